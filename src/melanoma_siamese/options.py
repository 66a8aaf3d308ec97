"""The options several commands share, and the configuration they resolve to. Imports no torch."""
from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Optional

from .config import Config, load_config
from .errors import ConfigError

PACKAGED_CONFIGS = ("default", "reference", "plain-ce", "default-no-head", "demo")


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


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML file or packaged name (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one configuration value, e.g. --set model.backbone=resnet18 (repeatable)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (default auto)")
    parser.add_argument("--seed", type=int, help="seed of the split, sampling and initialisation")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="dataset folder (Kaggle 256x256, original ISIC 2020, or isic-cli)")
    parser.add_argument("--metadata", type=Path, help="metadata CSV for any other layout (with --images)")
    parser.add_argument("--images", type=Path, help="image folder for --metadata")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="drop missing or undecodable images (listed in the run folder) instead of stopping")


def overrides_of(args: argparse.Namespace) -> list[str]:
    """`--set` values, and the dedicated options that are shorthands for configuration keys."""
    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"runtime.device={args.device}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"runtime.seed={args.seed}")
    if getattr(args, "no_progress", False):
        overrides.append("runtime.progress=false")
    if getattr(args, "folds", None) is not None:
        overrides.append(f"data.folds={args.folds}")
    if getattr(args, "skip_bad_images", False):
        overrides.append("data.skip_bad_images=true")
    if getattr(args, "tta", False):
        overrides.append("evaluation.tta=true")
    if getattr(args, "prevalence", None) is not None:
        overrides.append(f"evaluation.prevalence={args.prevalence}")
    return overrides


def resolve_config(args: argparse.Namespace, base: Optional[Path] = None) -> Config:
    path = base if base is not None else config_path(args.config)
    return load_config(path, overrides_of(args))
