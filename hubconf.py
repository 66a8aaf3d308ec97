"""torch.hub entry point: `torch.hub.load(REPO_DIR, "melanoma_siamese", run=RUN, source="local")`.

RUN is a run folder written by `melanoma-siamese train`, or a folder written by `export --format hf`. The result
is a melanoma_siamese.api.Model: `predict(paths or arrays)`, `embed`, `nearest`, and `.module` (the torch module
of encoder + classifier). The package's dependencies must be installed (`pip install -e .` in the clone).
"""
dependencies = ["torch", "torchvision", "numpy", "PIL", "pandas", "sklearn", "yaml", "pytorch_metric_learning"]


def melanoma_siamese(run: str, device: str = "cpu", engine: str = "torch", prevalence: float | None = None):
    """A trained run ready to answer (see melanoma_siamese.api.load_run)."""
    import sys
    from importlib.util import find_spec
    from pathlib import Path

    if find_spec("melanoma_siamese") is None:
        # A clone that was not installed: the package lives in src/.
        sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from melanoma_siamese.api import load_run

    return load_run(run, device, engine, prevalence)
