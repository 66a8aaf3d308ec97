"""Use a trained run on new images: `predict` (files, folders, CSV lists of paths) and `pair` (two images).

Also what `serve` and `export` share with them: loading a run for inference (models, thresholds, the
retrieval index and where its images are), reading an untrusted image, and scoring a batch of pixels.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from .config import Config, ConfigError, load_config

LABEL_NAMES = ("not melanoma", "melanoma")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Full-size ISIC 2020 photographs are up to 6000 x 6000 (36 MP); anything far beyond is refused undecoded.
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_NEIGHBOURS = 5
VAL_PAIR_SAMPLE = 3000

# pixels (N x S x S x 3 uint8) -> (embeddings N x D, melanoma probabilities N)
Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


from .errors import ImageRejected  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Thresholds:
    classifier: float
    knn: float
    source: str


@dataclass(frozen=True)
class RetrievalIndex:
    """Embeddings (L2-normalised), ids, labels and parts of the run's training and validation images.

    Search is exact: cosine similarity is one matrix product, and 33k x 512 float32 is 68 MB.
    """

    embeddings: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    parts: np.ndarray

    def part(self, name: str) -> "RetrievalIndex":
        keep = self.parts == name
        return RetrievalIndex(self.embeddings[keep], self.ids[keep], self.labels[keep], self.parts[keep])

    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (N x k) of the most similar entries and their cosine distances (1 - cosine similarity)."""
        k = min(k, len(self.ids))
        sims = np.asarray(query, dtype=np.float32) @ self.embeddings.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else \
            np.broadcast_to(np.arange(k), sims.shape).copy()
        order = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1), axis=1)
        # Clipped: rounding makes an image's distance to itself about -1e-7.
        return order, np.clip(1.0 - np.take_along_axis(sims, order, axis=1), 0.0, 2.0)


@dataclass
class LoadedRun:
    path: Path
    config: Config
    encoder: object
    classifier: object
    index: RetrievalIndex
    thresholds: Thresholds
    image_paths: dict[str, str]
    train_prevalence: Optional[float]
    device: object


def load_thresholds(run_dir: Path) -> Thresholds:
    path = run_dir / "threshold.json"
    if not path.is_file():
        return Thresholds(0.5, 0.5, "0.5 (the run has no threshold.json with a validation-chosen threshold)")
    data = json.loads(path.read_text())
    return Thresholds(float(data["classifier"]), float(data.get("knn", 0.5)),
                      f"chosen on the validation part ({data.get('rule', 'unknown rule')})")


def load_index(run_dir: Path) -> RetrievalIndex:
    path = run_dir / "index.npz"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no index.npz (the retrieval index); `melanoma-siamese evaluate --run "
                          f"{run_dir}` writes it")
    data = np.load(path)
    return RetrievalIndex(data["embeddings"].astype(np.float32), data["ids"].astype(str),
                          data["labels"].astype(int), data["parts"].astype(str))


def image_locations(run_dir: Path) -> dict[str, str]:
    """isic_id -> image file, from the dataset the run was trained on (empty when it is no longer there)."""
    from .data.metadata import DataError, read_dataset

    info_file = run_dir / "run.json"
    if not info_file.is_file():
        return {}
    source = json.loads(info_file.read_text()).get("source", {})
    paths = {k: Path(source[k]) if source.get(k) else None for k in ("data", "metadata", "images")}
    try:
        table = read_dataset(paths["data"], paths["metadata"], paths["images"]).table
    except (DataError, OSError):
        return {}
    return {i: p for i, p in zip(table["isic_id"], table["path"]) if p}


def _train_prevalence(run_dir: Path) -> Optional[float]:
    info_file = run_dir / "run.json"
    train = json.loads(info_file.read_text()).get("parts", {}).get("train") if info_file.is_file() else None
    return train["melanoma"] / train["images"] if train and train.get("images") else None


