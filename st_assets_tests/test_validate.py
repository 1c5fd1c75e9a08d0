"""Tests for st_assets.steps.validate: GX suites per format, quarantine with reasons, duplicates."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest

from st_assets.steps.formats import PAIR_COLUMNS, PairFormat
from st_assets.steps.pairs import normalise_pairs
from st_assets.steps.validate import (
    QUARANTINE_COLUMNS,
    ValidationRules,
    check_validated_pairs,
    validate_pairs,
)

RULES = ValidationRules()


def pair(
    format: str,
    sentence1: str | None = None,
    sentence2: str | None = None,
    negative: str | None = None,
    score: float | None = None,
    label: str | None = None,
    source_file: str = "pairs.csv",
    row_number: int = 1,
) -> dict[str, Any]:
    return {
        "source_file": source_file,
        "row_number": row_number,
        "row_hash": f"{source_file}:{row_number}",
        "format": format,
        "sentence1": sentence1,
        "sentence2": sentence2,
        "negative": negative,
        "score": score,
        "label": label,
    }


def table(*rows: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=list(PAIR_COLUMNS))
    frame["score"] = frame["score"].astype("float64")
    return frame


def numbered(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Give rows consecutive row_numbers per source_file, as the normaliser would."""
    counters: dict[str, int] = {}
    for row in rows:
        counters[row["source_file"]] = counters.get(row["source_file"], 0) + 1
        row["row_number"] = counters[row["source_file"]]
        row["row_hash"] = f"{row['source_file']}:{row['row_number']}"
    return table(*rows)


def quarantined_row(outcome, source_file: str, row_number: int) -> dict[str, Any]:
    rows = outcome.quarantined_rows
    match = rows[(rows["source_file"] == source_file) & (rows["row_number"] == row_number)]
    assert len(match) == 1, rows
    return match.iloc[0].to_dict()


def test_clean_rows_of_every_format_are_all_valid() -> None:
    frame = numbered(
        [
            pair("scored", "a cat", "a feline", score=0.9),
            pair("binary", "a cat", "a dog", score=0.0),
            pair("binary", "a cat", "a kitten", score=1.0),
            pair("triplet", "a cat", "a kitten", "a car"),
            pair("anchor_positive", "a cat", "a kitten"),
            pair("labelled_texts", "book a flight", label="travel"),
            pair("unlabelled_texts", "book a flight please"),
        ]
    )
    outcome = validate_pairs(frame, RULES)
    assert outcome.quarantined_rows.empty
    assert outcome.rule_failures == {}
    pd.testing.assert_frame_equal(outcome.valid_pairs, frame)
    assert outcome.suite_results and all(summary.success for summary in outcome.suite_results)


def test_rows_failing_score_range_go_to_quarantine() -> None:
    frame = numbered(
        [
            pair("scored", "a", "b", score=0.5),
            pair("scored", "c", "d", score=1.7),
            pair("scored", "e", "f", score=-0.1),
            pair("scored", "g", "h", score=1.0),
        ]
    )
    outcome = validate_pairs(frame, RULES)
    assert outcome.valid_pairs["row_number"].tolist() == [1, 4]
    assert outcome.quarantined_rows["row_number"].tolist() == [2, 3]
    assert set(outcome.quarantined_rows["rule"]) == {"score_in_range"}
    row = quarantined_row(outcome, "pairs.csv", 2)
    assert row["value"] == "1.7"
    assert (
        row["reason"]
        == "score 1.7 outside [0, 1]: the score read, divided by the file's score_scale (rule score_in_range)"
    )
    assert outcome.rule_failures == {"score_in_range": 2}


def test_missing_score_is_quarantined() -> None:
    outcome = validate_pairs(table(pair("scored", "a", "b", score=None)), RULES)
    assert outcome.quarantined_rows["rule"].tolist() == ["score_not_null"]


@pytest.mark.parametrize("label", [2.0, 0.5, -1.0])
def test_binary_label_outside_0_1_is_quarantined(label: float) -> None:
    frame = numbered([pair("binary", "a", "b", score=1.0), pair("binary", "c", "d", score=label)])
    outcome = validate_pairs(frame, RULES)
    assert outcome.valid_pairs["row_number"].tolist() == [1]
    row = quarantined_row(outcome, "pairs.csv", 2)
    assert row["rule"] == "score_is_binary"
    assert "is not 0 or 1" in row["reason"]


