"""Every melanoma-siamese command in the README parses with the real parser (behaviour is tested elsewhere)."""
import re
import shlex
from pathlib import Path

import pytest

from melanoma_siamese.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    out = []
    for line in lines:
        if " -m melanoma_siamese " in line and line.startswith("torchrun"):
            line = "melanoma-siamese " + line.split(" -m melanoma_siamese ", 1)[1]
        if line.startswith(("melanoma-siamese ", "python -m melanoma_siamese")):
            out.append(line)
    return out


def _fill(command: str) -> list[str]:
    command = re.sub(r"\[([^\]]*)\]", r"\1", command)  # optional parts: keep them
    command = command.replace("section.key=value ...", "siamese.epochs=1").replace("...", "")
    words = shlex.split(command)
    return words[1:] if words[0] == "melanoma-siamese" else words[3:]


def test_readme_has_both_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", _readme_commands())
def test_readme_command_parses(command):
    words = _fill(command)
    if words == ["--help"]:
        return
    build_parser().parse_args([w for w in words if w])


def test_experiment_script_commands_parse():
    """The README's comparison script: run it with `echo` for the binary, parse what it would run."""
    import subprocess

    out = subprocess.run(["bash", str(ROOT / "experiments" / "compare_ham.sh")], capture_output=True, text=True,
                         env={"BIN": "echo", "SEEDS": "0 1", "PATH": "/usr/bin:/bin"}, cwd=ROOT, check=True)
    commands = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("compare")]
    assert len(commands) == 4
    for words in commands:
        args = build_parser().parse_args(words)
        assert args.configs[0] == "configs/default.yaml" and "configs/plain-ce.yaml" in args.configs


def test_gpu_experiment_script_commands_parse(tmp_path):
    """The GPU variant: one compare per (prevalence, seed) in parallel, then table-only merges."""
    import subprocess

    out = subprocess.run(["bash", str(ROOT / "experiments" / "compare_ham_gpu.sh")], capture_output=True, text=True,
                         env={"PY": "echo", "RUNS": str(tmp_path), "SEEDS": "0 1", "PATH": "/usr/bin:/bin"},
                         cwd=ROOT, check=True)
    logs = sorted((tmp_path / "parts").glob("*.log"))
    assert [p.name for p in logs] == ["gpu-ham-5pct-seed0.log", "gpu-ham-5pct-seed1.log", "gpu-ham-seed0.log",
                                      "gpu-ham-seed1.log"]
    lines = [p.read_text() for p in logs] + [line for line in out.stdout.splitlines() if "compare" in line]
    assert len(lines) == 6
    for line in lines:
        words = shlex.split(line)
        assert words[:2] == ["-m", "melanoma_siamese"]
        args = build_parser().parse_args(words[2:])
        assert args.configs[0] == "configs/default.yaml" and args.device == "cuda"
    assert sum("--table-only" in line for line in lines) == 2


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_clinical_comparison_script_commands_parse(tmp_path, device):
    """Issue 11's comparison: four recipes (metadata, image only, the 5-fold ensemble, plain CE) per seed."""
    import subprocess

    out = subprocess.run(["bash", str(ROOT / "experiments" / "compare_ham_clinical.sh")], capture_output=True,
                         text=True, env={"PY": "echo", "RUNS": str(tmp_path), "SEEDS": "0 1", "DEVICE": device,
                                         "PATH": "/usr/bin:/bin"}, cwd=ROOT, check=True)
    lines = [p.read_text() for p in sorted((tmp_path / "parts").glob("*.log"))]
    lines += [line for line in out.stdout.splitlines() if "compare" in line]
    assert len(lines) == 3 and sum("--table-only" in line for line in lines) == 1
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[2:])
        assert args.configs == ["configs/default-clinical.yaml", "configs/default.yaml",
                                "configs/default-clinical-5fold.yaml", "configs/plain-ce.yaml"]
        assert args.device == device
        assert ("data.image_size=128" in args.overrides) == (device == "cuda")
