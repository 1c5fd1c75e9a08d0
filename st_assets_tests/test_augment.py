"""Tests for st_assets.steps.augment: the counterfactual term map, its swapping rules and CDA on training rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from st_assets.steps.augment import (
    BUNDLED_TERM_MAP,
    DEFAULT_GROUPS,
    TermMap,
    counterfactual_augment,
    load_swapped_groups,
    load_term_map,
    swap_terms,
    user_term_map_file,
)
from st_assets.steps.formats import PAIR_COLUMNS


@pytest.fixture(scope="module")
def term_map() -> TermMap:
    return load_term_map()


def swap(text: str, term_map: TermMap, groups: tuple[str, ...] | None = DEFAULT_GROUPS) -> str:
    return swap_terms(text, term_map, groups)[0]


# ---------------------------------------------------------------------------------------------------------
# Swapping rules


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # whole words only
        ("History is his", "History is hers"),
        ("the shepherd", "the shepherd"),
        ("Sheila met Hermann in the theme park.", "Sheila met Hermann in the theme park."),
        ("Mankind and manhood", "Mankind and manhood"),
        ("heir, hero, theme, sherry", "heir, hero, theme, sherry"),
        # case
        ("HE said", "SHE said"),
        ("He said she was a man.", "She said he was a woman."),
        ("HIS CAR", "HER CAR"),
        # her/his rule
        ("She told her brother", "He told his sister"),
        ("Her car is red", "His car is red"),
        ("I gave it to her.", "I gave it to him."),
        ("He gave her a book.", "She gave him a book."),
        ("She told her that it worked.", "He told him that it worked."),
        ("That book is his.", "That book is hers."),
        ("His is bigger.", "Hers is bigger."),
        ("That book is hers, not his.", "That book is his, not hers."),
        ("her own car", "his own car"),
        ("her 3 kids", "his 3 kids"),
        ("let her go", "let him go"),
        ("on his back", "on her back"),
        ("his only card and his will", "her only card and her will"),
        ("his or her account", "her or his account"),
        ("her or his account", "his or her account"),
        ("at his/her core", "at her/his core"),
        ("(s)he will call, or s/he will", "(s)he will call, or s/he will"),
        ("his and her cards", "her and his cards"),
        ("his or hers.", "hers or his."),
        ("His and mine", "Hers and mine"),
        ("ask her and her husband to call", "ask him and his wife to call"),
        ("tell her or her lawyer", "tell him or his lawyer"),
        # possessives and contractions
        ("John's wife", "Amy's husband"),
        ("The men's room", "The women's room"),
        ("he's late and she'll wait", "she's late and he'll wait"),
        ("he\u2019s here", "she\u2019s here"),
        # titles and hyphens
        ("Mr. Smith", "Mrs. Smith"),
        ("Mrs. Smith and Mr Jones", "Mr. Smith and Mrs Jones"),
        ("father-in-law", "mother-in-law"),
        ("my great-grandfather", "my great-grandmother"),
        ("an all-male team", "an all-female team"),
        ("a man-made lake", "a man-made lake"),
        ("a king-size bed for the king", "a king-size bed for the queen"),
        ("He ate at Burger King with the king.", "She ate at Burger King with the queen."),
        ("The Muslim Brotherhood and his brother", "The Muslim Brotherhood and her sister"),
        # names are capitalised words only
        ("Bill paid the bill.", "Donna paid the bill."),
        ("BILL and Kate", "DONNA and Greg"),
        ("mike check", "mike check"),
        # nothing to swap, or not English
        ("No gendered words here.", "No gendered words here."),
        ("Éric et Hélène, Heß, Çağla", "Éric et Hélène, Heß, Çağla"),
        ("Ólafur sá hana", "Ólafur sá hana"),
        ("", ""),
    ],
)
def test_swap_rules_on_tricky_sentences(term_map: TermMap, text: str, expected: str) -> None:
    assert swap(text, term_map) == expected


def test_swap_reports_the_terms_swapped_as_written_in_the_map(term_map: TermMap) -> None:
    assert swap_terms("JOHN told her brother, Mr. Smith.", term_map, DEFAULT_GROUPS) == (
        "AMY told his sister, Mrs. Smith.",
        ["John", "her", "brother", "mr"],
    )
    assert swap_terms("nothing here", term_map) == ("nothing here", [])


def test_age_group_is_opt_in_and_fixes_the_article(term_map: TermMap) -> None:
    assert swap("a young man", term_map) == "a young woman"
    assert swap("a young man", term_map, ("age",)) == "an old man"
    assert swap("An older sister", term_map, ("age", "gender")) == "A younger brother"
    assert swap("AN OLD-FASHIONED man", term_map, ("age",)) == "AN OLD-FASHIONED man"
    # "A" alone could be title case or capitals; the word after it says which.
    assert swap("A YOUNG MAN", term_map, ("age", "gender")) == "AN OLD WOMAN"
    assert swap("AN OLD MAN", term_map, ("age",)) == "A YOUNG MAN"
    assert swap("A young man", term_map, ("age",)) == "An old man"


def test_swap_with_all_groups_by_default(term_map: TermMap) -> None:
    assert swap_terms("the youngest son", term_map)[0] == "the oldest daughter"


def test_unknown_group_is_an_error(term_map: TermMap) -> None:
    with pytest.raises(ValueError, match=r"unknown term group.*'race'"):
        swap_terms("he", term_map, ["race"])


def test_swapping_twice_round_trips_unambiguous_text(term_map: TermMap) -> None:
    text = "Paul and his sons met the Queen and Mr. Jones's niece-in-law."
    assert swap(swap(text, term_map), term_map) == text


# ---------------------------------------------------------------------------------------------------------
# The bundled map and user files


def test_bundled_map_has_the_documented_groups(term_map: TermMap) -> None:
    assert term_map.groups == ("gender", "gender_names", "age")
    assert ("his", "her") in term_map.pairs["gender"] and ("father", "mother") in term_map.pairs["gender"]
    assert len(term_map.pairs["gender_names"]) == 8
    assert "man-made" in term_map.keep


def test_bundled_names_are_those_of_the_gender_probe(term_map: TermMap) -> None:
    probe = json.loads((BUNDLED_TERM_MAP.parent / "gender_career_family.jsonl").read_text(encoding="utf-8"))
    male = {e.split()[-1].rstrip(".") for e in probe["targ1"]["examples"] if e.startswith("This is")}
    female = {e.split()[-1].rstrip(".") for e in probe["targ2"]["examples"] if e.startswith("This is")}
    pairs = term_map.pairs["gender_names"]
    assert {a for a, _ in pairs} == male and {b for _, b in pairs} == female


def write_json(path: Path, content: object) -> Path:
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def test_user_file_adds_groups_and_overrides_pairs(tmp_path: Path) -> None:
    user_file = write_json(
        tmp_path / "counterfactual_terms.json",
        {
            "_note": "ours",
            "groups": {"gender": [["lad", "lass"], ["Bill", "Mary"]], "titles": [["duke", "duchess"]]},
            "keep": ["Lad-Lit"],
        },
    )
    extended = load_term_map(user_file)
    assert extended.groups == ("gender", "gender_names", "age", "titles")
    assert swap("The lad met Bill and the duke.", extended, None) == "The lass met Mary and the duchess."
    # Bill's bundled partner lost its pair; the other names keep theirs.
    assert swap("Donna met John.", extended) == "Donna met Amy."
    assert swap("lad-lit", extended) == "lad-lit"
    # Terms saved decomposed (NFD) are compared in NFC, as texts are stored.
    decomposed = write_json(
        tmp_path / "nfd.json",
        {"groups": {"titles": [["fiance\u0301", "fiance\u0301e"]]}, "keep": ["fiance\u0301 visa"]},
    )
    assert swap("my fiancé", load_term_map(decomposed), ("titles",)) == "my fiancée"
    assert swap("my fiancé visa", load_term_map(decomposed), ("titles",)) == "my fiancé visa"
    # The bundled map is untouched.
    assert swap("The lad met Bill.", load_term_map()) == "The lad met Donna."


def test_user_file_is_found_in_the_home_only_when_present(tmp_path: Path) -> None:
    assert user_term_map_file(tmp_path) is None
    path = write_json(tmp_path / "counterfactual_terms.json", {"groups": {}})
    assert user_term_map_file(tmp_path) == path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"pairs": {}}), "unknown key.*'pairs'"),
        (json.dumps({"groups": [["he", "she"]]}), "'groups' must be an object"),
        (json.dumps({"groups": {"gender": "he/she"}}), "group 'gender' must be a list"),
        (
            json.dumps({"groups": {"gender": [["he", "she", "they"]]}}),
            "group 'gender' pair 0: expected a list",
        ),
        (json.dumps({"groups": {"g": [["ok", "fine"], ["he", 3]]}}), "group 'g' pair 1: expected a list"),
        (json.dumps({"groups": {"g": [["step father", "step mother"]]}}), "single words of letters"),
        (json.dumps({"groups": {"g": [["he", "HE"]]}}), "cannot swap with itself"),
        (json.dumps({"groups": {"g": [["Bill", "donna"]]}}), "mixes a capitalised name"),
        (json.dumps({"groups": {"g": [["lad", "lass"], ["lad", "girl"]]}}), "'lad' would swap to any of"),
        (json.dumps({"keep": "man-made"}), "'keep' must be a list"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_user_file_names_file_and_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "counterfactual_terms.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_term_map(path)
    assert str(path) in str(info.value)


def test_a_user_file_in_another_encoding_is_named_and_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "counterfactual_terms.json"
    path.write_bytes(
        json.dumps({"groups": {"g": [["garçon", "fille"]]}}, ensure_ascii=False).encode("cp1252")
    )
    with pytest.raises(ValueError, match="not UTF-8") as info:
        load_term_map(path)
    assert str(path) in str(info.value)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"groups": {"g": [["lad", "lass"]]}}).encode())
    assert swap("The lad left.", load_term_map(path), None) == "The lass left."


def test_missing_user_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read") as info:
        load_term_map(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# counterfactual_augment


def pairs_frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in PAIR_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    frame["split"] = "train"
    return frame


def scored_rows() -> pd.DataFrame:
    return pairs_frame(
        [
            {"sentence1": "A man is playing guitar.", "sentence2": "He plays a guitar.", "score": 0.8},
            {"sentence1": "A cat sleeps.", "sentence2": "The cat is asleep.", "score": 0.9},
            {"sentence1": "John met his wife.", "sentence2": "A dog barks.", "score": 0.0},
            {"sentence1": "A woman is playing guitar.", "sentence2": "She plays a guitar.", "score": 0.8},
        ]
    ).assign(
        source_file="pairs.csv",
        row_number=[1, 2, 3, 4],
        row_hash=["h1", "h2", "h3", "h4"],
        format="scored",
    )


def test_augment_adds_swapped_copies_with_same_score_and_lineage(term_map: TermMap) -> None:
    train = pairs_frame(
        [
            {"sentence1": "A man is playing guitar.", "sentence2": "He plays a guitar.", "score": 0.8},
            {"sentence1": "A cat sleeps.", "sentence2": "The cat is asleep.", "score": 0.9},
            {"sentence1": "John met his wife.", "sentence2": "A dog barks.", "score": 0.0},
        ]
    ).assign(source_file="pairs.csv", row_number=[1, 2, 3], row_hash=["h1", "h2", "h3"], format="scored")

    result = counterfactual_augment(train, term_map)

    assert result.added_rows == 2
    assert result.terms_swapped == {"John": 1, "he": 1, "his": 1, "man": 1, "wife": 1}
    pd.testing.assert_frame_equal(result.rows.iloc[:3], train)
    added = result.rows.iloc[3:].reset_index(drop=True)
    assert list(added["sentence1"]) == ["A woman is playing guitar.", "Amy met her husband."]
    assert list(added["sentence2"]) == ["She plays a guitar.", "A dog barks."]
    assert list(added["score"]) == [0.8, 0.0]
    assert list(added["row_hash"]) == ["h1:cda", "h3:cda"]
    assert list(added["row_number"]) == [1, 3]
    assert set(added["source_file"]) == {"pairs.csv"} and set(added["split"]) == {"train"}
    assert list(result.rows.columns) == list(train.columns)


def test_augment_skips_copies_that_already_exist(term_map: TermMap) -> None:
    train = scored_rows()
    result = counterfactual_augment(train, term_map)
    # Rows 1 and 4 are each other's counterfactual; only John's row adds a copy.
    assert result.added_rows == 1
    assert result.rows["sentence1"].iloc[-1] == "Amy met her husband."


def test_augment_swaps_every_text_column_of_a_triplet_consistently(term_map: TermMap) -> None:
    train = pairs_frame(
        [
            {
                "sentence1": "Where is my husband's card?",
                "sentence2": "My husband lost his card.",
                "negative": "How do I close the account?",
            }
        ]
    ).assign(source_file="t.csv", row_number=1, row_hash="t1", format="triplet")
    result = counterfactual_augment(train, term_map)
    copy = result.rows.iloc[1]
    assert (copy["sentence1"], copy["sentence2"], copy["negative"]) == (
        "Where is my wife's card?",
        "My wife lost her card.",
        "How do I close the account?",
    )
    assert pd.isna(copy["score"]) and copy["format"] == "triplet"


def test_augment_labelled_texts_keep_their_label(term_map: TermMap) -> None:
    train = pairs_frame(
        [
            {"sentence1": "Can my daughter open an account?", "label": "age_limit"},
            {"sentence1": "My card is lost.", "label": "lost_card"},
        ]
    ).assign(source_file="l.csv", row_number=[1, 2], row_hash=["l1", "l2"], format="labelled_texts")
    result = counterfactual_augment(train, term_map)
    assert result.added_rows == 1
    copy = result.rows.iloc[-1]
    assert (copy["sentence1"], copy["label"]) == ("Can my son open an account?", "age_limit")
    assert pd.isna(copy["sentence2"]) and pd.isna(copy["negative"])


def test_augment_with_nothing_to_swap_returns_the_rows_unchanged(term_map: TermMap) -> None:
    train = scored_rows().iloc[[1]].reset_index(drop=True)
    result = counterfactual_augment(train, term_map)
    assert result.added_rows == 0 and result.terms_swapped == {}
    pd.testing.assert_frame_equal(result.rows, train)


def test_augment_groups_choose_what_is_swapped(term_map: TermMap) -> None:
    train = pairs_frame([{"sentence1": "An old man waits.", "label": "x"}]).assign(
        source_file="a.csv", row_number=1, row_hash="a1", format="labelled_texts"
    )
    assert counterfactual_augment(train, term_map).rows["sentence1"].iloc[-1] == "An old woman waits."
    aged = counterfactual_augment(train, term_map, groups=("age",))
    assert aged.rows["sentence1"].iloc[-1] == "A young man waits."
    assert aged.terms_swapped == {"old": 1}


def test_augment_is_deterministic(term_map: TermMap) -> None:
    train = scored_rows()
    first = counterfactual_augment(train, term_map)
    again = counterfactual_augment(train, term_map)
    pd.testing.assert_frame_equal(first.rows, again.rows)
    assert first.terms_swapped == again.terms_swapped


def test_the_groups_of_a_users_term_map_must_be_chosen_to_be_swapped(tmp_path: Path) -> None:
    (tmp_path / "counterfactual_terms.json").write_text(
        json.dumps({"groups": {"my_terms": [["he", "she"], ["Jamie", "Jessie"]]}}), encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"\['my_terms'\] are not in counterfactual_groups") as info:
        load_swapped_groups(tmp_path, ["gender", "gender_names"])
    assert "counterfactual_terms.json" in str(info.value)
    with pytest.raises(ValueError, match="unknown term group"):
        load_swapped_groups(tmp_path, ["gender", "my_terms", "genders"])
    groups = ["gender", "gender_names", "my_terms"]
    term_map = load_swapped_groups(tmp_path, groups)
    rows = pairs_frame([{"sentence1": "Jamie said he lost his card at church."}]).assign(
        source_file="u.csv", row_number=1, row_hash="u1", format="unlabelled_texts"
    )
    copy = counterfactual_augment(rows, term_map, groups).rows["sentence1"].iloc[-1]
    assert copy == "Jessie said she lost her card at church."
