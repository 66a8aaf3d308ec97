"""Grad-CAM heat maps of what drove the melanoma score, through encoder and classifier (the `grad-cam` package)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .models import Classifier, Encoder


class MelanomaLogits(nn.Module):
    """Normalised image -> the classifier's two logits, so Grad-CAM can follow the score into the backbone."""

    def __init__(self, encoder: Encoder, classifier: Classifier):
        super().__init__()
        self.encoder, self.classifier = encoder, classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The classifier may stay on the CPU (where predict keeps it) while the encoder runs on a GPU.
        embeddings = self.encoder(images)
        return self.classifier(embeddings.to(next(self.classifier.parameters()).device))


def target_layer(encoder: Encoder) -> nn.Module:
    """The backbone's last convolutional stage: ResNets' layer4, the `features` stack's last block otherwise."""
    backbone = encoder.backbone
    if hasattr(backbone, "layer4"):
        return backbone.layer4[-1]
    if hasattr(backbone, "features"):
        return backbone.features[-1]
    raise ValueError(f"no known last convolutional stage in {type(backbone).__name__} for Grad-CAM")


def gradcam_maps(encoder: Encoder, classifier: Classifier, images: torch.Tensor) -> np.ndarray:
    """N x H x W maps in [0, 1] of the evidence for the melanoma logit (class 1)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = MelanomaLogits(encoder, classifier)
    with GradCAM(model=model, target_layers=[target_layer(encoder)]) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(1)] * len(images))


def overlay(pixels: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The heat map in the jet colour map over the image (both H x W), as H x W x 3 uint8 RGB."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(pixels.astype(np.float32) / 255, heat, use_rgb=True, image_weight=0.55)


def saliency_overlays(run, pixels: np.ndarray) -> list[np.ndarray]:
    """Overlays for N x S x S x 3 uint8 images of a loaded run (see predict.load_run)."""
    d = run.config.data
    images = torch.tensor(pixels).permute(0, 3, 1, 2).float().div(255)
    images = ((images - d.mean) / d.std).to(run.device)
    maps = gradcam_maps(run.encoder, run.classifier, images)
    return [overlay(p, m) for p, m in zip(pixels, maps)]
