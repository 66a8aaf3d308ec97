"""Command line: parse, dispatch, and turn the package's errors into messages and exit codes (2: bad input).

Each command's module is imported only when that command is named, so `--help`, `<command> --help` and a
mistyped option answer without importing torch. Real failures (a CUDA error, a bug) keep their traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from importlib import import_module
from pathlib import Path
from typing import Collection, Optional, Sequence

from .allocator import keep_freed_memory
from .config import Config
from .errors import CheckpointError, ConfigError, DataError, Interrupted, WeightsError
# PACKAGED_CONFIGS is re-exported: callers and tests have long imported it, with config_path, from here.
from .options import PACKAGED_CONFIGS, add_common, add_data, config_path, overrides_of, resolve_config  # noqa: F401
from .runfolder import RunFolder

# Commands declared in their own module (add_parser(sub) adds the sub-command and sets `handler`), with
# the line `melanoma-siamese --help` lists for them without importing the module.
MODULE_COMMANDS = {
    "compare": ("compare", "train recipes on one split over several seeds; write a table"),
    "predict": ("predict", "melanoma probability, decision and similar known cases for images"),
    "pair": ("predict", "embedding distance of two images, against validation pair distances"),
    "export": ("export", "write encoder + classifier as one ONNX model (or a folder to share: --format hf) and check it"),
    "serve": ("serve", "web page and HTTP API over a trained run"),
    "bench": ("bench_options", "measure input pipeline, passes per image, embedding speed and memory side by side on "
              "this machine (--gpu: training throughput on a CUDA GPU)"),
}


def _own_commands(sub) -> None:
    train = sub.add_parser("train", help="validate data, split by patient, train both stages, evaluate")
    add_data(train)
    train.add_argument("--out", type=Path, help="run folder (default runs/<time>)")
    train.add_argument("--stage", choices=("all", "siamese", "classifier"), default="all",
                       help="classifier: reuse the run's trained encoder and split, train stage 2 only")
    train.add_argument("--resume", type=Path, metavar="RUN",
                       help="continue RUN from its last completed epoch (its config, split and data); a K-fold "
                            "ensemble keeps its finished members and continues the interrupted one")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (its files are removed only once the new run's data "
                            "and weights have been checked)")
    train.add_argument("--folds", type=int, metavar="K",
                       help="train a K-fold ensemble (data.folds=K): K models, each validated on one patient-"
                            "grouped fold of the training part, averaged; the validation and test parts stay")
    add_common(train)
    train.set_defaults(handler=cmd_train)

    evaluate = sub.add_parser("evaluate", help="re-score a run on its saved split, or on another dataset")
    evaluate.add_argument("--run", type=Path, required=True, help="run folder written by train")
    add_data(evaluate)
    evaluate.add_argument("--tta", action="store_true", help="average the 8 flips/transposes of each image")
    evaluate.add_argument("--prevalence", type=float, metavar="P",
                          help="share of melanoma in the population the `probability` column is for, e.g. for an "
                               "external set (default: the training part's)")
    add_common(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    demo = sub.add_parser("demo", help="generate a synthetic dataset, train and evaluate on it (a few minutes on CPU)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--images", type=int, default=480, help="number of generated images")
    add_common(demo)
    demo.set_defaults(handler=cmd_demo)

    synth = sub.add_parser("synth", help="write a synthetic dataset in the Kaggle ISIC layout")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--images", type=int, default=400)
    synth.add_argument("--melanoma-fraction", type=float, default=0.25)
    synth.add_argument("--size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=cmd_synth)


def build_parser(commands: Optional[Collection[str]] = None) -> argparse.ArgumentParser:
    """The whole parser; with `commands`, only those are declared in full (their modules imported), and
    the others are listed by name and help line."""
    parser = argparse.ArgumentParser(prog="melanoma-siamese", description=(
        "Siamese metric learning for melanoma vs benign on dermoscopic images: train, evaluate, compare."))
    from . import __version__

    parser.add_argument("--version", action="version", version=f"melanoma-siamese {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _own_commands(sub)
    wanted = {MODULE_COMMANDS[c][0] for c in (MODULE_COMMANDS if commands is None else commands)
              if c in MODULE_COMMANDS}
    declared: set[str] = set()
    for name, (module, help_line) in MODULE_COMMANDS.items():
        if module not in wanted:
            sub.add_parser(name, help=help_line)
        elif module not in declared:
            import_module(f".{module}", __package__).add_parser(sub)
            declared.add(module)
    return parser


def named_command(argv: Sequence[str]) -> list[str]:
    """The sub-command in argv (the first word that is not an option), as a list of zero or one."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return [first] if first in MODULE_COMMANDS else []


def _source(args: argparse.Namespace):
    from .train import DataSource

    if args.data is None and args.metadata is None:
        raise ConfigError("give --data DIR (or --metadata CSV --images DIR)")
    return DataSource(args.data, args.metadata, args.images)


