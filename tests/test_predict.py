"""predict and pair on a tiny trained run: numbers against the run's own evaluation, bad files, saliency."""
import dataclasses
import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melanoma_siamese.cli import main
from melanoma_siamese.inference import Predictor, RetrievalIndex, load_run, predict_paths, val_pair_distances
from melanoma_siamese.inputs import expand_inputs, read_image
from melanoma_siamese.runfolder import RunFolder

from inference_run import image_files, png_header_only, shared_run


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    return shared_run(tiny_data, tmp_path_factory)


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir, "cpu")


def test_cli_probability_and_knn_vote_equal_the_runs_evaluation(run_dir, tiny_data, tmp_path, capsys):
    predictions = pd.read_csv(RunFolder(run_dir).predictions, dtype={"isic_id": str})
    test = predictions[predictions["part"] == "test"].head(6)
    folder = tmp_path / "new"
    folder.mkdir()
    for image_id in test["isic_id"]:
        shutil.copy(tiny_data / "train-image" / "image" / f"{image_id}.jpg", folder)
    out = tmp_path / "out.csv"
    assert main(["predict", "--run", str(run_dir), str(folder), "--csv", str(out), "--neighbours", "3",
                 "--device", "cpu"]) == 0
    rows = pd.read_csv(out).sort_values("path").reset_index(drop=True)
    expected = test.sort_values("isic_id").reset_index(drop=True)
    assert len(rows) == 6 and (rows["status"] == "ok").all()
    # The raw score equals evaluation's, and so does the calibrated probability shown at the same prevalence.
    assert np.allclose(rows["score"], expected["prob_melanoma"], atol=1e-5)
    assert np.allclose(rows["probability"], expected["probability"], atol=1e-5)
    assert np.allclose(rows["knn_probability"], expected["knn_prob_melanoma"], atol=1e-5)
    threshold = json.loads(RunFolder(run_dir).thresholds.read_text())["classifier"]
    assert ((rows["score"] >= threshold) == (rows["decision"] == "melanoma")).all()
    # The threshold shown is on the probability's scale: no probability above it beside "not melanoma".
    assert ((rows["probability"] >= rows["threshold"]) == (rows["decision"] == "melanoma")).all()
    assert (rows["score_threshold"] == threshold).all()
    assert {"neighbour_3_id", "neighbour_3_label", "neighbour_3_distance"} <= set(rows.columns)
    assert "neighbour_4_id" not in rows.columns
    printed = capsys.readouterr().out
    assert "P(melanoma)" in printed and expected["isic_id"][0] in printed


def test_neighbours_are_the_exact_nearest_training_images(run, tiny_data):
    train = run.index.part("train")
    paths = [tiny_data / "train-image" / "image" / f"{i}.jpg" for i in train.ids[:4]]
    rows = predict_paths(Predictor(run), paths, neighbours=4)
    for row, image_id, emb in zip(rows, train.ids[:4], train.embeddings[:4]):
        # A training image finds itself first; the rest match a brute-force cosine ranking.
        assert row["neighbour_1_id"] == image_id and row["neighbour_1_distance"] < 1e-5
        brute = sorted(1 - float(np.dot(emb, other)) for other in train.embeddings)[:4]
        assert np.allclose([row[f"neighbour_{n}_distance"] for n in range(1, 5)], brute, atol=1e-5)
        # And the answer says so: its vote rests on its own training label.
        assert row["known_case"] == image_id


