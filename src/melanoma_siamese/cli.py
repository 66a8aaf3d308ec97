"""Command line: parse, load the configuration, call the pieces, report. Exit 2 on bad input."""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

from .checkpoint import CheckpointError
from .config import ConfigError, Config, load_config
from .data.metadata import DataError
from .engine import Interrupted
from .models import WeightsError

PACKAGED_CONFIGS = ("default", "reference", "plain-ce", "default-no-head", "demo")
# Modules that add their own sub-commands: each has add_parser(subparsers, common) and sets `handler`.
COMMAND_MODULES = ("compare", "predict", "export", "serve", "bench")


def config_path(name: Optional[str]) -> Path:
    """A file path, or the name of a packaged recipe (default, reference, plain-ce, demo)."""
    name = name or "default"
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".yaml")
    if stem in PACKAGED_CONFIGS and not path.exists() and len(path.parts) <= 2:
        return Path(str(resources.files("melanoma_siamese") / "configs" / f"{stem}.yaml"))
    raise ConfigError(f"configuration file {name} does not exist; give a YAML path or one of "
                      f"{', '.join(PACKAGED_CONFIGS)}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML file or packaged name (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one configuration value, e.g. --set model.backbone=resnet18 (repeatable)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    parser.add_argument("--seed", type=int, help="seed of the split, sampling and initialisation")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _data_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--data", type=Path, help="dataset folder (Kaggle 256x256, original ISIC 2020, or isic-cli)")
    parser.add_argument("--metadata", type=Path, help="metadata CSV for any other layout (with --images)")
    parser.add_argument("--images", type=Path, help="image folder for --metadata")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="drop missing or undecodable images (listed in the run folder) instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melanoma-siamese", description=(
        "Siamese metric learning for melanoma vs benign on dermoscopic images: train, evaluate, compare."))
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="validate data, split by patient, train both stages, evaluate")
    _data_args(train, True)
    train.add_argument("--out", type=Path, help="run folder (default runs/<time>)")
    train.add_argument("--stage", choices=("all", "siamese", "classifier"), default="all",
                       help="classifier: reuse the run's siamese.pth and split, train stage 2 only")
    train.add_argument("--resume", type=Path, metavar="RUN",
                       help="continue RUN from its last completed epoch (its config, split and data)")
    _common(train)

    evaluate = sub.add_parser("evaluate", help="re-score a run on its saved split, or on another dataset")
    evaluate.add_argument("--run", type=Path, required=True, help="run folder written by train")
    _data_args(evaluate, False)
    evaluate.add_argument("--tta", action="store_true", help="average the 8 flips/transposes of each image")
    _common(evaluate)

    demo = sub.add_parser("demo", help="generate a synthetic dataset, train and evaluate on it (a few minutes on CPU)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--images", type=int, default=480, help="number of generated images")
    _common(demo)

    synth = sub.add_parser("synth", help="write a synthetic dataset in the Kaggle ISIC layout")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--images", type=int, default=400)
    synth.add_argument("--melanoma-fraction", type=float, default=0.25)
    synth.add_argument("--size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)

    from importlib import import_module

    for name in COMMAND_MODULES:
        import_module(f".{name}", __package__).add_parser(sub, _common)
    return parser


def resolve_config(args: argparse.Namespace, base: Optional[Path] = None) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"runtime.device={args.device}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"runtime.seed={args.seed}")
    if getattr(args, "no_progress", False):
        overrides.append("runtime.progress=false")
    if getattr(args, "skip_bad_images", False):
        overrides.append("data.skip_bad_images=true")
    if getattr(args, "tta", False):
        overrides.append("evaluation.tta=true")
    path = base if base is not None else config_path(args.config)
    return load_config(path, overrides)


def _source(args: argparse.Namespace):
    from .train import DataSource

    if args.data is None and args.metadata is None:
        raise ConfigError("give --data DIR (or --metadata CSV --images DIR)")
    return DataSource(args.data, args.metadata, args.images)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import run_train

    if args.resume is not None:
        run = args.resume
        config = _run_config(args, run, "train --resume")
        source = _source(args) if (args.data or args.metadata) else _saved_source(run)
        run_train(config, source, run, args.stage, resume=True)
        print(f"Run folder: {run}")
        return 0
    config = resolve_config(args)
    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    run_train(config, _source(args), out, args.stage)
    print(f"Run folder: {out}")
    return 0


def _run_config(args: argparse.Namespace, run: Path, command: str) -> Config:
    """A run's own saved configuration, with this command's --set overrides."""
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a run folder: config.yaml is missing (train writes it)")
    if args.config:
        raise ConfigError(f"{command} uses the run's own config.yaml; --config is not accepted (use --set)")
    return resolve_config(args, base=run / "config.yaml")


def _saved_source(run: Path):
    from .train import DataSource

    saved = json.loads((run / "run.json").read_text())["source"]
    return DataSource(*(Path(saved[k]) if saved[k] else None for k in ("data", "metadata", "images")))


def cmd_evaluate(args: argparse.Namespace, log=print) -> int:
    from .data.prepare import apply_saved_split
    from .engine import resolve_device
    from .evaluate import evaluate_run
    from .train import load_source

    run = args.run
    config = _run_config(args, run, "evaluate")
    external = args.data is not None or args.metadata is not None
    if external:
        source = _source(args)
    else:
        source = _saved_source(run)
    prepared = load_source(config, source, config.runtime.progress, log)
    if not external:
        apply_saved_split(prepared, run / "split.csv")
    device = resolve_device(config.runtime.device)
    log(f"Device: {device}")
    evaluate_run(run, config, prepared, device, log,
                 external=(source.data or source.metadata) if external else None)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import make_synthetic_dataset

    make_synthetic_dataset(args.out, args.images, args.melanoma_fraction, size=args.size, seed=args.seed)
    print(f"Wrote {args.images} synthetic images in the Kaggle ISIC layout to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .data.synth import make_synthetic_dataset
    from .train import DataSource, run_train

    config = resolve_config(args, base=config_path(args.config or "demo"))
    data_dir = args.out / "data"
    if not (data_dir / "train-metadata.csv").is_file():
        make_synthetic_dataset(data_dir, args.images, 0.25, size=config.data.image_size, seed=config.runtime.seed)
        print(f"Generated {args.images} synthetic images in {data_dir}")
    start = time.time()
    metrics = run_train(config, DataSource(data=data_dir), args.out)
    # Re-score from the saved files, as `evaluate --run` does.
    evaluate_args = build_parser().parse_args(["evaluate", "--run", str(args.out), "--no-progress"])
    print("\nRe-scoring the saved run with `melanoma-siamese evaluate --run` ...")
    cmd_evaluate(evaluate_args, log=lambda line: None)
    trained = json.loads((args.out / "metrics.json").read_text())
    untrained = metrics["baseline"]["untrained_encoder_test_knn_auc"]
    print(f"\nDemo finished in {time.time() - start:.0f} s. Run folder: {args.out}")
    print(f"ROC AUC: {trained['test']['roc_auc']:.2f} (trained encoder + MLP, test part); "
          f"kNN vote on the trained embedding: {trained['knn']['test']['roc_auc']:.2f}; "
          f"kNN vote on the untrained encoder's embedding: {untrained:.2f}")
    return 0


def keep_freed_memory() -> None:
    """Have glibc keep freed memory in the process, as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... would.

    glibc serves allocations over 32 MB from fresh pages and returns them on free. On virtual machines
    that hand freed memory back to the host, the first write to fresh pages is slow, and every large
    batch tensor pays it on every batch: `bench` measured batched augmentation at half speed here.
    Explicit MALLOC_* variables in the environment win.
    """
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": cmd_train, "evaluate": cmd_evaluate, "demo": cmd_demo, "synth": cmd_synth}
    try:
        return handlers[args.command](args) if args.command in handlers else args.handler(args)
    except Interrupted as exc:
        signum = int(exc.args[0]) if exc.args else 15
        print(f"Interrupted by signal {signum}: the last completed epoch is kept in RUN/state/siamese_last.pth; "
              "continue with: melanoma-siamese train --resume RUN", file=sys.stderr)
        return 128 + signum
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except (ConfigError, WeightsError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except RuntimeError as exc:
        if "CUDA" not in str(exc) and "cuda" not in str(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