def load_run(run_dir: Path, device: str = "cpu") -> LoadedRun:
    from .checkpoint import load_model
    from .engine import resolve_device

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run folder: config.yaml is missing (train writes it)")
    config = load_config(run_dir / "config.yaml")
    torch_device = resolve_device(device)
    encoder, _ = load_model(run_dir / "models" / "siamese.pth", "siamese")
    classifier, _ = load_model(run_dir / "models" / "classifier.pth", "classifier")
    return LoadedRun(run_dir, config, encoder.to(torch_device), classifier, load_index(run_dir),
                     load_thresholds(run_dir), image_locations(run_dir), _train_prevalence(run_dir), torch_device)


def read_image(source: str | Path | bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """size x size x 3 uint8 from a path or bytes; ImageRejected (with the reason) for anything unusable."""
    from .data.images import decode_image

    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(handle) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"image dimensions are too large ({exc})", 413) from exc
    except FileNotFoundError as exc:
        raise ImageRejected("file does not exist", 404) from exc
    except IsADirectoryError as exc:
        raise ImageRejected("is a folder, not an image file", 400) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageRejected("not an image (no known image format)", 415) from exc
    except Exception as exc:  # OSError mostly; some format plugins raise ValueError and the like on bad headers
        raise ImageRejected(f"cannot be read ({type(exc).__name__}: {exc})", 400) from exc
    # Checked from the header before decoding, so a small file claiming huge dimensions costs nothing.
    if width * height > max_pixels:
        raise ImageRejected(f"image dimensions {width} x {height} exceed the limit of {max_pixels} pixels", 413)
    if isinstance(handle, io.BytesIO):
        handle.seek(0)
    try:
        pixels, _ = decode_image(handle, size)
    except Exception as exc:  # PIL raises many types for truncated or corrupt data
        raise ImageRejected(f"corrupt image ({type(exc).__name__}: {exc})", 400) from exc
    return pixels


def torch_scorer(run: LoadedRun, batch_size: int = 64) -> Scorer:
    from .engine import embed, melanoma_probability

    d = run.config.data

    def score(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb = embed(run.encoder, pixels, np.arange(len(pixels)), d.mean, d.std, run.device, batch_size,
                    tta=run.config.evaluation.tta)
        return emb, melanoma_probability(run.classifier, emb)

    return score


def describe(run: LoadedRun, embeddings: np.ndarray, probs: np.ndarray, neighbours: int) -> list[dict]:
    """Per image: probability and decision, the kNN vote beside it, and the most similar training images.

    The vote uses the training part only, with the run's knn_k, as the validation-chosen kNN threshold did.
    """
    from .metrics import knn_probabilities

    train = run.index.part("train")
    votes = knn_probabilities(embeddings, train.embeddings, train.labels, run.config.evaluation.knn_k)
    order, distances = train.nearest(embeddings, neighbours)
    t = run.thresholds
    out = []
    for i, (p, vote) in enumerate(zip(probs, votes)):
        similar = [{"id": str(train.ids[j]), "label": int(train.labels[j]), "label_name": LABEL_NAMES[train.labels[j]],
                    "distance": float(d)} for j, d in zip(order[i], distances[i])]
        out.append({"probability": float(p), "decision": LABEL_NAMES[int(p >= t.classifier)],
                    "threshold": t.classifier, "knn_probability": float(vote),
                    "knn_decision": LABEL_NAMES[int(vote >= t.knn)], "knn_threshold": t.knn,
                    "similar": similar})
    return out


def expand_inputs(items: Sequence[Path]) -> list[Path]:
    """Files as given; folders searched recursively for image files; a .csv lists paths (column `path`)."""
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                          and not p.name.startswith("."))
        elif item.suffix.lower() == ".csv" and item.is_file():
            try:
                table = pd.read_csv(item, dtype=str, keep_default_na=False)
            except Exception as exc:  # pandas raises many kinds here
                raise ConfigError(f"{item}: cannot be read as a CSV list of image paths: {exc}") from exc
            if table.empty:
                raise ConfigError(f"{item}: the CSV lists no image paths")
            column = "path" if "path" in table.columns else table.columns[0]
            out += [p if p.is_absolute() else item.parent / p for p in map(Path, table[column]) if str(p)]
        else:
            out.append(item)
    return out


