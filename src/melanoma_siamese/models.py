"""The Siamese encoder (torchvision or timm backbone -> 512-d projection -> L2 norm) and the MLP classifier."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_b0", "efficientnet_b1",
             "efficientnet_b2", "efficientnet_b3", "convnext_tiny", "mobilenet_v3_large")


from .errors import WeightsError  # noqa: F401  (re-exported)
from .config import timm_name
from .timm_backbone import build_timm_backbone
from .weights import load_state_dict_file, state_dict_problems


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
    """A classification model with its classifier replaced by a projection to embedding_dim: torchvision's
    `name`, or timm's for "timm:<name>" (timm_backbone.py)."""
    if timm_name(name) is not None:
        return build_timm_backbone(timm_name(name), pretrained, embedding_dim)
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise WeightsError(f"model.backbone: unknown torchvision model {name!r}; e.g. {', '.join(BACKBONES)}, "
                           "or timm:<name> for a timm model")
    model = torchvision.models.get_model(name, weights=None)
    if pretrained != "none":
        state = _imagenet_state_dict(name) if pretrained == "imagenet" else load_state_dict_file(Path(pretrained))
        problems = state_dict_problems(state, model.state_dict())
        if problems:
            source = pretrained if pretrained != "imagenet" else f"ImageNet weights of {name}"
            raise WeightsError(f"weights file {source} does not fit torchvision's {name}: {'; '.join(problems)}. "
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
    """The layer that maps the backbone's features to the embedding: new, never pretrained."""
    if hasattr(model, "get_classifier"):  # every timm model (num_classes=embedding_dim), no torchvision one
        return model.get_classifier()
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return model.fc
    head = model.classifier
    return [m for m in head if isinstance(m, nn.Linear)][-1]


class Classifier(nn.Module):
    """The reference's MLP on frozen embeddings: 512 -> 256 -> 64 -> 2, LeakyReLU, Dropout.

    hidden=() gives a single linear layer: how a stage-1 cross-entropy head is saved as the classifier.
    `features` (features.FEATURE_SETS) widens the input by the clinical and patient columns that follow the
    embedding (features.model_input builds them).
    """

    def __init__(self, embedding_dim: int = 512, dropout: float = 0.4, hidden: tuple[int, ...] = (256, 64),
                 features: tuple[str, ...] = ("image",)):
        from .features import extra_names

        super().__init__()
        self.features = tuple(features)
        self.args = {"embedding_dim": embedding_dim, "dropout": dropout, "hidden": list(hidden),
                     "features": list(self.features)}
        layers: list[nn.Module] = []
        width = embedding_dim + len(extra_names(self.features))
        for size in hidden:
            layers += [nn.Linear(width, size), nn.LeakyReLU(), nn.Dropout(dropout)]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))
        # The extra columns of an image whose context is unknown (no metadata, no other image of the patient):
        # what an embedding alone is scored with (Grad-CAM). Not saved: it follows from `features`.
        self.register_buffer("unknown_context", _unknown_context(self.features), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[1] == self.args["embedding_dim"] and self.unknown_context.numel():
            inputs = torch.cat([inputs, self.unknown_context.to(inputs).expand(len(inputs), -1)], dim=1)
        return self.net(inputs)


def _unknown_context(features: tuple[str, ...]) -> torch.Tensor:
    import numpy as np
    import pandas as pd

    from .features import extra_features

    return torch.as_tensor(extra_features(features, np.zeros((1, 1), dtype=np.float32), pd.DataFrame(index=[0]))[0])


class EnsembleEncoder(nn.Module):
    """K encoders as one: the members' L2-normalised embeddings side by side, scaled by 1/sqrt(K), so the
    result is L2-normalised too and its cosine similarity between two images is the mean of the members'
    (a distance in this space is the mean of the members' cosine distances)."""

    def __init__(self, members: list[Encoder]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.args = {**members[0].args, "members": len(members)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(images) for m in self.members], dim=1) / len(self.members) ** 0.5


class EnsembleClassifier(nn.Module):
    """K classifiers as one: each reads its member's slice of the EnsembleEncoder's embedding (back at unit
    length) and the same extra columns; the melanoma probability is the mean of theirs. The output is the
    log of the mean probabilities, so softmax gives that mean exactly."""

    def __init__(self, members: list[Classifier]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.features = members[0].features
        self.args = {**members[0].args, "members": len(members)}

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        k, width = len(self.members), self.args["embedding_dim"]
        extra = inputs[:, k * width:]
        probs = [torch.softmax(m(torch.cat([inputs[:, i * width:(i + 1) * width] * k ** 0.5, extra], dim=1)), dim=1)
                 for i, m in enumerate(self.members)]
        return torch.log(torch.stack(probs).mean(0).clamp_min(1e-12))


def build_encoder(args: dict) -> nn.Module:
    """The encoder a checkpoint's `args` describe (an EnsembleEncoder where they name `members`), untrained."""
    args = dict(args)
    members = args.pop("members", None)
    if members:
        return EnsembleEncoder([Encoder(pretrained="none", **args) for _ in range(int(members))])
    return Encoder(pretrained="none", **args)


def build_classifier(args: dict) -> nn.Module:
    """The classifier a checkpoint's `args` describe (an EnsembleClassifier where they name `members`)."""
    args = dict(args)
    members = args.pop("members", None)

    def one() -> Classifier:
        return Classifier(args["embedding_dim"], args["dropout"], tuple(args.get("hidden", (256, 64))),
                          tuple(args.get("features", ("image",))))

    return EnsembleClassifier([one() for _ in range(int(members))]) if members else one()
