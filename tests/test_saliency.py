from types import SimpleNamespace

import numpy as np
import pytest
import torch

from melanoma_siamese.config import load_config
from melanoma_siamese.models import Classifier, Encoder
from melanoma_siamese.saliency import (MIN_CELLS, choose_stage, saliency_maps, saliency_overlays,
                                       saliency_with_stage, stage_sizes)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return Encoder("resnet18", "none", 32).eval(), Classifier(32).eval()


@pytest.mark.parametrize("size, stage, cells", [(256, "layer4", 8), (128, "layer3", 8), (64, "layer2", 8),
                                                (32, "layer1", 8), (224, "layer3", 14)])
def test_latest_stage_with_at_least_eight_cells(resnet, size, stage, cells):
    chosen, module = choose_stage(resnet[0], size)
    assert (chosen.name, chosen.cells, chosen.useful) == (stage, cells, True)
    assert module is dict(((f"layer{i}", getattr(resnet[0].backbone, f"layer{i}")[-1]) for i in range(1, 5)))[stage]
    assert f"{cells}x{cells}" in chosen.describe() and f"{size} px" in chosen.describe()


def test_too_small_an_image_says_the_map_is_not_useful(resnet):
    chosen, _ = choose_stage(resnet[0], 16)
    assert chosen.name == "layer1" and chosen.cells == 4 and not chosen.useful
    assert "too coarse" in chosen.describe() and chosen.to_dict()["useful"] is False


def test_features_backbones_have_stages_too():
    encoder = Encoder("mobilenet_v3_large", "none", 16).eval()
    chosen, _ = choose_stage(encoder, 64)
    sizes = stage_sizes(encoder, 64)
    assert chosen.cells >= MIN_CELLS and chosen.name.startswith("features[")
    later = int(chosen.name[len("features["):-1]) + 1
    assert all(size < MIN_CELLS for size in sizes[later:])


def test_forced_stage_and_unknown_stage(resnet):
    assert choose_stage(resnet[0], 64, name="layer4")[0].cells == 2
    with pytest.raises(ValueError, match="layer1"):
        choose_stage(resnet[0], 64, name="layer9")


def test_maps_and_overlays_of_a_loaded_run(resnet):
    run = SimpleNamespace(config=load_config(None, ["data.image_size=64"]), encoder=resnet[0],
                          classifier=resnet[1], device=torch.device("cpu"))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    maps, stage = saliency_maps(run, pixels)
    assert maps.shape == (2, 64, 64) and stage.name == "layer2"
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    overlays, stage, evidence = saliency_with_stage(run, pixels)
    assert overlays[0].shape == (64, 64, 3) and overlays[0].dtype == np.uint8
    assert evidence == [bool(m.max() > 0) for m in maps]
    assert np.array_equal(saliency_overlays(run, pixels)[1], overlays[1])
    assert resnet[0].training is False
