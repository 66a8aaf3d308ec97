"""The Siamese encoder (torchvision backbone -> 512-d projection -> L2 norm) and the MLP classifier."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_b0", "efficientnet_b1",
             "efficientnet_b2", "efficientnet_b3", "convnext_tiny", "mobilenet_v3_large")


from .errors import WeightsError  # noqa: F401  (re-exported)


def _weights_enum(name: str):
    return torchvision.models.get_model_weights(name).DEFAULT


def _imagenet_state_dict(name: str) -> dict:
    weights = _weights_enum(name)
    filename = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "not to be had here"
        raise WeightsError(
            f"ImageNet weights for {name} are not available: {cached} is absent and downloading {weights.url} "
            f"failed ({type(exc).__name__}: {exc}). Either put that file at {cached} (download it on a machine "
            f"with internet), or set model.pretrained to the path of a local state dict "
            f"(--set model.pretrained=/path/{filename}), or train from scratch with --set model.pretrained=none."
        ) from exc


def _load_file_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"model.pretrained: weights file {path} does not exist; expected a torchvision state "
                           "dict file, 'imagenet' or 'none'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"weights file {path} cannot be loaded as a state dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def _replace_classifier(model: nn.Module, embedding_dim: int) -> nn.Module:
    """Swap the last Linear of the torchvision classifier for a projection to embedding_dim."""
    if isinstance(getattr(model, "fc", None), nn.Linear):
        model.fc = nn.Linear(model.fc.in_features, embedding_dim)
        return model
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Sequential):
        for i in range(len(head) - 1, -1, -1):
            if isinstance(head[i], nn.Linear):
                head[i] = nn.Linear(head[i].in_features, embedding_dim)
                return model
    raise ValueError(f"do not know where the classifier of {type(model).__name__} is")


def build_backbone(name: str, pretrained: str, embedding_dim: int) -> nn.Module:
    """A torchvision classification model with its classifier replaced by a projection."""
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise WeightsError(f"model.backbone: unknown torchvision model {name!r}; e.g. {', '.join(BACKBONES)}")
    model = torchvision.models.get_model(name, weights=None)
    if pretrained != "none":
        state = _imagenet_state_dict(name) if pretrained == "imagenet" else _load_file_state_dict(Path(pretrained))
        expected = model.state_dict()
        unexpected = [k for k in state if k not in expected]
        missing = [k for k in expected if k not in state]
        wrong_shape = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
        if unexpected or missing or wrong_shape:
            source = pretrained if pretrained != "imagenet" else f"ImageNet weights of {name}"
            details = []
            if missing:
                details.append(f"missing keys {missing[:5]}")
            if unexpected:
                details.append(f"unexpected keys {unexpected[:5]}")
            if wrong_shape:
                details.append(f"keys of another shape {wrong_shape[:5]}")
            raise WeightsError(f"weights file {source} does not fit torchvision's {name}: {'; '.join(details)}. "
                               f"Expected a state dict in torchvision's key layout for {name}.")
        model.load_state_dict(state)
    return _replace_classifier(model, embedding_dim)


class Encoder(nn.Module):
    """Image -> L2-normalised embedding. `head` is an optional linear CE head on the embedding."""

    def __init__(self, backbone: str = "resnet50", pretrained: str = "imagenet", embedding_dim: int = 512,
                 ce_head: bool = False):
        super().__init__()
        self.args = {"backbone": backbone, "embedding_dim": embedding_dim, "ce_head": ce_head}
        self.backbone = build_backbone(backbone, pretrained, embedding_dim)
        self.head = nn.Linear(embedding_dim, 2) if ce_head else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(images), dim=1)

    def new_parameters(self) -> list[nn.Parameter]:
        """The layers that did not come from the pretrained backbone."""
        out = list(_projection(self.backbone).parameters())
        return out + (list(self.head.parameters()) if self.head is not None else [])


def _projection(model: nn.Module) -> nn.Module:
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return model.fc
    head = model.classifier
    return [m for m in head if isinstance(m, nn.Linear)][-1]


class Classifier(nn.Module):
    """The reference's MLP on frozen embeddings: 512 -> 256 -> 64 -> 2, LeakyReLU, Dropout.

    hidden=() gives a single linear layer: how a stage-1 cross-entropy head is saved as the classifier.
    """

    def __init__(self, embedding_dim: int = 512, dropout: float = 0.4, hidden: tuple[int, ...] = (256, 64)):
        super().__init__()
        self.args = {"embedding_dim": embedding_dim, "dropout": dropout, "hidden": list(hidden)}
        layers: list[nn.Module] = []
        width = embedding_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.LeakyReLU(), nn.Dropout(dropout)]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(embeddings)