def test_binary_label_shows_as_user_wrote_it() -> None:
    outcome = validate_pairs(table(pair("binary", "a", "b", score=2.0)), RULES)
    row = outcome.quarantined_rows.iloc[0]
    assert row["value"] == "2"
    assert row["reason"] == "label 2 is not 0 or 1 (rule score_is_binary)"


def test_anchor_equal_positive_is_quarantined() -> None:
    frame = numbered([pair("anchor_positive", "same", "same"), pair("anchor_positive", "one", "two")])
    outcome = validate_pairs(frame, RULES)
    assert outcome.valid_pairs["row_number"].tolist() == [2]
    row = quarantined_row(outcome, "pairs.csv", 1)
    assert row["rule"] == "texts_distinct"
    assert row["value"] == "same"
    assert row["reason"] == "anchor and positive are the same text (rule texts_distinct)"


def test_texts_that_differ_only_in_case_and_spacing_are_the_same_text() -> None:
    outcome = validate_pairs(table(pair("anchor_positive", "Reset my password", "reset my  password")), RULES)
    row = outcome.quarantined_rows.iloc[0]
    assert outcome.valid_pairs.empty and row["rule"] == "texts_distinct"
    assert row["reason"] == "anchor and positive are the same text (rule texts_distinct)"


@pytest.mark.parametrize(
    ("anchor", "positive", "negative"),
    [("a", "b", "a"), ("a", "b", "b"), ("a", "a", "a"), ("x", "y", "X"), ("cafe\u0301", "b", "Caf\u00e9 ")],
)
def test_triplet_with_repeated_text_is_quarantined(anchor: str, positive: str, negative: str) -> None:
    outcome = validate_pairs(table(pair("triplet", anchor, positive, negative)), RULES)
    assert outcome.valid_pairs.empty
    assert outcome.quarantined_rows["rule"].tolist() == ["texts_distinct"]


def test_missing_text_is_quarantined_with_empty_value() -> None:
    outcome = validate_pairs(table(pair("triplet", "a", "b", None)), RULES)
    row = outcome.quarantined_rows.iloc[0]
    assert row["rule"] == "negative_not_null"
    assert row["value"] == ""
    assert row["reason"] == "negative is empty (rule negative_not_null)"


def test_text_longer_than_max_chars_is_quarantined() -> None:
    rules = ValidationRules(min_chars=2, max_chars=5)
    frame = numbered([pair("anchor_positive", "ok", "fine"), pair("anchor_positive", "ok", "too long")])
    outcome = validate_pairs(frame, rules)
    assert outcome.valid_pairs["row_number"].tolist() == [1]
    row = quarantined_row(outcome, "pairs.csv", 2)
    assert row["rule"] == "sentence2_length"
    assert row["value"] == "too long"
    assert row["reason"] == "positive has 8 characters, outside [2, 5] (rule sentence2_length)"


def test_text_shorter_than_min_chars_is_quarantined() -> None:
    outcome = validate_pairs(table(pair("unlabelled_texts", "x")), ValidationRules(min_chars=2))
    assert outcome.quarantined_rows["rule"].tolist() == ["sentence1_length"]


@pytest.mark.parametrize(
    ("label", "rule"), [(None, "label_not_null"), ("", "label_not_blank"), ("  ", "label_not_blank")]
)
def test_labelled_text_without_label_is_quarantined(label: str | None, rule: str) -> None:
    outcome = validate_pairs(table(pair("labelled_texts", "book a flight", label=label)), RULES)
    assert outcome.quarantined_rows["rule"].tolist() == [rule]


def test_row_failing_several_rules_is_quarantined_once_with_all_rules() -> None:
    outcome = validate_pairs(table(pair("scored", None, "b", score=1.7)), RULES)
    assert len(outcome.quarantined_rows) == 1
    row = outcome.quarantined_rows.iloc[0]
    assert row["rule"] == "sentence1_not_null"
    assert row["value"] == ""
    assert row["reason"] == (
        "sentence1 is empty (rule sentence1_not_null); score 1.7 outside [0, 1]: the score read, divided by the file's score_scale (rule score_in_range)"
    )
    assert outcome.rule_failures == {"sentence1_not_null": 1, "score_in_range": 1}


