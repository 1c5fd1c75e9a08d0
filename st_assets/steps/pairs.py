"""Normalise raw rows into the shared ``labelled_pairs`` shape, and derive training pairs from labelled texts."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping

import numpy as np
import pandas as pd

from st_assets.steps.formats import PAIR_COLUMNS, PairFormat

LABELLED_PAIR_COLUMNS = (*PAIR_COLUMNS, "parse_error", "arrived_at")

# C0/C1 control characters other than whitespace: invisible, they only break tokenisers and displays.
# The whitespace ones among them (vertical tab, form feed, \x1c-\x1f, next line) become spaces, so
# "line one<VT>line two" keeps its two words apart.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")
_WHITESPACE = re.compile(r"\s+")

# Where each format's input columns land in labelled_pairs; the optional group column in every format.
_COLUMN_MAP: dict[PairFormat, dict[str, str]] = {
    pair_format: {**columns, "group": "group_name"}
    for pair_format, columns in {
        PairFormat.SCORED: {"sentence1": "sentence1", "sentence2": "sentence2", "score": "score"},
        PairFormat.BINARY: {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"},
        PairFormat.TRIPLET: {"anchor": "sentence1", "positive": "sentence2", "negative": "negative"},
        PairFormat.ANCHOR_POSITIVE: {"anchor": "sentence1", "positive": "sentence2"},
        PairFormat.LABELLED_TEXTS: {"text": "sentence1", "label": "label"},
        PairFormat.UNLABELLED_TEXTS: {"text": "sentence1"},
    }.items()
}


def clean_text(value: object) -> str | None:
    """Text in NFC (one code point per accented letter, as most keyboards type it), with control characters
    removed and whitespace collapsed; None when nothing is left, or only invisible format characters
    (zero-width spaces and joiners) are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = _WHITESPACE.sub(" ", _CONTROL_CHARACTERS.sub("", unicodedata.normalize("NFC", str(value)))).strip()
    if all(character == " " or unicodedata.category(character) == "Cf" for character in text):
        return None
    return text


def _parse_score(
    value: object, score_scale: float, column: str, binary: bool
) -> tuple[float | None, str | None]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    if isinstance(value, bool):
        return float(value), None
    if binary and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        # What pandas writes for a boolean column in a CSV.
        return float(value.strip().lower() == "true"), None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, f"{column} {value!r} is not a number"
    if math.isnan(number):
        # A float NaN is how pandas and Parquet write a missing value; the text "NaN" is a value written.
        return (None, f"{column} {value!r} is not a number") if isinstance(value, str) else (None, None)
    return number / score_scale, None


def normalise_pairs(
    raw_rows: pd.DataFrame,
    formats: dict[str, PairFormat],
    score_scale: float = 1.0,
    file_scales: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """One ``labelled_pairs`` row per raw row; rows that cannot be read keep their ``parse_error``.

    ``formats`` maps each source file to its pair format. Scores are divided by the file's entry in
    ``file_scales``, else by ``score_scale``. Binary labels travel in ``score`` (0.0/1.0).
    """
    normalised = []
    for raw in raw_rows.itertuples(index=False):
        pair_format = formats[raw.source_file]
        row: dict[str, object] = dict.fromkeys(LABELLED_PAIR_COLUMNS)
        row.update(
            source_file=raw.source_file,
            row_number=raw.row_number,
            row_hash=raw.row_hash,
            format=pair_format.value,
            parse_error=raw.parse_error,
            arrived_at=getattr(raw, "arrived_at", None),
        )
        if raw.parse_error is None or pd.isna(raw.parse_error):
            errors = []
            record = json.loads(raw.record)
            for input_column, pair_column in _COLUMN_MAP[pair_format].items():
                value = record.get(input_column)
                if isinstance(value, list | dict) or (isinstance(value, bool) and pair_column != "score"):
                    # JSON arrays, objects and booleans are not text: reading them as their Python repr
                    # would train on "['a', 'b']".
                    errors.append(f"{input_column} is a JSON {type(value).__name__}, not text")
                elif pair_column == "score":
                    # Binary labels are never rescaled: 0/1 is the contract.
                    binary = pair_format is PairFormat.BINARY
                    scale = 1.0 if binary else (file_scales or {}).get(raw.source_file, score_scale)
                    row["score"], error = _parse_score(value, scale, input_column, binary)
                    errors += [error] if error else []
                else:
                    if isinstance(value, float) and value.is_integer():
                        value = int(value)  # 3.0 from JSON or Parquet reads as the 3 a CSV gives (labels)
                    row[pair_column] = clean_text(value)
            row["parse_error"] = "; ".join(errors) or None
        normalised.append(row)
    frame = pd.DataFrame(normalised, columns=list(LABELLED_PAIR_COLUMNS))
    frame["row_number"] = frame["row_number"].astype("int64")
    frame["score"] = frame["score"].astype("float64")
    return frame


def labelled_texts_to_pairs(
    texts: pd.DataFrame, seed: int, partners: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Anchor/positive pairs from labelled texts: each text paired with another text of its label.

    ``texts`` has ``sentence1`` and ``label``; labels with a single text give no pair. Seeded. With
    ``partners`` (a wider set of labelled texts, such as all training rows around a recent window), each
    text's positive is drawn from those of its label instead, so a new text with no recent partner still
    trains. Returns columns ``anchor``, ``positive``, ``label``.
    """
    rng = np.random.default_rng(seed)
    anchors, positives, labels = [], [], []
    pools = (
        {label: sorted(set(group["sentence1"])) for label, group in partners.groupby("label", sort=True)}
        if partners is not None
        else {}
    )
    for label, group in texts.groupby("label", sort=True):
        members = group["sentence1"].tolist()
        if partners is not None:
            pool = sorted(set(pools.get(label, [])) | set(members))
            if len(pool) < 2:
                continue
            place = {text: index for index, text in enumerate(pool)}
            for member in members:
                # A uniform pick among the pool's other texts: skip over the member's own place.
                pick = int(rng.integers(len(pool) - 1))
                pick += pick >= place[member]
                anchors.append(member)
                positives.append(pool[pick])
                labels.append(label)
            continue
        if len(members) < 2:
            continue
        # A random derangement: a cyclic shift of a shuffled order never pairs a text with itself.
        order = rng.permutation(len(members))
        for position, index in enumerate(order):
            anchors.append(members[index])
            positives.append(members[order[(position + 1) % len(order)]])
            labels.append(label)
    return pd.DataFrame({"anchor": anchors, "positive": positives, "label": labels})
