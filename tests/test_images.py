import numpy as np
import torch

from melanoma_siamese.config import AugmentConfig
from melanoma_siamese.data.images import build_cache, decode_image, sample_triplets, train_transform

from conftest import write_image


def test_conversions_are_counted_not_errors(tmp_path):
    paths = [write_image(tmp_path / "g.png", mode="L"), write_image(tmp_path / "a.png", mode="RGBA"),
             write_image(tmp_path / "c.jpg", mode="CMYK"), write_image(tmp_path / "big.jpg", size=(50, 40)),
             write_image(tmp_path / "ok.jpg")]
    cache = build_cache([str(p) for p in paths], 32, tmp_path / "cache")
    assert cache.failures == {}
    assert cache.array.shape == (5, 32, 32, 3) and cache.array.dtype == np.uint8
    assert cache.conversions["mode L"] == 1 and cache.conversions["mode RGBA"] == 1
    assert cache.conversions["mode CMYK"] == 1 and cache.conversions["resized"] == 1


def test_corrupt_and_absent_files_are_reported(tmp_path):
    good = write_image(tmp_path / "good.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    cache = build_cache([str(good), str(bad), ""], 32, tmp_path / "cache")
    assert set(cache.failures) == {1, 2}
    assert "does not decode" in cache.failures[1] and cache.failures[2] == "file absent"


def test_cache_is_reused_and_rebuilt_when_data_changes(tmp_path):
    path = write_image(tmp_path / "x.jpg", color=(10, 20, 30))
    first = build_cache([str(path)], 16, tmp_path / "cache")
    again = build_cache([str(path)], 16, tmp_path / "cache")
    assert first.path == again.path
    assert build_cache([str(path)], 24, tmp_path / "cache").path != first.path  # resolution is part of the key
    import os
    import time
    write_image(path, color=(200, 200, 200))
    os.utime(path, (time.time() + 5, time.time() + 5))
    changed = build_cache([str(path)], 16, tmp_path / "cache")
    assert changed.path != first.path and changed.array[0].mean() > 150


def test_decode_reduces_large_jpeg(tmp_path):
    path = write_image(tmp_path / "huge.jpg", size=(2000, 1500))
    pixels, notes = decode_image(path, 64)
    assert pixels.shape == (64, 64, 3) and "resized" in notes


def test_train_transform_outputs_normalised_floats():
    torch.manual_seed(0)
    image = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    out = train_transform(32, 0.5, 0.5, AugmentConfig(rotation_degrees=0, brightness=0, contrast=0, saturation=0,
                                                      hue=0))(image)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.ones_like(out))


def test_sampled_triplets_respect_classes():
    rows = np.arange(20)
    labels = np.array([0] * 16 + [1] * 4)
    trip = sample_triplets(rows, labels, 200, balanced=True, rng=np.random.default_rng(0))
    assert (labels[trip[:, 0]] == labels[trip[:, 1]]).all() and (labels[trip[:, 0]] != labels[trip[:, 2]]).all()
    assert 0.4 < (labels[trip[:, 0]] == 1).mean() < 0.6  # balanced anchors
