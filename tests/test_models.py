from pathlib import Path

import pytest
import torch
import torchvision

from melanoma_siamese.models import Classifier, Encoder, WeightsError, build_backbone


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_encoder_gives_unit_embeddings(name):
    encoder = Encoder(name, "none", 512, ce_head=True).eval()
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 512) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert encoder.head(out).shape == (2, 2)


def test_classifier_shape():
    model = Classifier(512, 0.4)
    linear = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(512, 256), (256, 64), (64, 2)]
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in model.net)
    assert model(torch.randn(3, 512)).shape == (3, 2)


def test_weights_load_from_local_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-local.pth"
    torch.save(reference.state_dict(), path)
    model = build_backbone("resnet18", str(path), 512)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 512


def test_wrong_weights_file_is_refused_by_name(tmp_path):
    path = tmp_path / "not-resnet.pth"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError) as err:
        build_backbone("resnet18", str(path), 512)
    assert str(path) in str(err.value) and "foo.weight" in str(err.value)
    with pytest.raises(WeightsError, match="does not exist"):
        build_backbone("resnet18", str(tmp_path / "absent.pth"), 512)


def test_imagenet_weights_found_in_torch_hub_cache(tmp_path, monkeypatch):
    """The real weights API path: torchvision looks in $TORCH_HOME/hub/checkpoints before downloading."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    target = Path(tmp_path) / "hub" / "checkpoints" / Path(weights.url).name
    target.parent.mkdir(parents=True)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), target)
    model = build_backbone("resnet18", "imagenet", 512)
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_imagenet_offline_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as err:
        build_backbone("resnet18", "imagenet", 512)
    message = str(err.value)
    assert "resnet18" in message and "model.pretrained=none" in message and "hub/checkpoints" in message


def test_unknown_backbone():
    with pytest.raises(WeightsError, match="unknown torchvision model"):
        build_backbone("resnet5000", "none", 512)
