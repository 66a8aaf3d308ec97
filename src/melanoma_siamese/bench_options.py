"""`bench`'s options, apart from the bench itself so that `bench --help` does not import torch."""
from __future__ import annotations

import argparse
from pathlib import Path


def _description() -> str:
    # The bench module's docstring, read without importing the module (and torch with it).
    import ast
    from importlib import resources

    source = (resources.files("melanoma_siamese") / "bench.py").read_text(encoding="utf-8")
    return ast.get_docstring(ast.parse(source)) or ""


def _run(args: argparse.Namespace) -> int:
    from .bench import cmd_bench

    return cmd_bench(args)


def add_parser(sub) -> None:
    parser = sub.add_parser("bench", help="measure input pipeline, passes per image, embedding speed and memory "
                            "side by side on this machine (--gpu: training throughput on a CUDA GPU)",
                            description=_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=800, help="generated images (JPEGs and their cache)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--backbone", default="resnet50", help="torchvision backbone, e.g. resnet50 or resnet18")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the bench (default: the usable cores that other work leaves idle, "
                        "judged by the load average; at least 1)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of the reference's way (default: the usable cores)")
    parser.add_argument("--pipeline-images", type=int, default=1920,
                        help="images each input pipeline delivers while timed (after its warm-up)")
    parser.add_argument("--pass-images", type=int, default=8,
                        help="training images of the short epoch that counts backbone passes (a multiple of 4)")
    parser.add_argument("--embed-batch", type=int, default=32, help="batch size of both embedding measurements")
    parser.add_argument("--embed-batches", type=int, default=3, help="timed batches of each embedding measurement")
    parser.add_argument("--memory-scale", type=int, default=4, help="the larger dataset of the memory check is "
                        "this many times --images (at least 4)")
    parser.add_argument("--memory-steps", type=int, default=2, help="training steps before memory is read")
    parser.add_argument("--memory-batch", type=int, default=16, help="batch size of those training steps")
    parser.add_argument("--gpu", action="store_true", help="measure training throughput on a CUDA GPU instead")
    parser.add_argument("--gpu-images", type=int, default=20000,
                        help="--gpu: images of the uint8 cache generated on the GPU (one epoch of ours)")
    parser.add_argument("--gpu-batch", type=int, default=128, help="--gpu: training batch size of ours and of "
                        "the model-only step (the reference uses its own 32 triplets)")
    parser.add_argument("--gpu-reference-batches", type=int, default=60,
                        help="--gpu: timed batches of the reference's way")
    parser.add_argument("--predict-images", type=int, default=1000,
                        help="JPEG files `predict` reads in the prediction row (the generated ones, repeated)")
    parser.add_argument("--predict-batch", type=int, default=64, help="predict's batch size in that row")
    parser.add_argument("--serve-requests", type=int, default=64,
                        help="requests at each level of concurrency (1, 8, 32 clients) of the serving rows")
    parser.add_argument("--no-serving", action="store_true", help="skip the prediction and serving rows")
    parser.add_argument("--no-compile", action="store_true", help="--gpu: skip the torch.compile measurements")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="keep the generated data here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON")
    parser.set_defaults(handler=_run)