def _flat_row(path: Path, result: Optional[dict], reason: str = "", saliency: str = "") -> dict:
    row = {"path": str(path), "status": "ok" if result else "failed", "reason": reason}
    if result:
        row.update({k: result[k] for k in ("probability", "decision", "threshold", "knn_probability",
                                           "knn_decision", "knn_threshold")})
        for n, s in enumerate(result["similar"], 1):
            row.update({f"neighbour_{n}_id": s["id"], f"neighbour_{n}_label": s["label"],
                        f"neighbour_{n}_distance": s["distance"]})
        if saliency:
            row["saliency"] = saliency
    return row


def _terminal_table(rows: list[dict], neighbours: int) -> str:
    lines = [f"{'path':<40} {'P(melanoma)':>11}  {'decision':<12} {'kNN vote':>8}  nearest training images "
             "(id label distance)"]
    for r in rows:
        path = r["path"] if len(r["path"]) <= 40 else "..." + r["path"][-37:]
        if r["status"] != "ok":
            lines.append(f"{path:<40} {'-':>11}  {'FAILED':<12} {'-':>8}  {r['reason']}")
            continue
        near = ", ".join(f"{r[f'neighbour_{n}_id']} {'mel' if r[f'neighbour_{n}_label'] else 'ben'} "
                         f"{r[f'neighbour_{n}_distance']:.3f}" for n in range(1, neighbours + 1)
                         if f"neighbour_{n}_id" in r)
        lines.append(f"{path:<40} {r['probability']:>11.4f}  {r['decision']:<12} {r['knn_probability']:>8.3f}  {near}")
    return "\n".join(lines)


def _decode_batch(paths: Sequence[Path], size: int, max_pixels: int) -> list[tuple[Optional[np.ndarray], str]]:
    def work(path: Path) -> tuple[Optional[np.ndarray], str]:
        try:
            return read_image(path, size, max_pixels), ""
        except ImageRejected as exc:
            return None, str(exc)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(work, paths))


def predict_paths(run: LoadedRun, paths: Sequence[Path], scorer: Scorer, neighbours: int = DEFAULT_NEIGHBOURS,
                  batch_size: int = 64, saliency_dir: Optional[Path] = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                  progress: bool = False) -> list[dict]:
    """One flat row per path, in order; unreadable files get status 'failed' and the reason."""
    from tqdm.auto import tqdm

    size = run.config.data.image_size
    rows: list[dict] = []
    with tqdm(total=len(paths), desc="Predicting", unit="image", disable=not progress, leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            decoded = _decode_batch(chunk, size, max_pixels)
            good = [i for i, (pixels, _) in enumerate(decoded) if pixels is not None]
            results: dict[int, dict] = {}
            overlays: dict[int, str] = {}
            if good:
                pixels = np.stack([decoded[i][0] for i in good])
                emb, probs = scorer(pixels)
                results = dict(zip(good, describe(run, emb, probs, neighbours)))
                if saliency_dir is not None:
                    overlays = dict(zip(good, _write_saliency(run, pixels, [chunk[i] for i in good],
                                                              saliency_dir, start + np.array(good))))
            for i, path in enumerate(chunk):
                rows.append(_flat_row(path, results.get(i), decoded[i][1], overlays.get(i, "")))
            bar.update(len(chunk))
    return rows


def _write_saliency(run: LoadedRun, pixels: np.ndarray, paths: Sequence[Path], out_dir: Path,
                    numbers: np.ndarray) -> list[str]:
    from .saliency import saliency_overlays

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for overlay, path, number in zip(saliency_overlays(run, pixels), paths, numbers):
        # The running number keeps two inputs called image.jpg in different folders apart.
        target = out_dir / f"{int(number):05d}_{path.stem}_gradcam.png"
        Image.fromarray(overlay).save(target)
        written.append(str(target))
    return written


def _engine_scorer(run: LoadedRun, engine: str, onnx_path: Optional[Path], batch_size: int) -> Scorer:
    if engine == "torch":
        return torch_scorer(run, batch_size)
    from .export import default_onnx_path, onnx_scorer

    path = onnx_path or default_onnx_path(run.path)
    if not path.is_file():
        raise ConfigError(f"ONNX model {path} does not exist; write it with `melanoma-siamese export --run "
                          f"{run.path} --format onnx`")
    return onnx_scorer(path)


def cmd_predict(args: argparse.Namespace) -> int:
    run = load_run(args.run, args.device)
    paths = expand_inputs(args.paths)
    if not paths:
        raise ConfigError(f"no image files found in {', '.join(map(str, args.paths))}")
    scorer = _engine_scorer(run, args.engine, args.onnx, args.batch_size)
    rows = predict_paths(run, paths, scorer, args.neighbours, args.batch_size, args.saliency,
                         int(args.max_megapixels * 1e6), progress=not args.no_progress and len(paths) > args.batch_size)
    print(f"Threshold {run.thresholds.classifier:.4f} ({run.thresholds.source}); kNN vote of k="
          f"{run.config.evaluation.knn_k} training images, threshold {run.thresholds.knn:.4f}")
    print(_terminal_table(rows, args.neighbours))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(args.csv, index=False)
        print(f"Wrote {args.csv}")
    failed = sum(r["status"] != "ok" for r in rows)
    if failed:
        print(f"{failed} of {len(rows)} file(s) could not be used; see the reason column", file=sys.stderr)
    return 1 if failed else 0


def val_pair_distances(index: RetrievalIndex, limit: int = VAL_PAIR_SAMPLE, seed: int = 0) -> dict[str, np.ndarray]:
    """Cosine distances of every same-class and every other-class pair of validation images."""
    val = index.part("val")
    if len(val.ids) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(val.ids), limit, replace=False))
        val = RetrievalIndex(val.embeddings[keep], val.ids[keep], val.labels[keep], val.parts[keep])
    distances = 1.0 - val.embeddings @ val.embeddings.T
    upper = np.triu(np.ones_like(distances, dtype=bool), k=1)
    same = val.labels[:, None] == val.labels[None, :]
    return {"same_class": distances[upper & same], "other_class": distances[upper & ~same]}


