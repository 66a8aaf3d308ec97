"""Augmentation of whole uint8 batches as tensor operations, on the GPU when there is one.

The per-sample torchvision pipeline (rotation, colour jitter, flips, normalise) costs ~5 ms an image
on a CPU core; a GPU training ResNet-50 needs thousands a second. Here rotation and flips are one
nearest-neighbour gather of uint8 pixels (v2.RandomRotation's default interpolation), and brightness,
contrast, saturation, hue and the normalisation are folded into one 3x3 matrix plus offset per image
(each is affine in RGB), applied in one matrix product. Parameters are drawn from the same
distributions as torchvision's v2 transforms.

Where the time goes on a CPU: a batch of 64 at 256 px is 12.5 MB of uint8 but 50 MB as float, and
each full pass over 50 MB (conversion, resample, colour, clamp, normalise: seven of them before)
streams through memory. So the geometry is done on uint8, and the float work runs a few images
at a time, whose float copy stays in the processor's cache, writing each value of the output once.
"""
from __future__ import annotations

import math

import torch

from .config import AugmentConfig

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
GRAY = torch.tensor([0.299, 0.587, 0.114])
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
# Images per step of the float work on a CPU: 4 x 256 x 256 x 3 float32 is 3 MB, within a core's cache.
CPU_CHUNK = 4


def async_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor to `device` without the host waiting: on CUDA a copy from pageable memory waits for
    the GPU queue to drain, so the tensor is pinned first."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def resize_uint8(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 B x H x W x 3 -> B x size x size x 3, bilinear with antialiasing (as v2.Resize), still uint8."""
    from torchvision.transforms.v2 import functional as TF

    if pixels.shape[1:3] == (size, size):
        return pixels
    # A permuted H x W x 3 batch is channels_last: torchvision's fast uint8 path, and the result permutes back
    # without a copy.
    return TF.resize(pixels.permute(0, 3, 1, 2), [size, size], antialias=True).permute(0, 2, 3, 1)


