"""`predict` (files, folders, CSV lists of paths) and `pair` (two images) over a trained run.

The work is in `inference`; this module declares the options, prints and writes. Torch is imported when
a command runs, not when its options are declared, so `predict --help` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, ImageRejected
from .display import distance_text, probability_pair, probability_text
from .familiarity import ROUNDING
from .inputs import DEFAULT_MAX_PIXELS, max_pixels_option


def _terminal_table(rows: list[dict], neighbours: int) -> str:
    lines = [f"{'path':<40} {'P(melanoma)':>11}  {'decision':<12} {'familiar?':<30} {'kNN vote':>9}  "
             "nearest training images (id label distance)"]
    for r in rows:
        path = r["path"] if len(r["path"]) <= 40 else "..." + r["path"][-37:]
        if r["status"] != "ok":
            lines.append(f"{path:<40} {'-':>11}  {'FAILED':<12} {'-':<30} {'-':>9}  {r['reason']}")
            continue
        near = ", ".join(f"{r[f'neighbour_{n}_id']} {'mel' if r[f'neighbour_{n}_label'] else 'ben'} "
                         f"{distance_text(r[f'neighbour_{n}_distance'])}" for n in range(1, neighbours + 1)
                         if f"neighbour_{n}_id" in r)
        familiar = ("-" if r["unfamiliar_percentile"] is None else f"UNFAMILIAR ({r['unfamiliar_by']})"
                    if r["unfamiliar"] else f"yes (pct {r['unfamiliar_percentile']:.0f})")
        shown = probability_text(r["probability"], r["threshold"])
        # The vote's own decision beside it: a vote that reads as its threshold at three decimals may be either.
        vote = f"{r['knn_probability']:.3f} {'mel' if r['knn_decision'] == 'melanoma' else 'ben'}"
        lines.append(f"{path:<40} {shown:>11}  {r['decision']:<12} {familiar:<30} {vote:>9}  {near}")
    return "\n".join(lines)


def _header(predictor) -> list[str]:
    """What every answer below rests on: the engine, the scale of the probability, the threshold."""
    run = predictor.run
    lines = [f"Engine: {predictor.engine}."]
    if run.generated:
        lines.append("WARNING: this run was trained on generated images: its answers mean nothing for real photos.")
    if run.calibration is not None:
        lines.append(f"P(melanoma): calibrated on the validation part ({run.calibration.method}) for a population "
                     f"with {100 * predictor.prevalence:.2f}% melanoma ({predictor.prevalence_source}; "
                     "--prevalence to change).")
    else:
        lines.append("P(melanoma): the classifier's raw score (this run has no calibration; `evaluate --run RUN` "
                     "fits one): a score, not a risk.")
    # Significant digits, not decimals: at a low prevalence the threshold is 0.001314, and "0.0013" beside a
    # probability of 0.00130 called "not melanoma" would read as a contradiction.
    # Six significant digits: a probability a row prints as 0.27881 must not sit beside a threshold read as 0.2788.
    lines.append(f"Threshold on that scale: {predictor.threshold:.6g} ({run.thresholds.source}); kNN vote: the "
                 f"share of melanoma among the k={run.config.evaluation.knn_k} most similar training images (not "
                 f"calibrated, not moved to the prevalence), threshold {run.thresholds.knn:.4g}, its decision beside it.")
    rule = run.familiarity
    if rule is not None:
        lines.append(f"Unfamiliar: mean distance to the {rule.k} nearest training images above "
                     f"{distance_text(rule.cut)} (the {100 * rule.quantile:g}th percentile of validation images), "
                     "or a texture as far from the training images'; pct = the share of validation images as close "
                     "or closer.")
        # A distance means nothing without a scale: the cut and a typical validation image give one.
        lines.append(f"Distances: 1 - cosine similarity of the embeddings (0 = the same direction, 2 = opposite); "
                     f"a typical validation image's mean distance to its {rule.k} nearest training images is "
                     f"{distance_text(rule.record()['val_median'])}.")
    return lines


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from .context import predict_with_context, read_context
    from .inference import DEFAULT_NEIGHBOURS, Predictor, load_run, predict_paths
    from .inputs import expand_inputs

    from .saliency import GRADCAM_MISSING, gradcam_installed

    if args.saliency is not None and not gradcam_installed():
        raise ConfigError(f"--saliency: {GRADCAM_MISSING}")
    max_pixels = max_pixels_option(args.max_megapixels)
    run = load_run(args.run, args.device)
    paths = expand_inputs(args.paths)
    if not paths:
        raise ConfigError(f"no image files found in {', '.join(map(str, args.paths))}")
    predictor = Predictor(run, args.engine, args.onnx, args.batch_size, args.prevalence)
    neighbours = args.neighbours or DEFAULT_NEIGHBOURS
    context = read_context(args.paths) if run.features != ("image",) else None
    if context is not None:  # a run reading clinical or patient features, and CSV input with a patient column
        rows = predict_with_context(predictor, paths, context, neighbours, max_pixels)
    else:
        rows = predict_paths(predictor, paths, neighbours, args.batch_size, args.saliency, max_pixels,
                             progress=not args.no_progress and len(paths) > args.batch_size)
    print("\n".join(_header(predictor)))
    print(_terminal_table(rows, neighbours))
    for r in rows:
        if r.get("known_case"):
            print(f"{r['path']}: {r['known_case_note']}", file=sys.stderr)
    unfamiliar = sum(bool(r.get("unfamiliar")) for r in rows)
    if unfamiliar:
        print(f"{unfamiliar} image(s) are unlike every image the model was trained on: their answers are not "
              "reliable", file=sys.stderr)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.csv, index=False)
        print(f"Wrote {args.csv}")
    failed = sum(r["status"] != "ok" for r in rows)
    if failed:
        where = f"the `reason` column of {args.csv}" if args.csv else "the last column of the table above (FAILED rows)"
        print(f"{failed} of {len(rows)} file(s) could not be used; the reason for each is in {where}", file=sys.stderr)
    return 1 if failed else 0


def _familiarity_line(u: dict) -> str:
    """How familiar one image is, said for a familiar image too, so a missing warning is not mistaken for a
    check never made."""
    if u["flag"]:
        return ("UNFAMILIAR: this image is unlike every image the model was trained on; the answer is not "
                f"reliable. {u['reason']}")
    if u["percentile"] is None:
        return f"familiarity not checked: {u['reason']}"
    texture = ("" if u["appearance_percentile"] is None else
               f"; in texture, {u['appearance_percentile']:.0f}% of them are this close or closer")
    return (f"not flagged unfamiliar: mean distance {distance_text(u['distance'])} to the nearest training images, "
            f"within the cut {distance_text(u['cut'])} ({u['percentile']:.0f}% of validation images are this close "
            f"or closer){texture}")


def _print_pair(report: dict) -> None:
    if report["trained_on_generated_images"]:
        print("WARNING: this run was trained on generated images: its answers mean nothing for real photos.")
    # Below 1e-6 a distance is float32 rounding as much as a difference the model sees.
    distance = report["distance"]
    shown = distance_text(distance) if distance >= ROUNDING else "below 0.000001: the model cannot tell the two apart"
    print(f"Embedding distance (1 - cosine similarity): {shown}")
    scale = (f"calibrated, at {100 * report['prevalence']:.2f}% melanoma ({report['prevalence_source']})"
             if report["calibrated"] else "raw score, not calibrated")
    for r in report["images"]:
        # At the decimals it takes to see which is larger, as predict's table and the saliency caption.
        shown, threshold = probability_pair(r["probability"], report["threshold"])
        print(f"  {r['path']}: P(melanoma) {shown} ({scale}) -> {r['decision']} (threshold {threshold})")
        print("    " + _familiarity_line(r["unfamiliar"]))
    for name, text in (("same_class", "same-class"), ("other_class", "other-class")):
        v = report["validation"][name]
        if v["pairs"]:
            print(f"  {100 * v['share_closer']:.1f}% of {v['pairs']} {text} validation pairs are this close or closer "
                  f"(their median distance {distance_text(v['median'])})")
        else:
            print(f"  No {text} validation pairs to compare with")


def cmd_pair(args: argparse.Namespace) -> int:
    import numpy as np

    from .inference import Predictor, load_run, pair_report
    from .inputs import read_image

    max_pixels = max_pixels_option(args.max_megapixels)
    run = load_run(args.run, args.device)
    size = run.config.data.image_size
    images = []
    for path in (args.a, args.b):
        try:
            images.append(read_image(path, size, max_pixels, run.checks))
        except ImageRejected as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 1
    report = pair_report(Predictor(run, prevalence=args.prevalence), np.stack(images))
    report["images"] = [{"path": str(p), **r} for p, r in zip((args.a, args.b), report["images"])]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_pair(report)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _shared_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="run folder written by train")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_PIXELS / 1e6,
                        help="refuse images whose header claims more pixels than this (default 64)")
    parser.add_argument("--prevalence", type=float, metavar="P",
                        help="share of melanoma in the population the probability is for, e.g. 0.02 "
                             "(default: the training part's)")


def add_parser(sub) -> None:
    predict = sub.add_parser("predict", help="melanoma probability, decision and similar known cases for images")
    _shared_options(predict)
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                         help="image files, folders (searched recursively) or CSV files listing paths")
    predict.add_argument("--csv", type=Path, help="write one row per image here")
    predict.add_argument("--neighbours", type=_positive, metavar="K",
                         help="most similar training images to list (default 5)")
    predict.add_argument("--saliency", type=Path, metavar="DIR",
                         help="write a Grad-CAM figure per image into DIR (image and overlay, colour bar, caption "
                              "with the answer)")
    predict.add_argument("--engine", choices=("torch", "onnxruntime"), default="torch")
    predict.add_argument("--onnx", type=Path, help="ONNX model for --engine onnxruntime (default RUN/models/model.onnx)")
    predict.add_argument("--batch-size", type=_positive, default=64)
    predict.add_argument("--no-progress", action="store_true")
    predict.set_defaults(handler=cmd_predict)

    pair = sub.add_parser("pair", help="embedding distance of two images, against validation pair distances")
    _shared_options(pair)
    pair.add_argument("a", type=Path, metavar="A")
    pair.add_argument("b", type=Path, metavar="B")
    pair.add_argument("--json", action="store_true", help="print the report as JSON")
    pair.set_defaults(handler=cmd_pair)
