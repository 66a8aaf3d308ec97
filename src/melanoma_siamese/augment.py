"""Augmentation of whole uint8 batches as tensor operations, on the GPU when there is one.

The per-sample torchvision pipeline (rotation, colour jitter, flips, normalise) costs ~5 ms an image
on a CPU core; a GPU training ResNet-50 needs thousands a second. Here rotation, flips and any
resize are one affine `grid_sample`, and brightness, contrast, saturation and hue are folded into
one 3x3 matrix plus offset per image (each is affine in RGB), so a batch costs a few kernels.
Parameters are drawn from the same distributions as torchvision's v2 transforms.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import AugmentConfig
from .preprocess import normalize, to_unit

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
GRAY = torch.tensor([0.299, 0.587, 0.114])
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def async_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor to `device` without the host waiting: on CUDA a copy from pageable memory waits for
    the GPU queue to drain, so the tensor is pinned first."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class BatchAugment:
    """Callable: uint8 B x H x W x 3 (any device) -> normalised float B x 3 x size x size, augmented."""

    def __init__(self, size: int, mean: float, std: float, augment: AugmentConfig):
        self.size, self.mean, self.std, self.cfg = size, mean, std, augment
        self._constants: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def constants(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(grey weights, RGB->YIQ, YIQ->RGB) on `device`, made once: a copy from pageable memory or
        a GPU matrix inverse would each stall the GPU queue on every batch."""
        key = (str(device), dtype)
        if key not in self._constants:
            self._constants[key] = tuple(t.to(device, dtype) for t in (GRAY, _RGB_TO_YIQ, torch.linalg.inv(_RGB_TO_YIQ)))
        return self._constants[key]

    @staticmethod
    def to_device(p: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """All parameters to `device` in one asynchronous copy (packed, pinned on a GPU)."""
        if device.type == "cpu":
            return p
        packed = async_to(torch.stack([v.float() for v in p.values()]), device)
        return {k: row if p[k].dtype != torch.bool else row > 0.5 for k, row in zip(p, packed)}

    def parameters(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-image random parameters (drawn on the CPU so a seed gives the same stream on any device)."""
        c = self.cfg

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, generator=generator)

        return {
            "angle": uniform(-c.rotation_degrees, c.rotation_degrees),
            "hflip": (torch.rand(n, generator=generator) < 0.5) & c.hflip,
            "vflip": (torch.rand(n, generator=generator) < 0.5) & c.vflip,
            "brightness": uniform(max(0.0, 1 - c.brightness), 1 + c.brightness),
            "contrast": uniform(max(0.0, 1 - c.contrast), 1 + c.contrast),
            "saturation": uniform(max(0.0, 1 - c.saturation), 1 + c.saturation),
            "hue": uniform(-c.hue, c.hue),
        }

    def geometry(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rotation about the centre (zero fill, as v2.RandomRotation), flips and resize: one grid_sample."""
        n = len(x)
        theta = torch.deg2rad(p["angle"])
        cos, sin = torch.cos(theta), torch.sin(theta)
        sx = 1 - 2 * p["hflip"].float()
        sy = 1 - 2 * p["vflip"].float()
        # affine_grid maps output coordinates to input ones: rotate by -angle (counter-clockwise image
        # rotation, as torchvision), then flip.
        zero = torch.zeros_like(cos)
        matrix = torch.stack([cos * sx, -sin * sy, zero, sin * sx, cos * sy, zero], dim=1).view(n, 2, 3)
        grid = F.affine_grid(matrix.to(x.dtype), [n, 3, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def colour(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Brightness, contrast, saturation, hue as one affine map per image: x' = M x + o, clamped.

        Built on x's device from small tensors (`p` already there), so a GPU batch needs no read-back.
        """
        n, device, dtype = len(x), x.device, x.dtype
        p = {k: v.to(dtype) for k, v in p.items() if k != "angle"}
        gray, yiq, yiq_inverse = self.constants(device, dtype)
        eye = torch.eye(3, device=device, dtype=dtype).expand(n, 3, 3)
        mean_rgb = x.mean(dim=(2, 3))  # B x 3, before jitter
        m = eye * p["brightness"].view(n, 1, 1)
        # Contrast blends with the mean grey level of the current (brightness-adjusted) image.
        fc = p["contrast"].view(n, 1)
        grey_mean = (mean_rgb * p["brightness"].view(n, 1)) @ gray
        m = m * fc.unsqueeze(2)
        o = ((1 - fc) * grey_mean.view(n, 1)).expand(n, 3)
        # Saturation blends with the per-pixel grey image: S = f I + (1 - f) 1 g^T.
        fs = p["saturation"].view(n, 1, 1)
        sat = fs * eye + (1 - fs) * gray.view(1, 1, 3)
        m, o = sat @ m, (sat @ o.unsqueeze(2)).squeeze(2)
        # Hue: a rotation of the chroma plane in YIQ space by the hue shift (in turns).
        angle = -2 * math.pi * p["hue"]
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero, one = torch.zeros_like(cos), torch.ones_like(cos)
        rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1).view(n, 3, 3)
        hue = yiq_inverse @ rot @ yiq
        m, o = hue @ m, (hue @ o.unsqueeze(2)).squeeze(2)
        return (torch.einsum("bij,bjhw->bihw", m, x) + o.view(n, 3, 1, 1)).clamp_(0, 1)

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        p = self.to_device(self.parameters(len(batch), generator), batch.device)
        x = self.geometry(to_unit(batch), p)
        return normalize(self.colour(x, p), self.mean, self.std)
