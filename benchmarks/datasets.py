"""Benchmark data read from ../shared (never copied into the project): STS-B and Banking77."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from st_assets.steps.split import normalise_text

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_stsb(split: str) -> pd.DataFrame:
    """STS-B ``train`` or ``dev`` as sentence1, sentence2, score (0-5, as published)."""
    rows = []
    with (SHARED_DATA / "stsb" / f"sts-{split}.csv").open(encoding="utf-8") as handle:
        for fields in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            rows.append((fields[5], fields[6], float(fields[4])))
    return pd.DataFrame(rows, columns=["sentence1", "sentence2", "score"])


def banking77_split(test_fraction: float = 0.1, seed: int = 13) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Banking77 train texts (text, label) split into our own train and held-out test, stratified by intent."""
    texts = pd.read_csv(SHARED_DATA / "banking77" / "train.csv").rename(columns={"category": "label"})
    # Texts that differ only in case or spacing are one text to an uncased tokenizer: keep one of them, so
    # no held-out query has a twin among the training texts.
    texts = (
        texts.assign(key=texts["text"].map(normalise_text))
        .drop_duplicates("key")
        .drop(columns="key")
        .sample(frac=1.0, random_state=seed)
    )
    rank = texts.groupby("label").cumcount()
    size = texts.groupby("label")["text"].transform("size")
    test_mask = rank < (size * test_fraction).round()
    return texts[~test_mask].reset_index(drop=True), texts[test_mask].reset_index(drop=True)
