"""Figures from numbers (Agg backend): each function takes what it draws and a path, and writes a PNG."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from .display import prevalences_differ  # noqa: E402

# Curves drawn on one axis: wide and pale first, thinner and patterned on top, so where two coincide
# both stay visible (the one on top as a pattern over the other).
CURVE_STYLES = ({"ls": "-", "lw": 3.2, "alpha": 0.55}, {"ls": "--", "lw": 1.6, "alpha": 0.95},
                {"ls": ":", "lw": 1.6, "alpha": 0.95}, {"ls": "-.", "lw": 1.2, "alpha": 0.95})


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    # "tight": a caption or legend below the axes, or a long title, is saved whole rather than cut at the edge.
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """`text` wrapped to about `width_in` inches at `fontsize`, keeping the line breaks it has."""
    # 0.6 em: about the widest average character of the default font (digits), so a line never runs over.
    chars = max(20, int(width_in * 72 / (0.6 * fontsize)))
    # Whole words only: a command's flag (--prevalence) must not be split at its hyphens.
    return "\n".join(textwrap.fill(line, chars, break_long_words=False, break_on_hyphens=False) or line
                     for line in text.split("\n"))


def _caption(ax, text: str, width_in: float, below, fontsize: float = 7):
    """Wrapped text under the artist `below` (a legend under the axes); inside the layout, so the saved figure
    keeps it."""
    return ax.annotate(_wrap(text, width_in, fontsize), xy=(0, 0), xycoords=below, xytext=(0, -4),
                       textcoords="offset points", ha="left", va="top", fontsize=fontsize, color="dimgrey")


def loss_curves(history: Sequence[dict], path: Path, title: str, extra: Sequence[str] = ()) -> None:
    """Training and validation loss per epoch; `extra` keys (shares such as val_acc) on a second axis, 0 to 1."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    epochs = [h["epoch"] for h in history]
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        values = [h.get(key, np.nan) for h in history]
        if np.isfinite(values).any():
            ax.plot(epochs, values, style, ms=3, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.set_title(title)
    lines, names = ax.get_legend_handles_labels()
    if extra:
        ax2 = ax.twinx()
        # Colours after the loss lines': twinx starts its own colour cycle, which would repeat them.
        for key, color in zip(extra, ("tab:green", "tab:red", "tab:purple")):
            values = [h.get(key, np.nan) for h in history]
            if np.isfinite(values).any():
                ax2.plot(epochs, values, "--^", ms=3, color=color, label=key.replace("_", " "))
        ax2.set_ylabel(", ".join(k.replace("_", " ") for k in extra))
        ax2.set_ylim(0, 1.02)
        more = ax2.get_legend_handles_labels()
        lines, names = lines + more[0], names + more[1]
    drawn = len(ax.get_lines())
    _mark_kept_epoch(ax, history, None)
    marked = ax.get_lines()[drawn:]
    lines, names = lines + marked, names + [line.get_label() for line in marked]
    # Below the axes: inside, it would cover curves that run through every corner.
    ax.legend(lines, names, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(lines),
              frameon=False)
    _save(fig, path)


def validation_metrics(history: Sequence[dict], keys: Sequence[str], path: Path,
                       monitor: Optional[str] = None) -> None:
    """Metrics in [0, 1] and mean cosine similarities (which go down to -1) per epoch, on one axis.

    The kept epoch (the last marked "best", as in loss_curves) gets a dotted line, and a star on `monitor`,
    the value early stopping watched, where that is drawn here."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    epochs = [h["epoch"] for h in history]
    lowest = 0.0
    for key in keys:
        values = np.array([h.get(key, np.nan) for h in history], dtype=float)
        if np.isfinite(values).any():
            ax.plot(epochs, values, "-o", ms=3, label=key.replace("_", " "))
            lowest = min(lowest, float(np.nanmin(values)))
    ax.set_xlabel("epoch (0 = untrained encoder)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(max(-1.02, lowest - 0.05) if lowest < 0 else 0, 1.02)
    if lowest < 0:
        ax.axhline(0, color="grey", lw=0.6)
    similarity = any("similarity" in key for key in keys)
    ax.set_ylabel("value (0 to 1" + ("; similarity -1 to 1)" if similarity else ")"))
    ax.set_title("Validation retrieval and kNN metrics")
    _mark_kept_epoch(ax, history, monitor if monitor in keys else None)
    # Below the axes, as in loss_curves: inside, it would cover curves that run through every corner.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    _save(fig, path)


def _mark_kept_epoch(ax, history: Sequence[dict], monitor: Optional[str]) -> None:
    """Dotted line at the last epoch marked "best" (the weights kept), and a star on its `monitor` value."""
    best = [h for h in history if h.get("best")]
    if not best:
        return
    kept = best[-1]
    ax.axvline(kept["epoch"], color="grey", lw=0.8, ls=":", label=f"kept epoch ({kept['epoch']})")
    if monitor is not None and np.isfinite(kept.get(monitor, np.nan)):
        # Unclipped: a best value of 1.0 sits on the axes' top edge.
        ax.plot([kept["epoch"]], [kept[monitor]], "*", ms=12, color="black", zorder=5, clip_on=False,
                label=f"kept: best {monitor.replace('_', ' ')} {kept[monitor]:.3f}")


def confusion_matrix(cm: Sequence[Sequence[int]], path: Path, title: str) -> None:
    """Counts of true against predicted class; a long `title` is wrapped to the figure's width."""
    cm = np.asarray(cm)
    width = 4.2
    fig, ax = plt.subplots(figsize=(width, 3.8))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks([0, 1], ["benign", "melanoma"])
    ax.set_yticks([0, 1], ["benign", "melanoma"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    # The title is centred over the axes, not the figure: wrapped narrower than the figure, it fits either way.
    ax.set_title(_wrap(title, 0.8 * width, 9), fontsize=9)
    _save(fig, path)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, where: str = "test part") -> None:
    """curves: name -> (labels, probabilities)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    for i, (name, (y, p)) in enumerate(curves.items()):
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = skm.roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {skm.roc_auc_score(y, p):.3f})", zorder=2 + i,
                **CURVE_STYLES[i % len(CURVE_STYLES)])
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.axhline(0.8, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(f"ROC, {where}")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, where: str = "test part") -> None:
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    for i, (name, (y, p)) in enumerate(curves.items()):
        if len(np.unique(y)) < 2:
            continue
        precision, recall, _ = skm.precision_recall_curve(y, p)
        ax.plot(recall, precision, label=f"{name} (AP {skm.average_precision_score(y, p):.3f})", zorder=2 + i,
                **CURVE_STYLES[i % len(CURVE_STYLES)])
        ax.axhline(np.mean(y), color="grey", lw=0.6, ls=":")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_title(f"Precision-recall, {where} (dotted: prevalence)")
    ax.legend(fontsize=8)
    _save(fig, path)


def _reliability_points(labels: np.ndarray, probs: np.ndarray, bins: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean probability, melanoma fraction and image count per non-empty equal-width bin (the bins of the ECE)."""
    which = np.clip(np.floor(np.asarray(probs, dtype=float) * bins).astype(int), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    keep = count > 0
    mean = np.bincount(which, probs, bins)[keep] / count[keep]
    return mean, np.bincount(which, labels, bins)[keep] / count[keep], count[keep]


def reliability(labels: np.ndarray, probs: np.ndarray, path: Path, bins: int = 10, caption: str = "") -> None:
    """One score's reliability curve; see reliability_before_after for a calibrated one beside it."""
    reliability_before_after(labels, {"model": probs}, path, bins, caption=caption)


def reliability_before_after(labels: np.ndarray, scores: dict[str, np.ndarray], path: Path, bins: int = 10,
                             title: str = "Reliability, test part", caption: str = "", min_count: int = 10) -> None:
    """scores: name -> probabilities (e.g. {"raw score": raw, "calibrated (platt)": calibrated}), each drawn
    over `bins` equal-width bins with its Brier score and expected calibration error in the legend.

    Each bin's marker has an area by its image count and the count beside it; a bin of fewer than `min_count`
    images is hollow, faded and not joined to the curve, so that one image at (0.91, 0) does not read as the
    calibration collapsing. `caption` goes under the axes: say there on which scale the probabilities are."""
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(4.8, 6.4))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for i, (name, probs) in enumerate(scores.items()):
        _reliability_curve(ax, labels, np.asarray(probs, dtype=float), bins, i, name, min_count)
    ax.scatter([], [], s=25, marker="o", facecolors="none", edgecolors="grey",
               label=f"hollow: bin of fewer than {min_count} images")
    ax.set_xlim(-0.02, 1.05)
    ax.set_ylim(-0.04, 1.04)
    ax.set_xlabel("mean predicted melanoma probability")
    ax.set_ylabel("observed melanoma fraction")
    ax.set_title(f"{title} ({bins} equal-width bins)", fontsize=9)
    # Below the axes, the caption below it: inside, the legend would hide a bin somewhere.
    legend = ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(-0.02, -0.12), frameon=False)
    counts = (f"Marker area grows with the images in the bin; the number beside each marker is that count. "
              f"Hollow, faded, unjoined: fewer than {min_count} images, too few to read.")
    _caption(ax, counts + ("\n" + caption if caption else ""), 4.2, legend)
    _save(fig, path)


def _reliability_curve(ax, labels: np.ndarray, probs: np.ndarray, bins: int, i: int, name: str,
                       min_count: int) -> None:
    """One score's bins: joined filled markers where a bin holds `min_count` images or more, hollow ones elsewhere."""
    from .metrics import expected_calibration_error

    mean, frac, count = _reliability_points(labels, probs, bins)
    few = count < min_count
    style, marker = CURVE_STYLES[i % len(CURVE_STYLES)], "os^"[i % 3]
    line, = ax.plot(mean[~few], frac[~few], zorder=3 + i, **style,
                    label=f"{name}: Brier {skm.brier_score_loss(labels, probs):.3f}, "
                          f"ECE {expected_calibration_error(labels, probs, bins):.3f}")
    color = line.get_color()
    # Area by the share of all images, the same scale for every curve; a floor keeps one image visible.
    area = 12 + 400 * count / max(len(labels), 1)
    ax.scatter(mean[~few], frac[~few], s=area[~few], marker=marker, color=color, zorder=4 + i)
    ax.scatter(mean[few], frac[few], s=area[few], marker=marker, facecolors="none", edgecolors=color, alpha=0.5,
               zorder=4 + i)
    side = 1 if i % 2 == 0 else -1
    for x, y, n, s, faded in zip(mean, frac, count, area, few):
        # Just outside the marker (radius sqrt(area)/2 points), the first curve's counts to the right, the
        # second's to the left: where two curves share a bin, both counts stay readable.
        ax.annotate(f"{n}", (x, y), xytext=(side * (np.sqrt(s) / 2 + 2), 2), textcoords="offset points",
                    ha="left" if side > 0 else "right", fontsize=6, color=color, alpha=0.7 if faded else 1.0,
                    zorder=10, gid=f"bin-count-{i}")


def calibration_caption(method: str, fitted_prevalence: float, part_prevalence: float, where: str = "test part",
                        shown_prevalence: Optional[float] = None, shown_by: str = "predict") -> str:
    """The sentence under a reliability plot that names its scale: calibrated probabilities are drawn at the
    prevalence the calibration was fitted at (the validation part's), and `shown_by` (e.g. "predict
    --prevalence 0.02") may show them at another, where the same image gets a different number."""
    text = (f"Calibrated ({method}) probabilities at the validation part's melanoma prevalence, "
            f"{100 * fitted_prevalence:.1f}%, where the calibration was fitted; the {where} has "
            f"{100 * part_prevalence:.1f}% melanoma.")
    if shown_prevalence is None or not prevalences_differ(shown_prevalence, fitted_prevalence):
        return text + f" {shown_by} shows probabilities on this scale."
    return (text + f" {shown_by} shows them at {100 * shown_prevalence:.1f}% prevalence, a different scale: "
            f"the same image gets a {'lower' if shown_prevalence < fitted_prevalence else 'higher'} number there.")


def embedding_map(embeddings: np.ndarray, labels: np.ndarray, path: Path, seed: int = 0, max_points: int = 3000,
                  where: str = "test part") -> None:
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(labels))[:max_points]
    perplexity = float(min(30, max(2, (len(idx) - 1) / 3)))
    xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(embeddings[idx])
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name, color in ((0, "benign", "tab:blue"), (1, "melanoma", "tab:red")):
        m = labels[idx] == c
        ax.scatter(xy[m, 0], xy[m, 1], s=6 if c == 0 else 10, alpha=0.6, c=color, label=name)
    ax.set_title(f"t-SNE of the embeddings, {where}")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8)
    _save(fig, path)