def test_duplicate_rows_keep_first_and_quarantine_copies() -> None:
    frame = table(
        pair("scored", "a", "b", score=0.5, source_file="b.csv", row_number=1),
        pair("scored", "a", "b", score=0.5, source_file="a.csv", row_number=2),
        pair("scored", "a", "b", score=0.5, source_file="a.csv", row_number=7),
        pair("scored", "a", "b", score=0.6, source_file="a.csv", row_number=8),
    )
    outcome = validate_pairs(frame, RULES)
    kept = outcome.valid_pairs[["source_file", "row_number"]].values.tolist()
    assert kept == [["a.csv", 2], ["a.csv", 8]]
    quarantined = outcome.quarantined_rows
    assert quarantined[["source_file", "row_number"]].values.tolist() == [["a.csv", 7], ["b.csv", 1]]
    assert set(quarantined["rule"]) == {"duplicate_row"}
    assert (
        quarantined["reason"].tolist()
        == ["duplicate of a.csv row 2, its first copy (rule duplicate_row)"] * 2
    )
    assert outcome.rule_failures == {"duplicate_row": 2}


def test_a_newer_file_repeating_old_rows_loses_the_duplicates_whatever_its_name() -> None:
    frame = table(
        pair("scored", "a", "b", score=0.5, source_file="support.csv", row_number=1),
        pair("scored", "c", "d", score=0.5, source_file="support.csv", row_number=2),
        pair("scored", "a", "b", score=0.5, source_file="additions.csv", row_number=1),
    )
    frame["arrived_at"] = pd.to_datetime(["2026-01-01", "2026-01-01", "2026-02-01"], utc=True)
    outcome = validate_pairs(frame, RULES)
    assert outcome.quarantined_rows[["source_file", "row_number"]].values.tolist() == [["additions.csv", 1]]
    assert outcome.quarantined_rows["reason"].tolist() == [
        "duplicate of support.csv row 1, its first copy (rule duplicate_row)"
    ]


def test_a_text_given_another_label_later_is_quarantined_and_the_first_label_kept() -> None:
    frame = table(
        pair(
            "labelled_texts", "card not here", label="card_arrival", source_file="support.csv", row_number=1
        ),
        pair(
            "labelled_texts", "top up failed", label="top_up_failed", source_file="support.csv", row_number=2
        ),
        pair(
            "labelled_texts", "Card not  here", label="lost_card", source_file="additions.csv", row_number=1
        ),
        pair(
            "labelled_texts", "card not here", label="card_arrival", source_file="additions.csv", row_number=2
        ),
    )
    frame["arrived_at"] = pd.to_datetime(["2026-01-01", "2026-01-01", "2026-02-01", "2026-02-01"], utc=True)
    outcome = validate_pairs(frame, RULES)
    assert outcome.valid_pairs[["source_file", "row_number"]].values.tolist() == [
        ["support.csv", 1],
        ["support.csv", 2],
    ]
    conflict = quarantined_row(outcome, "additions.csv", 1)
    assert (conflict["rule"], conflict["value"]) == ("conflicting_label", "lost_card")
    assert conflict["reason"] == (
        "label 'lost_card', but support.csv row 1 labelled the same text 'card_arrival' first "
        "(rule conflicting_label)"
    )
    assert outcome.rule_failures == {"duplicate_row": 1, "conflicting_label": 1}
    assert all(summary.success for summary in check_validated_pairs(outcome.valid_pairs, RULES))
    assert not all(summary.success for summary in check_validated_pairs(frame.iloc[:3], RULES))


def test_same_texts_in_different_formats_are_not_duplicates() -> None:
    frame = numbered(
        [pair("anchor_positive", "a", "b"), pair("triplet", "a", "b", "c"), pair("anchor_positive", "a", "b")]
    )
    outcome = validate_pairs(frame, RULES)
    assert outcome.quarantined_rows["row_number"].tolist() == [3]


