"""Normalising raw rows into labelled_pairs, and pairs derived from labelled texts."""

from __future__ import annotations

import json

import pandas as pd
import pydantic
import pytest

from st_assets.settings import Settings
from st_assets.steps.formats import PairFormat
from st_assets.steps.pairs import clean_text, labelled_texts_to_pairs, normalise_pairs


def _raw(records: list[dict], source_file: str = "f.csv") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source_file": source_file,
            "row_number": range(1, len(records) + 1),
            "row_hash": [str(i) for i in range(len(records))],
            "record": [json.dumps(record) for record in records],
            "parse_error": [None] * len(records),
        }
    )


def test_control_characters_are_stripped_and_blank_text_becomes_null() -> None:
    assert clean_text("  reset\x00 my\tpassword\x1b ") == "reset my password"
    assert clean_text(" \x07 ") is None
    assert clean_text(" \u200b\u2060 ") is None  # zero-width space and word joiner: nothing visible
    assert clean_text("\u200b \ufeff") is None
    # Typed on macOS, an accent may arrive as its own code point: stored and embedded as one text.
    assert clean_text("Cafe\u0301 card") == "Caf\u00e9 card"
    assert clean_text("\U0001f469\u200d\U0001f4bb") == "\U0001f469\u200d\U0001f4bb"  # a joined emoji stays
    assert clean_text("=SUM(A1:A3); DROP TABLE x") == "=SUM(A1:A3); DROP TABLE x"


def test_whitespace_control_characters_become_spaces_between_words() -> None:
    # A vertical tab is a soft line break in slide text; form feed, next line and \x1c-\x1f separate too.
    for separator in ("\x0b", "\x0c", "\x85", "\x1c", "\x1f"):
        assert clean_text(f"first line{separator}second line") == "first line second line"


def test_binary_labels_written_as_true_false_are_read_and_numeric_labels_agree_across_file_types() -> None:
    records = [
        {"sentence1": "a", "sentence2": "b", "label": "True"},
        {"sentence1": "c", "sentence2": "d", "label": "false"},
    ]
    binary = normalise_pairs(_raw(records), {"f.csv": PairFormat.BINARY})
    assert binary["score"].tolist() == [1.0, 0.0] and binary["parse_error"].isna().all()
    scored = normalise_pairs(
        _raw([{"sentence1": "a", "sentence2": "b", "score": "true"}]), {"f.csv": PairFormat.SCORED}
    )
    assert scored["parse_error"][0] == "score 'true' is not a number"
    word = normalise_pairs(
        _raw([{"sentence1": "a", "sentence2": "b", "label": "yes"}]), {"f.csv": PairFormat.BINARY}
    )
    assert word["parse_error"][0] == "label 'yes' is not a number"
    labels = normalise_pairs(
        _raw([{"text": "a", "label": 3.0}, {"text": "b", "label": "3"}]), {"f.csv": PairFormat.LABELLED_TEXTS}
    )
    assert labels["label"].tolist() == ["3", "3"]


def test_scores_are_divided_by_the_configured_scale_but_binary_labels_are_not() -> None:
    scored = normalise_pairs(
        _raw([{"sentence1": "a", "sentence2": "b", "score": "4"}]),
        {"f.csv": PairFormat.SCORED},
        score_scale=5,
    )
    binary = normalise_pairs(
        _raw([{"sentence1": "a", "sentence2": "b", "label": "1"}]),
        {"f.csv": PairFormat.BINARY},
        score_scale=5,
    )
    assert scored["score"][0] == 0.8
    assert binary["score"][0] == 1.0