def pair_report(run: LoadedRun, pixels: np.ndarray, scorer: Scorer) -> dict:
    """Distance of two images and where it falls among validation same-class and other-class distances."""
    emb, probs = scorer(pixels)
    distance = float(1.0 - emb[0] @ emb[1])
    reference = {}
    for name, values in val_pair_distances(run.index).items():
        reference[name] = {"pairs": int(len(values)),
                           "share_closer": float((values <= distance).mean()) if len(values) else None,
                           "median": float(np.median(values)) if len(values) else None}
    t = run.thresholds.classifier
    return {"distance": distance, "cosine_similarity": 1.0 - distance,
            "images": [{"probability": float(p), "decision": LABEL_NAMES[int(p >= t)]} for p in probs],
            "threshold": t, "validation": reference}


def cmd_pair(args: argparse.Namespace) -> int:
    run = load_run(args.run, args.device)
    size = run.config.data.image_size
    try:
        pixels = np.stack([read_image(p, size, int(args.max_megapixels * 1e6)) for p in (args.a, args.b)])
    except ImageRejected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = pair_report(run, pixels, torch_scorer(run))
    report["images"] = [{"path": str(p), **r} for p, r in zip((args.a, args.b), report["images"])]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"Embedding distance (1 - cosine similarity): {report['distance']:.4f}")
    for r in report["images"]:
        print(f"  {r['path']}: P(melanoma) {r['probability']:.4f} -> {r['decision']} (threshold {report['threshold']:.4f})")
    for name, text in (("same_class", "same-class"), ("other_class", "other-class")):
        v = report["validation"][name]
        if v["pairs"]:
            print(f"  {100 * v['share_closer']:.1f}% of {v['pairs']} {text} validation pairs are this close or closer "
                  f"(their median distance {v['median']:.4f})")
        else:
            print(f"  No {text} validation pairs to compare with")
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


def add_parser(sub, common) -> None:
    predict = sub.add_parser("predict", help="melanoma probability, decision and similar known cases for images")
    _shared_options(predict)
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                         help="image files, folders (searched recursively) or CSV files listing paths")
    predict.add_argument("--csv", type=Path, help="write one row per image here")
    predict.add_argument("--neighbours", type=_positive, default=DEFAULT_NEIGHBOURS, metavar="K",
                         help="most similar training images to list (default 5)")
    predict.add_argument("--saliency", type=Path, metavar="DIR", help="write Grad-CAM overlays into DIR")
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
