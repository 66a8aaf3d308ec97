"""The Python API (api.load_run -> predict, embed, nearest): the same numbers as the `predict` command."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melanoma_siamese.api import load_run
from melanoma_siamese.cli import main
from melanoma_siamese.errors import ImageRejected

from inference_run import image_files, shared_run


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    return shared_run(tiny_data, tmp_path_factory)


@pytest.fixture(scope="module")
def model(run):
    return load_run(run)


def test_predict_equals_the_predict_command(model, run, tiny_data, tmp_path):
    paths = image_files(tiny_data)[:6]
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise)
    paths.append(noise)
    main(["predict", "--run", str(run), *map(str, paths), "--csv", str(tmp_path / "p.csv"), "--neighbours", "3"])
    csv = pd.read_csv(tmp_path / "p.csv")
    answers = model.predict(paths, neighbours=3)
    assert len(answers) == len(csv) == 7
    for answer, (_, row) in zip(answers, csv.iterrows()):
        for key in ("probability", "threshold", "score", "knn_probability"):
            assert answer[key] == pytest.approx(row[key], abs=1e-9), key
        assert answer["decision"] == row["decision"] and answer["knn_decision"] == row["knn_decision"]
        assert answer["unfamiliar"]["flag"] == row["unfamiliar"]
        assert answer["unfamiliar"]["distance"] == pytest.approx(row["unfamiliar_distance"], abs=1e-9)
        assert [s["id"] for s in answer["similar"]] == [str(row[f"neighbour_{n}_id"]) for n in (1, 2, 3)]
    assert answers[-1]["unfamiliar"]["flag"] and answers[0]["calibrated"]
    assert model.threshold == pytest.approx(csv["threshold"].iloc[0])


def test_arrays_give_the_same_answer_as_the_files(model, tiny_data):
    paths = image_files(tiny_data)[:4]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    from_files, from_arrays = model.predict(paths), model.predict(arrays)
    assert from_files == from_arrays
    # One image alone, and a 4-D batch, are accepted as such (a batch of one rounds differently, by ~1e-9).
    assert_same_answers(model.predict(arrays[0]), from_files[:1])
    assert model.predict(np.stack(arrays)) == from_files


def assert_same_answers(got: list[dict], expected: list[dict], tol: float = 1e-6) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in ("probability", "threshold", "score", "knn_probability"):
            assert a[key] == pytest.approx(b[key], abs=tol), key
        assert (a["decision"], a["unfamiliar"]["flag"]) == (b["decision"], b["unfamiliar"]["flag"])
        assert [s["id"] for s in a["similar"]] == [s["id"] for s in b["similar"]]


def test_embed_is_l2_normalised_and_nearest_lists_known_training_cases(model, run, tiny_data):
    paths = image_files(tiny_data)[:3]
    emb = model.embed(paths)
    assert emb.shape == (3, 512) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    near = model.nearest(paths, k=4)
    train = model.run.index.part("train")
    labels = dict(zip(train.ids, train.labels))
    for image, found in zip(emb, near):
        assert len(found) == 4
        distances = [n["distance"] for n in found]
        assert distances == sorted(distances)
        for n in found:
            assert labels[n["id"]] == n["label"] and n["label_name"] in ("melanoma", "not melanoma")
            expected = 1 - image @ train.embeddings[list(train.ids).index(n["id"])]
            assert n["distance"] == pytest.approx(max(expected, 0.0), abs=1e-5)
    # The images were training images: each is its own nearest case.
    own = [p.stem for p in paths]
    assert all(f[0]["id"] == i and f[0]["distance"] < 1e-4 for f, i in zip(near, own) if i in labels)


def test_unusable_images_are_refused_by_name(model, tmp_path):
    with pytest.raises(ImageRejected, match=r"images\[0\].*uint8"):
        model.predict([np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(ImageRejected, match=r"images\[1\] \(array\).*flat|images\[1\] \(array\).*standard"):
        model.predict([np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8),
                       np.full((32, 32, 3), 128, np.uint8)])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageRejected, match="broken.jpg"):
        model.embed([bad])


def test_module_gives_the_raw_score(model, tiny_data):
    import torch

    pixels = model.pixels(image_files(tiny_data)[:2])
    with torch.no_grad():
        emb, score = model.module(torch.from_numpy(pixels))
    answers = model.predict(image_files(tiny_data)[:2])
    assert np.allclose(score.numpy(), [a["score"] for a in answers], atol=1e-6)