def test_files_on_different_scales_each_get_their_own() -> None:
    # The bundled helpdesk pairs score 0-1; STS-style files score 0-5.
    settings = Settings(score_scales={"stsb*.csv": 5})
    raw = pd.concat(
        [
            _raw([{"sentence1": "a", "sentence2": "b", "score": "0.8"}], source_file="helpdesk_pairs.csv"),
            _raw([{"sentence1": "c", "sentence2": "d", "score": "4"}], source_file="stsb_train.csv"),
        ]
    )
    files = ["helpdesk_pairs.csv", "stsb_train.csv"]
    pairs = normalise_pairs(
        raw,
        dict.fromkeys(files, PairFormat.SCORED),
        file_scales={name: settings.score_scale_for(name) for name in files},
    )
    assert pairs["score"].tolist() == [0.8, 0.8]
    with pytest.raises(pydantic.ValidationError, match="greater than 0"):
        Settings(score_scales={"*.csv": 0})


def test_a_score_that_is_not_a_number_is_a_parse_error() -> None:
    pairs = normalise_pairs(
        _raw([{"sentence1": "a", "sentence2": "b", "score": "high"}]), {"f.csv": PairFormat.SCORED}
    )
    assert "not a number" in pairs["parse_error"][0]


def test_a_score_written_as_nan_is_named_while_a_missing_one_is_empty() -> None:
    pairs = normalise_pairs(
        _raw(
            [
                {"sentence1": "a", "sentence2": "b", "score": "NaN"},
                {"sentence1": "c", "sentence2": "d", "score": float("nan")},  # pandas' missing value
            ]
        ),
        {"f.csv": PairFormat.SCORED},
    )
    assert pairs["parse_error"][0] == "score 'NaN' is not a number"
    assert pd.isna(pairs["parse_error"][1]) and pd.isna(pairs["score"][1])


def test_triplet_columns_land_in_sentence1_sentence2_negative() -> None:
    pairs = normalise_pairs(
        _raw([{"anchor": "a", "positive": "p", "negative": "n"}]), {"f.csv": PairFormat.TRIPLET}
    )
    row = pairs.iloc[0]
    assert (row["sentence1"], row["sentence2"], row["negative"], row["format"]) == ("a", "p", "n", "triplet")


def test_labelled_text_pairs_share_a_label_never_pair_a_text_with_itself_and_are_seeded() -> None:
    texts = pd.DataFrame({"sentence1": [f"t{i}" for i in range(9)], "label": list("aaabbbbcz")})
    pairs = labelled_texts_to_pairs(texts, seed=3)
    label_of = dict(zip(texts["sentence1"], texts["label"], strict=True))
    assert len(pairs) == 7  # 'c' and 'z' have one text each
    assert all(label_of[a] == label_of[p] for a, p in zip(pairs["anchor"], pairs["positive"], strict=True))
    assert (pairs["anchor"] != pairs["positive"]).all()
    assert pairs.equals(labelled_texts_to_pairs(texts, seed=3))


def test_json_arrays_objects_and_booleans_are_not_read_as_text() -> None:
    pairs = normalise_pairs(
        _raw([{"anchor": ["a", "b"], "positive": {"x": 1}}, {"anchor": True, "positive": "fine"}]),
        {"f.csv": PairFormat.ANCHOR_POSITIVE},
    )
    assert pairs["parse_error"][0] == "anchor is a JSON list, not text; positive is a JSON dict, not text"
    assert pairs["parse_error"][1] == "anchor is a JSON bool, not text"


def test_the_group_column_lands_in_group_name_cleaned_and_only_as_text() -> None:
    frame = normalise_pairs(
        _raw(
            [
                {"text": "card lost", "label": "card", "group": "  en-GB "},
                {"text": "pin blocked", "label": "pin"},
                {"text": "card gone", "label": "card", "group": ["a", "b"]},
            ]
        ),
        {"f.csv": PairFormat.LABELLED_TEXTS},
    )
    assert frame["group_name"].iloc[0] == "en-GB" and pd.isna(frame["group_name"].iloc[1])
    assert frame["parse_error"].iloc[:2].isna().all()
    assert frame["parse_error"].iloc[2] == "group is a JSON list, not text"