def test_duplicates_of_quarantined_rows_are_reported_by_their_own_rule() -> None:
    frame = numbered([pair("scored", "a", "b", score=1.7), pair("scored", "a", "b", score=1.7)])
    outcome = validate_pairs(frame, RULES)
    assert outcome.quarantined_rows["rule"].tolist() == ["score_in_range", "score_in_range"]


def test_rows_in_equal_valid_plus_quarantined_per_file() -> None:
    frame = numbered(
        [
            pair("scored", "a", "b", score=0.5, source_file="one.csv"),
            pair("scored", "a", "b", score=0.5, source_file="one.csv"),
            pair("scored", None, "b", score=3.0, source_file="one.csv"),
            pair("triplet", "x", "x", "y", source_file="two.jsonl"),
            pair("triplet", "x", "y", "z", source_file="two.jsonl"),
            pair("binary", "p", "q", score=0.5, source_file="three.csv"),
            pair("labelled_texts", "hello", label="greet", source_file="four.csv"),
            pair("nonsense", "hello", source_file="four.csv"),
        ]
    )
    outcome = validate_pairs(frame, RULES)
    assert len(outcome.valid_pairs) + len(outcome.quarantined_rows) == len(frame)
    for source_file, rows in frame.groupby("source_file"):
        valid = (outcome.valid_pairs["source_file"] == source_file).sum()
        quarantined = (outcome.quarantined_rows["source_file"] == source_file).sum()
        assert valid + quarantined == len(rows), source_file
    assert outcome.rule_failures["unknown_format"] == 1


def test_quarantined_rows_carry_raw_row_as_json_with_nulls() -> None:
    outcome = validate_pairs(table(pair("scored", "a", None, score=0.5)), RULES)
    row = outcome.quarantined_rows.iloc[0]
    assert list(outcome.quarantined_rows.columns) == list(QUARANTINE_COLUMNS)
    assert json.loads(row["raw_row"]) == {
        "sentence1": "a",
        "sentence2": None,
        "negative": None,
        "score": 0.5,
        "label": None,
    }


def test_valid_pairs_keep_input_columns_and_index() -> None:
    frame = numbered([pair("scored", "a", "b", score=0.5), pair("scored", "c", "d", score=9.0)])
    frame.index = pd.Index([10, 20])
    outcome = validate_pairs(frame, RULES)
    assert list(outcome.valid_pairs.columns) == list(PAIR_COLUMNS)
    assert outcome.valid_pairs.index.tolist() == [10]


def test_suite_results_summarise_each_expectation() -> None:
    frame = numbered([pair("scored", "a", "b", score=0.5), pair("scored", "c", "d", score=9.0)])
    outcome = validate_pairs(frame, RULES)
    by_rule = {summary.rule: summary for summary in outcome.suite_results}
    score = by_rule["score_in_range"]
    assert score.format == "scored"
    assert score.expectation_type == "expect_column_values_to_be_between"
    assert (score.success, score.unexpected_count, score.element_count) == (False, 1, 2)
    assert by_rule["sentence1_not_null"].success
    assert by_rule["duplicate_row"].success


def test_empty_input_returns_empty_outputs() -> None:
    outcome = validate_pairs(table(), RULES)
    assert outcome.valid_pairs.empty and list(outcome.valid_pairs.columns) == list(PAIR_COLUMNS)
    assert outcome.quarantined_rows.empty
    assert list(outcome.quarantined_rows.columns) == list(QUARANTINE_COLUMNS)
    assert outcome.rule_failures == {}
    assert outcome.suite_results == []


def test_missing_columns_are_an_error() -> None:
    with pytest.raises(ValueError, match="missing columns"):
        validate_pairs(table(pair("scored", "a", "b", score=0.5)).drop(columns=["negative"]), RULES)


def test_check_validated_pairs_succeeds_on_valid_rows() -> None:
    frame = numbered(
        [
            pair("scored", "a", "b", score=0.5),
            pair("scored", "a", "b", score=0.5),
            pair("triplet", "a", "a", "b"),
            pair("binary", "a", "b", score=1.0),
        ]
    )
    valid = validate_pairs(frame, RULES).valid_pairs
    summaries = check_validated_pairs(valid, RULES)
    assert summaries and all(summary.success for summary in summaries)


