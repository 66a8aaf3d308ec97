import numpy as np
import torch

from melanoma_siamese.config import AugmentConfig
from melanoma_siamese.data.images import build_cache, sample_triplets, train_transform
from melanoma_siamese.inputs import decode_image

from helpers import write_image


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


def _build_after(barrier, paths, cache_dir, results):
    barrier.wait()
    try:
        build_cache(paths, 16, cache_dir, workers=1)
        results.put("ok")
    except Exception as exc:  # reported to the test, not lost in the child
        results.put(repr(exc))


def test_processes_building_one_cache_at_once_all_succeed(tmp_path):
    """Runs started side by side (compare on one GPU, DDP ranks) build the same cache concurrently."""
    import multiprocessing as mp

    paths = [str(write_image(tmp_path / f"{i}.jpg", color=(i * 20, 40, 60))) for i in range(12)]
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_build_after, args=(barrier, paths, tmp_path / "cache", results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert outcomes == ["ok"] * 4
    cache = build_cache(paths, 16, tmp_path / "cache")
    assert cache.array.shape == (12, 16, 16, 3) and not list((tmp_path / "cache").glob("*tmp*"))


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


def test_per_sample_augmentation_is_the_same_with_any_workers():
    """The reference's loader: one DataLoader for the whole run (persistent workers). An item's
    augmentation is a function of its seed alone: the same with 0 or 2 workers, in every epoch, and the
    global torch generator of the process is left as it was."""
    from torch.utils.data import DataLoader

    from melanoma_siamese.config import AugmentConfig
    from melanoma_siamese.data.images import EpochBatches, TripletImages, item_seeds, sample_triplets, triplet_keys

    array = np.random.default_rng(0).integers(0, 255, (12, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(12) % 2
    transform = train_transform(16, 0.5, 0.5, AugmentConfig())
    results = {}
    for workers in (0, 2):
        batches = EpochBatches()
        loader = DataLoader(TripletImages(array, transform), batch_sampler=batches, num_workers=workers,
                            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(123)
        before = torch.get_rng_state()
        epochs = []
        for epoch in (1, 2):
            triplets = sample_triplets(np.arange(12), labels, 8, True, np.random.default_rng([0, epoch]))
            keys = triplet_keys(triplets, item_seeds(0, epoch, 8))
            batches.set([keys[:4], keys[4:]])
            epochs.append([torch.cat(b) for b in loader])
        assert torch.equal(torch.get_rng_state(), before)
        results[workers] = epochs
        del loader
    for a, b in zip(results[0], results[2]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(results[0][0][0], results[0][1][0])  # new triplets and seeds each epoch
