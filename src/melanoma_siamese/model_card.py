"""A model card per run (MODEL_CARD.md), rewritten by `evaluate` from what the run folder records.

Every number comes from the run's own files (run.json, config, metrics, results by group); a section the
run has nothing for says so rather than disappearing. No models, no torch.
"""
from __future__ import annotations

from typing import Optional

from .config import Config
from .display import distance_text, prevalences_differ

STATED = "stated with --prevalence"


def shown_by(cal: dict) -> str:
    """The command that shows the calibrated probability at the prevalence these numbers assume: with a
    prevalence given to `evaluate` alone, plain `predict` and `serve` still show the run's own, so the words
    must name the flag (the card is read next to the predict a reader runs)."""
    if cal.get("shown_prevalence_source") == STATED:
        return f"predict --prevalence {cal['shown_at_prevalence']!r}"
    return "predict"


def calibration_measured(cal: dict, part: str = "test", spelled: bool = False, where: str = "") -> str:
    """Brier and ECE on a part, with the scale they were measured on: the prevalence the calibration was fitted
    at. Probabilities shown at a prevalence far from the data's own (evaluate --prevalence 0.02 on a part with 25%
    melanoma) read low against this data by design; a reader must not take these figures for theirs."""
    c, fitted, shown = cal[part], cal.get("fitted_prevalence"), cal.get("shown_at_prevalence")
    ece = "expected calibration error" if spelled else "ECE"
    text = (f"{ece} {c['ece_before']:.3f} -> {c['ece_after']:.3f}, Brier {c['brier_before']:.3f} -> "
            f"{c['brier_after']:.3f} (raw score -> calibrated)")
    if fitted is None:  # a record written before the fitted prevalence was kept
        return text
    text += f", measured at the prevalence the calibration was fitted at, {100 * fitted:.1f}%"
    if c.get("melanoma_share") is not None:
        text += f" (the {where or part + ' part'} has {100 * c['melanoma_share']:.1f}% melanoma)"
    return text + _at_shown_prevalence(c, fitted, shown, where or f"{part} part")


def _at_shown_prevalence(c: dict, fitted: float, shown: Optional[float], where: str) -> str:
    """What the figures say of the probabilities shown: the same where the shown prevalence is the fitted one;
    measured again where the data's own share is the shown prevalence; else a warning, and the command that
    measures them at the data's share."""
    share = c.get("melanoma_share")
    if share is None or shown is None:
        return ""
    if prevalences_differ(shown, fitted) and not prevalences_differ(shown, share) and "ece_shown" in c:
        return (f". At the prevalence shown, {100 * shown:.2f}%, which is this data's own share, the probabilities "
                f"shown have ECE {c['ece_shown']:.3f} and Brier {c['brier_shown']:.3f}")
    text = ""
    if prevalences_differ(shown, fitted):
        text = (f". The probabilities shown at {100 * shown:.2f}% are not what these figures measure: they are "
                f"rescaled for a population with {100 * shown:.2f}% melanoma, so on this data they read "
                f"{'lower' if shown < fitted else 'higher'} than its frequencies by design")
    if prevalences_differ(share, fitted) and prevalences_differ(share, shown):
        text += (f". The {where} has {100 * share:.1f}% melanoma, unlike the {100 * fitted:.1f}% the calibration "
                 f"was fitted at: `--prevalence {share:.3g}` shows its probabilities at its own share and measures "
                 "them there")
    return text


LICENCES = {
    "generated": "none needed: generated cartoons written by `melanoma-siamese synth`, not photographs",
    "isic": "CC BY-NC 4.0 (ISIC Archive: non-commercial use, with attribution; cite Rotemberg et al., Sci. Data 8, "
            "34 (2021) for ISIC 2020)",
    "ham10000": "CC BY-NC 4.0 (HAM10000: Tschandl et al., Sci. Data 5, 180161 (2018))",
    "unknown": "not recorded: state the licence of this data before sharing results",
}


def licence(source: dict, layout: str, generated: bool) -> str:
    if generated:
        return LICENCES["generated"]
    where = " ".join(str(v) for v in source.values() if v).lower()
    if "ham10000" in where:
        return LICENCES["ham10000"]
    if layout in ("kaggle-256", "isic-2020-site", "isic-2020-kaggle", "isic-cli"):
        return LICENCES["isic"]
    return LICENCES["unknown"]


def _ci(report: dict, key: str) -> str:
    from .metrics import interval_text

    value = report.get(key)
    if value is None:
        return "n/a"
    return f"{value:.3f}{interval_text(report, key)}"


