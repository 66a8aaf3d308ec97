"""`melanoma-siamese bench` end to end on a tiny configuration: the report's structure and counts, not timings."""
import json
import math

import pytest
import torch

from melanoma_siamese.bench_training import TimedBatches
from melanoma_siamese.cli import main

TINY = ["--images", "48", "--size", "64", "--backbone", "resnet18", "--pipeline-images", "96", "--pass-images", "8",
        "--embed-batch", "8", "--embed-batches", "1", "--memory-steps", "1", "--memory-batch", "8",
        "--predict-images", "16", "--predict-batch", "8", "--serve-requests", "8"]


def test_bench_reports_every_measurement(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"] == torch.__version__
    assert report["machine"]["torch_threads"] >= 1 and isinstance(report["machine"]["malloc_env"], dict)
    rows = {row["name"].split(",")[0].split(" at ")[0]: row for row in report["rows"]}
    assert set(rows) == {"cache build (decode every JPEG once)", "input pipeline", "backbone passes per training "
                         "image per epoch", "embedding extraction vs model-only forward", "anonymous RSS",
                         "per-image CPU latency", "predict on 16 JPEG files vs model-only", "model alone", "serve",
                         "serve p95 latency", "predict's own work (model left out) vs model-only"}
    for start in ("predict on", "predict's own work"):  # each engine: predict, and predict without the model
        assert [r["name"].split(", ")[1] for r in report["rows"] if r["name"].startswith(start)] == \
            ["torch", "onnxruntime"]
    clients = [r["name"].split(", ")[1] for r in report["rows"] if r["name"].startswith("serve, ")]
    assert clients == ["1 concurrent client(s)", "8 concurrent client(s)", "32 concurrent client(s)"]
    ceiling = rows["model alone"]  # what batching can gain at most here, beside the serve rows it bounds
    assert ceiling["name"] == "model alone, batch of 32 vs one image per pass, CPU" and ceiling["passed"] is None
    assert ceiling["ratio"] == pytest.approx(ceiling["ours"] / ceiling["baseline"])
    latency = rows["per-image CPU latency"]
    assert latency["unit"] == "ms" and latency["passed"] is None
    for row in report["rows"]:
        assert math.isfinite(row["ours"]) and row["ours"] > 0, row
        if row["passed"] is not None:
            assert math.isfinite(row["baseline"]) and row["baseline"] > 0, row
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0 and row["target"], row
    passes = rows["backbone passes per training image per epoch"]
    assert passes["baseline"] == 3.0 and passes["ours"] == 1.0 and passes["passed"] is True
    assert report["all_passed"] == all(r["passed"] for r in report["rows"] if r["passed"] is not None)
    printed = capsys.readouterr().out
    assert "PASS" in printed and "torch threads" in printed and "MALLOC_" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_gpu_without_cuda_exits_2(capsys):
    assert main(["bench", "--gpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_rejects_sizes_it_cannot_measure(capsys):
    assert main(["bench", "--memory-scale", "2", "--pass-images", "6"]) == 2
    err = capsys.readouterr().err
    assert "--memory-scale" in err and "--pass-images" in err


def test_timed_batches_count_only_after_warmup():
    timed = TimedBatches(([0] * n for n in (5, 3, 2, 4)), warmup=1, count=len)
    assert sum(len(b) for b in timed) == 14
    assert timed.images == 9 and timed.seconds > 0 and timed.rate > 0
    empty = TimedBatches([[0]], warmup=1, count=len)
    list(empty)
    with pytest.raises(RuntimeError, match="warm-up"):
        empty.rate


@pytest.mark.slow
def test_gpu_bench_code_path_runs_on_a_cpu(tmp_path, monkeypatch):
    """bench --gpu's measurements, tried on the CPU (no GPU here): every row is made and finite."""
    import melanoma_siamese.bench_gpu as bench_gpu
    from melanoma_siamese.cli import build_parser

    monkeypatch.setattr(bench_gpu, "GPU_WARMUP", 2)
    args = build_parser(["bench"]).parse_args(
        ["bench", "--gpu", "--size", "32", "--backbone", "resnet18", "--gpu-images", "64", "--gpu-batch", "16",
         "--gpu-reference-batches", "1", "--predict-images", "16", "--predict-batch", "8", "--serve-requests", "8",
         "--no-compile"])
    rows = bench_gpu.run_gpu(args, tmp_path, 1, torch.device("cpu"))
    names = [r.name for r in rows]
    assert "distinct training images/s, ours vs the reference's way" in names
    assert any(n.startswith("predict on 16 JPEG files vs model-only, torch, CPU") for n in names)
    assert "predict's own work (model left out) vs model-only, torch, CPU" in names
    assert sum(n.startswith("serve") for n in names) == 4
    assert "model alone, batch of 32 vs one image per pass, CPU" in names
    for r in rows:
        assert r.ours is None or math.isfinite(r.ours), r