def test_an_image_the_model_was_trained_on_is_named_as_such(run, run_dir, tiny_data, capsys):
    train_id, test_id = run.index.part("train").ids[0], run.index.part("val").ids[0]
    paths = [tiny_data / "train-image" / "image" / f"{i}.jpg" for i in (train_id, test_id)]
    assert main(["predict", "--run", str(run_dir), *map(str, paths), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"{paths[0]}: indistinguishable from training image {train_id} " in err
    assert "the model was trained on this image or a copy" in err
    assert str(paths[1]) not in err  # a validation image is not a training image
    pixels = np.stack([read_image(p, run.config.data.image_size) for p in paths])
    # With test-time augmentation the embedding moves off the index's; the same pixels still say so.
    e = run.config.evaluation
    tta = dataclasses.replace(run, config=dataclasses.replace(run.config, evaluation=dataclasses.replace(e, tta=True)))
    for predictor in (Predictor(run), Predictor(tta)):
        answer = predictor.answers(pixels)
        assert answer[0]["known_case"]["id"] == train_id and answer[1]["known_case"] is None
    assert Predictor(tta).score(pixels[:1])[0] @ run.index.embeddings[run.index.ids == train_id][0] < 1 - 1e-6


def test_bad_files_get_a_row_with_the_reason_and_a_nonzero_exit(run_dir, tiny_data, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = image_files(tiny_data)[:3]
    for p in good:
        shutil.copy(p, folder)
    (folder / "notes.jpg").write_text("not an image")
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:150])
    (folder / "bomb.png").write_bytes(png_header_only(50000, 50000))
    out = tmp_path / "out.csv"
    assert main(["predict", "--run", str(run_dir), str(folder), str(tmp_path / "absent.jpg"), "--csv", str(out),
                 "--no-progress"]) == 1
    rows = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert (rows["status"] == "ok").sum() == 3
    reasons = {p.split("/")[-1]: r for p, r in rows.loc[rows["status"] == "failed", "reason"].items()}
    assert "not an image" in reasons["notes.jpg"]
    assert reasons["truncated.jpg"]
    # Past Pillow's own limit too, the tool's words and limit, not only Pillow's.
    assert reasons["bomb.png"].startswith("image dimensions exceed the limit of 64000000 pixels")
    assert "does not exist" in reasons["absent.jpg"]
    assert f"4 of 7 file(s) could not be used; the reason for each is in the `reason` column of {out}" in \
        capsys.readouterr().err
    # Without --csv the reasons are the table's last column, and the closing line says so.
    assert main(["predict", "--run", str(run_dir), str(folder / "notes.jpg"), "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert "FAILED" in printed.out and "not an image" in printed.out.splitlines()[-1]
    assert "the last column of the table above (FAILED rows)" in printed.err


def test_a_pixel_limit_pillow_would_not_honour_is_refused_before_loading(run_dir, tiny_data, capsys):
    image = str(image_files(tiny_data)[0])
    for command in (["predict", "--run", str(run_dir), image], ["pair", "--run", str(run_dir), image, image]):
        assert main([*command, "--max-megapixels", "500"]) == 2
        assert "--max-megapixels 500: must be above 0 and at most 178" in capsys.readouterr().err
    assert main(["predict", "--run", str(run_dir), image, "--max-megapixels", "178", "--no-progress"]) == 0


def test_csv_list_batches_and_progress_bar(run, run_dir, tiny_data, tmp_path, capsys, monkeypatch):
    paths = image_files(tiny_data)[:10]
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": [str(p) for p in paths[:5]] + [p.name for p in paths[5:]]}).to_csv(listing, index=False)
    for p in paths[5:]:
        shutil.copy(p, tmp_path)  # relative entries are read beside the CSV
    assert expand_inputs([listing]) == paths[:5] + [tmp_path / p.name for p in paths[5:]]
    out = tmp_path / "out.csv"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: the bar shows (progress.bar_disable)
    assert main(["predict", "--run", str(run_dir), str(listing), "--csv", str(out), "--batch-size", "3"]) == 0
    assert "Predicting" in capsys.readouterr().err
    batched = pd.read_csv(out)["probability"].to_numpy()
    whole = [r["probability"] for r in predict_paths(Predictor(run), paths, batch_size=64)]
    assert np.allclose(batched, whole, atol=1e-6)


def test_files_and_a_csv_list_with_saliency_overlays(run_dir, tiny_data, tmp_path):
    first, second, third = image_files(tiny_data)[:3]
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": [str(third)]}).to_csv(listing, index=False)
    maps = tmp_path / "maps"
    out = tmp_path / "out.csv"
    assert main(["predict", "--run", str(run_dir), str(first), str(second), str(listing), "--neighbours", "3",
                 "--saliency", str(maps), "--csv", str(out)]) == 0
    rows = pd.read_csv(out)
    assert rows["path"].tolist() == [str(first), str(second), str(third)]
    written = rows["saliency"].tolist()
    assert sorted(map(str, maps.iterdir())) == sorted(written)
    with Image.open(written[0]) as image:
        assert image.size[0] > 2 * 32 and image.mode in ("RGB", "RGBA")


def test_saliency_figures_are_readable_and_the_csv_notes_the_stage(run, tiny_data, tmp_path):
    from melanoma_siamese.saliency import choose_stage

    paths = image_files(tiny_data)[:2]
    rows = predict_paths(Predictor(run), paths, saliency_dir=tmp_path / "maps")
    stage, _ = choose_stage(run.encoder, run.config.data.image_size)
    for row in rows:
        # The note sits next to the path: the stage and its resolution, as the server's caption states them.
        assert list(row)[-2:] == ["saliency", "saliency_note"] and stage.describe() in row["saliency_note"]
        with Image.open(row["saliency"]) as image:
            # The image and its overlay side by side, each at least 256 px, over a caption: not a bare 32 px overlay.
            assert image.size[0] >= 2 * 256 and image.size[1] > 256


def test_gradcam_follows_the_melanoma_logit():
    import torch

    from melanoma_siamese.models import Classifier, Encoder
    from melanoma_siamese.saliency import MelanomaLogits, gradcam_maps

    torch.manual_seed(0)
    encoder, classifier = Encoder("resnet18", "none", 512).eval(), Classifier(512).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(MelanomaLogits(encoder, classifier)(images), classifier(encoder(images)))
    maps = gradcam_maps(encoder, classifier, images)
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert maps.std() > 0.05  # layer4 is 2 x 2 here: a map with structure, not a constant


def test_pair_distance_equals_the_index_and_is_placed_among_validation_pairs(run_dir, run, tiny_data, capsys):
    train = run.index.part("train")
    a, b = (tiny_data / "train-image" / "image" / f"{i}.jpg" for i in train.ids[:2])
    assert main(["pair", "--run", str(run_dir), str(a), str(b), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["distance"] == pytest.approx(1 - float(train.embeddings[0] @ train.embeddings[1]), abs=1e-5)
    reference = val_pair_distances(run.index)
    same = report["validation"]["same_class"]
    assert same["pairs"] == len(reference["same_class"])
    assert same["share_closer"] == pytest.approx((reference["same_class"] <= report["distance"]).mean())
    assert main(["pair", "--run", str(run_dir), str(a), str(a)]) == 0
    out = capsys.readouterr().out
    assert "Embedding distance (1 - cosine similarity): below 0.000001: the model cannot tell the two apart" in out
    # Each image says how familiar it is, flagged or not: a missing warning must not read as a check not made.
    assert out.count("    not flagged unfamiliar: mean distance ") + out.count("    UNFAMILIAR: ") == 2, out


def test_pair_prints_probability_and_threshold_at_the_decimals_that_order_them(capsys):
    from melanoma_siamese.predict import _print_pair

    unfamiliar = {"flag": False, "percentile": None, "reason": "r"}
    report = {"trained_on_generated_images": False, "distance": 0.01, "calibrated": True, "prevalence": 0.25,
              "prevalence_source": "s", "threshold": 0.278834, "validation": {
                  "same_class": {"pairs": 0}, "other_class": {"pairs": 0}},
              "images": [{"path": "a.jpg", "probability": 0.278812, "decision": "not melanoma",
                          "unfamiliar": unfamiliar}]}
    _print_pair(report)
    # 0.2788 beside a threshold of 0.2788 would hide which is larger.
    assert "P(melanoma) 0.27881 (calibrated, at 25.00% melanoma (s)) -> not melanoma (threshold 0.27883)" in \
        capsys.readouterr().out


def test_val_pair_distances_against_every_pair():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([0, 1, 0, 0, 1, 1, 0])
    index = RetrievalIndex(emb, np.array([str(i) for i in range(7)]), labels, np.array(["val"] * 7))
    got = val_pair_distances(index)
    same = [1 - emb[i] @ emb[j] for i in range(7) for j in range(i + 1, 7) if labels[i] == labels[j]]
    other = [1 - emb[i] @ emb[j] for i in range(7) for j in range(i + 1, 7) if labels[i] != labels[j]]
    assert np.allclose(sorted(got["same_class"]), sorted(same), atol=1e-6)
    assert np.allclose(sorted(got["other_class"]), sorted(other), atol=1e-6)


def test_threshold_is_half_and_says_so_without_threshold_json(tmp_path):
    thresholds = RunFolder(tmp_path).read_thresholds()
    assert thresholds.classifier == 0.5 and "no threshold.json" in thresholds.source


def test_not_a_run_folder_exits_2(tmp_path, tiny_data):
    assert main(["predict", "--run", str(tmp_path), str(image_files(tiny_data)[0])]) == 2


def test_the_run_records_its_calibration_and_unfamiliar_rule(run_dir):
    trust = RunFolder(run_dir).read_trust()
    assert trust["trained_on_generated_images"] is True
    assert trust["calibration"]["method"] == "platt" and 0 < trust["calibration"]["prevalence"] < 1
    assert trust["unfamiliar"]["quantile"] == 0.99 and trust["unfamiliar"]["n_val"] > 0
    assert trust["unfamiliar_appearance"]["cut"] > 0
    metrics = RunFolder(run_dir).read_metrics()
    assert {"brier_before", "brier_after", "ece_before", "ece_after"} <= set(metrics["calibration"]["test"])
    rule = metrics["unfamiliar"]
    assert set(rule["flagged_share"]) == {"val", "test"}
    assert rule["texture"]["cut"] == trust["unfamiliar_appearance"]["cut"]
    for part, either in rule["flagged_share"].items():  # flagged by either cut: at least each alone, at most both
        alone = rule["flagged_share_embedding"][part], rule["flagged_share_texture"][part]
        assert max(alone) <= either <= sum(alone) + 1e-9


def test_noise_is_flagged_unfamiliar_and_tiny_or_flat_images_are_refused(run, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (200, 200), (128, 128, 128)).save(tmp_path / "grey.png")
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in
            predict_paths(Predictor(run), [tmp_path / n for n in ("noise.png", "dot.png", "grey.png")])}
    assert rows["noise.png"]["status"] == "ok" and rows["noise.png"]["unfamiliar"]
    assert rows["noise.png"]["unfamiliar_percentile"] == 100
    # Each rule's own share is given: the texture's too, not only the embedding's.
    assert 0 <= rows["noise.png"]["unfamiliar_texture_percentile"] <= 100
    assert rows["dot.png"]["status"] == "failed" and "at least 32 pixels" in rows["dot.png"]["reason"]
    assert rows["grey.png"]["status"] == "failed" and "flat colour" in rows["grey.png"]["reason"]


def test_prevalence_moves_the_probability_and_its_threshold_together(run, tiny_data):
    paths = image_files(tiny_data)[:8]
    low = predict_paths(Predictor(run, prevalence=0.01), paths)
    high = predict_paths(Predictor(run, prevalence=0.5), paths)
    for a, b in zip(low, high):
        assert a["score"] == b["score"] and a["decision"] == b["decision"]
        assert a["probability"] < b["probability"] and a["threshold"] < b["threshold"]
        assert (a["probability"] >= a["threshold"]) == (a["decision"] == "melanoma")
    with pytest.raises(Exception, match="between 0 and 1"):
        Predictor(run, prevalence=1.5)


def test_terminal_shows_a_low_threshold_and_the_votes_decision_legibly(run, tiny_data, capsys):
    """At a low prevalence the threshold has more than four decimals; a kNN vote at its threshold is a 'mel'."""
    from melanoma_siamese.display import distance_text
    from melanoma_siamese.predict import _header, _terminal_table

    predictor = Predictor(run, prevalence=0.001)
    rows = predict_paths(predictor, image_files(tiny_data)[:6], neighbours=2)
    header = "\n".join(_header(predictor))
    threshold = predictor.threshold
    assert threshold < 0.01 and f"Threshold on that scale: {threshold:.6g} " in header
    assert float(f"{threshold:.6g}") == pytest.approx(threshold, rel=1e-5)  # significant digits, not 0.0013
    # The neighbours' distances get a scale: a typical validation image's, from the run's own rule.
    typical = float(np.median(run.familiarity.val_distances))
    assert f"mean distance to its {run.familiarity.k} nearest training images is {distance_text(typical)}." in header
    table = _terminal_table(rows, 2).splitlines()[1:]
    for row, line in zip(rows, table):
        assert f" {row['knn_probability']:.3f} {'mel' if row['knn_decision'] == 'melanoma' else 'ben'} " in line
    at_threshold = dict(rows[0], knn_probability=run.thresholds.knn, knn_decision="melanoma")
    assert f"{run.thresholds.knn:.3f} mel" in _terminal_table([at_threshold], 2)
    header, first = _terminal_table(rows, 2).splitlines()[:2]  # the vote column stays under its heading
    assert header.index("kNN vote") + len("kNN vote") == first.index(" mel ") + 4 or \
        header.index("kNN vote") + len("kNN vote") == first.index(" ben ") + 4
