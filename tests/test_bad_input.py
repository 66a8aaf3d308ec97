"""Each bad input: a message naming file/column/value, exit status 2, nothing half-written."""
import pandas as pd

from melanoma_siamese.cli import main

from helpers import kaggle_dataset, set_args


def _train(data, out, capsys, *extra):
    # The default recipe (ImageNet weights): data problems must be reported before weights are looked for.
    code = main(["train", "--data", str(data), "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    return code, err


def _meta(data):
    return pd.read_csv(data / "train-metadata.csv", dtype=str)


def test_missing_column(tmp_path, capsys):
    data = kaggle_dataset(tmp_path / "d")
    _meta(data).drop(columns=["isic_id"]).to_csv(data / "train-metadata.csv", index=False)
    code, err = _train(data, tmp_path / "run", capsys)
    assert code == 2 and "train-metadata.csv" in err and "isic_id" in err and "columns found: patient_id, target" in err
    assert not (tmp_path / "run").exists()  # nothing written: no folder, no train.log, no TensorBoard events


def test_duplicate_ids(tmp_path, capsys):
    data = kaggle_dataset(tmp_path / "d")
    meta = _meta(data)
    meta.loc[1, "isic_id"] = meta.loc[0, "isic_id"]
    meta.to_csv(data / "train-metadata.csv", index=False)
    code, err = _train(data, tmp_path / "run", capsys)
    assert code == 2 and "duplicate image id" in err and "'ISIC_0000000'" in err


def test_label_that_maps_to_no_class(tmp_path, capsys):
    data = kaggle_dataset(tmp_path / "d")
    meta = _meta(data)
    meta.loc[3, "target"] = "2"
    meta.to_csv(data / "train-metadata.csv", index=False)
    code, err = _train(data, tmp_path / "run", capsys)
    assert code == 2 and "column 'target'" in err and "value '2'" in err and "ISIC_0000003" in err


def test_missing_and_undecodable_images(tmp_path, capsys):
    data = kaggle_dataset(tmp_path / "d")
    (data / "train-image" / "image" / "ISIC_0000005.jpg").unlink()
    (data / "train-image" / "image" / "ISIC_0000006.jpg").write_bytes(b"not an image at all")
    code, err = _train(data, tmp_path / "run", capsys)
    assert code == 2
    assert "ISIC_0000005" in err and "absent" in err
    assert "ISIC_0000006.jpg" in err and "does not decode" in err and "--skip-bad-images" in err


def test_skip_bad_images_drops_and_lists_them(tmp_path, capsys):
    data = kaggle_dataset(tmp_path / "d", n=60)
    (data / "train-image" / "image" / "ISIC_0000005.jpg").unlink()
    (data / "train-image" / "image" / "ISIC_0000006.jpg").write_bytes(b"garbage")
    run = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(run), "--skip-bad-images", *set_args(),
                 "--set", "siamese.epochs=1", "--set", "classifier.epochs=1"])
    out = capsys.readouterr().out
    assert code == 0 and "Skipped 2 bad image(s)" in out
    skipped = pd.read_csv(run / "skipped_images.csv")
    assert sorted(skipped["isic_id"]) == ["ISIC_0000005", "ISIC_0000006"]
    assert len(pd.read_csv(run / "split.csv")) == 58


def test_too_few_of_a_class(tmp_path, capsys):
    data = kaggle_dataset(tmp_path / "d", n=40, melanoma_every=20)  # 2 melanoma
    code, err = _train(data, tmp_path / "run", capsys)
    assert code == 2 and "melanoma (target 1)" in err and "at least" in err


def test_every_problem_at_once(tmp_path, capsys):
    data = kaggle_dataset(tmp_path / "d")
    meta = _meta(data)
    meta.loc[1, "isic_id"] = meta.loc[0, "isic_id"]
    meta.loc[3, "target"] = "benign?"
    meta.to_csv(data / "train-metadata.csv", index=False)
    (data / "train-image" / "image" / "ISIC_0000005.jpg").unlink()
    (data / "train-image" / "image" / "ISIC_0000006.jpg").write_bytes(b"garbage")
    code, err = _train(data, tmp_path / "run", capsys)
    assert code == 2
    for needle in ("duplicate image id", "value 'benign?'", "ISIC_0000005", "does not decode"):
        assert needle in err, needle


def test_unknown_config_key_exit_2(tmp_path, capsys, tiny_data):
    code, err = _train(tiny_data, tmp_path / "run", capsys, "--set", "siamese.lossy=1")
    assert code == 2 and "siamese.lossy" in err and "siamese.loss" in err


def test_offline_imagenet_default_is_a_clear_error(tmp_path, capsys, tiny_data, monkeypatch):
    import torch

    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    code, err = _train(tiny_data, tmp_path / "run", capsys, "--set", "model.backbone=resnet18",
                       "--set", "data.image_size=32", "--set", "runtime.progress=false")
    assert code == 2 and "ImageNet weights for resnet18" in err and "model.pretrained=none" in err
    assert not (tmp_path / "run").exists()  # weights are looked for before the run's folder is written


def _old_run(folder):
    """The files of an earlier run, and one file of the user's that is not the run's."""
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "siamese.pth").write_bytes(b"old encoder")
    (folder / "config.yaml").write_text("old: config\n")
    (folder / "train.log").write_text("the old run's log\n")
    (folder / "external" / "other").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine\n")
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_run_folder_is_not_trained_over_without_overwrite(tmp_path, capsys, tiny_data, monkeypatch):
    import torch

    run = tmp_path / "run"
    before = _old_run(run)
    code, err = _train(tiny_data, run, capsys, *set_args())
    assert code == 2 and f"--out {run} already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert _files(run) == before
    # --overwrite with weights that cannot be had: refused before anything of the old run is touched.
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    code, err = _train(tiny_data, run, capsys, "--overwrite", *set_args(), "--set", "model.pretrained=imagenet")
    assert code == 2 and "ImageNet weights for resnet18" in err
    assert _files(run) == before


def test_overwrite_replaces_every_file_of_the_old_run_and_keeps_the_rest(tmp_path, capsys, tiny_data):
    run = tmp_path / "run"
    _old_run(run)
    code, _ = _train(tiny_data, run, capsys, "--overwrite", *set_args(), "--set", "siamese.epochs=1",
                     "--set", "classifier.epochs=1")
    assert code == 0
    assert (run / "notes.txt").read_text() == "mine\n" and not (run / "external").exists()
    assert (run / "models" / "siamese.pth").read_bytes() != b"old encoder"
    assert "old" not in (run / "config.yaml").read_text().split(":")[0]
    log = (run / "train.log").read_text()
    assert "the old run's log" not in log and "=== train started" in log.splitlines()[0]