class BatchAugment:
    """Callable: uint8 B x H x W x 3 (any device) -> normalised float B x 3 x size x size, augmented."""

    def __init__(self, size: int, mean: float, std: float, augment: AugmentConfig):
        self.size, self.mean, self.std, self.cfg = size, mean, std, augment
        self._constants: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._bordered: dict[tuple, torch.Tensor] = {}

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

    def bordered(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The batch inside a zero border wide enough that every rotation's source pixels fall in it (the zero
        fill: no bounds checks per pixel), and the border's width.

        The buffer is kept per shape, so its border is written once; each batch writes only the images."""
        n, s = len(pixels), pixels.shape[1]
        border = math.ceil((math.sqrt(2) - 1) * s / 2) + 2  # a square turned by 45 degrees reaches furthest
        key = (n, s, str(pixels.device))
        if key not in self._bordered:
            side = s + 2 * border
            self._bordered[key] = torch.zeros(n, side, side, 3, dtype=torch.uint8, device=pixels.device)
        buffer = self._bordered[key]
        buffer[:, border:border + s, border:border + s].copy_(pixels)
        return buffer, border

    def source_index(self, p: dict[str, torch.Tensor], border: int) -> torch.Tensor:
        """Per output pixel, the flat index (int32) of its source pixel in the bordered images.

        As affine_grid + grid_sample(mode="nearest", align_corners=False): rotation about the centre by the
        angle (counter-clockwise, as torchvision), then the flips. A source coordinate is the sum of a
        column term and a row term, rounded by truncating it plus a half (it is never negative here).
        """
        n, s = len(p["angle"]), self.size
        side = s + 2 * border
        theta = torch.deg2rad(p["angle"])
        cos, sin = torch.cos(theta).view(n, 1), torch.sin(theta).view(n, 1)
        sx = (1 - 2 * p["hflip"].float()).view(n, 1)
        sy = (1 - 2 * p["vflip"].float()).view(n, 1)
        u = torch.arange(s, device=theta.device, dtype=torch.float32) + (0.5 - s / 2)  # from the centre
        centre = (s - 1) / 2 + border + 0.5
        col = ((cos * sx) * u + centre).view(n, 1, s) + (-sin * sy * u).view(n, s, 1)
        row = ((sin * sx) * u + centre).view(n, 1, s) + (cos * sy * u).view(n, s, 1)
        flat = row.to(torch.int32).mul_(side).add_(col.to(torch.int32))
        offsets = torch.arange(n, device=flat.device, dtype=torch.int32) * (side * side)
        return flat.add_(offsets.view(n, 1, 1)).view(-1)

    def rotated(self, source: torch.Tensor, border: int, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bordered images (see `bordered`) -> rotated and flipped ones, k x size*size x 3 uint8."""
        return source.view(-1, 3).index_select(0, self.source_index(p, border)).view(len(source), -1, 3)

    def geometry(self, pixels: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rotation (zero fill, nearest, as v2.RandomRotation) and flips of uint8 B x H x W x 3 images:
        uint8 B x size x size x 3."""
        source, border = self.bordered(resize_uint8(pixels, self.size))
        return self.rotated(source, border, p).view(len(pixels), self.size, self.size, 3)

    def jitter(self, p: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Brightness, contrast, saturation, hue as one affine map per image on [0, 1] RGB: x' = M x + d g,
        where g is the image's mean grey level before the jitter (contrast blends with it). (M, d)."""
        n, dtype = len(p["angle"]), torch.float32
        p = {k: v.to(dtype) for k, v in p.items() if k != "angle"}
        gray, yiq, yiq_inverse = self.constants(device, dtype)
        eye = torch.eye(3, device=device, dtype=dtype).expand(n, 3, 3)
        fb, fc = p["brightness"].view(n, 1, 1), p["contrast"].view(n, 1, 1)
        m = eye * (fb * fc)
        # Contrast blends with the mean grey of the brightness-adjusted image: (1 - fc) * fb * g, per channel.
        d = ((1 - fc) * fb).view(n, 1).expand(n, 3)
        # Saturation blends with the per-pixel grey image: S = f I + (1 - f) 1 g^T.
        fs = p["saturation"].view(n, 1, 1)
        sat = fs * eye + (1 - fs) * gray.view(1, 1, 3)
        # Hue: a rotation of the chroma plane in YIQ space by the hue shift (in turns).
        angle = -2 * math.pi * p["hue"]
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero, one = torch.zeros_like(cos), torch.ones_like(cos)
        rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1).view(n, 3, 3)
        mix = yiq_inverse @ rot @ yiq @ sat
        return mix @ m, (mix @ d.unsqueeze(2)).squeeze(2)

    def colour(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The jitter on float B x 3 x H x W images in [0, 1], clamped (the fused path in __call__ does the same)."""
        n = len(x)
        m, d = self.jitter(p, x.device)
        grey = x.mean(dim=(2, 3)) @ self.constants(x.device, torch.float32)[0]
        return (torch.einsum("bij,bjhw->bihw", m, x) + (d * grey.view(n, 1)).view(n, 3, 1, 1)).clamp_(0, 1)

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        p = self.to_device(self.parameters(len(batch), generator), batch.device)
        source, border = self.bordered(resize_uint8(batch, self.size))
        n, device = len(batch), batch.device
        m, d = self.jitter(p, device)
        gray = self.constants(device, torch.float32)[0]
        # Normalisation folded in: clamp(M x + o, 0, 1) normalised is clamp(M' x + o', low, high), with the
        # 1/255 of the uint8 pixels in M'.
        m = m / (255 * self.std)
        low, high = -self.mean / self.std, (1 - self.mean) / self.std
        out = torch.empty(n, 3, self.size * self.size, device=device)
        step = CPU_CHUNK if device.type == "cpu" else max(1, n)
        for start in range(0, n, step):
            end = min(n, start + step)
            part = {k: v[start:end] for k, v in p.items()}
            x = self.rotated(source[start:end], border, part).float()  # k x pixels x 3
            grey = (x.mean(dim=1) @ gray) / 255
            offset = (d[start:end] * grey.view(-1, 1) - self.mean) / self.std
            torch.baddbmm(offset.unsqueeze(2), m[start:end], x.transpose(1, 2), out=out[start:end])
            out[start:end].clamp_(low, high)
        return out.view(n, 3, self.size, self.size)
