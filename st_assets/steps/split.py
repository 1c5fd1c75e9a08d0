"""Leak-free train/eval split: rows sharing any text land on the same side, chosen by a seeded stable hash."""

from __future__ import annotations

import hashlib

import pandas as pd

# Every text column of labelled_pairs; formats without one hold nulls there.
SPLIT_TEXT_COLUMNS: tuple[str, ...] = ("sentence1", "sentence2", "negative")
TRAIN = "train"
EVAL = "eval"


def normalise_text(text: str) -> str:
    """The form texts are compared in: casefolded, whitespace runs collapsed to one space, trimmed."""
    return " ".join(text.casefold().split())


def _row_texts(frame: pd.DataFrame) -> list[list[str]]:
    """Each row's distinct normalised texts, in column order, skipping missing cells."""
    columns = [column for column in SPLIT_TEXT_COLUMNS if column in frame.columns]
    texts: list[list[str]] = [[] for _ in range(len(frame))]
    for column in columns:
        for i, value in enumerate(frame[column].tolist()):
            if isinstance(value, str):
                normalised = normalise_text(value)
                if normalised not in texts[i]:
                    texts[i].append(normalised)
    return texts


def _stable_unit(seed: int, key: str) -> float:
    """Map (seed, key) to [0, 1) identically in every process, unlike the salted built-in hash()."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# The order rows arrived in, where the frame says: a group's key comes from its earliest row.
ARRIVAL_ORDER_COLUMNS: tuple[str, ...] = ("arrived_at", "source_file", "row_number")


def _arrival_order(frame: pd.DataFrame) -> list[int]:
    """Row positions, earliest arrival first (frame order where the frame carries no arrival columns)."""
    columns = [column for column in ARRIVAL_ORDER_COLUMNS if column in frame.columns]
    if not columns:
        return list(range(len(frame)))
    ordered = frame[columns].reset_index(drop=True).sort_values(columns, kind="stable", na_position="last")
    return ordered.index.tolist()


def assign_split(valid_pairs: pd.DataFrame, eval_fraction: float, seed: int) -> pd.DataFrame:
    """Return a copy with a ``split`` column of 'train'/'eval'; rows connected by a shared text stay together.

    Rows are grouped with union-find over their normalised texts. A group's key is the smallest text of
    its earliest-arrived row, so rows that join a group later do not move it; the group goes to eval
    when sha256(f"{seed}:{key}") mapped to [0, 1) is below ``eval_fraction``.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    row_texts = _row_texts(valid_pairs)

    parent: dict[str, str] = {}

    def find(text: str) -> str:
        root = text
        while parent[root] != root:
            root = parent[root]
        # Path compression keeps later finds near O(1) on long chains of shared texts.
        while parent[text] != root:
            parent[text], text = root, parent[text]
        return root

    for texts in row_texts:
        for text in texts:
            parent.setdefault(text, text)
        first = find(texts[0]) if texts else None
        for text in texts[1:]:
            root = find(text)
            if root != first:
                parent[root] = first

    key_of_root: dict[str, str] = {}
    for position in _arrival_order(valid_pairs):
        texts = row_texts[position]
        if texts:
            key_of_root.setdefault(find(texts[0]), min(texts))
    side_of_key: dict[str, str] = {}
    sides: list[str] = []
    for texts in row_texts:
        # A row without any text cannot leak; key "" keeps it deterministic.
        key = key_of_root[find(texts[0])] if texts else ""
        side = side_of_key.get(key)
        if side is None:
            side = EVAL if _stable_unit(seed, key) < eval_fraction else TRAIN
            side_of_key[key] = side
        sides.append(side)

    result = valid_pairs.copy()
    result["split"] = pd.Series(sides, index=valid_pairs.index, dtype="str")
    return result


def leaking_texts(pairs_with_split: pd.DataFrame) -> list[str]:
    """Normalised texts found in both train and eval rows, sorted; empty when the split is clean."""
    row_texts = _row_texts(pairs_with_split)
    seen: dict[str, set[str]] = {TRAIN: set(), EVAL: set()}
    for side, texts in zip(pairs_with_split["split"].tolist(), row_texts, strict=True):
        if side in seen:
            seen[side].update(texts)
    return sorted(seen[TRAIN] & seen[EVAL])
