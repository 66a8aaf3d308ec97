"""Train several recipes under the same overrides, seeds and split, and tabulate them side by side.

Resumable: each (recipe, seed) is a run folder; one whose metrics.json exists is read, not retrained.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .options import add_common, resolve_config
from .runfolder import RunFolder

COLUMNS = [
    ("roc_auc", "test ROC AUC"), ("average_precision", "average precision"),
    ("balanced_accuracy", "balanced accuracy"), ("sensitivity_at_90_specificity", "sens. @ 90% spec."),
    ("partial_auc_above_80_sensitivity", "pAUC >80% sens. (ISIC 2024, max 0.2)"),
    ("balanced_test_accuracy", "acc. balanced test"), ("knn_roc_auc", "kNN ROC AUC"),
    ("train_seconds", "stage-1 time (s)"), ("backbone_passes", "backbone passes"),
]


def add_parser(sub) -> None:
    parser = sub.add_parser("compare", help="train recipes on one split over several seeds; write a table")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--configs", nargs="+", required=True, help="recipe YAML files (the first is compared "
                        "against each other one)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the one split every run shares")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--skip-bad-images", action="store_true")
    parser.add_argument("--table-only", action="store_true", help="train nothing: tabulate the finished rows "
                        "(e.g. after merging run folders made by several processes or machines)")
    add_common(parser)
    parser.set_defaults(handler=cmd_compare)


def run_row(metrics: dict) -> dict:
    """One line of runs.csv from a finished run's metrics (its baseline record holds the training cost)."""
    test, baseline = metrics["test"], metrics.get("baseline", {})
    return {
        "roc_auc": test["roc_auc"], "roc_auc_ci_low": test.get("roc_auc_ci", [None, None])[0],
        "roc_auc_ci_high": test.get("roc_auc_ci", [None, None])[1],
        "average_precision": test["average_precision"], "balanced_accuracy": test["balanced_accuracy"],
        "sensitivity_at_90_specificity": test.get("sensitivity_at_90_specificity"),
        "partial_auc_above_80_sensitivity": test.get("partial_auc_above_80_sensitivity"),
        "balanced_test_accuracy": metrics.get("test_balanced", {}).get("accuracy"),
        "knn_roc_auc": metrics["knn"]["test"]["roc_auc"],
        "train_seconds": baseline.get("siamese_seconds", float("nan")),
        "backbone_passes": baseline.get("backbone_image_passes", float("nan")),
    }


def summarise(rows: pd.DataFrame, recipes: list[str]) -> pd.DataFrame:
    out = []
    for recipe in recipes:
        r = rows[rows["recipe"] == recipe]
        if r.empty:
            continue
        line = {"recipe": recipe, "seeds": len(r)}
        for key, name in COLUMNS:
            values = r[key].astype(float)
            if key not in rows:  # a runs.csv from before the column existed
                continue
            if key in ("train_seconds", "backbone_passes"):
                line[name] = f"{values.mean():.0f}"
            else:  # mean ± standard deviation over seeds (no spread from a single seed)
                line[name] = f"{values.mean():.3f}" + (f" ± {values.std(ddof=0):.3f}" if len(r) > 1 else "")
        line["ROC AUC 95% CI (mean of seeds)"] = f"{r['roc_auc_ci_low'].mean():.3f}-{r['roc_auc_ci_high'].mean():.3f}"
        out.append(line)
    return pd.DataFrame(out)


def _run_folder(out_dir: Path, recipe: str, seed: int) -> RunFolder:
    return RunFolder(out_dir / recipe / f"seed{seed}")


def paired_comparisons(out_dir: Path, recipes: list[str], seeds: list[int]) -> list[dict]:
    """First recipe vs each other one: paired patient bootstrap of the seed-averaged AUC difference."""
    from .metrics import paired_bootstrap_auc

    def probs(recipe: str):
        files = [_run_folder(out_dir, recipe, s).predictions for s in seeds]
        frames = [pd.read_csv(f, dtype={"isic_id": str}) for f in files if f.is_file()]
        return [f[f["part"] == "test"].sort_values("isic_id").reset_index(drop=True) for f in frames]

    first = probs(recipes[0])
    result = []
    for other in recipes[1:]:
        second = probs(other)
        if not first or not second:
            continue
        ref = first[0]
        comparison = paired_bootstrap_auc(ref["label"].to_numpy(), np.stack([f["prob_melanoma"] for f in first]),
                                          np.stack([f["prob_melanoma"] for f in second]), ref["patient_id"].to_numpy())
        result.append({"a": recipes[0], "b": other, **comparison})
    return result


def _train_missing(args: argparse.Namespace, recipes: list[str], rows: pd.DataFrame, rows_file: Path) -> pd.DataFrame:
    from .config import with_overrides
    from .folds import run_training
    from .train import DataSource

    # Seeds outermost: an interrupted table holds every recipe at the seeds it reached.
    for seed in args.seeds:
        for config_file, recipe in zip(args.configs, recipes):
            run = _run_folder(args.out, recipe, seed)
            done = not rows.empty and ((rows["recipe"] == recipe) & (rows["seed"] == seed)).any()
            if done and run.metrics.is_file():
                print(f"[compare] {recipe} seed {seed}: done, kept")
                continue
            if args.table_only:
                print(f"[compare] {recipe} seed {seed}: not finished, left out of the table (--table-only)")
                continue
            args.seed = seed
            config = with_overrides(resolve_config(args, base=Path(config_file)), {"data.split_seed": args.split_seed})
            print(f"[compare] {recipe} seed {seed}: training into {run.root}")
            metrics = run_training(config, DataSource(data=args.data), run.root)
            if not rows.empty:  # a row whose run folder is gone was retrained: replace it
                rows = rows[~((rows["recipe"] == recipe) & (rows["seed"] == seed))]
            rows = pd.concat([rows, pd.DataFrame([{"recipe": recipe, "seed": seed, **run_row(metrics)}])],
                             ignore_index=True)
            rows.to_csv(rows_file, index=False)
    return rows


def _markdown(table: pd.DataFrame, comparisons: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in table.itertuples(index=False)]
    if comparisons:
        lines += ["", "Paired patient bootstrap of the test ROC AUC difference (seed-averaged):", ""]
        for c in comparisons:
            lines.append(f"- {c['a']} - {c['b']}: {c['auc_difference']:+.3f} (95% CI {c['ci'][0]:+.3f} to "
                         f"{c['ci'][1]:+.3f}; share of resamples where {c['b']} is not worse: {c['p_b_not_worse']:.2f})")
    return lines


def cmd_compare(args: argparse.Namespace) -> int:
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    recipes = [Path(c).name.removesuffix(".yaml") for c in args.configs]
    rows_file = out_dir / "runs.csv"
    rows = pd.read_csv(rows_file) if rows_file.is_file() else pd.DataFrame()
    rows = _train_missing(args, recipes, rows, rows_file)
    table = summarise(rows, recipes)
    table.to_csv(out_dir / "comparison.csv", index=False)
    comparisons = paired_comparisons(out_dir, recipes, args.seeds)
    lines = _markdown(table, comparisons)
    (out_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    (out_dir / "paired.json").write_text(json.dumps(comparisons, indent=2))
    print("\n".join(lines))
    return 0
