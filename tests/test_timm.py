"""Backbones from timm (`model.backbone=timm:<name>`): a tiny convolutional and a tiny transformer model of timm's
own test set, random init, 32-64 px images."""
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from melanoma_siamese.checkpoint import load_model, save_model
from melanoma_siamese.cli import main
from melanoma_siamese.config import SiameseConfig, load_config
from melanoma_siamese.errors import ConfigError, WeightsError
from melanoma_siamese.models import Classifier, Encoder, EnsembleClassifier, EnsembleEncoder, build_backbone
from melanoma_siamese.optim import encoder_optimizer
from melanoma_siamese.inference import load_run
from melanoma_siamese.saliency import (choose_stage, gradcam_maps, saliency_maps, saliency_with_stage, stage_sizes,
                                       stages)

from helpers import TINY, set_args

timm = pytest.importorskip("timm")

CONV, VIT = "test_resnet", "test_vit"  # 0.4 M and 0.3 M parameters


@pytest.fixture(scope="module", params=[CONV, VIT])
def encoder(request):
    torch.manual_seed(0)
    return Encoder(f"timm:{request.param}", "none", 16).eval()


def test_embeddings_are_l2_normalised_and_of_the_embedding_width(encoder):
    z = encoder(torch.randn(3, 3, 64, 64))
    assert z.shape == (3, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)


def test_new_parameters_are_exactly_the_projection(encoder):
    projection = encoder.backbone.get_classifier()
    assert isinstance(projection, torch.nn.Linear) and projection.out_features == 16
    new = {id(p) for p in encoder.new_parameters()}
    assert new == {id(p) for p in projection.parameters()}
    # What optim.py builds on it: the projection at the full learning rate, every other layer at the backbone's.
    optimizer = encoder_optimizer(SiameseConfig(lr=1e-3, backbone_lr_scale=0.1), encoder, [])
    lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(lr) == len(list(encoder.parameters()))
    assert all(lr[id(p)] == pytest.approx(1e-3 if id(p) in new else 1e-4) for p in encoder.parameters())


def test_a_transformer_runs_at_any_multiple_of_its_patch():
    # dynamic_img_size: the position embedding follows the input, so a checkpoint needs no image size.
    encoder = Encoder(f"timm:{VIT}", "none", 8).eval()
    assert encoder.backbone.pretrained_cfg["input_size"][-1] == 160
    for size in (32, 64, 96):
        assert encoder(torch.randn(1, 3, size, size)).shape == (1, 8)


def test_checkpoint_round_trip_gives_the_same_outputs(encoder, tmp_path):
    save_model(encoder, tmp_path / "siamese.pth")
    loaded, data = load_model(tmp_path / "siamese.pth", "siamese")
    assert data["args"]["backbone"] == encoder.args["backbone"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), encoder(images))


@pytest.mark.parametrize("name, size, stage, caption", [
    (CONV, 64, "layer2", "8x8 map (8 px cells)"),
    (VIT, 64, "blocks.5.norm1", "4x4 grid of 16 px patches"),
    (VIT, 32, "blocks.5.norm1", "2x2 grid of 16 px patches"),
    ("test_mambaout", 64, "stages.1", "8x8 map (8 px cells)"),  # channels-last (NHWC) stage outputs
])
def test_gradcam_maps_of_the_image_size_with_a_caption(name, size, stage, caption):
    torch.manual_seed(0)
    encoder, classifier = Encoder(f"timm:{name}", "none", 16).eval(), Classifier(16).eval()
    chosen, module = choose_stage(encoder, size)
    assert chosen.name == stage and module is encoder.backbone.get_submodule(stage)
    assert caption in chosen.describe() and f"{size} px model input" in chosen.describe()
    maps = gradcam_maps(encoder, classifier, torch.randn(2, 3, size, size))
    assert maps.shape == (2, size, size) and np.isfinite(maps).all() and 0 <= maps.min() and maps.max() <= 1
    assert maps.max() > 0  # a map that is not blank: the gradients reached the stage


def test_the_conv_stages_are_timms_feature_info():
    encoder = Encoder(f"timm:{CONV}", "none", 16).eval()
    assert [n for n, _ in stages(encoder)] == [info["module"] for info in encoder.backbone.feature_info]
    assert stage_sizes(encoder, 64) == [32, 16, 8, 4, 2]


def test_gradcam_of_a_transformer_ensemble():
    torch.manual_seed(0)
    encoder = EnsembleEncoder([Encoder(f"timm:{VIT}", "none", 8) for _ in range(2)]).eval()
    classifier = EnsembleClassifier([Classifier(8) for _ in range(2)]).eval()
    run = SimpleNamespace(config=load_config(None, ["data.image_size=32"]), encoder=encoder, classifier=classifier,
                          device=torch.device("cpu"))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    maps, stage = saliency_maps(run, pixels)
    assert maps.shape == (2, 32, 32) and stage.patches and stage.cells == 2 and not stage.useful


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_path_loads_a_file_of_timms_layout(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model(CONV, pretrained=False)  # ImageNet's 1000-class classifier: left out
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), path)
    model = build_backbone(f"timm:{CONV}", str(path), 16)
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key
    assert model.fc.weight.shape == (16, source.fc.in_features)


