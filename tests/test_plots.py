import numpy as np
import pytest

from melanoma_siamese import plots


@pytest.fixture
def figures(monkeypatch):
    """Every figure a plot function saves, laid out and written by plots._save but kept open for inspection."""
    kept, close = [], plots.plt.close
    monkeypatch.setattr(plots.plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def _inside_figure(fig, artist) -> bool:
    fig.canvas.draw()
    box, page = artist.get_window_extent(), fig.bbox
    return page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1


def _history(epochs=7):
    rng = np.random.default_rng(0)
    return [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "val_acc": 0.5 + 0.06 * e,
             "knn_auc": 0.6 + 0.04 * e, "other_class_similarity": -0.3 - 0.05 * e + 0.01 * rng.random(),
             "same_class_similarity": 0.2 + 0.05 * e, "best": e == 5} for e in range(epochs)]


def test_validation_metrics_keep_negative_similarities_in_view(figures, tmp_path):
    history = _history()
    plots.validation_metrics(history, ("knn_auc", "same_class_similarity", "other_class_similarity"),
                             tmp_path / "v.png")
    ax = figures[0].axes[0]
    assert ax.get_ylim()[0] <= min(h["other_class_similarity"] for h in history)
    assert ax.get_ylim()[1] >= 1
    assert (tmp_path / "v.png").stat().st_size > 0


def test_validation_metrics_start_at_zero_when_nothing_is_negative(figures, tmp_path):
    plots.validation_metrics(_history(), ("knn_auc",), tmp_path / "v.png")
    assert figures[0].axes[0].get_ylim()[0] == 0


def test_classifier_loss_has_whole_epochs_and_an_accuracy_axis_in_0_1(figures, tmp_path):
    plots.loss_curves(_history(4), tmp_path / "c.png", "Stage 2", extra=("val_acc",))
    ax, ax2 = figures[0].axes
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax2.get_ylim() == pytest.approx((0, 1.02))


def _curves():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.3).astype(int)
    p = np.clip(0.3 * y + rng.normal(0.4, 0.2, 300), 0, 1)
    return {"MLP / classifier": (y, p), "kNN vote": (y, p.copy())}  # identical: the curves coincide


@pytest.mark.parametrize("draw", [plots.roc_curves, plots.pr_curves])
def test_coinciding_curves_stay_distinguishable(figures, tmp_path, draw):
    draw(_curves(), tmp_path / "c.png")
    lines = [line for line in figures[0].axes[0].get_lines() if "(" in line.get_label()]
    assert len(lines) == 2
    first, second = lines
    assert first.get_linestyle() != second.get_linestyle()
    assert first.get_linewidth() > second.get_linewidth()
    assert second.get_zorder() > first.get_zorder() and first.get_alpha() < 1


def test_reliability_before_and_after_with_brier_and_ece(figures, tmp_path):
    rng = np.random.default_rng(2)
    y = (rng.random(500) < 0.3).astype(int)
    raw = np.clip(0.5 * y + rng.normal(0.45, 0.15, 500), 0, 1)
    calibrated = np.clip(0.2 + 0.4 * y + rng.normal(0, 0.1, 500), 0, 1)
    plots.reliability_before_after(y, {"raw score": raw, "calibrated (platt)": calibrated}, tmp_path / "r.png")
    labels = [line.get_label() for line in figures[0].axes[0].get_lines()]
    assert any(label.startswith("raw score: Brier") and "ECE" in label for label in labels)
    assert any(label.startswith("calibrated (platt): Brier") for label in labels)
    plots.reliability(y, raw, tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 0


def _reliability_data():
    """300 images; the top bin holds one benign image at 0.91, as in the new-user trial's run."""
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.25).astype(int)
    p = np.clip(rng.beta(2, 5, 300) + 0.25 * y, 0, 0.79)
    p[0], y[0] = 0.91, 0
    return y, p


