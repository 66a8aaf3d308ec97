"""`predict` with a patient's context: CSV inputs that carry a patient column (and, if the run reads them, age,
sex and site) are scored a patient at a time, so each image's patient features (features.patient_features)
come from that patient's other images in the same call. Each row then says how much the image stands out.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .features import patient_features
from .inference import Predictor, context_probability, decoded_chunks, describe, flat_row

PATIENT_COLUMNS = ("patient_id", "patient")


def read_context(items: Sequence[Path]) -> Optional[pd.DataFrame]:
    """Per listed path (index: the path as `expand_inputs` resolves it): patient_id, age, sex, site, from the
    CSV inputs that have a patient column; None when none has."""
    from .data.clinical import clinical_columns

    frames = []
    for item in map(Path, items):
        if item.suffix.lower() != ".csv" or not item.is_file():
            continue
        table = pd.read_csv(item, dtype=str, keep_default_na=False)
        patient = next((c for c in PATIENT_COLUMNS if c in table.columns), None)
        if patient is None or table.empty:
            continue
        column = "path" if "path" in table.columns else table.columns[0]
        paths = [str(p if p.is_absolute() else item.parent / p) for p in map(Path, table[column])]
        found = clinical_columns(table, str(item))
        for warning in found.warnings:  # a value not understood is used as missing, never without a word
            print(f"warning: {warning}", file=sys.stderr)
        clinical = found.table
        frames.append(pd.DataFrame({"patient_id": table[patient].to_numpy(), **{c: clinical[c].to_numpy()
                                    for c in ("age", "sex", "site")}}, index=paths))
    return pd.concat(frames) if frames else None


def _group_order(paths: Sequence[Path], context: pd.DataFrame) -> list[list[int]]:
    """Indices of `paths` by patient (a path with no patient in the context is its own group), in input order."""
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        patient = context["patient_id"].get(str(path), "") if str(path) in context.index else ""
        groups.setdefault(f"p:{patient}" if patient else f"i:{i}", []).append(i)
    return list(groups.values())


def predict_with_context(predictor: Predictor, paths: Sequence[Path], context: pd.DataFrame, neighbours: int,
                         max_pixels: int) -> list[dict]:
    """One flat row per path, in input order, as inference.predict_paths, plus patient_id, the patient's
    image count, the distance to the patient's other images and the rank by it (1 = stands out most)."""
    run = predictor.run
    context = context[~context.index.duplicated(keep="last")]
    rows: list[Optional[dict]] = [None] * len(paths)
    for members in _group_order(paths, context):
        chunk = [paths[i] for i in members]
        _, decoded = next(decoded_chunks(chunk, len(chunk), run.config.data.image_size, max_pixels, run.checks))
        good = [k for k, (pixels, _) in enumerate(decoded) if pixels is not None]
        results: dict[int, dict] = {}
        if good:
            pixels = np.stack([decoded[k][0] for k in good])
            table = context.reindex([str(chunk[k]) for k in good]).reset_index(drop=True)
            results = dict(zip(good, score_patient(predictor, pixels, table, neighbours)))
        for k, i in enumerate(members):
            row = flat_row(paths[i], results.get(k), decoded[k][1])
            rows[i] = {**row, **results[k]["patient"]} if k in results else row
    return rows


def score_patient(predictor: Predictor, pixels: np.ndarray, table: pd.DataFrame, neighbours: int) -> list[dict]:
    """Answers for one patient's images scored together (`table`: a row per image, patient_id and the clinical
    columns it has), each with "patient": its image count, distance to its other images and rank (1 = stands
    out most)."""
    run = predictor.run
    table = table.reset_index(drop=True).copy()
    table["patient_id"] = table["patient_id"].fillna("").astype(str).replace("", "?") if "patient_id" in table \
        else "?"
    emb, _ = predictor.score(pixels)
    scored = (emb, context_probability(run, emb, table))
    answers = describe(run, pixels, scored, neighbours, predictor.prevalence, predictor.prevalence_source)
    standing = patient_features(emb, table["patient_id"].to_numpy())
    return [{**answer, "patient": _standing(table["patient_id"][0], len(pixels), distance, rank, alone)}
            for answer, (distance, rank, _, alone) in zip(answers, standing)]


def _standing(patient: str, count: int, distance: float, rank: float, alone: float) -> dict:
    if alone:
        return {"patient_id": patient, "patient_images": count, "patient_distance": None, "patient_rank": None}
    return {"patient_id": patient, "patient_images": count, "patient_distance": float(distance),
            "patient_rank": int(round(rank * (count - 1))) + 1}