def _run_config(args: argparse.Namespace, run: RunFolder, command: str) -> Config:
    """A run's own saved configuration, with this command's --set overrides."""
    run.require_trained()
    if args.config:
        raise ConfigError(f"{command} uses the run's own {run.config.name}; --config is not accepted (use --set)")
    return run.read_config(overrides_of(args))


def _data_of(args: argparse.Namespace, run: RunFolder):
    """The data named on the command line, else the data the run was trained on."""
    from .train import DataSource

    return _source(args) if (args.data or args.metadata) else DataSource(**run.source())


def _refuse_mixing(run: RunFolder, args: argparse.Namespace) -> None:
    """A new run written over an old one would leave some of the old files beside the new (its models, when the
    new one stops early), and a later command would read the mix without a word: ask what is meant."""
    owned = run.owned()
    if args.stage == "classifier" or args.overwrite or not owned:
        return
    found = ", ".join(p.name for p in owned[:5])
    if not run.holds_run():
        raise ConfigError(f"--out {run.root} is not a run folder but holds names a run writes ({found}); a run "
                          "would write among them. Give a new or empty --out folder (or --overwrite to write there "
                          "anyway: nothing that is not a run's is removed)")
    raise ConfigError(f"--out {run.root} already holds a run ({found}, ...). Give a new --out folder; or --resume "
                      f"{run.root} to continue it; or --stage classifier to retrain its classifier on its encoder; or "
                      "--overwrite to replace it (its files are removed only once the new run's data and weights "
                      "have been checked)")


def cmd_train(args: argparse.Namespace) -> int:
    from .folds import run_training

    if args.resume is not None:
        if args.folds is not None:
            raise ConfigError("train --resume continues the run as it was configured; --folds is not accepted "
                              f"(the run's own: data.folds in {RunFolder(args.resume).config})")
        run = RunFolder(args.resume)
        config = _run_config(args, run, "train --resume")
        run_training(config, _data_of(args, run), run.root, args.stage, resume=True)
        print(f"Run folder: {run.root}")
        return 0
    config = resolve_config(args)
    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    _refuse_mixing(RunFolder(out), args)
    run_training(config, _source(args), out, args.stage)
    print(f"Run folder: {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace, log=print) -> int:
    from .data.prepare import apply_saved_split
    from .evaluate import evaluate_run
    from .runtime import resolve_device
    from .train import load_source

    run = RunFolder(args.run)
    config = _run_config(args, run, "evaluate")
    external = args.data is not None or args.metadata is not None
    source = _data_of(args, run)
    prepared = load_source(config, source, config.runtime.progress, log)
    if not external:
        apply_saved_split(prepared, run.split)
    device = resolve_device(config.runtime.device)
    log(f"Device: {device}")
    evaluate_run(run, config, prepared, device, log, external=(source.data or source.metadata) if external else None)
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
    earlier = RunFolder(args.out)
    if earlier.holds_run() and (earlier.run_info().get("source") or {}).get("data") != str(data_dir.resolve()):
        raise ConfigError(f"--out {args.out} holds a run that is not a demo's (trained on other data than "
                          f"{data_dir}); the demo would replace it. Give another --out")
    if not (data_dir / "train-metadata.csv").is_file():
        make_synthetic_dataset(data_dir, args.images, 0.25, size=config.data.image_size, seed=config.runtime.seed)
        print(f"Generated {args.images} synthetic images in {data_dir}")
    start = time.time()
    metrics = run_train(config, DataSource(data=data_dir), args.out)
    # Re-score from the saved files, as `evaluate --run` does.
    evaluate_args = build_parser(()).parse_args(["evaluate", "--run", str(args.out), "--no-progress"])
    print("\nRe-scoring the saved run with `melanoma-siamese evaluate --run` ...")
    cmd_evaluate(evaluate_args, log=lambda line: None)
    trained = RunFolder(args.out).read_metrics()
    untrained = metrics["baseline"]["untrained_encoder_test_knn_auc"]
    print(f"\nDemo finished in {time.time() - start:.0f} s. Run folder: {args.out}")
    print(f"ROC AUC: {trained['test']['roc_auc']:.2f} (trained encoder + MLP, test part); "
          f"kNN vote on the trained embedding: {trained['knn']['test']['roc_auc']:.2f}; "
          f"kNN vote on the untrained encoder's embedding: {untrained:.2f}")
    return 0


# The commands that run a model: their large tensors come back every batch.
MODEL_COMMANDS = ("train", "demo", "compare", "bench", "evaluate", "predict", "pair", "export", "serve")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(named_command(argv)).parse_args(argv)
    if args.command in MODEL_COMMANDS:
        # The server keeps freed memory too while it works, and hands it back once idle (serve.IDLE_TRIM_S).
        keep_freed_memory()
    try:
        return args.handler(args)
    except Interrupted as exc:
        signum = int(exc.args[0]) if exc.args else 15
        print(f"Interrupted by signal {signum}: the last completed epoch is kept in {RunFolder(Path('RUN')).state()}; "
              "continue with: melanoma-siamese train --resume RUN", file=sys.stderr)
        return 128 + signum
    except (ConfigError, DataError, WeightsError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