def _data_section(info: dict, generated: bool, heading: str = "## Data") -> list[str]:
    source = info.get("source", {})
    parts = info.get("parts", {})
    total = sum(p["images"] for p in parts.values())
    melanoma = sum(p["melanoma"] for p in parts.values())
    lines = [heading, "",
             f"- Source: {' '.join(f'`--{k} {v}`' for k, v in source.items() if v) or 'not recorded'}",
             f"- Layout: {info.get('layout', 'not recorded')}" + (" (generated images)" if generated else ""),
             f"- Images: {total}, of which {melanoma} melanoma"
             + (f" ({100 * melanoma / total:.1f}%)" if total else ""),
             f"- Licence: {licence(source, info.get('layout', ''), generated)}"]
    if info.get("skipped_images") or info.get("dropped_duplicates"):
        lines.append(f"- Left out: {info.get('skipped_images', 0)} unreadable image(s), "
                     f"{info.get('dropped_duplicates', 0)} listed duplicate(s)")
    return lines + [""]


def _split_section(info: dict, config: Config) -> list[str]:
    d = config.data
    seed = d.split_seed if d.split_seed is not None else config.runtime.seed
    lines = ["## Split", "",
             f"Grouped by patient (no patient in two parts), stratified by label, seed {seed}: "
             f"{100 * (1 - d.val_fraction - d.test_fraction):.0f}/{100 * d.val_fraction:.0f}/"
             f"{100 * d.test_fraction:.0f} train/val/test (`split.csv`).", "",
             "| part | images | melanoma |", "| --- | --- | --- |"]
    lines += [f"| {part} | {p['images']} | {p['melanoma']} |" for part, p in info.get("parts", {}).items()]
    return lines + [""]


def _recipe_section(config: Config, baseline: Optional[dict]) -> list[str]:
    m, s, c = config.model, config.siamese, config.classifier
    budget = f"{s.budget_images} backbone image passes" if s.budget_images else f"{s.epochs} epochs (no image cap)"
    lines = ["## Recipe and budget", "",
             f"- Encoder: {m.backbone}, weights {m.pretrained}, {m.embedding_dim}-d embedding, "
             f"{config.data.image_size} px images",
             f"- Stage 1: loss {s.loss}, mining {s.mining}, cross-entropy head weight {s.ce_weight}, "
             f"optimizer {s.optimizer} lr {s.lr:g}, batch {s.batch_size}; budget {budget}",
             f"- Stage 2: classifier {c.kind}; features {', '.join(getattr(c, 'features', ('image',)))}",
             f"- Threshold rule: {config.evaluation.threshold} (chosen on the validation part)",
             f"- Training seed: {config.runtime.seed} (initial weights, batches, augmentation; the split has its own)"]
    if config.data.folds >= 2:
        lines.append(f"- A {config.data.folds}-fold ensemble: {config.data.folds} models, each trained on the training "
                     "part less one patient-grouped fold and validated on it; probability = the mean of the members', "
                     "embedding distance = the mean of theirs (`folds/`, `oof_predictions.csv`); the budget is per model")
    if baseline:
        lines.append(f"- Spent: {baseline.get('backbone_image_passes', 'n/a')} backbone image passes, "
                     f"{baseline.get('siamese_seconds', 0):.0f} s in stage 1; untrained-encoder kNN ROC AUC on "
                     f"test {baseline.get('untrained_encoder_test_knn_auc', float('nan')):.3f}")
    if baseline and "kept_epoch" in baseline:
        value = baseline.get("kept_value")
        lines.append(f"- Stage 1 ran {baseline['epochs_run']} epoch(s) and kept the weights of epoch "
                     f"{baseline['kept_epoch']} (its {baseline['monitor']}, the best on validation"
                     + ("" if value is None else f", {value:.4g}") + "); every epoch is in `history_siamese.jsonl`")
    return lines + [""]


def _folds_section(metrics: dict) -> list[str]:
    folds = metrics.get("folds")
    if not folds:
        return []
    oof = folds["out_of_fold"]
    members = ", ".join(f"{m['test_roc_auc']:.3f}" for m in folds["members"])
    return ["## Ensemble members", "",
            f"Out-of-fold ROC AUC (each training image scored by the member that did not train on it): "
            f"{_ci(oof, 'roc_auc')} on {oof['images']} images, {oof['melanoma']} melanoma. Members' own test ROC "
            f"AUC: {members}.", ""]