def test_check_validated_pairs_flags_rows_that_should_not_be_there() -> None:
    frame = numbered([pair("scored", "a", "b", score=0.5), pair("scored", "a", "b", score=0.5)])
    failing = {summary.rule for summary in check_validated_pairs(frame, RULES) if not summary.success}
    assert failing == {"duplicate_row"}


def _word_count(text: str) -> int:
    return len(text.split())


def test_texts_with_more_tokens_than_max_tokens_are_quarantined() -> None:
    rules = ValidationRules(max_tokens=3, count_tokens=_word_count)
    frame = numbered(
        [
            pair("anchor_positive", "one two", "three four five"),
            pair("anchor_positive", "one two", "a b c d e"),
            pair("triplet", "a cat", "a kitten", "a very fast red car"),
        ]
    )
    outcome = validate_pairs(frame, rules)
    assert outcome.valid_pairs["row_number"].tolist() == [1]
    row = quarantined_row(outcome, "pairs.csv", 2)
    assert row["rule"] == "sentence2_tokens"
    assert row["value"] == "a b c d e"
    assert row["reason"] == "positive has 5 tokens, more than the limit of 3 (rule sentence2_tokens)"
    assert quarantined_row(outcome, "pairs.csv", 3)["rule"] == "negative_tokens"
    assert outcome.rule_failures == {"sentence2_tokens": 1, "negative_tokens": 1}
    summary = next(
        s for s in outcome.suite_results if s.rule == "sentence2_tokens" and s.format == "anchor_positive"
    )
    assert summary.expectation_type == "expect_column_values_to_be_between"


def test_missing_text_fails_not_null_only_when_tokens_are_counted() -> None:
    rules = ValidationRules(max_tokens=3, count_tokens=_word_count)
    outcome = validate_pairs(table(pair("scored", None, "b", score=0.5)), rules)
    assert outcome.rule_failures == {"sentence1_not_null": 1}


def test_check_validated_pairs_applies_the_token_bound() -> None:
    rules = ValidationRules(max_tokens=3, count_tokens=_word_count)
    frame = numbered([pair("scored", "a b", "c d", score=0.5), pair("scored", "a b c d", "e", score=0.5)])
    assert all(s.success for s in check_validated_pairs(validate_pairs(frame, rules).valid_pairs, rules))
    failing = {s.rule for s in check_validated_pairs(frame, rules) if not s.success}
    assert failing == {"sentence1_tokens"}


def test_without_max_tokens_no_token_rule_runs() -> None:
    rules = ValidationRules(count_tokens=_word_count)
    outcome = validate_pairs(table(pair("scored", "a b c d e f g", "h", score=0.5)), rules)
    assert outcome.quarantined_rows.empty
    assert not any(s.rule.endswith("_tokens") for s in outcome.suite_results)


def test_max_tokens_without_a_counter_is_an_error() -> None:
    with pytest.raises(ValueError, match="needs count_tokens"):
        ValidationRules(max_tokens=128)


def test_text_made_only_of_control_characters_is_quarantined_as_empty() -> None:
    raw = pd.DataFrame(
        {
            "source_file": "control.jsonl",
            "row_number": [1, 2],
            "row_hash": ["h1", "h2"],
            "record": [
                json.dumps({"anchor": "\x07\x1b\x00\x7f\x9f", "positive": "a kitten"}),
                json.dumps({"anchor": "a\x07 cat\x1b", "positive": "a kitten"}),
            ],
            "parse_error": [None, None],
        }
    )
    labelled = normalise_pairs(raw, {"control.jsonl": PairFormat.ANCHOR_POSITIVE})
    assert pd.isna(labelled["sentence1"].iloc[0])
    outcome = validate_pairs(labelled.drop(columns=["parse_error", "arrived_at"]), RULES)
    row = quarantined_row(outcome, "control.jsonl", 1)
    assert row["rule"] == "sentence1_not_null"
    assert row["reason"] == "anchor is empty (rule sentence1_not_null)"
    assert outcome.valid_pairs["sentence1"].tolist() == ["a cat"]
