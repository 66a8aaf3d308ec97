"""A trained run put to use: the one loader of a run (evaluate, predict, pair, serve and export use it),
the retrieval index, the two engines (PyTorch, and onnxruntime on the exported model), and the answer
for a batch of images: probability, decision, kNN vote and the most similar known images.

The commands (`predict`, `pair`, `serve`, `export`, `evaluate`) live in their own modules and call this.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import load_model
from .config import Config
from .errors import ConfigError, ImageRejected
from .inputs import DEFAULT_MAX_PIXELS, ImageChecks, read_image
from .model_card import STATED
from .preprocess import to_model_input
from .runfolder import RunFolder, Thresholds

LABEL_NAMES = ("not melanoma", "melanoma")
ENGINES = ("torch", "onnxruntime")
DEFAULT_NEIGHBOURS = 5
KNOWN_CASE_K = 5  # nearest training images looked at for one the image cannot be told apart from
# predict's threads that describe answers while the model scores the next chunk (half the cores, 2 to 8).
DESCRIBE_THREADS = max(2, min(8, (os.cpu_count() or 2) // 2))
VAL_PAIR_SAMPLE = 3000

# pixels (N x S x S x 3 uint8) -> (embeddings N x D, melanoma probabilities N)
Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class RetrievalIndex:
    """Embeddings (L2-normalised), ids, labels and parts of the run's training and validation images.

    Search is exact: cosine similarity is one matrix product, and 33k x 512 float32 is 68 MB.
    """

    embeddings: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    parts: np.ndarray
    # Appearance descriptors of the same images (familiarity.appearance_features), for the unfamiliar check.
    appearance: Optional[np.ndarray] = None

    def part(self, name: str) -> "RetrievalIndex":
        keep = self.parts == name
        return RetrievalIndex(self.embeddings[keep], self.ids[keep], self.labels[keep], self.parts[keep],
                              None if self.appearance is None else self.appearance[keep])

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
    folder: RunFolder
    config: Config
    encoder: nn.Module
    classifier: nn.Module
    index: Optional[RetrievalIndex]
    thresholds: Thresholds
    train_prevalence: Optional[float]
    device: torch.device
    # trust.json: calibration, the unfamiliar-image rule's record, whether the data was generated.
    trust: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder.root

    @cached_property
    def calibration(self):
        from .calibration import Calibration

        record = self.trust.get("calibration")
        return Calibration.from_dict(record) if record else None

    @cached_property
    def familiarity(self):
        """The unfamiliar-image rule on the embedding, rebuilt from the index (the cut `evaluate` recorded)."""
        return None if self.index is None else self._rule(self.index.embeddings)

    @cached_property
    def appearance_rule(self):
        """The same rule on appearance descriptors: an encoder trained to separate two classes can map a photo
        unlike its training images right beside them, while its texture still differs."""
        return None if self.index is None or self.index.appearance is None else self._rule(self.index.appearance)

    def _rule(self, features: np.ndarray):
        from .familiarity import fit

        parts = self.index.parts
        if not (parts == "val").any():
            return None
        e = self.config.evaluation
        return fit(features[parts == "train"], features[parts == "val"], e.unfamiliar_k, e.unfamiliar_quantile)

    @property
    def features(self) -> tuple[str, ...]:
        """What the classifier reads (classifier.features): the embedding, and clinical / patient features."""
        return tuple(getattr(self.classifier, "features", ("image",)))

    @property
    def generated(self) -> bool:
        return bool(self.trust.get("trained_on_generated_images", False))

    @property
    def checks(self) -> ImageChecks:
        return ImageChecks(self.config.data.min_image_side, self.config.data.min_image_std)

    def prevalence(self, stated: Optional[float] = None) -> tuple[Optional[float], str]:
        """The prevalence shown probabilities assume, and where it comes from."""
        if stated is not None:
            if not 0 < stated < 1:
                raise ConfigError(f"--prevalence {stated}: must be strictly between 0 and 1 (a share, e.g. 0.02)")
            return float(stated), STATED
        if self.config.evaluation.prevalence is not None:
            return self.config.evaluation.prevalence, "set by evaluation.prevalence"
        if self.train_prevalence:
            return self.train_prevalence, "the training part's share of melanoma"
        if self.calibration is not None:
            return self.calibration.prevalence, "the validation part's share of melanoma"
        return None, "unknown"

    @cached_property
    def image_paths(self) -> dict[str, str]:
        """isic_id -> image file, from the dataset the run was trained on (empty when it is no longer there)."""
        from .data.metadata import DataError, read_dataset

        try:
            source = self.folder.source()
            table = read_dataset(source["data"], source["metadata"], source["images"],
                                 self.config.data.image_types).table  # the kinds the run was trained on
        except (ConfigError, DataError, OSError):
            return {}
        return {i: p for i, p in zip(table["isic_id"], table["path"]) if p}


def load_run(run_dir: Path | RunFolder, device: str | torch.device = "cpu", config: Optional[Config] = None,
             with_index: bool = True) -> LoadedRun:
    """Models, configuration (the run's own unless given), thresholds and, with_index, the retrieval index.

    Evaluation loads without the index, which it writes; every other use needs it."""
    from .runtime import resolve_device

    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    config = config if config is not None else folder.read_config()
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    encoder, _ = load_model(folder.siamese, "siamese")
    classifier, _ = load_model(folder.classifier, "classifier")
    index = RetrievalIndex(**folder.read_index()) if with_index else None
    return LoadedRun(folder, config, encoder.to(torch_device), classifier, index, folder.read_thresholds(),
                     folder.train_prevalence(), torch_device, folder.read_trust())


class PixelModel(nn.Module):
    """uint8 N x S x S x 3 -> (embedding, melanoma probability): the whole of what the ONNX file computes."""

    def __init__(self, encoder: nn.Module, classifier: nn.Module, mean: float, std: float):
        if tuple(getattr(classifier, "features", ("image",))) != ("image",):
            raise ConfigError(f"this run's classifier also reads {', '.join(classifier.features[1:])} features, which "
                              "a pixels-only model (the ONNX file, the Hub folder, api's Model.module) cannot take: "
                              "these are for runs trained with classifier.features: [image]; score this run with "
                              "`predict` or api.load_run(RUN).predict")
        super().__init__()
        self.encoder, self.classifier, self.mean, self.std = encoder, classifier, mean, std

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.encoder(to_model_input(images, self.mean, self.std))
        return embedding, torch.softmax(self.classifier(embedding), dim=1)[:, 1]


def torch_scorer(run: LoadedRun, batch_size: int = 64) -> Scorer:
    from .engine import embed

    d = run.config.data

    def score(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb = embed(run.encoder, pixels, np.arange(len(pixels)), d.mean, d.std, batch_size=batch_size,
                    tta=run.config.evaluation.tta)
        return emb, context_probability(run, emb, None)

    return score


ONNXRUNTIME_MISSING = ("the onnxruntime engine needs onnxruntime or onnxruntime-gpu, and neither is installed: "
                      "pip install onnxruntime (or onnxruntime-gpu on a CUDA machine)")


def onnx_providers(available: Sequence[str], device_type: str) -> list[str]:
    """onnxruntime's execution providers for a run on `device_type`: CUDA first where the run is on CUDA and the
    installed build (onnxruntime-gpu) has it, the CPU always (both builds install the `onnxruntime` module)."""
    cuda = device_type == "cuda" and "CUDAExecutionProvider" in available
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


def onnx_scorer(path: Path, threads: Optional[int] = None, device_type: str = "cpu") -> Scorer:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError(ONNXRUNTIME_MISSING) from exc

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = onnx_providers(ort.get_available_providers(), device_type)
    session = ort.InferenceSession(str(path), options, providers=providers)

    def score(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embedding, probability = session.run(None, {"images": np.ascontiguousarray(pixels, dtype=np.uint8)})
        return embedding, probability

    return score


class Predictor:
    """A loaded run and one engine: images -> answers. `engine` is "torch" or "onnxruntime" (the exported
    model, RUN/models/model.onnx unless `onnx_path` names another). `prevalence`: the share of melanoma in
    the population the shown probabilities are for (None: the run's default, see LoadedRun.prevalence)."""

    def __init__(self, run: LoadedRun, engine: str = "torch", onnx_path: Optional[Path] = None,
                 batch_size: int = 64, prevalence: Optional[float] = None):
        if engine not in ENGINES:
            raise ConfigError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
        self.run, self.engine = run, engine
        self.prevalence, self.prevalence_source = run.prevalence(prevalence)
        if engine == "torch":
            self.score = torch_scorer(run, batch_size)
            return
        path = onnx_path or run.folder.onnx
        if not Path(path).is_file():
            raise ConfigError(f"ONNX model {path} does not exist; write it with `melanoma-siamese export --run "
                              f"{run.path} --format onnx`")
        self.score = onnx_scorer(Path(path), device_type=run.device.type)

    @property
    def threshold(self) -> float:
        """The decision threshold on the scale of the probabilities this predictor shows."""
        return float(shown_probability(self.run, [self.run.thresholds.classifier], self.prevalence)["threshold"])

    def answers(self, pixels: np.ndarray, neighbours: int = DEFAULT_NEIGHBOURS, context=None) -> list[dict]:
        """`context`: a table with a row per image (clinical columns, patient_id) for a run whose classifier
        reads them; None or absent columns: unknown."""
        return self.describe(pixels, self.scored(pixels, context), neighbours)

    def scored(self, pixels: np.ndarray, context=None) -> tuple[np.ndarray, np.ndarray]:
        """The model's part of the answers: (embeddings, classifier scores)."""
        emb, probs = self.score(pixels)
        if self.run.features != ("image",):
            probs = context_probability(self.run, emb, context)
        return emb, probs

    def describe(self, pixels: np.ndarray, scored: tuple[np.ndarray, np.ndarray],
                 neighbours: int = DEFAULT_NEIGHBOURS) -> list[dict]:
        """The rest: probability at the prevalence, decision, kNN vote, neighbours, unfamiliar check."""
        return describe(self.run, pixels, scored, neighbours, self.prevalence, self.prevalence_source)


def context_probability(run: LoadedRun, embeddings: np.ndarray, context=None) -> np.ndarray:
    """The classifier's score from embeddings and, for a run trained with them, clinical and patient features
    (features.model_input); without a context, metadata is unknown and every image is its patient's only one."""
    import pandas as pd

    from .engine import melanoma_probability
    from .features import model_input

    table = context if context is not None else pd.DataFrame(index=range(len(embeddings)))
    return melanoma_probability(run.classifier, model_input(run.features, embeddings, table.reset_index(drop=True)))


def shown_probability(run: LoadedRun, scores: np.ndarray, prevalence: Optional[float]) -> dict:
    """The number a person is shown: calibrated and moved to `prevalence` where the run has a calibration,
    with the threshold on that same scale and the decision taken on it; the raw score otherwise."""
    from .calibration import displayed

    raw_threshold = run.thresholds.classifier
    if run.calibration is None:
        scores = np.asarray(scores, dtype=np.float64)
        return {"probability": scores, "threshold": raw_threshold, "melanoma": scores >= raw_threshold,
                "calibrated": False}
    return {**displayed(run.calibration, scores, raw_threshold, prevalence), "calibrated": True}


def unfamiliar_flags(run: LoadedRun, embeddings: np.ndarray, appearance: np.ndarray) -> tuple[dict, dict, np.ndarray]:
    """The embedding's and the appearance's assessments (familiarity.Familiarity.assess) of images the run's
    rules exist for, and the flag: unfamiliar by either."""
    found = run.familiarity.assess(embeddings)
    if run.appearance_rule is None:
        looks = {"unfamiliar": np.zeros(len(embeddings), dtype=bool), "percentile": [None] * len(embeddings)}
    else:
        looks = run.appearance_rule.assess(appearance)
    return found, looks, found["unfamiliar"] | looks["unfamiliar"]


def unfamiliar_answers(run: LoadedRun, embeddings: np.ndarray, pixels: np.ndarray,
                       appearance: Optional[np.ndarray] = None) -> list[dict]:
    """Per image: distance to the nearest training images and its percentile among validation images, in the
    embedding and in appearance; flagged when either is beyond its cut."""
    from .display import distance_text
    from .familiarity import appearance_features

    rule = run.familiarity
    if rule is None:
        return [{"flag": False, "distance": None, "percentile": None, "cut": None, "embedding_flag": False,
                 "appearance_flag": False, "appearance_percentile": None,
                 "reason": "this run has no validation images in its index to judge familiarity"}] * len(embeddings)
    appearance = appearance_features(pixels) if appearance is None else appearance
    found, looks, flags = unfamiliar_flags(run, embeddings, appearance)
    out = []
    for i, (distance, percentile) in enumerate(zip(found["distance"], found["percentile"])):
        reasons = []
        if found["unfamiliar"][i]:
            reasons.append(f"its mean distance to the {rule.k} nearest training images, {distance_text(distance)}, "
                           f"is above the cut {distance_text(rule.cut)} (the {100 * rule.quantile:g}th percentile of "
                           f"validation images'; farther than {percentile:.0f}% of them)")
        texture = looks["percentile"][i]
        if looks["unfamiliar"][i]:
            reasons.append(f"its texture is unlike the training images' (farther than {texture:.0f}% "
                           "of validation images)")
        out.append({"flag": bool(flags[i]), "distance": float(distance), "percentile": float(percentile),
                    "cut": float(rule.cut), "embedding_flag": bool(found["unfamiliar"][i]),
                    "appearance_flag": bool(looks["unfamiliar"][i]),
                    "appearance_percentile": None if texture is None else float(texture),
                    "reason": ("In the model's terms, " + "; and ".join(reasons) + ".") if reasons else ""})
    return out


def describe(run: LoadedRun, pixels: np.ndarray, scored: tuple[np.ndarray, np.ndarray], neighbours: int,
             prevalence: Optional[float] = None, prevalence_source: str = "") -> list[dict]:
    """Per image: probability (calibrated, at `prevalence`) and decision, the raw score, whether the image is
    unlike the training images, the kNN vote beside it, and the most similar training images.

    The vote uses the training part only, with the run's knn_k, as the validation-chosen kNN threshold did.
    """
    from .familiarity import appearance_features
    from .metrics import knn_probabilities

    embeddings, probs = scored
    train = run.index.part("train")
    votes = knn_probabilities(embeddings, train.embeddings, train.labels, run.config.evaluation.knn_k)
    # One search serves the neighbours shown and the known-case check.
    order, distances = train.nearest(embeddings, max(neighbours, KNOWN_CASE_K))
    similar = _similar(train, order[:, :neighbours], distances[:, :neighbours])
    shown = shown_probability(run, probs, prevalence)
    appearance = appearance_features(pixels)
    familiar = unfamiliar_answers(run, embeddings, pixels, appearance)
    known = known_cases(train, order[:, :KNOWN_CASE_K], distances[:, :KNOWN_CASE_K], appearance)
    t = run.thresholds
    out = []
    for i, (p, vote) in enumerate(zip(probs, votes)):
        out.append({"probability": float(shown["probability"][i]), "decision": LABEL_NAMES[int(shown["melanoma"][i])],
                    "threshold": float(shown["threshold"]), "score": float(p), "score_threshold": t.classifier,
                    "calibrated": shown["calibrated"], "prevalence": prevalence,
                    "prevalence_source": prevalence_source, "unfamiliar": familiar[i],
                    "trained_on_generated_images": run.generated,
                    "knn_probability": float(vote), "knn_decision": LABEL_NAMES[int(vote >= t.knn)],
                    "knn_threshold": t.knn, "similar": similar[i], "known_case": known[i]})
    return out


def known_cases(train: RetrievalIndex, order: np.ndarray, distances: np.ndarray, appearance: np.ndarray) -> list:
    """Per image, the training image it cannot be told apart from, or None: one of its nearest in the embedding
    (`order`, `distances`: RetrievalIndex.nearest's, KNOWN_CASE_K of them) whose distance is rounding
    (familiarity.ROUNDING), or whose appearance descriptor is the same (the same pixels, or a flipped or turned
    copy, whatever test-time augmentation or a GPU's arithmetic did to the embedding). Its answer and kNN vote
    then rest on a label the model was trained on."""
    from .familiarity import ROUNDING

    out = []
    for i, (row, dist) in enumerate(zip(order, distances)):
        same = [j for j, d in zip(row, dist) if d < ROUNDING or (train.appearance is not None and np.allclose(
            train.appearance[j], appearance[i], rtol=0, atol=1e-7))]
        if not same:
            out.append(None)
            continue
        image_id, label = str(train.ids[same[0]]), LABEL_NAMES[train.labels[same[0]]]
        out.append({"id": image_id, "label_name": label,
                    "note": f"indistinguishable from training image {image_id} ({label}): the model was trained on "
                            "this image or a copy, so its answer and kNN vote are not a test of the model"})
    return out


def similar_cases(run: LoadedRun, embeddings: np.ndarray, k: int) -> list[list[dict]]:
    """Per embedding, the k most similar training images: `id`, `label` (1 = melanoma), `label_name`,
    `distance` (1 - cosine similarity), closest first."""
    train = run.index.part("train")
    return _similar(train, *train.nearest(embeddings, k))


def _similar(train: RetrievalIndex, order: np.ndarray, distances: np.ndarray) -> list[list[dict]]:
    """similar_cases' rows from a search already made (RetrievalIndex.nearest's order and distances)."""
    return [[{"id": str(train.ids[j]), "label": int(train.labels[j]), "label_name": LABEL_NAMES[train.labels[j]],
              "distance": float(d)} for j, d in zip(row, dist)] for row, dist in zip(order, distances)]


def flat_row(path: Path, result: Optional[dict], reason: str = "", saliency: str = "",
             saliency_note: str = "") -> dict:
    """One CSV row of `predict`: the answer with its neighbours spread over numbered columns."""
    row = {"path": str(path), "status": "ok" if result else "failed", "reason": reason}
    if result:
        row.update({k: result[k] for k in ("probability", "decision", "threshold", "prevalence", "score",
                                           "score_threshold")})
        u = result["unfamiliar"]
        by = [name for name, flagged in (("embedding", u["embedding_flag"]), ("texture", u["appearance_flag"]))
              if flagged]
        row.update({"unfamiliar": u["flag"], "unfamiliar_by": "+".join(by), "unfamiliar_distance": u["distance"],
                    "unfamiliar_percentile": u["percentile"],
                    "unfamiliar_texture_percentile": u["appearance_percentile"]})
        row.update({k: result[k] for k in ("knn_probability", "knn_decision", "knn_threshold",
                                           "trained_on_generated_images")})
        known = result.get("known_case") or {}
        row.update({"known_case": known.get("id", ""), "known_case_note": known.get("note", "")})
        for n, s in enumerate(result["similar"], 1):
            row.update({f"neighbour_{n}_id": s["id"], f"neighbour_{n}_label": s["label"],
                        f"neighbour_{n}_distance": s["distance"]})
        if saliency:
            row["saliency"] = saliency
            row["saliency_note"] = saliency_note
    return row


def decoded_chunks(paths: Sequence[Path], batch_size: int, size: int, max_pixels: int,
                   checks: Optional[ImageChecks] = None, threads: int = 4) -> Iterator[tuple[int, list]]:
    """(start, [(pixels or None, reason)] per path) for each chunk of `paths`, in order. The next chunk is
    decoded in threads (PIL lets go of the GIL while decoding) while the caller scores this one, so the
    model does not wait for the files."""
    def work(path: Path) -> tuple[Optional[np.ndarray], str]:
        try:
            return read_image(path, size, max_pixels, checks), ""
        except ImageRejected as exc:
            return None, str(exc)

    starts = range(0, len(paths), batch_size)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        ahead = [pool.submit(work, p) for p in paths[:batch_size]]
        for start in starts:
            current = ahead
            ahead = [pool.submit(work, p) for p in paths[start + batch_size:start + 2 * batch_size]]
            yield start, [f.result() for f in current]


def predict_paths(predictor: Predictor, paths: Sequence[Path], neighbours: int = DEFAULT_NEIGHBOURS,
                  batch_size: int = 64, saliency_dir: Optional[Path] = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                  progress: bool = False) -> list[dict]:
    """One flat row per path, in order; unreadable files get status 'failed' and the reason.

    Three stages overlap: files decode in threads ahead of the model, the model scores a chunk, and the
    chunks before it are described in threads (numpy, mostly without the GIL: on a GPU describing an
    answer costs more than scoring it)."""
    from collections import deque

    from tqdm.auto import tqdm

    from .progress import bar_disable

    run = predictor.run
    rows: list[dict] = []
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=DESCRIBE_THREADS) as describing, \
            tqdm(total=len(paths), desc="Predicting", unit="image", disable=bar_disable(progress), leave=False) as bar:
        for start, decoded in decoded_chunks(paths, batch_size, run.config.data.image_size, max_pixels, run.checks):
            good = [i for i, (pixels, _) in enumerate(decoded) if pixels is not None]
            pixels = np.stack([decoded[i][0] for i in good]) if good else None
            answers = describing.submit(predictor.describe, pixels, predictor.scored(pixels), neighbours) \
                if good else None
            pending.append((start, decoded, good, pixels, answers))
            while len(pending) > DESCRIBE_THREADS or (pending and start + batch_size >= len(paths)):
                done = _chunk_rows(run, paths[pending[0][0]:pending[0][0] + batch_size], pending.popleft(),
                                   saliency_dir)
                rows += done
                bar.update(len(done))
    return rows


def _chunk_rows(run: LoadedRun, chunk: Sequence[Path], item: tuple, saliency_dir: Optional[Path]) -> list[dict]:
    """The rows of one chunk of predict_paths (`item`: its start, decoded images, which decoded, their pixels, its
    answers being described), with its saliency figures written."""
    start, decoded, good, pixels, answers = item
    results = dict(zip(good, answers.result())) if good else {}
    figures: dict[int, tuple[str, str]] = {}
    if good and saliency_dir is not None:
        figures = dict(zip(good, write_saliency(run, pixels, [chunk[i] for i in good], saliency_dir,
                                                start + np.array(good), [results[i] for i in good])))
    return [flat_row(path, results.get(i), decoded[i][1], *figures.get(i, ("", ""))) for i, path in enumerate(chunk)]


def write_saliency(run: LoadedRun, pixels: np.ndarray, paths: Sequence[Path], out_dir: Path,
                   numbers: np.ndarray, answers: Sequence[dict]) -> list[tuple[str, str]]:
    """A Grad-CAM figure per image in out_dir (image and overlay side by side, colour bar, a caption with the
    image's answer and the stage); per image its path and the one-line note on the map."""
    from .saliency import caption, figure, note, saliency_with_stage

    out_dir.mkdir(parents=True, exist_ok=True)
    found = saliency_with_stage(run, pixels)
    written = []
    for i, (path, number, answer) in enumerate(zip(paths, numbers, answers)):
        # The running number keeps two inputs called image.jpg in different folders apart.
        target = out_dir / f"{int(number):05d}_{path.stem}_gradcam.png"
        lines = caption(path.name, answer, found.stage, found.evidence[i])
        figure(pixels[i], found.overlays[i], lines, found.evidence[i], target)
        written.append((str(target), note(found.stage, found.evidence[i])))
    return written


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


def pair_report(predictor: Predictor, pixels: np.ndarray) -> dict:
    """Distance of two images and where it falls among validation same-class and other-class distances, with
    each image's answer (probability at the predictor's prevalence, decision, unfamiliar flag)."""
    emb, probs = predictor.score(pixels)
    # Clipped as in RetrievalIndex.nearest: rounding makes an image's distance to itself about -1e-7 ("-0.0000").
    distance = float(np.clip(1.0 - emb[0] @ emb[1], 0.0, 2.0))
    reference = {}
    for name, values in val_pair_distances(predictor.run.index).items():
        reference[name] = {"pairs": int(len(values)),
                           "share_closer": float((values <= distance).mean()) if len(values) else None,
                           "median": float(np.median(values)) if len(values) else None}
    shown = shown_probability(predictor.run, probs, predictor.prevalence)
    familiar = unfamiliar_answers(predictor.run, emb, pixels)
    images = [{"probability": float(p), "decision": LABEL_NAMES[int(m)], "score": float(s), "unfamiliar": u}
              for p, m, s, u in zip(shown["probability"], shown["melanoma"], probs, familiar)]
    return {"distance": distance, "cosine_similarity": 1.0 - distance, "images": images,
            "threshold": float(shown["threshold"]), "calibrated": shown["calibrated"],
            "prevalence": predictor.prevalence, "prevalence_source": predictor.prevalence_source,
            "trained_on_generated_images": predictor.run.generated, "validation": reference}