def overlap_sentence(overlap: dict) -> str:
    """External data holding the run's own images, said with the numbers on the rest (metrics' overlap_with_run)."""
    n, m = overlap["images"], overlap["melanoma"]
    text = (f"WARNING: {n['train'] + n['val']} of these images are the run's own ({n['train']} training, "
            f"{m['train']} of them melanoma; {n['val']} validation, {m['val']} melanoma; matched by isic_id), so the "
            "numbers on all of them overstate: a training image finds itself among the known cases, and the "
            "threshold, calibration and unfamiliar cut were chosen on the validation images.")
    unseen = overlap.get("unseen")
    if unseen is None:
        return text + f" The {overlap['unseen_images']} others lack a class to score on their own."
    return (text + f" On the {overlap['unseen_images']} images the run neither trained nor tuned on "
            f"({overlap['unseen_melanoma']} melanoma): ROC AUC {_ci(unseen, 'roc_auc')}, sensitivity "
            f"{_ci(unseen, 'sensitivity')}, specificity {_ci(unseen, 'specificity')}.")


def _external_section(external: dict, overlap: Optional[dict] = None) -> list[str]:
    """The data an external evaluation scored: what it is, and that all of it was scored, none held out."""
    lines = _data_section(external, external.get("generated", False), "## External data (scored here)")
    if overlap is not None:
        return lines[:-1] + [f"- Scored whole: every image is in the numbers below. {overlap_sentence(overlap)}", ""]
    return lines[:-1] + ["- Scored whole: every image is in the numbers below; none of them is in the run's split "
                         "(by isic_id), so the model was neither trained nor tuned on them (threshold, calibration "
                         "and the unfamiliar cut come from the run's own validation part). The run's own card, with "
                         "its held-out test part, is its MODEL_CARD.md.", ""]


