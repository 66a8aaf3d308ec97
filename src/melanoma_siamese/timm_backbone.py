"""Backbones from timm (`model.backbone=timm:<name>`, the `timm` extra): convolutional and transformer models
with their classifier built as the projection to the embedding, their weights, and how Grad-CAM reads them.

timm is imported only when such a backbone is built, so the package works without it.
"""
from __future__ import annotations

import difflib
import math
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .errors import ConfigError, WeightsError
from .weights import state_dict_problems

INSTALL = "pip install 'melanoma-siamese[timm]'"


def build_timm_backbone(name: str, pretrained: str, embedding_dim: int) -> nn.Module:
    """timm's `name` with its classifier made a new `embedding_dim` projection (`get_classifier()`), its other
    weights from `pretrained`: "none" (random), "imagenet" (timm's, through the Hugging Face cache) or a file."""
    timm = _import_timm(name)
    if not timm.is_model(name):
        raise ConfigError(_unknown_model(timm, name))
    if pretrained == "imagenet":
        model = _imagenet_model(timm, name, embedding_dim)
    else:
        model = _create(timm, name, embedding_dim)
        if pretrained != "none":
            _load_file(model, name, Path(pretrained))
    if not isinstance(model.get_classifier(), nn.Module) or not list(model.get_classifier().parameters()):
        raise ConfigError(f"model.backbone: timm:{name} has no single classifier layer to make the projection "
                          f"(get_classifier() gives {type(model.get_classifier()).__name__}); choose another model, "
                          "e.g. a non-distilled variant")
    return model


def _import_timm(name: str):
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(f"model.backbone: timm:{name} needs the timm package, which is not installed: {INSTALL}") \
            from exc
    return timm


def _unknown_model(timm, name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (f"model.backbone: timm has no model {name!r}{hint} (timm.list_models('*{name.split('_')[0]}*') "
            "lists the names that contain a pattern)")


def _create(timm, name: str, embedding_dim: int, **kwargs) -> nn.Module:
    # A ViT's position embedding is made for one image size; with dynamic_img_size=True it is resized to the
    # input at each forward pass, so the model is built from its name alone (a checkpoint's args need no image
    # size) and runs at any data.image_size that is a multiple of its patch. Other models refuse the argument.
    try:
        return timm.create_model(name, num_classes=embedding_dim, dynamic_img_size=True, **kwargs)
    except TypeError as exc:
        if "dynamic_img_size" not in str(exc):
            raise
    return timm.create_model(name, num_classes=embedding_dim, **kwargs)


def _imagenet_model(timm, name: str, embedding_dim: int) -> nn.Module:
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id, url = (cfg.hf_hub_id, cfg.url) if cfg is not None else (None, None)
    if not hub_id and not url:
        # timm itself would warn and carry on with random weights; a run asked for ImageNet's should not.
        raise WeightsError(f"model.pretrained=imagenet: timm has no pretrained weights for {name} (see "
                           "timm.list_pretrained()); set model.pretrained to a weights file or to none")
    try:
        return _create(timm, name, embedding_dim, pretrained=True)
    except Exception as exc:  # offline, HTTP errors, a missing cache entry: all mean "not to be had here"
        raise WeightsError(_weights_unavailable(name, hub_id, url, exc)) from exc


def _weights_unavailable(name: str, hub_id: Optional[str], url: Optional[str], exc: Exception) -> str:
    if hub_id:
        from huggingface_hub.constants import HF_HUB_CACHE

        tried = f"the Hugging Face Hub's {hub_id} (not in the cache {HF_HUB_CACHE}, and downloading it failed"
        fetch = (f"`huggingface-cli download {hub_id}` on a machine with internet fills that cache; or take "
                 f"model.safetensors from https://huggingface.co/{hub_id} and set "
                 "--set model.pretrained=/path/model.safetensors")
    else:
        tried = f"{url} (not in the cache {Path(torch.hub.get_dir()) / 'checkpoints'}, and downloading it failed"
        fetch = f"download {url} on a machine with internet and set --set model.pretrained=/path/{Path(url).name}"
    return (f"ImageNet weights for timm:{name} are not available: tried {tried}: {type(exc).__name__}: {exc}). "
            f"Either {fetch} (a state dict in timm's layout for {name}), or train from scratch with "
            "--set model.pretrained=none.")


def _load_file(model: nn.Module, name: str, path: Path) -> None:
    """The file's weights into every layer but the projection (the file's own classifier is left out)."""
    from timm.models import load_state_dict


    if not path.is_file():
        raise WeightsError(f"model.pretrained: weights file {path} does not exist; expected a state dict of timm's "
                           f"{name} (.safetensors, .pth or .bin), 'imagenet' or 'none'")
    try:
        # timm's reader: safetensors or torch.load(weights_only), unwraps "state_dict"/"model", strips "module."
        state = load_state_dict(str(path))
    except Exception as exc:
        raise WeightsError(f"weights file {path} cannot be loaded as a state dict: {exc}") from exc
    head = projection_name(model) + "."
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    problems = state_dict_problems(state, expected)
    if problems:
        raise WeightsError(f"weights file {path} does not fit timm's {name}: {'; '.join(problems)}. Expected a state "
                           f"dict in timm's key layout for {name} (timm.create_model('{name}').state_dict()).")
    model.load_state_dict(state, strict=False)


def projection_name(model: nn.Module) -> str:
    """The module name of a timm model's classifier (the projection here): "fc", "head", "head.fc"..."""
    layer = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is layer)


