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


def test_a_folder_that_is_not_a_run_loses_nothing(tmp_path, capsys, tiny_data):
    """--out holding the user's own images/ and external/ (names a run also writes): refused; with --overwrite
    the run is written there but nothing of the user's is removed."""
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "images" / "lesion.jpg").write_bytes(b"the user's photo")
    (out / "external" / "clinic").mkdir(parents=True)
    code, err = _train(tiny_data, out, capsys, *set_args())
    assert code == 2 and "is not a run folder but holds names a run writes (images, external)" in err
    code, _ = _train(tiny_data, out, capsys, "--overwrite", *set_args(), "--set", "siamese.epochs=1",
                     "--set", "classifier.epochs=1")
    assert code == 0 and (out / "models" / "siamese.pth").is_file()
    assert (out / "images" / "lesion.jpg").read_bytes() == b"the user's photo" and (out / "external" / "clinic").is_dir()


def test_data_inside_the_run_it_would_replace_is_refused(tmp_path, capsys, tiny_data):
    import shutil

    run = tmp_path / "run"
    _old_run(run)
    data = run / "external" / "data"
    shutil.copytree(tiny_data, data)
    before = _files(run)
    code, err = _train(data, run, capsys, "--overwrite", *set_args())
    assert code == 2 and f"{data} lies inside the folder of the run it would replace" in err
    assert _files(run) == before


def test_what_stops_a_k_fold_run_stops_it_before_anything_is_written(tmp_path, capsys):
    data = kaggle_dataset(tmp_path / "d")  # 10 melanoma patients, 7 of them in the training part
    code, err = _train(data, tmp_path / "run", capsys, *set_args(), "--folds", "8")
    assert code == 2 and "data.folds=8" in err and "use fewer folds" in err
    assert not (tmp_path / "run").exists()


def test_an_unknown_backbone_stops_a_run_before_anything_is_written(tmp_path, capsys, tiny_data):
    code, err = _train(tiny_data, tmp_path / "run", capsys, *set_args(), "--set", "model.backbone=resnet19")
    assert code == 2 and "resnet19" in err and not (tmp_path / "run").exists()


def test_demo_does_not_replace_a_run_that_is_not_a_demo(tmp_path, capsys):
    run = tmp_path / "run"
    before = _old_run(run)
    assert main(["demo", "--out", str(run), "--no-progress"]) == 2
    assert "holds a run that is not a demo's" in capsys.readouterr().err and _files(run) == before


def test_clearing_a_run_removes_a_link_not_what_it_points_to(tmp_path):
    from melanoma_siamese.runfolder import RunFolder

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"x")
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text("a: 1\n")
    run.images.symlink_to(elsewhere, target_is_directory=True)
    run.clear()
    assert not run.images.exists() and not run.images.is_symlink() and (elsewhere / "keep.png").is_file()
    assert not run.config.exists()
