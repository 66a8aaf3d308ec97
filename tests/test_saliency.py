from types import SimpleNamespace

import numpy as np
import pytest
import torch

from melanoma_siamese.config import load_config
from melanoma_siamese.models import Classifier, Encoder
from melanoma_siamese.saliency import (BELOW_THRESHOLD, FOR_MELANOMA, MIN_CELLS, NO_EVIDENCE, SaliencyStage,
                                       caption, choose_stage, figure, note, saliency_maps, saliency_overlays,
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


LAYER2 = SaliencyStage("layer2", 8, 64)


def answer(probability: float, threshold: float = 0.2389, flagged: bool = False) -> dict:
    return {"probability": probability, "threshold": threshold, "calibrated": True, "prevalence": 0.2457,
            "decision": "melanoma" if probability >= threshold else "not melanoma", "unfamiliar": {"flag": flagged},
            "trained_on_generated_images": False}


def test_caption_of_a_benign_answer_says_the_map_is_not_a_finding():
    lines = caption("lesion.jpg", answer(0.0048, flagged=True), LAYER2, True)
    text = " ".join(lines)
    assert lines[0] == "lesion.jpg"
    assert "P(melanoma) 0.0048" in text and "24.57% melanoma prevalence" in text and "not melanoma" in text
    assert "threshold 0.2389" in text and "UNFAMILIAR" in text
    assert LAYER2.describe() in text and "drawn 4x larger (nearest neighbour)" in text
    assert BELOW_THRESHOLD in lines and FOR_MELANOMA in lines and NO_EVIDENCE not in lines


def test_caption_above_the_threshold_and_without_evidence():
    above = caption("a.png", answer(0.70), LAYER2, True)
    assert "-> melanoma" in above[1] and BELOW_THRESHOLD not in above and FOR_MELANOMA in above
    assert not any("UNFAMILIAR" in line for line in above)
    empty = caption("a.png", answer(0.0048), LAYER2, False)
    # An all-zero map is said to be empty, not drawn as a map of "the little evidence there is".
    assert NO_EVIDENCE in empty and BELOW_THRESHOLD not in empty and FOR_MELANOMA not in empty
    raw = caption("a.png", {**answer(0.3), "calibrated": False, "prevalence": None}, LAYER2, True)
    assert "raw score, not calibrated" in raw[1]
    # The probability and the threshold at the decimals it takes to see which is larger.
    assert "P(melanoma) 0.27881 " in caption("a.png", answer(0.278812, 0.278834), LAYER2, True)[1]
    assert "(threshold 0.27883)" in caption("a.png", answer(0.278812, 0.278834), LAYER2, True)[1]
    known = {**answer(0.1), "known_case": {"note": "indistinguishable from training image X (not melanoma)"}}
    assert "Known case: indistinguishable from training image X (not melanoma)." in caption("a", known, LAYER2, True)


def test_note_names_the_stage_and_an_empty_map():
    assert note(LAYER2, True) == LAYER2.describe() + "."
    assert note(LAYER2, False).endswith(NO_EVIDENCE) and "8x8" in note(LAYER2, False)


@pytest.mark.parametrize("evidence", [True, False])
def test_figure_is_drawn_larger_than_the_model_input_with_its_caption(tmp_path, evidence):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels, heat = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    short, long = tmp_path / "short.png", tmp_path / "long.png"
    figure(pixels, heat, caption("a.jpg", answer(0.0048), LAYER2, evidence), evidence, short)
    figure(pixels, heat, caption("b" * 300 + ".jpg", answer(0.0048), LAYER2, evidence), evidence, long)
    with Image.open(short) as a, Image.open(long) as b:
        # Two 256 px panels side by side; a long file name wraps onto more lines instead of running off the edge.
        assert a.size[0] >= 2 * 256 and a.size[1] > 256 + 100 and b.size[0] == a.size[0] and b.size[1] > a.size[1]