def is_timm_model(model: nn.Module) -> bool:
    return hasattr(model, "pretrained_cfg") and hasattr(model, "get_classifier")


def is_token_model(model: nn.Module) -> bool:
    """A ViT-like model: its blocks carry tokens (N x tokens x C), the first `num_prefix_tokens` not patches."""
    blocks = getattr(model, "blocks", None)
    return (getattr(model, "num_prefix_tokens", None) is not None and isinstance(blocks, nn.Sequential)
            and len(blocks) > 0 and hasattr(blocks[-1], "norm1"))


def gradcam_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Where Grad-CAM can be taken, input to output: a transformer's last block's first norm (its tokens, laid on
    their grid by `grid_transform`, the pytorch-grad-cam recipe for ViTs); else the modules timm's feature_info
    names at each reduction."""
    if is_token_model(model):
        name = f"blocks.{len(model.blocks) - 1}.norm1"
        return [(name, model.get_submodule(name))]
    info = getattr(model, "feature_info", None) or []
    if not info:
        raise ValueError(f"timm's {type(model).__name__} lists no feature stages (feature_info) for Grad-CAM")
    return [(stage["module"], model.get_submodule(stage["module"])) for stage in info]


def grid_transform(model: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """What makes a stage's output N x C x H x W for Grad-CAM: tokens laid on their grid, channels-last maps
    transposed; None where the output already is."""
    if is_token_model(model):
        return partial(tokens_to_grid, prefix=int(model.num_prefix_tokens))
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        return channels_first
    return None


def tokens_to_grid(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """N x (prefix + S*S) x C tokens -> N x C x S x S, the class/register tokens dropped (square inputs only)."""
    patches = tokens[:, prefix:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not make a square grid; Grad-CAM needs square images")
    return patches.reshape(len(patches), side, side, patches.shape[2]).permute(0, 3, 1, 2)


def channels_first(maps: torch.Tensor) -> torch.Tensor:
    return maps.permute(0, 3, 1, 2)



def fixed_input_size(model: nn.Module, image_size: int) -> None:
    """Resize, in place, the position embeddings of every timm module built with `dynamic_img_size` to the grid
    of `image_size`: the model then computes the same at that size without resampling them on each forward pass
    (an antialiased bicubic resize that the ONNX exporter cannot write). For a copy of the model to export."""
    for module in model.modules():
        if getattr(module, "dynamic_img_size", False) and hasattr(module, "set_input_size"):
            module.set_input_size(img_size=image_size)
