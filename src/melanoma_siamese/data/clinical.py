"""Clinical metadata in one vocabulary: age, sex, body site and Fitzpatrick skin type.

Every dataset names these differently (ISIC 2020 `anatom_site_general_challenge`, the ISIC Archive
`anatom_site_general`, HAM10000 `localization` with its own words). `clinical_columns` maps a
metadata table's own columns to `CLINICAL_COLUMNS`, so results by group and metadata features read
one vocabulary. A value it does not know becomes missing and is counted in a warning, never silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

CLINICAL_COLUMNS = ("age", "sex", "site", "skin_type")
SEXES = ("female", "male")
# ISIC's `anatom_site_general` groups, with the three torso ones merged: coarse enough that each group
# holds enough images for a result by group.
SITES = ("head/neck", "upper extremity", "lower extremity", "torso", "palms/soles", "oral/genital")
SKIN_TYPES = ("I", "II", "III", "IV", "V", "VI")

# The table's own column for each clinical column, first found wins (order: most specific first).
SOURCE_COLUMNS = {
    "age": ("age_approx", "age"),
    "sex": ("sex",),
    "site": ("anatom_site_general_challenge", "anatom_site_general", "anatom_site", "localization", "site"),
    "skin_type": ("fitzpatrick_skin_type", "skin_type"),
}

# Words that say "not recorded": missing, without a warning.
MISSING_WORDS = ("", "unknown", "nan", "none", "na", "n/a", "not recorded")

SITE_WORDS = {
    "head/neck": "head/neck", "head": "head/neck", "neck": "head/neck", "face": "head/neck",
    "scalp": "head/neck", "ear": "head/neck",
    "upper extremity": "upper extremity", "hand": "upper extremity",
    "lower extremity": "lower extremity", "foot": "lower extremity",
    "torso": "torso", "anterior torso": "torso", "posterior torso": "torso", "lateral torso": "torso",
    "trunk": "torso", "back": "torso", "abdomen": "torso", "chest": "torso",
    # HAM10000's `acral` is palm or sole; its `hand` and `foot` may be the back of either, so they go to
    # the extremity.
    "palms/soles": "palms/soles", "acral": "palms/soles",
    "oral/genital": "oral/genital", "genital": "oral/genital",
}
SEX_WORDS = {"female": "female", "f": "female", "male": "male", "m": "male"}
SKIN_TYPE_WORDS = {**{t.lower(): t for t in SKIN_TYPES}, **{str(i + 1): t for i, t in enumerate(SKIN_TYPES)}}
AGE_RANGE = (0.0, 120.0)


@dataclass(frozen=True)
class Clinical:
    """The four columns (index as the input table), the source column of each (None: absent), warnings, and
    the columns (of the four) that held a value not understood."""

    table: pd.DataFrame
    sources: dict[str, Optional[str]]
    warnings: list[str]
    not_understood: tuple[str, ...] = ()


def clinical_columns(table: pd.DataFrame, file: str) -> Clinical:
    """Map a metadata table's own columns to age (float years, NaN missing), sex, site and skin type
    ("" missing); unknown values become missing and are announced."""
    out = pd.DataFrame(index=table.index)
    sources: dict[str, Optional[str]] = {}
    warnings: list[str] = []
    not_understood: list[str] = []
    for column in CLINICAL_COLUMNS:
        source = next((c for c in SOURCE_COLUMNS[column] if c in table.columns), None)
        sources[column] = source
        if source is None:
            out[column] = np.nan if column == "age" else ""
            continue
        mapper = _age if column == "age" else _word_mapper(column)
        values, unknown = mapper(table[source])
        out[column] = values
        if len(unknown):
            warnings.append(_unknown_warning(file, source, column, unknown))
            not_understood.append(column)
    return Clinical(out, sources, warnings, tuple(not_understood))


def with_clinical(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with the four columns, empty where absent (a split.csv written before they existed)."""
    frame = frame.copy()
    for column in CLINICAL_COLUMNS:
        if column not in frame.columns:
            frame[column] = np.nan if column == "age" else ""
        elif column == "age":
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
        else:
            frame[column] = frame[column].fillna("").astype(str)
    return frame


def _text(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    text = str(value).strip().lower()
    # A numeric column read as float writes "2.0" for skin type 2.
    return text[:-2] if text.endswith(".0") else text


def _word_mapper(column: str):
    words = {"sex": SEX_WORDS, "site": SITE_WORDS, "skin_type": SKIN_TYPE_WORDS}[column]

    def mapper(values: pd.Series) -> tuple[pd.Series, pd.Series]:
        texts = values.map(_text)
        mapped = texts.map(lambda t: words.get(t, ""))
        unknown = texts[(mapped == "") & ~texts.isin(MISSING_WORDS)]
        return mapped, unknown

    return mapper


def _age(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    texts = values.map(_text)
    numbers = pd.to_numeric(texts.where(~texts.isin(MISSING_WORDS)), errors="coerce")
    bad = numbers.notna() & ((numbers < AGE_RANGE[0]) | (numbers > AGE_RANGE[1]))
    numbers = numbers.where(~bad)
    unknown = texts[(numbers.isna() & ~texts.isin(MISSING_WORDS))]
    return numbers.astype(float), unknown


def _unknown_warning(file: str, source: str, column: str, unknown: pd.Series) -> str:
    counts = unknown.value_counts()
    shown = ", ".join(f"'{value}' ({n})" for value, n in counts.head(8).items())
    more = f" and {len(counts) - 8} other value(s)" if len(counts) > 8 else ""
    return (f"{file}: column '{source}': {len(unknown)} row(s) have a value not understood as {column}, "
            f"treated as missing: {shown}{more}; expected {expected_values(column)}")


def expected_values(column: str) -> str:
    """What `column` understands, in words."""
    return {"age": f"a number of years from {AGE_RANGE[0]:.0f} to {AGE_RANGE[1]:.0f}",
            "sex": "female or male", "site": ", ".join(SITE_WORDS),
            "skin_type": "Fitzpatrick I-VI (or 1-6)"}[column]
