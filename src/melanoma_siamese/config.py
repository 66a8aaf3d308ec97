"""Configuration: frozen dataclasses loaded from YAML, with `section.key=value` overrides.

A recipe (configs/*.yaml) says *what* is trained; `--set` says where and how big. The resolved
configuration is written into every run folder so a result can be re-run from it alone.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml


from .errors import ConfigError  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class AugmentConfig:
    rotation_degrees: float = 30.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    hflip: bool = True
    vflip: bool = True


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 256
    # The reference normalises with mean = std = 0.5 per channel.
    mean: float = 0.5
    std: float = 0.5
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    # Per-class size of the class-balanced test subsample (the reference used 136 + 136);
    # capped by the rarer class in the test part.
    balanced_test_per_class: int = 136
    # Subsample melanoma in the training part only, to simulate a rarer prevalence (None = keep all).
    train_melanoma_fraction: Optional[float] = None
    skip_bad_images: bool = False
    # Images refused before scoring (checked on the decoded original, before any resize): a shorter side
    # below min_image_side pixels (real dermoscopic photos have hundreds; the demo's generated ones 64),
    # or a grey-level standard deviation (0-255) below min_image_std: a blank or flat colour (the lowest
    # of the 2,000 real HAM10000 sample images is 7.3).
    min_image_side: int = 32
    min_image_std: float = 2.0
    # Seed of the split alone (None = runtime.seed); compare fixes it so every recipe and seed share one split.
    split_seed: Optional[int] = None
    cache_dir: Optional[str] = None
    # isic-cli downloads only: which kinds of `image_type` to keep, comma-separated, each matching the start
    # of the value ("dermoscopic", "clinical" for both clinical kinds, "tbp"), or "all".
    image_types: str = "dermoscopic"
    # K >= 2: K models, each trained on the training part less one patient-grouped, label-stratified fold and
    # validated on that fold (its out-of-fold predictions are saved), averaged as one ensemble; the
    # validation and test parts stay as for one model (ensemble.py). 0: one model.
    folds: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"
    # A torchvision model name, or timm:<name> (the timm extra; timm_backbone.py).
    # "imagenet" (torchvision's weights API, or timm's through the Hugging Face cache), "none" (random init), or a
    # path to a state dict file.
    pretrained: str = "imagenet"
    embedding_dim: int = 512


@dataclass(frozen=True)
class SiameseConfig:
    # Loss on the embeddings: triplet | contrastive | multi_similarity | supcon | arcface | none
    loss: str = "triplet"
    # "sampled": the reference's anchor/positive/negative triplets, three forward passes each.
    # Otherwise in-batch mining: all | semihard | hard | batch_hard | multi_similarity | none.
    mining: str = "sampled"
    margin: float = 1.0
    # Weight of a cross-entropy head on the embedding (0 = no head).
    ce_weight: float = 0.0
    # Class-weighted cross-entropy for the head (inverse class frequency in the training part).
    ce_class_weight: bool = True
    # Balanced batches (half melanoma, half not) for in-batch mining / the reference's 50:50 anchors.
    balanced: bool = True
    epochs: int = 100
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-4
    # Learning rate of the pretrained backbone relative to the new layers.
    backbone_lr_scale: float = 1.0
    weight_decay: float = 0.0
    # false: norm scales and biases are kept out of weight decay (optim.py); true: every parameter decays.
    decay_norm_and_bias: bool = False
    scheduler: str = "none"  # none | cosine (with linear warm-up)
    warmup_epochs: float = 0.0
    # Cap on training images passed through the backbone (a sampled triplet costs three); 0 = no cap.
    budget_images: int = 0
    # Images per epoch (0 = as many as the training part).
    epoch_images: int = 0
    patience: int = 10
    # val_loss | knn_auc | precision_at_1 | map_at_r
    monitor: str = "val_loss"
    # Reference images (from the training part) for validation retrieval metrics; 0 = all.
    val_reference_max: int = 4000


@dataclass(frozen=True)
class ClassifierConfig:
    # mlp: the reference's 512->256->64->2 MLP on frozen embeddings; head: the stage-1 CE head.
    kind: str = "mlp"
    epochs: int = 80
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    dropout: float = 0.4
    patience: int = 10
    # balanced: inverse-frequency class weights in the cross-entropy; none: plain.
    class_weight: str = "balanced"
    # What the classifier reads: [image] (the embedding), plus clinical (age, sex, site, each with a missing
    # code) and/or patient (distance to, and rank among, the same patient's other images; count): features.py.
    features: tuple = ("image",)
    # In training, each clinical variable (and, as often, all of them) is set to its missing code with this
    # probability, so "missing" means "unknown" and data without metadata scores as the image alone would.
    feature_dropout: float = 0.3


@dataclass(frozen=True)
class EvalConfig:
    # youden | sensitivity | fixed: how the decision threshold is chosen on the validation part.
    threshold: str = "youden"
    target_sensitivity: float = 0.9
    fixed_threshold: float = 0.5
    knn_k: int = 16
    bootstrap: int = 1000
    tta: bool = False
    # platt | temperature | none: the map from the classifier's score to a probability, fitted on the
    # validation part (see calibration.py for why Platt: class weights shift the score as well).
    calibration: str = "platt"
    # The prevalence the shown probability assumes (null = the training part's share of melanoma).
    prevalence: Optional[float] = None
    # Unfamiliar image: its mean cosine distance to the k nearest training images is above this quantile
    # of the same distance over the validation images.
    unfamiliar_k: int = 5
    unfamiliar_quantile: float = 0.99


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"
    seed: int = 0
    # DataLoader workers for per-sample pipelines (the reference's sampled triplets) and decoding.
    num_workers: int = 2
    progress: bool = True
    # In-batch recipes: gather uint8 batches from the cache and augment them as tensors on the device.
    batch_augment: bool = True
    # Keep the training images on the GPU when they fit (auto), or always stream from pinned memory (off).
    gpu_cache: str = "auto"
    # auto: bf16 autocast on GPUs that support it, else fp16 with a gradient scaler; fp32 on CPU.
    amp: str = "auto"
    # auto: channels_last on CUDA only.
    channels_last: str = "auto"
    compile: bool = False
    # TensorBoard event files in RUN/tensorboard: auto writes them when the `track` extra is installed,
    # on requires it, off never writes them.
    tensorboard: str = "auto"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    siamese: SiameseConfig = field(default_factory=SiameseConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


CHOICES = {
    "siamese.loss": ("triplet", "contrastive", "multi_similarity", "supcon", "arcface", "none"),
    "siamese.mining": ("sampled", "all", "semihard", "hard", "batch_hard", "multi_similarity", "none"),
    "siamese.optimizer": ("adam", "adamw"),
    "siamese.scheduler": ("none", "cosine"),
    "siamese.monitor": ("val_loss", "knn_auc", "precision_at_1", "map_at_r"),
    "classifier.kind": ("mlp", "head"),
    "classifier.class_weight": ("balanced", "none"),
    "evaluation.threshold": ("youden", "sensitivity", "fixed"),
    "evaluation.calibration": ("platt", "temperature", "none"),
    "runtime.device": ("auto", "cpu", "cuda"),
    "runtime.amp": ("auto", "off", "bf16", "fp16"),
    "runtime.gpu_cache": ("auto", "off"),
    "runtime.channels_last": ("auto", "on", "off"),
    "runtime.tensorboard": ("auto", "on", "off"),
}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'configuration'}: expected a mapping, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown configuration key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(prefix + k for k in known)}"
        )
    kwargs = {}
    for name, value in values.items():
        f = known[name]
        path = f"{where}.{name}" if where else name
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, path)
        else:
            kwargs[name] = _coerce(value, default, f.type, path)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, annotation: Any, path: str) -> Any:
    optional = "Optional" in str(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: a value is required (default {default!r})")
    target = type(default) if default is not None else None
    if target is None:
        text = str(annotation)
        target = float if "float" in text else int if "int" in text else str
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if target is tuple:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
            return tuple(items)
        raise ConfigError(f"{path}: expected a list of names, e.g. [image, clinical], got {value!r}")
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if target is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is str and isinstance(value, bool):  # YAML 1.1 reads a bare off/on/no/yes as a boolean
        return "on" if value else "off"
    if target is str and isinstance(value, (dict, list)):  # YAML reads "timm:" (a trailing colon) as a mapping
        raise ConfigError(f"{path}: expected a name, got {value!r}; a value ending in ':' names nothing "
                          "(e.g. model.backbone=timm:resnet50)")
    if target is str:
        return str(value)
    raise ConfigError(f"{path}: expected {target.__name__}, got {value!r}")


TIMM_PREFIX = "timm:"


def timm_name(backbone: str) -> Optional[str]:
    """The timm model named by a `model.backbone` value ("timm:<name>"), None for a torchvision name."""
    if not backbone.startswith(TIMM_PREFIX):
        return None
    name = backbone[len(TIMM_PREFIX):].strip()
    if not name:
        raise ConfigError(f"model.backbone: {backbone!r} names no timm model; expected timm:<name>, e.g. "
                          "timm:resnet50 or timm:vit_small_patch16_224 (timm.list_models() lists them)")
    return name


def _check_choices(config: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    s = config.siamese
    if s.mining == "sampled" and s.loss != "triplet":
        raise ConfigError("siamese.mining: 'sampled' triplets need siamese.loss: triplet")
    if s.loss == "none" and s.ce_weight <= 0:
        raise ConfigError("siamese.loss: none needs siamese.ce_weight > 0 (a cross-entropy head)")
    if config.classifier.kind == "head" and s.ce_weight <= 0:
        raise ConfigError("classifier.kind: head needs siamese.ce_weight > 0 in stage 1")
    _check_classifier(config.classifier)
    timm_name(config.model.backbone)  # refuses "timm:" naming no model
    d = config.data
    if not 0 < d.val_fraction < 1 or not 0 < d.test_fraction < 1 or d.val_fraction + d.test_fraction >= 1:
        raise ConfigError("data.val_fraction and data.test_fraction must be in (0, 1) and sum below 1")
    if d.train_melanoma_fraction is not None and not 0 < d.train_melanoma_fraction <= 1:
        raise ConfigError("data.train_melanoma_fraction must be in (0, 1] or null")
    if d.folds == 1 or d.folds < 0:
        raise ConfigError(f"data.folds: {d.folds}; use 0 (one model) or K >= 2 (a K-fold ensemble)")
    if d.min_image_side < 1 or d.min_image_std < 0:
        raise ConfigError("data.min_image_side must be at least 1 and data.min_image_std at least 0")
    e = config.evaluation
    if e.prevalence is not None and not 0 < e.prevalence < 1:
        raise ConfigError("evaluation.prevalence must be strictly between 0 and 1, or null")
    if e.unfamiliar_k < 1 or not 0 < e.unfamiliar_quantile < 1:
        raise ConfigError("evaluation.unfamiliar_k must be at least 1 and evaluation.unfamiliar_quantile "
                          "strictly between 0 and 1")


def _check_classifier(c: ClassifierConfig) -> None:
    from .features import check_features

    problem = check_features(c.features)
    if problem:
        raise ConfigError(f"classifier.features: {list(c.features)} {problem}")
    if c.kind == "head" and tuple(c.features) != ("image",):
        raise ConfigError("classifier.kind: head reads the embedding alone; set classifier.features: [image]")
    if not 0 <= c.feature_dropout < 1:
        raise ConfigError(f"classifier.feature_dropout: {c.feature_dropout} must be in [0, 1)")


def _nested(config_dict: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = config_dict
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. model.backbone=resnet18")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Defaults, then the YAML file, then each `section.key=value` override, validated."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"configuration file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        values = loaded
        _built(values, str(path))
    for text in overrides:
        key, value = parse_override(text)
        # Each override alone on top of the file, so a bad key or value is blamed on the --set that gave it
        # rather than on a file the user never touched (choices across keys are checked once, below).
        trial = copy.deepcopy(values)
        _nested(trial, key, value)
        _built(trial, f"--set {text}")
        _nested(values, key, value)
    config = _built(values, "")
    _check_choices(config)
    return config


def _built(values: dict[str, Any], source: str) -> Config:
    try:
        return _build(Config, values, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    values = to_dict(config)
    for key, value in overrides.items():
        _nested(values, key, value)
    result = _build(Config, values, "")
    _check_choices(result)
    return result


def to_dict(config: Config) -> dict[str, Any]:
    """Plain values (lists, not tuples), as YAML and JSON write them."""
    return dataclasses.asdict(config, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v
                                                                  for k, v in items})


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
