"""Packaging that fits the user's machine: tested floors, optional extras whose absence is said plainly, the licence
as current setuptools expects it, and the set-up commands' installs."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from melanoma_siamese.cli import main
from melanoma_siamese.errors import ConfigError

from helpers import serve_process
from inference_run import image_files, shared_run

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floors_module():
    spec = importlib.util.spec_from_file_location("floor_constraints", ROOT / "tools" / "floor_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floor_constraints_pin_every_declared_lower_bound(capsys):
    floors = _floors_module()
    assert floors.main([str(ROOT / "pyproject.toml"), "--extras", "test"]) == 0
    pins = dict(line.split("==") for line in capsys.readouterr().out.split())
    project = PYPROJECT["project"]
    declared = [r for r in project["dependencies"]]
    for extra, reqs in project["optional-dependencies"].items():
        declared += [r for r in reqs if not r.startswith("melanoma-siamese")]
    for req in declared:
        name, bound = req.split(">=")
        assert pins[name.lower()] == bound, req
    # The test extra names other extras of the package: their requirements are followed.
    assert pins["torch"] == "2.2" and "grad-cam" in pins and "huggingface_hub" in pins and "onnx" in pins


def test_floor_constraints_name_an_unknown_extra():
    with pytest.raises(SystemExit, match="no extra 'nope'.*test"):
        _floors_module().requirements(PYPROJECT["project"], ["nope"])


@pytest.mark.slow
def test_licence_is_an_spdx_expression_and_the_install_does_not_warn(tmp_path):
    project = PYPROJECT["project"]
    assert project["license"] == "MIT" and (ROOT / project["license-files"][0]).is_file()
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]
    # What `pip install` does (an isolated build with the declared setuptools), shown verbosely, installing nothing.
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                           "--report", str(report), "-v", str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deprecat" not in (done.stdout + done.stderr).lower()
    metadata = json.loads(report.read_text())["install"][0]["metadata"]
    assert metadata["license_expression"] == "MIT" and metadata["license_file"] == ["LICENSE"]


def test_readme_python_version_and_version_flag_match_pyproject():
    version = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert f"Python {version}+ (as `requires-python` says)" in (ROOT / "README.md").read_text()
    out = subprocess.run([sys.executable, "-m", "melanoma_siamese", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and PYPROJECT["project"]["version"] in out.stdout


def test_make_demo_installs_the_package_alone_and_make_test_the_test_extras():
    def planned(target: str) -> str:
        # -n: print what would run, run nothing; -B: as from a fresh clone.
        return subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=60).stdout

    demo, test = planned("demo"), planned("test")
    assert "pip install -e ." in demo and "[test]" not in demo and "melanoma-siamese demo" in demo
    assert "pip install -e '.[test]'" in test and "pytest" in test
    floors = planned("floors")
    assert "floor_constraints.py" in floors and "-c .venv-floors/constraints.txt" in floors


def test_onnxruntime_or_the_gpu_build_whichever_is_installed():
    from melanoma_siamese.inference import onnx_providers

    both = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(both, "cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(both, "cpu") == ["CPUExecutionProvider"]
    assert onnx_providers(["CPUExecutionProvider"], "cuda") == ["CPUExecutionProvider"]


def test_without_onnxruntime_the_engine_says_what_to_install(monkeypatch, tmp_path):
    from melanoma_siamese.inference import onnx_scorer

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match="onnxruntime or onnxruntime-gpu.*pip install onnxruntime"):
        onnx_scorer(tmp_path / "model.onnx")


def test_export_without_onnxruntime_writes_the_model_and_says_it_is_unchecked(tiny_data, tmp_path_factory,
                                                                              tmp_path, monkeypatch, capsys):
    run = shared_run(tiny_data, tmp_path_factory)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "m.onnx"
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert out.is_file() and "not checked against PyTorch" in captured.err and "largest" not in captured.out


def test_predict_saliency_without_grad_cam_stops_before_any_work(tiny_data, tmp_path_factory, tmp_path,
                                                                 monkeypatch, capsys):
    run = shared_run(tiny_data, tmp_path_factory)
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    csv = tmp_path / "p.csv"
    assert main(["predict", "--run", str(run), str(image_files(tiny_data)[0]), "--saliency", str(tmp_path / "maps"),
                 "--csv", str(csv)]) == 2
    assert "melanoma-siamese[gradcam]" in capsys.readouterr().err and not csv.exists()


@pytest.mark.slow
def test_serve_without_grad_cam_answers_without_a_map_and_the_page_says_so(tiny_data, tmp_path_factory, tmp_path):
    """A real server in a Python where the Grad-CAM package cannot be imported (as when the extra is absent)."""
    import httpx

    run = shared_run(tiny_data, tmp_path_factory)
    blocked = "import sys; sys.modules['pytorch_grad_cam'] = None; from melanoma_siamese.cli import main; " \
              "sys.exit(main(sys.argv[1:]))"
    with serve_process(run, tmp_path / "serve.log", launcher=("-c", blocked)) as (_, base):
        with open(image_files(tiny_data)[0], "rb") as f:
            answer = httpx.post(base + "/api/predict?saliency=true", files={"file": ("a.jpg", f, "image/jpeg")},
                                timeout=60)
        page = httpx.get(base + "/", timeout=10).text
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["saliency_png"] is None and "Grad-CAM package is not installed" in body["saliency_note"]
    assert np.isfinite(body["probability"]) and body["decision"] in ("melanoma", "not melanoma")
    # The page shows the note where the map would be.
    assert '$("saliency-caption").textContent = answer.saliency_note' in page