def _metrics_section(metrics: dict, where: str = "test part") -> list[str]:
    lines = [f"## Metrics ({where})", "", "| set | images | melanoma | ROC AUC | sensitivity | specificity |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, key in (("natural prevalence", "test"), ("class-balanced subsample", "test_balanced")):
        r = metrics.get(key)
        if r:
            lines.append(f"| {name} | {r['n']} | {r['n_melanoma']} | {_ci(r, 'roc_auc')} | {_ci(r, 'sensitivity')} | "
                         f"{_ci(r, 'specificity')} |")
    knn = metrics.get("knn", {}).get("test")
    if knn:
        lines.append(f"| kNN vote, natural prevalence | {knn['n']} | {knn['n_melanoma']} | {_ci(knn, 'roc_auc')} | "
                     f"{_ci(knn, 'sensitivity')} | {_ci(knn, 'specificity')} |")
    threshold = metrics.get("threshold", {}).get("classifier")
    if threshold is not None:
        n_boot = metrics.get("test", {}).get("n_boot")
        shown = metrics.get("calibration", {}).get("threshold_shown")
        same = (f" (the same cut as {shown:.4f} on the calibrated probability "
                f"`{shown_by(metrics['calibration'])}` shows)" if shown is not None else "")
        lines += ["", f"Sensitivity and specificity at the threshold chosen on validation, {threshold:.4f} on the "
                  f"classifier's raw score{same}; " + (f"95% intervals from {n_boot} patient resamples." if n_boot else
                                                         "no intervals (evaluation.bootstrap is 0).")]
    return lines + [""]


def _calibration_section(metrics: dict, where: str = "test part") -> list[str]:
    cal = metrics.get("calibration")
    if not cal:
        return ["## Calibration", "", "None: this run shows the classifier's raw score.", ""]
    lines = ["## Calibration", "", f"{cal['method']}, fitted on the validation part; probabilities shown for a "
             f"prevalence of {100 * cal['shown_at_prevalence']:.2f}% ({cal.get('shown_prevalence_source', '')})."]
    if cal.get("shown_prevalence_source") == STATED:
        lines.append(f"`predict` and `serve` show the run's own prevalence unless given the same: `{shown_by(cal)}`.")
    if "test" in cal:
        lines.append(f"On the {where}: {calibration_measured(cal, spelled=True, where=where)}.")
    return lines + [""]


def _groups_section(groups: Optional[dict], where: str = "test part") -> list[str]:
    if not groups or not groups.get("groupings"):
        return ["## Results by group", "", "The data has no sex, age, site or skin type to group by.", ""]
    from .metrics import WILSON_NOTE

    lines = ["## Results by group", "", f"{where[0].upper() + where[1:]}, same threshold, 95% patient-bootstrap "
             f"intervals (those marked Wilson: {WILSON_NOTE}); groups with fewer than {groups['min_melanoma']} "
             "melanomas are marked too few to say (their counts stay).", "",
             "| group | images | melanoma | ROC AUC | sensitivity | specificity |", "| --- | --- | --- | --- | --- | --- |"]
    for grouping, found in groups["groupings"].items():
        for group, r in found.items():
            numbers = ("| " + r["note"] + " | | |") if r["too_few_to_say"] else \
                f"| {_ci(r, 'roc_auc')} | {_ci(r, 'sensitivity')} | {_ci(r, 'specificity')} |"
            lines.append(f"| {grouping}: {group} | {r['images']} | {r['melanoma']} {numbers}")
    if groups.get("absent"):
        lines.append(f"\nNot in the data: {', '.join(groups['absent'])}.")
    return lines + [""]


def _unfamiliar_section(metrics: dict, where: str = "test part") -> list[str]:
    rule = metrics.get("unfamiliar")
    if not rule:
        return ["## Unfamiliar images", "", "This run has no unfamiliar-image rule (no validation images).", ""]
    embedding, texture = rule.get("flagged_share_embedding", {}), rule.get("flagged_share_texture", {})
    # Parts as a reader knows them: an external evaluation's rows are scored as "test" but are the other data.
    names = {"test": "test" if where == "test part" else where, "val": "val"}
    shares = ", ".join(f"{100 * v:.1f}% of {names.get(part, part)}"
                       + (f" ({100 * embedding[part]:.1f}% by the embedding, {100 * texture[part]:.1f}% by texture)"
                          if part in embedding and part in texture else "")
                       for part, v in rule.get("flagged_share", {}).items())
    return ["## Unfamiliar images", "", f"An image is flagged unfamiliar when its mean cosine distance to the "
            f"{rule.get('k')} nearest training images is above the validation {100 * rule['quantile']:g}th "
            f"percentile (cut {distance_text(rule.get('cut', float('nan')))}){_texture_rule(rule)}. "
            f"It flags {shares}. "
            f"By design each cut also flags about {100 * (1 - rule['quantile']):g}% of images like the validation "
            "ones; and an image unlike any seen can still fall inside both, so the check does not replace a look "
            "at the image.", ""]


def _texture_rule(rule: dict) -> str:
    """The texture half of the rule: its cut, or that this run has none (metrics written before the card
    named the cut say neither)."""
    if "texture" not in rule:
        return ", or its texture is as far from the training images'"
    if rule["texture"] is None:
        return " (this run has no texture rule: its index holds no appearance descriptors)"
    return (", or the same measure on a texture descriptor (a histogram of fine detail: sharpness, grain, noise) "
            f"is above its own validation percentile (cut {distance_text(rule['texture']['cut'])})")


def _source_args(info: dict) -> str:
    return " ".join(f"--{k} {v}" for k, v in info.get("source", {}).items() if v) or "--data DIR"


def _use_and_reproduce(info: dict, root: str, external: Optional[dict] = None) -> list[str]:
    data = _source_args(info)
    again = ([f"melanoma-siamese evaluate --run {root} {_source_args(external)}"] if external else
             [f"melanoma-siamese train {data} --config {root}/config.yaml --out runs/reproduced",
              "melanoma-siamese evaluate --run runs/reproduced"])
    scored = "the test part above" if external is None else f"the external data {external['name']} above"
    return ["## Intended use and limits", "",
            "A research tool, not a medical device: not for diagnosis or for deciding care. Its numbers hold for "
            f"data like {scored} (same source, devices and population); on other data measure first "
            "(`melanoma-siamese evaluate --run RUN --data OTHER`). Groups marked too few to say are untested.", "",
            "## How to reproduce", "", "```bash", *again, "```", "",
            f"Code: git commit {info.get('git_commit') or 'not recorded'}; versions "
            + ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items()) + ".", ""]


def model_card(root: str, config: Config, info: dict, metrics: dict, groups: Optional[dict],
               baseline: Optional[dict], generated: bool, external: Optional[dict] = None) -> str:
    """MODEL_CARD.md's text for the run at `root` (`info`: its run.json). `external`: for `evaluate --data OTHER`,
    the data scored (source, layout, parts, generated, name); the card then describes the run's training data
    and this evaluation apart, and says how to repeat the evaluation, not the training."""
    where = "test part" if external is None else f"external data {external['name']}, all of it"
    title = f"# Model card: {root}" + ("" if external is None else f", evaluated on external data {external['name']}")
    lines = [title, "", "Research use only, not diagnosis. Written by `melanoma-siamese evaluate`; "
             "rewritten each time the run is evaluated.", ""]
    if external is None:
        lines += _data_section(info, generated) + _split_section(info, config)
    else:
        lines += _data_section(info, generated, "## Training data (the run's)")
        lines += _external_section(external, metrics.get("overlap_with_run"))
    lines += _recipe_section(config, baseline) + _metrics_section(metrics, where) + _folds_section(metrics)
    lines += _calibration_section(metrics, where) + _groups_section(groups, where)
    lines += _unfamiliar_section(metrics, where) + _use_and_reproduce(info, root, external)
    return "\n".join(lines)
