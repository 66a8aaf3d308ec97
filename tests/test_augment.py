"""The batched tensor augmentation against torchvision's per-sample v2 transforms."""
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from melanoma_siamese.augment import BatchAugment
from melanoma_siamese.config import AugmentConfig
from melanoma_siamese.data.images import train_transform

NONE = AugmentConfig(rotation_degrees=0, brightness=0, contrast=0, saturation=0, hue=0, hflip=False, vflip=False)


def _image(n=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 8, 8, generator=g)
    return (torch.nn.functional.interpolate(base, size=size, mode="bilinear") * 255).round().to(torch.uint8)


def _params(aug, **fixed):
    n = 1
    p = aug.parameters(n, torch.Generator().manual_seed(0))
    for k, v in fixed.items():
        p[k] = torch.tensor([v])
    return p


def test_identity_when_everything_is_off():
    img = _image(4)
    out = BatchAugment(32, 0.5, 0.5, NONE)(img.permute(0, 2, 3, 1), torch.Generator().manual_seed(0))
    expected = (img.float() / 255 - 0.5) / 0.5
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("op,factor,reference", [
    ("brightness", 1.3, TF.adjust_brightness), ("contrast", 0.7, TF.adjust_contrast),
    ("saturation", 1.4, TF.adjust_saturation)])
def test_colour_ops_match_torchvision(op, factor, reference):
    img = _image()
    x = img.float() / 255
    aug = BatchAugment(32, 0.0, 1.0, NONE)
    p = _params(aug, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)
    p[op] = torch.tensor([factor])
    ours = aug.colour(x, p)
    assert torch.allclose(ours, reference(x, factor), atol=2e-3)


def test_hue_is_a_linear_approximation_of_torchvision():
    """Hue is a YIQ chroma rotation (linear, so it folds into the matrix); HSV's shift is not linear.

    It turns colours the same way and about as far, which is what an augmentation needs.
    """
    x = _image().float() / 255
    aug = BatchAugment(32, 0.0, 1.0, NONE)
    p = _params(aug, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.1)
    ours = aug.colour(x, p)
    same, opposite = TF.adjust_hue(x, 0.1), TF.adjust_hue(x, -0.1)
    assert (ours - same).abs().mean() < 0.6 * (ours - opposite).abs().mean()
    ratio = float((ours - x).abs().mean() / (same - x).abs().mean())
    assert 0.6 < ratio < 1.6


def test_flips_and_rotation_match_torchvision():
    """The geometry works on uint8 pixels, nearest-neighbour as v2.RandomRotation's default."""
    x = _image()
    hwc = x.permute(0, 2, 3, 1).contiguous()
    aug = BatchAugment(32, 0.0, 1.0, NONE)

    def ours(**fixed):
        return aug.geometry(hwc, _params(aug, **fixed)).permute(0, 3, 1, 2)

    assert torch.equal(ours(angle=0.0, hflip=True, vflip=False), TF.horizontal_flip(x))
    assert torch.equal(ours(angle=0.0, hflip=False, vflip=True), TF.vertical_flip(x))
    assert torch.equal(ours(angle=90.0, hflip=False, vflip=False), TF.rotate(x, 90.0))
    # A drawn angle: the same pixels as torchvision's nearest rotation, zero fill included, but for a few
    # pixels where a source coordinate falls within rounding of a pixel boundary.
    rotated, theirs = ours(angle=23.0, hflip=False, vflip=False), TF.rotate(x, 23.0)
    assert (rotated == 0).all(dim=1).sum() > 0
    assert (rotated != theirs).any(dim=1).float().mean() < 0.02


def test_resized_input_matches_torchvision_resize():
    big = _image(2, 64)
    aug = BatchAugment(32, 0.0, 1.0, NONE)
    out = aug(big.permute(0, 2, 3, 1).contiguous(), torch.Generator().manual_seed(0))
    expected = TF.resize(big, [32, 32], antialias=True).float() / 255
    assert out.shape == (2, 3, 32, 32) and torch.allclose(out, expected, atol=1e-5)


def test_fused_colour_and_normalisation_equal_the_steps():
    """__call__ folds the jitter, the clamp and the normalisation into one product per image: the same
    numbers as geometry, then colour, then normalise."""
    aug = BatchAugment(32, 0.4, 0.3, AugmentConfig())
    batch = _image(9).permute(0, 2, 3, 1).contiguous()
    fused = aug(batch, torch.Generator().manual_seed(3))
    p = aug.parameters(9, torch.Generator().manual_seed(3))
    steps = (aug.colour(aug.geometry(batch, p).permute(0, 3, 1, 2).float() / 255, p) - 0.4) / 0.3
    assert torch.allclose(fused, steps, atol=1e-4)


def test_same_distribution_as_per_sample_pipeline():
    """Pixel statistics over many augmentations of one image, and the parameter ranges."""
    cfg = AugmentConfig()
    img = _image(1, 32)[0]
    torch.manual_seed(0)
    per_sample = torch.stack([train_transform(32, 0.5, 0.5, cfg)(img) for _ in range(400)])
    batched = BatchAugment(32, 0.5, 0.5, cfg)(img.permute(1, 2, 0).expand(400, 32, 32, 3).contiguous(),
                                               torch.Generator().manual_seed(0))
    for stat in (lambda t: t.mean(), lambda t: t.std(), lambda t: t.mean(dim=(0, 2, 3)),
                 lambda t: t.std(dim=(2, 3)).mean(dim=0)):
        assert torch.allclose(stat(per_sample), stat(batched), atol=0.03)
    # Flipped images: compare the per-pixel mean maps (flips and rotations symmetrise them alike).
    assert (per_sample.mean(0) - batched.mean(0)).abs().mean() < 0.05
    p = BatchAugment(32, 0.5, 0.5, cfg).parameters(10000, torch.Generator().manual_seed(1))
    assert p["angle"].abs().max() <= cfg.rotation_degrees and abs(float(p["hflip"].float().mean()) - 0.5) < 0.02
    assert float(p["brightness"].min()) >= 1 - cfg.brightness and float(p["brightness"].max()) <= 1 + cfg.brightness


def test_seeded_and_device_independent_parameters():
    aug = BatchAugment(32, 0.5, 0.5, AugmentConfig())
    batch = _image(3).permute(0, 2, 3, 1).contiguous()
    a = aug(batch, torch.Generator().manual_seed(7))
    b = aug(batch, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert np.isfinite(a.numpy()).all()