def distance_histograms(embeddings: np.ndarray, labels: np.ndarray, path: Path, where: str = "test part") -> None:
    """Cosine distances of same-class and other-class pairs: separation of the metric space.

    The axis spans the distances that occur, not the full 0-2: a trained space often puts every pair below
    0.3, where a 0-2 axis would squeeze the three groups into a few bars. The label says which span is shown."""
    e = np.asarray(embeddings, dtype=np.float32)
    d = 1 - e @ e.T
    same = labels[:, None] == labels[None, :]
    upper = np.triu(np.ones_like(same, dtype=bool), k=1)
    top = float(np.quantile(d[upper], 0.999)) if upper.any() else 2.0
    top = min(2.0, max(0.02, 1.05 * top))
    bins = np.linspace(0, top, 61)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for mask, name in ((same & upper & (labels[:, None] == 1), "melanoma-melanoma"),
                       (same & upper & (labels[:, None] == 0), "benign-benign"),
                       (~same & upper, "melanoma-benign")):
        if mask.any():
            # The rare pair beyond the span is counted in the last bin rather than dropped.
            ax.hist(np.clip(d[mask], 0, top), bins=bins, density=True, alpha=0.45,
                    label=f"{name}: {int(mask.sum()):,} pairs, median {np.median(d[mask]):.3f}")
    ax.set_xlim(0, top)
    ax.set_xlabel("cosine distance (1 - cos)" + ("" if top >= 2.0 else
                  f"; shown 0-{top:.2f} of the possible 0-2 (the farthest 0.1% of pairs in the last bin)"),
                  fontsize=8)
    ax.set_ylabel("density")
    ax.set_title(f"Pair distances, {where}")
    ax.legend(fontsize=7)
    _save(fig, path)


