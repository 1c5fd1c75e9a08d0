"""Leak-free train/eval split: rows sharing any text land on the same side, chosen by a seeded stable hash."""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from dataclasses import dataclass

import pandas as pd

# The text columns that tie rows to one side; formats without sentence2 hold nulls there. A triplet's
# negative does not: it is a distractor, most often another row's positive (mined hard negatives), and
# linking rows through it chains a whole triplet file into one group, all train or all eval.
SPLIT_TEXT_COLUMNS: tuple[str, ...] = ("sentence1", "sentence2")
TRAIN = "train"
EVAL = "eval"
# A later row that would join a train group and an eval group: quarantined, so that neither side moves.
BRIDGE = "bridge"


def normalise_text(text: str) -> str:
    """The form texts are compared in: NFC (one code point sequence per accented letter), casefolded,
    whitespace runs collapsed to one space, trimmed."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


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


def split_texts(frame: pd.DataFrame) -> set[str]:
    """Every normalised text of ``frame`` that ties a row to its side of the split."""
    return {text for texts in _row_texts(frame) for text in texts}


def rows_holding(frame: pd.DataFrame, texts: set[str]) -> pd.Series:
    """True for each row of ``frame`` with a normalised split text in ``texts``."""
    return pd.Series(
        [any(text in texts for text in row) for row in _row_texts(frame)], index=frame.index, dtype=bool
    )


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


@dataclass
class _Group:
    """A group of rows sharing texts: its key, the arrival rank of its first row, and that row's batch."""

    key: str
    first_rank: int
    first_batch: object


def _arrival_batches(frame: pd.DataFrame) -> list[object]:
    """Each row's arrival time (its batch), or one batch for all when the frame carries none."""
    if "arrived_at" not in frame.columns:
        return [0] * len(frame)
    # UTC throughout, naive times read as UTC; a row without one counts as the latest to arrive.
    arrived = pd.to_datetime(frame["arrived_at"], utc=True)
    return arrived.fillna(pd.Timestamp.max.tz_localize("UTC")).tolist()


def assign_split(valid_pairs: pd.DataFrame, eval_fraction: float, seed: int) -> pd.DataFrame:
    """Return a copy with a ``split`` column; rows connected by a shared text stay together.

    Rows are grouped with union-find over their normalised texts, in arrival order. A group's key is the
    smallest text of its earliest-arrived row, so rows that join a group later do not move it; the group
    goes to eval when sha256(f"{seed}:{key}") mapped to [0, 1) is below ``eval_fraction``. A row that
    would join two groups of earlier batches that lie on different sides gets ``split`` BRIDGE instead:
    either side would move one of them, and put rows a champion trained on into the eval split.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    row_texts = _row_texts(valid_pairs)
    batches = _arrival_batches(valid_pairs)
    side_of_key: dict[str, str] = {}

    def side(key: str) -> str:
        if key not in side_of_key:
            side_of_key[key] = EVAL if _stable_unit(seed, key) < eval_fraction else TRAIN
        return side_of_key[key]

    parent: dict[str, str] = {}
    group_of_root: dict[str, _Group] = {}

    def find(text: str) -> str:
        root = text
        while parent[root] != root:
            root = parent[root]
        # Path compression keeps later finds near O(1) on long chains of shared texts.
        while parent[text] != root:
            parent[text], text = root, parent[text]
        return root

    bridges: set[int] = set()
    for rank, position in enumerate(_arrival_order(valid_pairs)):
        texts, batch = row_texts[position], batches[position]
        if not texts:
            continue
        roots = {find(text) for text in texts if text in parent}
        earlier = {side(group_of_root[root].key) for root in roots if group_of_root[root].first_batch < batch}
        if len(earlier) > 1:
            bridges.add(position)
            continue
        for text in texts:
            if text not in parent:
                parent[text] = text
                group_of_root[text] = _Group(min(texts), rank, batch)
        groups = {find(text) for text in texts}
        # The group whose first row arrived first keeps its key, and so its side.
        oldest = min(groups, key=lambda root: group_of_root[root].first_rank)
        for root in groups - {oldest}:
            parent[root] = oldest
            del group_of_root[root]

    sides = [
        BRIDGE if position in bridges else side(group_of_root[find(texts[0])].key) if texts else side("")
        for position, texts in enumerate(row_texts)
    ]
    result = valid_pairs.copy()
    result["split"] = pd.Series(sides, index=valid_pairs.index, dtype="str")
    return result


def bridge_sides(pairs_with_split: pd.DataFrame) -> dict[object, list[tuple[str, str]]]:
    """For each BRIDGE row (by index label), its normalised texts with the side other rows hold them on."""
    row_texts = _row_texts(pairs_with_split)
    side_of_text: dict[str, str] = {}
    for side, texts in zip(pairs_with_split["split"].tolist(), row_texts, strict=True):
        if side != BRIDGE:
            side_of_text.update(dict.fromkeys(texts, side))
    return {
        label: [(text, side_of_text[text]) for text in texts if text in side_of_text]
        for label, side, texts in zip(
            pairs_with_split.index, pairs_with_split["split"], row_texts, strict=True
        )
        if side == BRIDGE
    }


def linked_groups(row_keys: list[list[str]]) -> list[str]:
    """A group id per row (each row's keys non-empty): rows that share a key, directly or through other
    rows, get the same id."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for keys in row_keys:
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
    return [find(keys[0]) for keys in row_keys]


def largest_group_rows(pairs: pd.DataFrame) -> int:
    """How many rows the largest group of rows linked by shared texts holds (0 for no rows)."""
    sizes = Counter(linked_groups([texts for texts in _row_texts(pairs) if texts]))
    return max(sizes.values(), default=0)


def leaking_texts(pairs_with_split: pd.DataFrame) -> list[str]:
    """Normalised texts found in both train and eval rows, sorted; empty when the split is clean."""
    row_texts = _row_texts(pairs_with_split)
    seen: dict[str, set[str]] = {TRAIN: set(), EVAL: set()}
    for side, texts in zip(pairs_with_split["split"].tolist(), row_texts, strict=True):
        if side in seen:
            seen[side].update(texts)
    return sorted(seen[TRAIN] & seen[EVAL])