def test_reliability_shows_each_bins_count_and_hollows_the_small_bins(figures, tmp_path):
    y, p = _reliability_data()
    plots.reliability_before_after(y, {"raw score": p}, tmp_path / "r.png", min_count=10)
    ax = figures[0].axes[0]
    which = np.clip(np.floor(p * 10).astype(int), 0, 9)
    expected = sorted(str(n) for n in np.bincount(which, minlength=10) if n)
    assert sorted(t.get_text() for t in ax.texts if t.get_gid() == "bin-count-0") == expected
    one = [t for t in ax.texts if t.get_gid() == "bin-count-0" and t.xy[0] == pytest.approx(0.91)]
    assert [t.get_text() for t in one] == ["1"] and one[0].get_alpha() < 1
    filled, hollow = [c for c in ax.collections if len(c.get_offsets())][:2]
    assert [0.91, 0.0] in hollow.get_offsets().tolist()
    assert [0.91, 0.0] not in filled.get_offsets().tolist()
    assert np.all(hollow.get_facecolors()[:, 3] == 0) and filled.get_facecolors()[0, 3] > 0
    sizes = dict(zip(map(tuple, filled.get_offsets().tolist()), filled.get_sizes()))
    assert len(set(sizes.values())) > 1  # marker area follows the count
    curve = next(line for line in ax.get_lines() if line.get_label().startswith("raw score"))
    assert 0.91 not in curve.get_xdata()  # the lone image is not joined to the curve
    assert any("fewer than 10 images" in text for text in ax.get_legend_handles_labels()[1])


def test_reliability_caption_names_the_scale_and_stays_in_the_figure(figures, tmp_path):
    y, p = _reliability_data()
    caption = plots.calibration_caption("platt", 0.245, float(y.mean()), "test part", 0.02,
                                        "predict --prevalence 0.02")
    plots.reliability_before_after(y, {"raw score": p, "calibrated (platt)": p}, tmp_path / "r.png",
                                   caption=caption)
    fig = figures[0]
    shown = [t for t in fig.axes[0].texts if "24.5%" in t.get_text()]
    assert len(shown) == 1
    assert " ".join(shown[0].get_text().split()).endswith(" ".join(caption.split()))  # wrapped, every word kept
    assert _inside_figure(fig, shown[0])
    plots.reliability(y, p, tmp_path / "one.png", caption="raw score only")
    assert any("raw score only" in t.get_text() for t in figures[1].axes[0].texts)


def test_calibration_caption_says_where_the_shown_scale_differs():
    stated = plots.calibration_caption("platt", 0.245, 0.238, "test part", 0.02, "predict --prevalence 0.02")
    assert "24.5%" in stated and "23.8%" in stated and "fitted" in stated
    assert "predict --prevalence 0.02 shows them at 2.0% prevalence, a different scale" in stated
    assert "lower" in stated
    same = plots.calibration_caption("platt", 0.245, 0.238, "test part", 0.2451, "predict")
    assert "different" not in same and "predict shows probabilities on this scale" in same


def test_a_long_confusion_matrix_title_is_wrapped_whole_and_kept_in_the_figure(figures, tmp_path):
    title = ("Test part, raw-score threshold 0.731\n(= 0.019 as the probability predict --prevalence 0.02 shows "
             "at 2.00% prevalence, stated for evaluate alone)")
    plots.confusion_matrix([[150, 20], [10, 40]], tmp_path / "cm.png", title)
    fig = figures[0]
    drawn = fig.axes[0].title
    assert drawn.get_text().split() == title.split()
    assert "--prevalence" in drawn.get_text().split()
    assert len(drawn.get_text().split("\n")) > len(title.split("\n"))
    assert _inside_figure(fig, drawn)


def test_validation_metrics_mark_the_kept_epoch_and_name_the_scale(figures, tmp_path):
    history = _history()  # epoch 5 is the last marked best
    plots.validation_metrics(history, ("knn_auc", "same_class_similarity"), tmp_path / "v.png", monitor="knn_auc")
    ax = figures[0].axes[0]
    assert "0 to 1" in ax.get_ylabel() and "-1 to 1" in ax.get_ylabel()
    kept = [line for line in ax.get_lines() if line.get_label().startswith("kept epoch")]
    assert len(kept) == 1 and list(kept[0].get_xdata()) == [5, 5]
    star = [line for line in ax.get_lines() if line.get_label().startswith("kept: best knn auc")]
    assert len(star) == 1 and star[0].get_xydata().tolist() == [[5, history[5]["knn_auc"]]]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "kept epoch (5)" in labels
    plots.loss_curves(history[1:], tmp_path / "l.png", "Stage 1")  # the same epoch, in the same words
    assert "kept epoch (5)" in [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()]


def test_validation_metrics_without_the_monitored_value_still_mark_the_kept_epoch(figures, tmp_path):
    plots.validation_metrics(_history(), ("knn_auc",), tmp_path / "v.png", monitor="val_loss")
    ax = figures[0].axes[0]
    assert [line.get_label() for line in ax.get_lines() if "kept" in line.get_label()] == ["kept epoch (5)"]
    assert ax.get_ylabel() == "value (0 to 1)"
