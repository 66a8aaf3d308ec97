import pytest
import torch

from melanoma_siamese.checkpoint import CheckpointError, atomic_save, load_model, save_model
from melanoma_siamese.models import Classifier, Encoder


def test_roundtrip_rebuilds_model_from_file_alone(tmp_path):
    encoder = Encoder("resnet18", "none", 64, ce_head=True).eval()
    save_model(encoder, tmp_path / "m" / "siamese.pth", epoch=3)
    data = torch.load(tmp_path / "m" / "siamese.pth", weights_only=True)  # plain dict, weights_only safe
    assert data["kind"] == "siamese" and data["epoch"] == 3
    loaded, _ = load_model(tmp_path / "m" / "siamese.pth", "siamese")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), encoder(x))
    assert not list((tmp_path / "m").glob("*.tmp"))


def test_ddp_and_compile_prefixes_load(tmp_path):
    model = Classifier(16, 0.1)
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"format": 1, "kind": "classifier", "args": model.args, "state_dict": state}, tmp_path / "c.pth")
    loaded, _ = load_model(tmp_path / "c.pth", "classifier")
    assert torch.equal(loaded.net[0].weight, model.net[0].weight)


def test_truncated_or_wrong_checkpoint_named(tmp_path):
    path = tmp_path / "classifier.pth"
    save_model(Classifier(16, 0.1), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path, "classifier")
    other = tmp_path / "siamese.pth"
    save_model(Classifier(16, 0.1), other)
    with pytest.raises(CheckpointError, match="expected a siamese model"):
        load_model(other, "siamese")


def test_failed_save_leaves_previous_file(tmp_path):
    path = tmp_path / "x.pth"
    atomic_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_other_format_is_refused_with_the_version_named(tmp_path):
    path = tmp_path / "c.pth"
    save_model(Classifier(16, 0.1), path)
    data = torch.load(path, weights_only=True)
    for wrong in (2, None):
        data["format"] = wrong
        torch.save(data, path)
        with pytest.raises(CheckpointError, match=f"has format {wrong!r}.*reads format 1"):
            load_model(path, "classifier")