def image_grid(images: np.ndarray, titles: Sequence[str], path: Path, title: str) -> None:
    """images: N x H x W x 3 uint8."""
    n = len(images)
    cols = min(n, 8)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, t in zip(axes.ravel(), images, titles):
        ax.imshow(image)
        ax.set_title(t, fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def results_by_group(report: dict, path: Path, where: str = "test part") -> None:
    """Test ROC AUC per group (groups.results_by_group) as horizontal bars with 95% interval whiskers, counts on
    the labels; a group with too few melanomas gets no bar and says so."""
    rows = [(f"{grouping}: {group}\n{r['images']} images, {r['melanoma']} melanoma", r)
            for grouping, groups in report["groupings"].items() for group, r in groups.items()]
    fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.42 * max(len(rows), 1)))
    for y, (_, r) in enumerate(rows):
        if r["too_few_to_say"]:
            ax.text(0.01, y, "too few melanomas to say", va="center", fontsize=7, color="dimgrey")
            continue
        ci = r.get("roc_auc_ci")
        err = None
        if ci and all(v is not None and np.isfinite(v) for v in ci):
            err = [[max(r["roc_auc"] - ci[0], 0)], [max(ci[1] - r["roc_auc"], 0)]]
        ax.barh(y, r["roc_auc"], xerr=err, color="tab:blue", alpha=0.7, capsize=3)
        # Inside the bar's start, where no whisker reaches.
        ax.text(0.01, y, f"{r['roc_auc']:.2f}", va="center", fontsize=7, color="white", fontweight="bold")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel(f"ROC AUC, {where} (whiskers: 95% patient-bootstrap interval; dotted line: chance)", fontsize=8)
    ax.set_title(f"Results by group (fewer than {report['min_melanoma']} melanomas: too few to say)", fontsize=9)
    _save(fig, path)
