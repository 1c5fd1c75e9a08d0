"""Tests for st_assets.steps.split: leak-free, seeded, deterministic train/eval assignment."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pandas as pd
import pytest

from st_assets.steps.formats import PAIR_COLUMNS
from st_assets.steps.split import (
    BRIDGE,
    assign_split,
    bridge_sides,
    largest_group_rows,
    leaking_texts,
    normalise_text,
)


def pair(
    format: str,
    sentence1: str | None,
    sentence2: str | None = None,
    negative: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "source_file": "pairs.csv",
        "row_hash": "",
        "format": format,
        "sentence1": sentence1,
        "sentence2": sentence2,
        "negative": negative,
        "score": extra.get("score"),
        "label": extra.get("label"),
    }


def table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    for number, row in enumerate(rows, start=1):
        row["row_number"] = number
    frame = pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
    frame["score"] = frame["score"].astype("float64")
    return frame


def independent_pairs(count: int) -> pd.DataFrame:
    return table([pair("anchor_positive", f"question {i}", f"answer {i}") for i in range(count)])


def test_split_column_holds_train_or_eval_and_input_is_untouched() -> None:
    frame = independent_pairs(50)
    before = frame.copy()
    result = assign_split(frame, 0.3, seed=1)
    assert set(result["split"]) <= {"train", "eval"}
    assert list(result.columns) == [*PAIR_COLUMNS, "split"]
    pd.testing.assert_frame_equal(frame, before)
    pd.testing.assert_frame_equal(result.drop(columns="split"), frame)


def test_no_text_on_both_sides_of_split() -> None:
    # A chain a-b, b-c, c-d links every row into one group even though no two rows share both texts.
    rows = [pair("anchor_positive", f"chain {i}", f"chain {i + 1}") for i in range(20)]
    rows += [pair("triplet", f"q {i}", "chain 5", f"n {i}") for i in range(0, 200, 10)]
    rows += [pair("anchor_positive", f"solo {i}", f"other {i}") for i in range(200)]
    result = assign_split(table(rows), 0.5, seed=3)
    assert leaking_texts(result) == []
    assert result["split"].iloc[:40].nunique() == 1
    assert set(result["split"]) == {"train", "eval"}


def test_texts_are_compared_after_casefold_and_whitespace_collapse() -> None:
    rows = [pair("anchor_positive", f"Text  {i}", f"reply {i}") for i in range(40)]
    rows += [pair("anchor_positive", f"other {i}", f"TEXT {i} ") for i in range(40)]
    result = assign_split(table(rows), 0.5, seed=0)
    assert (result["split"].iloc[:40].to_numpy() == result["split"].iloc[40:].to_numpy()).all()
    assert leaking_texts(result) == []


def test_labelled_texts_with_same_text_stay_together() -> None:
    rows = [pair("labelled_texts", f"Book flight {i % 30}", label=f"l{i}") for i in range(90)]
    result = assign_split(table(rows), 0.5, seed=7)
    sides = result.groupby(result["sentence1"])["split"].nunique()
    assert (sides == 1).all()
    assert leaking_texts(result) == []


def test_split_is_deterministic() -> None:
    frame = independent_pairs(200)
    first = assign_split(frame, 0.2, seed=42)["split"].tolist()
    assert assign_split(frame, 0.2, seed=42)["split"].tolist() == first
    assert assign_split(frame.iloc[::-1], 0.2, seed=42)["split"].tolist() == first[::-1]


@pytest.mark.parametrize("seed", range(10))
def test_rows_joining_a_group_later_do_not_move_it(seed: int) -> None:
    # Twenty questions share one answer; a later file adds a question that sorts before every old text.
    old = table([pair("anchor_positive", f"question {i}", "the answer zeta") for i in range(20)])
    old["arrived_at"] = pd.Timestamp("2026-01-01", tz="UTC")
    later = table([pair("anchor_positive", "a brand new question", "the answer zeta")])
    later["source_file"] = "a_new_file.csv"
    later["arrived_at"] = pd.Timestamp("2026-02-01", tz="UTC")
    before = assign_split(old, 0.5, seed)["split"]
    after = assign_split(pd.concat([later, old], ignore_index=True), 0.5, seed)["split"]
    assert after.nunique() == 1
    assert after.iloc[0] == before.iloc[0]


def _two_groups_on_different_sides(seed: int) -> pd.DataFrame:
    """Two old groups of two rows each, one in train and one in eval under ``seed`` at fraction 0.5."""
    for i in range(100):
        old = table(
            [
                pair("scored", f"alpha {i}", "alpha answer", score=0.5),
                pair("scored", f"beta {i}", "beta answer", score=0.5),
            ]
        )
        old["arrived_at"] = pd.Timestamp("2026-01-01", tz="UTC")
        if assign_split(old, 0.5, seed)["split"].nunique() == 2:
            return old
    raise AssertionError("no pair of groups on different sides")


@pytest.mark.parametrize("seed", range(5))
def test_a_later_row_joining_a_train_group_and_an_eval_group_moves_neither(seed: int) -> None:
    old = _two_groups_on_different_sides(seed)
    before = assign_split(old, 0.5, seed)["split"].tolist()
    bridge = table([pair("scored", "alpha answer", "beta answer", score=0.9)])
    bridge["arrived_at"] = pd.Timestamp("2026-02-01", tz="UTC")
    after = assign_split(pd.concat([old, bridge], ignore_index=True), 0.5, seed)
    assert after["split"].tolist() == [*before, BRIDGE]
    assert sorted(bridge_sides(after)[2]) == sorted([("alpha answer", before[0]), ("beta answer", before[1])])
    # In one batch the same rows form one group, on one side: nothing has a side to keep yet.
    together = pd.concat([old, bridge], ignore_index=True).assign(arrived_at=old["arrived_at"].iloc[0])
    assert assign_split(together, 0.5, seed)["split"].nunique() == 1


def test_naive_and_missing_arrival_times_split_like_utc_ones() -> None:
    rows = table([pair("labelled_texts", "same text", label="a") for _ in range(3)])
    rows["arrived_at"] = pd.to_datetime(["2024-01-01", None, "2024-01-02"])
    assert assign_split(rows, 0.5, 0)["split"].nunique() == 1


def test_split_is_identical_in_another_process() -> None:
    code = (
        "import pandas as pd\n"
        "from st_assets.steps.split import assign_split\n"
        "frame = pd.DataFrame({'sentence1': [f'question {i}' for i in range(100)],"
        " 'sentence2': [f'answer {i}' for i in range(100)], 'negative': [None] * 100})\n"
        "print(''.join('e' if s == 'eval' else 't' for s in assign_split(frame, 0.3, seed=5)['split']))\n"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = assign_split(independent_pairs(100), 0.3, seed=5)["split"]
    assert other.stdout.strip() == "".join("e" if side == "eval" else "t" for side in here)


def test_seed_changes_the_split() -> None:
    frame = independent_pairs(200)
    assert (
        assign_split(frame, 0.3, seed=1)["split"].tolist()
        != assign_split(frame, 0.3, seed=2)["split"].tolist()
    )


def test_eval_fraction_roughly_respected() -> None:
    result = assign_split(independent_pairs(4000), 0.2, seed=11)
    assert abs((result["split"] == "eval").mean() - 0.2) < 0.03


@pytest.mark.parametrize(("fraction", "side"), [(0.0, "train"), (1.0, "eval")])
def test_extreme_fractions_put_everything_on_one_side(fraction: float, side: str) -> None:
    result = assign_split(independent_pairs(100), fraction, seed=0)
    assert set(result["split"]) == {side}


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_eval_fraction_outside_unit_interval_is_an_error(fraction: float) -> None:
    with pytest.raises(ValueError, match="eval_fraction"):
        assign_split(independent_pairs(3), fraction, seed=0)


def test_empty_input_gets_empty_split_column() -> None:
    result = assign_split(table([]), 0.2, seed=0)
    assert result.empty and "split" in result.columns
    assert leaking_texts(result) == []


def test_leaking_texts_reports_normalised_texts_on_both_sides() -> None:
    frame = table(
        [pair("anchor_positive", "Hello  World", "hi"), pair("anchor_positive", "bye", "hello world")]
    )
    frame["split"] = ["train", "eval"]
    assert leaking_texts(frame) == ["hello world"]


def test_normalise_text_casefolds_and_collapses_whitespace() -> None:
    assert normalise_text("  Straße \t und\nMEER ") == "strasse und meer"


def test_ten_thousand_linked_rows_split_without_a_leak() -> None:
    rows = [
        pair("triplet", f"anchor {i}", f"positive {i % 3000}", f"negative {i % 777}") for i in range(10_000)
    ]
    result = assign_split(table(rows), 0.1, seed=0)
    assert leaking_texts(result) == []
    assert set(result["split"]) <= {"train", "eval"}


def test_mined_triplets_whose_negatives_are_other_rows_positives_still_split() -> None:
    # Each anchor's negative is the next row's positive: linked through negatives, all 60 rows would be
    # one group, all train or all eval.
    rows = [pair("triplet", f"question {i}", f"answer {i}", f"answer {(i + 1) % 60}") for i in range(60)]
    for seed in range(6):
        result = assign_split(table(rows), 0.2, seed)
        assert 5 <= (result["split"] == "eval").sum() <= 20
        assert leaking_texts(result) == []
    assert largest_group_rows(table(rows)) == 1


def test_the_largest_group_counts_rows_linked_by_any_chain_of_texts() -> None:
    rows = [pair("anchor_positive", f"chain {i}", f"chain {i + 1}") for i in range(7)]
    rows += [pair("scored", "Chain 3", "elsewhere", score=0.5), pair("labelled_texts", "alone", label="x")]
    assert largest_group_rows(table(rows)) == 8
    assert largest_group_rows(table([])) == 0


def test_texts_in_composed_and_decomposed_unicode_are_one_text() -> None:
    composed = [pair("anchor_positive", f"caf\u00e9 {i}", f"reply {i}") for i in range(30)]
    decomposed = [pair("anchor_positive", f"other {i}", f"cafe\u0301 {i}") for i in range(30)]
    result = assign_split(table(composed + decomposed), 0.5, seed=0)
    assert (result["split"].iloc[:30].to_numpy() == result["split"].iloc[30:].to_numpy()).all()
    assert normalise_text("Cafe\u0301") == normalise_text("caf\u00e9")
