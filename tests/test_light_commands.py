"""Commands that need no model answer without importing torch; errors map to exit codes, real failures
keep their traceback."""
import subprocess
import sys

import pytest

from melanoma_siamese import cli

LIGHT = [["--help"], ["--version"], ["predict", "--help"], ["pair", "--help"], ["export", "--help"], ["serve", "--help"],
         ["compare", "--help"], ["train", "--help"], ["evaluate", "--help"], ["bench", "--help"],
         ["predict", "--bogus"],
         ["train", "--stage", "nonsense"]]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", LIGHT, ids=" ".join)
def test_help_and_option_errors_do_not_import_torch(argv):
    out = _run("import sys\nfrom melanoma_siamese.cli import main\ntry:\n    main(%r)\nexcept SystemExit as exc:\n"
               "    code = exc.code\nprint('torch imported' if 'torch' in sys.modules else 'no torch', code)" % argv)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == f"no torch {0 if argv[-1] in ('--help', '--version') else 2}"


def test_the_short_list_of_commands_equals_what_each_module_declares():
    assert cli.build_parser(()).format_help() == cli.build_parser().format_help()
    for name in cli.MODULE_COMMANDS:
        assert cli.build_parser([name]).format_help() == cli.build_parser().format_help()


def test_named_command():
    assert cli.named_command(["predict", "--run", "r", "x.jpg"]) == ["predict"]
    assert cli.named_command(["--help"]) == [] and cli.named_command(["train", "--help"]) == []


def test_a_cuda_error_shows_its_traceback_and_exits_1(tmp_path):
    # An out-of-memory or device assert is a real failure, not bad input: it must not become a one-line exit 2.
    out = _run("import sys\nfrom melanoma_siamese import cli\n"
               "def boom(args):\n    raise RuntimeError('CUDA error: device-side assert triggered')\n"
               f"cli.cmd_synth = boom\nsys.exit(cli.main(['synth', '--out', {str(tmp_path)!r}]))")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "CUDA error: device-side assert triggered" in out.stderr


def test_a_folder_that_is_not_a_run_is_exit_2_with_the_reason(tmp_path, capsys):
    for command in (["evaluate", "--run", str(tmp_path)], ["export", "--run", str(tmp_path)],
                    ["pair", "--run", str(tmp_path), "a.jpg", "b.jpg"], ["train", "--resume", str(tmp_path)]):
        assert cli.main(command) == 2, command
        assert "not a run folder" in capsys.readouterr().err, command
