import numpy as np
import pytest

from melanoma_siamese import plots


@pytest.fixture
def figures(monkeypatch):
    """Every figure a plot function saves, kept open for inspection (and still written)."""
    kept = []

    def save(fig, path):
        kept.append(fig)
        fig.savefig(path)

    monkeypatch.setattr(plots, "_save", save)
    yield kept
    for fig in kept:
        plots.plt.close(fig)


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
