"""Grad-CAM heat maps of what drove the melanoma score, through encoder and classifier (the `grad-cam` package).

Grad-CAM's map has the spatial size of the stage it is taken at. The backbone's last stage is 1/32 of
the image: 2x2 at 64 px, 8x8 only from 256 px, and a 2x2 map paints bands over the whole image, never a
lesion. So the map is taken at the latest stage that is still at least MIN_CELLS x MIN_CELLS at the run's
image size (layer4 of a ResNet at 256 px, layer2 at 64 px), and `SaliencyStage` says which, so a page can
state the resolution. Where no stage is that fine (images under 32 px), the finest one is used and
`SaliencyStage.useful` is False.

A timm backbone's stages are the modules its feature_info names; a transformer's map is taken at its last
block's first norm, its patch tokens laid on their grid (4x4 for 16 px patches at 64 px), so the map is as
coarse as the patches and the caption says so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from .models import Classifier, Encoder
from .preprocess import to_model_input
from .timm_backbone import gradcam_stages, grid_transform, is_timm_model, is_token_model

MIN_CELLS = 8
GRADCAM_MISSING = "Grad-CAM needs the grad-cam package, which is not installed: pip install 'melanoma-siamese[gradcam]'"


def gradcam_installed() -> bool:
    """Whether the optional Grad-CAM package is there (this module imports it only when a map is drawn)."""
    from importlib.util import find_spec

    return find_spec("pytorch_grad_cam") is not None


class MelanomaLogits(nn.Module):
    """Normalised image -> the classifier's two logits, so Grad-CAM can follow the score into the backbone."""

    def __init__(self, encoder: Encoder, classifier: Classifier):
        super().__init__()
        self.encoder, self.classifier = encoder, classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The classifier may stay on the CPU (where predict keeps it) while the encoder runs on a GPU.
        embeddings = self.encoder(images)
        return self.classifier(embeddings.to(next(self.classifier.parameters()).device))


@dataclass(frozen=True)
class SaliencyStage:
    """Where the map is taken and how fine it is: `cells` x `cells` at `image_size` px; `patches`: the cells are a
    transformer's patches."""

    name: str
    cells: int
    image_size: int
    patches: bool = False

    @property
    def useful(self) -> bool:
        return self.cells >= MIN_CELLS

    def describe(self) -> str:
        side = self.image_size // self.cells
        shape = f"grid of {side} px patches" if self.patches else f"map ({side} px cells)"
        text = (f"Grad-CAM at the backbone's {self.name}: a {self.cells}x{self.cells} {shape} "
                f"of the {self.image_size} px model input")
        return text if self.useful else text + "; too coarse to point at a lesion"

    def to_dict(self) -> dict:
        return {**asdict(self), "useful": self.useful}


def _members(encoder: nn.Module) -> list[nn.Module]:
    """An ensemble's member encoders; a single encoder is its own one member."""
    return list(encoder.members) if hasattr(encoder, "members") else [encoder]


def _backbone(encoder: nn.Module) -> nn.Module:
    """The backbone of the encoder (of its first member: an ensemble's members share one design)."""
    return _members(encoder)[0].backbone


def stages(encoder: Encoder) -> list[tuple[str, nn.Module]]:
    """The backbone's stages, input to output: ResNets' layer1-4 (their last block), the `features` stack's
    blocks otherwise (EfficientNet, ConvNeXt, MobileNet), timm_backbone.gradcam_stages for a timm model. An
    ensemble's members share one design: the first member's are named (member_layers gives the same stage of
    each)."""
    backbone = _backbone(encoder)
    if is_timm_model(backbone):
        return gradcam_stages(backbone)
    if hasattr(backbone, "layer4"):
        return [(f"layer{i}", getattr(backbone, f"layer{i}")[-1]) for i in range(1, 5)]
    if hasattr(backbone, "features"):
        return [(f"features[{i}]", block) for i, block in enumerate(backbone.features)]
    raise ValueError(f"no known convolutional stages in {type(backbone).__name__} for Grad-CAM")


def reshape_transform(encoder: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """What makes a stage's output N x C x H x W for Grad-CAM (None where it is already: torchvision, CNNs)."""
    backbone = _backbone(encoder)
    return grid_transform(backbone) if is_timm_model(backbone) else None


def member_layers(encoder: nn.Module, name: str) -> list[nn.Module]:
    """The stage called `name` in each member of an ensemble (the one stage of a single encoder): Grad-CAM then
    averages the members' maps, each scaled to [0, 1] (pytorch-grad-cam's multi-layer rule)."""
    return [dict(stages(member))[name] for member in _members(encoder)]


def target_layer(encoder: Encoder) -> nn.Module:
    """The backbone's last convolutional stage (the classic Grad-CAM layer)."""
    return stages(encoder)[-1][1]


def stage_sizes(encoder: Encoder, image_size: int) -> list[int]:
    """The shorter spatial side of each stage's output at this image size, from one forward pass of a
    blank image (exact for any backbone's strides and paddings)."""
    named, grid = stages(encoder), reshape_transform(encoder) or (lambda out: out)
    sizes: dict[int, int] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, i=i: sizes.__setitem__(i, min(grid(out).shape[-2:])))
             for i, (_, module) in enumerate(named)]
    was_training = encoder.training
    try:
        encoder.eval()
        with torch.no_grad():
            encoder(torch.zeros(1, 3, image_size, image_size, device=next(encoder.parameters()).device))
    finally:
        encoder.train(was_training)
        for hook in hooks:
            hook.remove()
    return [int(sizes[i]) for i in range(len(named))]


