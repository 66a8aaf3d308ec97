"""uint8 pixels -> the model's input. The only place that scales and normalises an image, so training,
evaluation, prediction, saliency and the exported model cannot drift apart (train/serve skew)."""
from __future__ import annotations

from typing import Optional

import torch


def to_unit(pixels: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """N x H x W x 3 uint8 (channels last, as decoded and cached) -> N x 3 x H x W float in [0, 1].

    The uint8 batch is moved first (a quarter of the bytes of float) and converted on the device."""
    if device is not None:
        pixels = pixels.to(device, non_blocking=True)
    return pixels.permute(0, 3, 1, 2).float().div_(255)


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (images - mean) / std


def to_model_input(pixels: torch.Tensor, mean: float, std: float,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W normalised float, as every model of a run expects."""
    return normalize(to_unit(pixels, device), mean, std)
