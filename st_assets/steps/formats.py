"""The pair formats users bring, recognised by their columns, and the one table shape they share.

Every input row becomes one row of ``labelled_pairs`` with these columns:

| column       | scored    | binary    | triplet  | anchor_positive | labelled_texts | unlabelled_texts |
|--------------|-----------|-----------|----------|-----------------|----------------|------------------|
| sentence1    | sentence1 | sentence1 | anchor   | anchor          | text           | text             |
| sentence2    | sentence2 | sentence2 | positive | positive        |                |                  |
| negative     |           |           | negative |                 |                |                  |
| score        | score     | label 0/1 |          |                 |                |                  |
| label        |           |           |          |                 | label          |                  |

plus ``source_file``, ``row_number`` (1-based data row in that file), ``row_hash`` and ``format``.
Any format may also carry a ``group`` column (a demographic or business segment, e.g. a locale or a
customer tier); it lands in ``group_name`` and the evaluation reports every metric per group.
"""

from __future__ import annotations

from enum import StrEnum


class PairFormat(StrEnum):
    """A training-data format; its value is what ``labelled_pairs.format`` holds."""

    SCORED = "scored"
    BINARY = "binary"
    TRIPLET = "triplet"
    ANCHOR_POSITIVE = "anchor_positive"
    LABELLED_TEXTS = "labelled_texts"
    UNLABELLED_TEXTS = "unlabelled_texts"


# Input columns that identify each format, most specific first.
INPUT_COLUMNS: dict[PairFormat, tuple[str, ...]] = {
    PairFormat.SCORED: ("sentence1", "sentence2", "score"),
    PairFormat.BINARY: ("sentence1", "sentence2", "label"),
    PairFormat.TRIPLET: ("anchor", "positive", "negative"),
    PairFormat.ANCHOR_POSITIVE: ("anchor", "positive"),
    PairFormat.LABELLED_TEXTS: ("text", "label"),
    PairFormat.UNLABELLED_TEXTS: ("text",),
}

# The losses each format can train with, its default first (st_assets.steps.train builds them).
LOSS_NAMES: dict[PairFormat, tuple[str, ...]] = {
    PairFormat.SCORED: ("CosineSimilarityLoss", "CoSENTLoss", "AnglELoss"),
    PairFormat.BINARY: ("OnlineContrastiveLoss", "ContrastiveLoss"),
    PairFormat.TRIPLET: ("TripletLoss", "MultipleNegativesRankingLoss"),
    PairFormat.ANCHOR_POSITIVE: ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"),
    # ProxySoftmaxLoss is st_assets' own (st_assets.steps.proxy_loss); the others are sentence-transformers'.
    # On five Banking77 splits it gained 1.6 points of 1-NN accuracy where MNRL pairs gained 0.9 (BENCHMARKS.md).
    PairFormat.LABELLED_TEXTS: (
        "ProxySoftmaxLoss",
        "MultipleNegativesRankingLoss",
        "CachedMultipleNegativesRankingLoss",
    ),
    # SimCSE: each text is its own positive; dropout makes the two views differ.
    PairFormat.UNLABELLED_TEXTS: ("MultipleNegativesRankingLoss",),
}

# Input columns any format may carry besides its own; they never decide the format.
OPTIONAL_COLUMNS: tuple[str, ...] = ("group",)

# Columns of labelled_pairs that hold text, per format, in input order.
TEXT_COLUMNS: dict[PairFormat, tuple[str, ...]] = {
    PairFormat.SCORED: ("sentence1", "sentence2"),
    PairFormat.BINARY: ("sentence1", "sentence2"),
    PairFormat.TRIPLET: ("sentence1", "sentence2", "negative"),
    PairFormat.ANCHOR_POSITIVE: ("sentence1", "sentence2"),
    PairFormat.LABELLED_TEXTS: ("sentence1",),
    PairFormat.UNLABELLED_TEXTS: ("sentence1",),
}

# The columns that make a training row what it is: the data version hashes these alone, and rows equal in
# all of them are duplicates.
CONTENT_COLUMNS: tuple[str, ...] = ("format", "sentence1", "sentence2", "negative", "score", "label")
# Rows in content order, whatever file and line they came from: what is computed from them in order (a
# bootstrap resample, a sample of texts) does not change when the same rows arrive in other files.
CONTENT_ORDER = ", ".join([*CONTENT_COLUMNS, "source_file", "row_number"])

PAIR_COLUMNS: tuple[str, ...] = (
    "source_file",
    "row_number",
    "row_hash",
    "format",
    "sentence1",
    "sentence2",
    "negative",
    "score",
    "label",
    "group_name",
)


def detect_format(columns: list[str]) -> PairFormat | None:
    """Return the format whose identifying columns are exactly the given columns (order and case ignored),
    besides the optional ``group`` column."""
    normalised = {column.strip().lower() for column in columns} - set(OPTIONAL_COLUMNS)
    for pair_format, required in INPUT_COLUMNS.items():
        if normalised == set(required):
            return pair_format
    return None