def choose_stage(encoder: Encoder, image_size: int, min_cells: int = MIN_CELLS,
                 name: Optional[str] = None) -> tuple[SaliencyStage, nn.Module]:
    """The latest stage whose output is at least min_cells on its shorter side at this image size (or the
    stage called `name`, e.g. "layer4"); the finest one where none is that fine."""
    named, sizes = stages(encoder), stage_sizes(encoder, image_size)
    if name is not None:
        names = [n for n, _ in named]
        if name not in names:
            raise ValueError(f"no stage {name!r} in this backbone; its stages: {', '.join(names)}")
        pick = names.index(name)
    else:
        fine = [i for i, size in enumerate(sizes) if size >= min_cells]
        pick = fine[-1] if fine else int(np.argmax(sizes))
    patches = is_token_model(_backbone(encoder))
    return SaliencyStage(named[pick][0], sizes[pick], int(image_size), patches), named[pick][1]


def gradcam_maps(encoder: Encoder, classifier: Classifier, images: torch.Tensor,
                 layer: Optional[nn.Module | list[nn.Module]] = None) -> np.ndarray:
    """N x H x W maps in [0, 1] of the evidence for the melanoma logit (class 1), taken at `layer`
    (default: the stage `choose_stage` picks for these images' size)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if layer is None:
        layer = choose_stage(encoder, images.shape[-1])[1]
    model = MelanomaLogits(encoder, classifier)
    with GradCAM(model=model, target_layers=layer if isinstance(layer, list) else [layer],
                 reshape_transform=reshape_transform(encoder)) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(1)] * len(images))


def overlay(pixels: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The heat map in the jet colour map over the image (both H x W), as H x W x 3 uint8 RGB."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(pixels.astype(np.float32) / 255, heat, use_rgb=True, image_weight=0.55)


def saliency_maps(run, pixels: np.ndarray, stage_name: Optional[str] = None) -> tuple[np.ndarray, SaliencyStage]:
    """N x S x S maps in [0, 1] for N x S x S x 3 uint8 images of a loaded run (see predict.load_run), and
    the stage they were taken at (`stage_name`, e.g. "layer4", forces one; default: `choose_stage`)."""
    d = run.config.data
    stage, _ = choose_stage(run.encoder, pixels.shape[1], name=stage_name)
    images = to_model_input(torch.from_numpy(np.array(pixels, copy=True)), d.mean, d.std, run.device)
    return gradcam_maps(run.encoder, run.classifier, images, member_layers(run.encoder, stage.name)), stage


class Saliency(NamedTuple):
    overlays: list[np.ndarray]  # H x W x 3 uint8 per image
    stage: SaliencyStage
    # Per image: False where the map is zero everywhere, i.e. no region raised the melanoma score at this
    # stage (Grad-CAM keeps positive evidence only); a caption should then say so, not show a blank map.
    evidence: list[bool]


def saliency_with_stage(run, pixels: np.ndarray) -> Saliency:
    """Overlays for N x S x S x 3 uint8 images, the stage (for a caption), and which maps show anything."""
    maps, stage = saliency_maps(run, pixels)
    return Saliency([overlay(p, m) for p, m in zip(pixels, maps)], stage,
                    [bool(m.max() > 0) for m in maps])


def saliency_overlays(run, pixels: np.ndarray) -> list[np.ndarray]:
    """Overlays for N x S x S x 3 uint8 images of a loaded run (see predict.load_run)."""
    return saliency_with_stage(run, pixels)[0]


# The figure predict writes: the image and its overlay side by side, each at least PANEL_PX, a colour bar, a caption.
PANEL_PX = 256
FOR_MELANOMA = ("The map shows where evidence FOR melanoma sits (Grad-CAM keeps positive evidence only); its colours "
                "are relative to this image's strongest region, so they cannot be compared between images.")
BELOW_THRESHOLD = ("The score is below the decision threshold: the map shows where the little melanoma evidence there "
                   "is sits, not a finding.")
NO_EVIDENCE = "No region raised the melanoma score at this stage."


def note(stage: SaliencyStage, evidence: bool) -> str:
    """One line on what a map is (predict's saliency_note column): the stage and its resolution, and whether any
    region raised the score."""
    return f"{stage.describe()}." + ("" if evidence else f" {NO_EVIDENCE}")


def upscale(size: int) -> int:
    """The whole factor an image of `size` px is drawn at so that a panel is at least PANEL_PX wide."""
    return max(1, -(-PANEL_PX // size))


def answer_line(answer: dict) -> str:
    """The answer as predict shows it: probability on its scale and prevalence, decision, threshold."""
    from .display import probability_pair

    shown, threshold = probability_pair(answer["probability"], answer["threshold"])
    scale = (f"calibrated, at {100 * answer['prevalence']:.2f}% melanoma prevalence"
             if answer.get("calibrated") and answer.get("prevalence") is not None
             else "the classifier's raw score, not calibrated")
    return f"P(melanoma) {shown} ({scale}) -> {answer['decision']} (threshold {threshold})."


def caption(name: str, answer: dict, stage: SaliencyStage, evidence: bool) -> list[str]:
    """The caption of one saliency figure, a paragraph per item: file name, answer, warnings, stage, how the map
    reads (the below-threshold and no-evidence sentences where they apply)."""
    lines = [name, answer_line(answer)]
    if answer.get("unfamiliar", {}).get("flag"):
        lines.append("UNFAMILIAR: this image is unlike the training images; the answer is not reliable.")
    if answer.get("known_case"):
        lines.append(f"Known case: {answer['known_case']['note']}.")
    if answer.get("trained_on_generated_images"):
        lines.append("This run was trained on generated images: its answers mean nothing for real photos.")
    if not evidence:
        lines.append(NO_EVIDENCE)
    else:
        below = answer["probability"] < answer["threshold"]
        lines += ([BELOW_THRESHOLD] if below else []) + [FOR_MELANOMA]
    factor = upscale(stage.image_size)
    drawn = f"; drawn {factor}x larger (nearest neighbour)" if factor > 1 else ""
    return lines + [f"{stage.describe()}; the map is smoothed to the input's pixels by Grad-CAM (bilinear){drawn}."]


def _wrapped(lines: list[str], width_px: int, fontsize: float = 9, weight: str = "normal") -> str:
    """`lines` wrapped at the most characters whose rendered width still fits width_px (measured, so a caption
    is never clipped whatever its words)."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scratch = Figure(dpi=100)
    renderer = FigureCanvasAgg(scratch).get_renderer()

    def width(text: str) -> float:
        drawn = scratch.text(0, 0, text, fontsize=fontsize, fontweight=weight)
        extent = drawn.get_window_extent(renderer).width
        drawn.remove()
        return extent

    longest = max(lines, key=len)
    # Start from the longest line's mean character width; a line of wide letters may take a step or two more.
    chars = max(20, int(width_px * len(longest) / max(width(longest), 1.0)))
    while True:
        text = "\n".join(textwrap.fill(line, chars, break_long_words=True) for line in lines)
        if width(text) <= width_px or chars <= 20:
            return text
        chars -= 2


def _panel(fig, box: tuple[float, ...], picture: Optional[np.ndarray], title: str):
    ax = fig.add_axes(box)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    if picture is not None:
        ax.imshow(picture, interpolation="nearest")
    return ax


def figure(pixels: np.ndarray, overlay_rgb: np.ndarray, lines: list[str], evidence: bool, path) -> None:
    """Writes the image and its overlay side by side at a whole multiple of their size (each panel at least
    PANEL_PX), a colour bar and the caption `lines` (the first one bold), laid out in pixels so nothing clips."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    dpi, pad, gap, head = 100, 16, 16, 22
    factor = upscale(pixels.shape[1])
    big = [np.kron(a, np.ones((factor, factor, 1), dtype=a.dtype)) for a in (pixels, overlay_rgb)]
    side = big[0].shape[0]
    width = pad + 2 * side + gap + 130
    title, text = _wrapped(lines[:1], width - 2 * pad, 10, "bold"), _wrapped(lines[1:], width - 2 * pad)
    top = pad + 17 * (title.count("\n") + 1) + head
    height = top + side + pad + 16 * (text.count("\n") + 1) + pad
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    fx, fy = (lambda x: x / width), (lambda y: 1 - y / height)  # pixels from the top left -> figure fractions
    fig.text(fx(pad), fy(pad), title, fontsize=10, fontweight="bold", va="top")
    _panel(fig, (fx(pad), fy(top + side), side / width, side / height), big[0], "Image (model input)")
    right = (fx(pad + side + gap), fy(top + side), side / width, side / height)
    if evidence:
        _panel(fig, right, big[1], "Grad-CAM: evidence for melanoma")
        bar = fig.add_axes((fx(pad + 2 * side + gap + 10), fy(top + side), 14 / width, side / height))
        colours = fig.colorbar(ScalarMappable(Normalize(0, 1), colormaps["jet"]), cax=bar, ticks=[0, 1])
        colours.ax.set_yticklabels(["weakest", "strongest"], fontsize=8)
        colours.set_label("relative to this image's\nstrongest region", fontsize=8)
    else:
        empty = _panel(fig, right, None, "Grad-CAM")
        empty.text(0.5, 0.5, _wrapped([NO_EVIDENCE], side), ha="center", va="center", fontsize=9,
                   transform=empty.transAxes)
    fig.text(fx(pad), fy(top + side + pad), text, fontsize=9, va="top", linespacing=1.25)
    fig.savefig(path, dpi=dpi)
