import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from melanoma_siamese import familiarity
from melanoma_siamese.errors import ConfigError

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000-sample"


def _manifold(n, rng, dim=32, rank=4):
    """Points near a 4-dimensional subspace of a 32-dimensional sphere: the 'training manifold'."""
    basis = np.linalg.qr(np.random.default_rng(123).normal(size=(dim, rank)))[0]
    points = rng.normal(size=(n, rank)) @ basis.T + 0.05 * rng.normal(size=(n, dim))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_off_manifold_points_flagged_and_validation_at_one_minus_q():
    rng = np.random.default_rng(0)
    train, val, test = _manifold(2000, rng), _manifold(1000, rng), _manifold(1000, rng)
    model = familiarity.fit(train, val, k=5, quantile=0.95)
    assert model.assess(val)["unfamiliar"].mean() == pytest.approx(0.05, abs=0.002)
    assert model.assess(test)["unfamiliar"].mean() == pytest.approx(0.05, abs=0.03)
    outside = rng.normal(size=(500, 32))
    result = model.assess(outside)
    assert result["unfamiliar"].all()
    assert (result["percentile"] >= 95).all()


def test_distance_matches_brute_force_and_percentile_is_a_share():
    rng = np.random.default_rng(1)
    train, val = _manifold(300, rng), _manifold(200, rng)
    model = familiarity.fit(train, val, k=3, quantile=0.99)
    query = _manifold(20, rng)
    got = model.assess(query)
    for i, q in enumerate(query):
        brute = np.sort([1 - float(q @ t) for t in train])[:3].mean()
        assert got["distance"][i] == pytest.approx(brute, abs=1e-5)
        assert got["percentile"][i] == pytest.approx(100 * np.mean(model.val_distances <= got["distance"][i]))
    assert model.assess(train[:5])["distance"] == pytest.approx(
        familiarity.knn_distance(train[:5], train, 3), abs=1e-6)


def test_k_one_is_the_nearest_image_and_copies_of_training_images_are_familiar():
    rng = np.random.default_rng(2)
    train, val = _manifold(300, rng), _manifold(200, rng)
    model = familiarity.fit(train, val, k=1)
    result = model.assess(train[:10])
    assert np.allclose(result["distance"], 0, atol=1e-5) and not result["unfamiliar"].any()


def test_record_is_json_and_says_how_the_cut_was_chosen():
    rng = np.random.default_rng(3)
    parts = np.array(["train"] * 300 + ["val"] * 100)
    model = familiarity.from_index(_manifold(400, rng), parts, k=5, quantile=0.99)
    record = json.loads(json.dumps(model.record()))
    assert record["k"] == 5 and record["quantile"] == 0.99 and record["n_val"] == 100 and record["n_train"] == 300
    assert record["cut"] == pytest.approx(np.quantile(model.val_distances, 0.99))
    assert "nearest training images" in record["method"]


def test_bad_settings_are_config_errors():
    rng = np.random.default_rng(4)
    with pytest.raises(ConfigError, match="quantile"):
        familiarity.fit(_manifold(10, rng), _manifold(10, rng), quantile=1.0)
    with pytest.raises(ConfigError, match="k must"):
        familiarity.fit(_manifold(10, rng), _manifold(10, rng), k=0)


def _png(array: np.ndarray) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_tiny_and_constant_images_are_refused():
    black_pixel = _png(np.zeros((1, 1, 3), dtype=np.uint8))
    assert "1x1 pixels" in familiarity.image_problems(black_pixel, min_side=32)[0]
    flat = np.full((300, 400, 3), 128, dtype=np.uint8)
    assert "flat colour" in familiarity.image_problems(_png(flat))[0]
    assert familiarity.image_problems(flat)  # arrays too
    buffer = io.BytesIO()
    Image.fromarray(flat).save(buffer, format="JPEG", quality=75)
    assert familiarity.image_problems(Image.open(buffer))
    assert familiarity.image_problems(np.zeros((20, 64), dtype=np.uint8), min_side=32)


def test_textured_images_pass_and_huge_ones_are_sampled():
    rng = np.random.default_rng(5)
    textured = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert familiarity.image_problems(_png(textured), min_side=32) == []
    assert familiarity.image_problems(textured, min_side=32) == []
    big = Image.new("RGB", (6000, 4000), (200, 150, 120))
    assert familiarity.image_problems(big)
    assert familiarity.image_problems(Image.new("LA", (100, 100)))  # other modes convert


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real-image sample absent ({SAMPLE}); its check is skipped")
def test_real_sample_images_pass():
    files = sorted((SAMPLE / "train-image" / "image").glob("*.jpg"))[:50]
    assert files
    for path in files:
        with Image.open(path) as image:
            assert familiarity.image_problems(image, min_side=64, min_std=2.0) == [], path


def test_appearance_features_are_histograms_that_tell_photos_from_flat_cartoons():
    rng = np.random.default_rng(6)
    photos = np.clip(rng.normal(150, 30, (40, 32, 32, 3)), 0, 255).astype(np.uint8)
    cartoons = np.zeros((10, 32, 32, 3), dtype=np.uint8)
    cartoons[:, :, :] = (230, 160, 200)
    cartoons[:, 8:24, 8:24] = (80, 40, 120)
    features = familiarity.appearance_features(np.concatenate([photos, cartoons]))
    assert features.shape == (50, 9)
    assert np.allclose((features ** 2).sum(1), 1, atol=1e-5)
    model = familiarity.fit(features[:30], features[30:40], k=5, quantile=0.9)
    assert model.assess(features[40:])["unfamiliar"].all()


def test_appearance_features_do_not_depend_on_the_chunk():
    pixels = np.random.default_rng(7).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    assert np.array_equal(familiarity.appearance_features(pixels, chunk=3), familiarity.appearance_features(pixels))
    assert familiarity.appearance_features(pixels[:0]).shape == (0, 9)


def test_appearance_features_are_numpys_histogram_of_the_laplacian():
    # The counting is written for speed; a run's index holds descriptors made by the version before, so the new
    # way must give the very same numbers: np.histogram of |Laplacian| of the channel mean, edges included.
    rng = np.random.default_rng(8)
    pixels = np.concatenate([rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8),
                             np.zeros((1, 24, 24, 3), dtype=np.uint8),  # every value on the first edge, 0
                             (np.indices((24, 24)).sum(0) % 2 * 255).astype(np.uint8)[None, ..., None].repeat(3, 3),
                             np.clip(rng.normal(128, 2, (3, 24, 24, 3)), 0, 255).astype(np.uint8)])
    grey = (pixels[..., 0].astype(np.float32) + pixels[..., 1] + pixels[..., 2]) / 3 / 255
    laplacian = np.abs(4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2]
                       - grey[:, 1:-1, 2:]).reshape(len(pixels), -1)
    assert laplacian.max() == 4  # the checkerboard reaches the top of the last bin
    counts = np.stack([np.histogram(row, bins=familiarity._TEXTURE_BINS)[0] for row in laplacian])
    expected = np.sqrt(counts / laplacian.shape[1]).astype(np.float32)
    assert np.array_equal(familiarity.appearance_features(pixels), expected)