def test_pretrained_path_of_another_model_is_refused(tmp_path):
    torch.save(timm.create_model(VIT, pretrained=False).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(WeightsError, match="does not fit timm's test_resnet: missing keys"):
        build_backbone(f"timm:{CONV}", str(tmp_path / "vit.pth"), 16)
    with pytest.raises(WeightsError, match="absent.pth does not exist"):
        build_backbone(f"timm:{CONV}", str(tmp_path / "absent.pth"), 16)


def test_imagenet_offline_says_what_was_tried_and_the_ways_out(monkeypatch):
    from huggingface_hub.utils import LocalEntryNotFoundError  # .errors only since huggingface_hub 0.24

    asked = []

    def offline(*args, **kwargs):
        asked.append(kwargs.get("filename"))
        raise LocalEntryNotFoundError("cannot reach the Hub and the file is not in the local cache")

    monkeypatch.setattr("timm.models._hub.hf_hub_download", offline)
    with pytest.raises(WeightsError) as err:
        build_backbone(f"timm:{CONV}", "imagenet", 16)
    message = str(err.value)
    assert asked, "the download was never attempted"
    for part in ["timm:test_resnet", "timm/test_resnet.r160_in1k", "LocalEntryNotFoundError",
                 "--set model.pretrained=/path/model.safetensors", "--set model.pretrained=none"]:
        assert part in message, part


def test_imagenet_for_a_model_timm_has_no_weights_for_is_refused(monkeypatch):
    monkeypatch.setattr("timm.models.get_pretrained_cfg", lambda name: None)
    with pytest.raises(WeightsError, match="timm has no pretrained weights for test_resnet"):
        build_backbone(f"timm:{CONV}", "imagenet", 16)


def test_unknown_and_empty_names_are_refused():
    with pytest.raises(ConfigError, match=r"no model 'test_resnett'; did you mean test_resnet.*timm.list_models"):
        build_backbone("timm:test_resnett", "none", 16)
    for value in ("timm:", "timm:  "):
        with pytest.raises(ConfigError, match="names no timm model; expected timm:<name>"):
            build_backbone(value, "none", 16)


def test_missing_timm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` then raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'melanoma-siamese\[timm\]'"):
        build_backbone(f"timm:{CONV}", "none", 16)


@pytest.mark.slow
def test_train_end_to_end_with_a_timm_backbone(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [item for item in TINY if not item.startswith(("model.backbone=", "siamese.epochs="))]
    overrides += [f"model.backbone=timm:{CONV}", "siamese.epochs=1"]
    assert main(["train", "--data", str(tiny_data), "--out", str(run_dir), "--seed", "0", *set_args(overrides)]) == 0
    run = load_run(run_dir)
    assert run.encoder.args["backbone"] == f"timm:{CONV}"
    pixels = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    overlays, stage, _ = saliency_with_stage(run, pixels)
    assert overlays[0].shape == (32, 32, 3) and stage.name == "layer1"


@pytest.mark.parametrize("name", [CONV, VIT])
def test_onnx_export_at_the_run_size_equals_torch(name, tmp_path):
    """A ViT built with dynamic_img_size resamples its position embedding at a size other than its own; the
    export fixes it at the run's size (the exporter cannot write that resample) and answers as PyTorch does."""
    ort = pytest.importorskip("onnxruntime")
    from melanoma_siamese.export import export_onnx
    from melanoma_siamese.inference import PixelModel

    torch.manual_seed(0)
    size = 48  # not test_vit's own size
    run = SimpleNamespace(encoder=Encoder(f"timm:{name}", "none", 16).eval(), classifier=Classifier(16).eval(),
                          config=load_config(None, [f"data.image_size={size}"]), device=torch.device("cpu"))
    path = export_onnx(run, tmp_path / "m.onnx")
    pixels = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    emb, prob = ort.InferenceSession(str(path)).run(None, {"images": pixels})
    with torch.no_grad():
        ref_emb, ref_prob = PixelModel(run.encoder, run.classifier, 0.5, 0.5)(torch.from_numpy(pixels))
    assert np.abs(emb - ref_emb.numpy()).max() < 1e-4 and np.abs(prob - ref_prob.numpy()).max() < 1e-4
    assert run.encoder(torch.rand(1, 3, 32, 32)).shape == (1, 16)  # the run's own model still takes any size
