"""Tests for st_assets.steps.fairness: SEAT/WEAT association tests, bundled probes and gender swaps."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from st_assets.defs.evaluation import build_evaluation_assets
from st_assets.defs.resources import WarehouseResource
from st_assets.settings import Settings
from st_assets.steps.augment import load_term_map
from st_assets.steps.evaluate import primary_group_gaps
from st_assets.steps.fairness import (
    AssociationTest,
    Category,
    SeatFormatError,
    bundled_test_paths,
    counterfactual_invariance,
    load_association_tests,
    run_association_test,
    swap_gender_terms,
    user_test_paths,
)
from st_assets.store.registry import register_model
from st_assets.store.warehouse import Warehouse


def lookup_encoder(table: Mapping[str, tuple[float, ...]], calls: list[list[str]] | None = None):
    def encode(texts: list[str]) -> np.ndarray:
        if calls is not None:
            calls.append(list(texts))
        return np.array([table[t] for t in texts], dtype=float)

    return encode


def make_test(x: list[str], y: list[str], a: list[str], b: list[str], name: str = "t") -> AssociationTest:
    return AssociationTest(
        name,
        Category("X", tuple(x)),
        Category("Y", tuple(y)),
        Category("A", tuple(a)),
        Category("B", tuple(b)),
    )


def cos(u: tuple[float, ...], v: tuple[float, ...]) -> float:
    dot = sum(p * q for p, q in zip(u, v, strict=True))
    return dot / math.sqrt(sum(p * p for p in u) * sum(q * q for q in v))


def hand_s(w: tuple[float, ...], a: list[tuple[float, ...]], b: list[tuple[float, ...]]) -> float:
    return sum(cos(w, v) for v in a) / len(a) - sum(cos(w, v) for v in b) / len(b)


def hand_d(sx: list[float], sy: list[float]) -> float:
    both = sx + sy
    mean = sum(both) / len(both)
    std = math.sqrt(sum((v - mean) ** 2 for v in both) / (len(both) - 1))
    return (sum(sx) / len(sx) - sum(sy) / len(sy)) / std


# ---------------------------------------------------------------------------------------------------------
# run_association_test


def test_two_by_two_matches_hand_computation() -> None:
    table = {
        "x1": (1.0, 0.0),
        "x2": (1.0, 1.0),
        "y1": (0.0, 1.0),
        "y2": (3.0, 1.0),
        "a": (1.0, 0.0),
        "b": (0.0, 2.0),
    }
    calls: list[list[str]] = []
    result = run_association_test(
        make_test(["x1", "x2"], ["y1", "y2"], ["a"], ["b"], name="toy"), lookup_encoder(table, calls)
    )
    # s(x1)=1, s(x2)=0, s(y1)=-1, s(y2)=(3-1)/sqrt(10).
    s_y2 = 2 / math.sqrt(10)
    sx, sy = [1.0, 0.0], [-1.0, s_y2]
    assert result.effect_size == pytest.approx(hand_d(sx, sy), abs=1e-9)
    # Sums of s over each 2-subset taken as X_i: {x1,x2}=1 (observed), {x1,y1}=0, {x1,y2}=1+s_y2, {x2,y1}=-1,
    # {x2,y2}=s_y2, {y1,y2}=-1+s_y2. The statistic 2 * sum - s_y2 is as far from 0 as the observed 2 - s_y2
    # for {x1,x2}, {x1,y2}, {x2,y1} and {y1,y2}: four of six (two-sided).
    assert result.p_value == pytest.approx(4 / 6, abs=1e-9)
    assert (result.test, result.n_x, result.n_y, result.exact) == ("toy", 2, 2, True)
    assert len(calls) == 1 and sorted(calls[0]) == sorted(table)


def test_three_d_with_several_attributes_matches_hand_computation() -> None:
    table = {
        "x1": (1.0, 0.2, 0.0),
        "x2": (0.5, 0.5, 0.5),
        "x3": (0.1, 0.0, 2.0),
        "y1": (0.0, 1.0, 0.3),
        "y2": (0.2, 0.9, 0.1),
        "a1": (1.0, 0.0, 0.0),
        "a2": (1.0, 0.0, 1.0),
        "b1": (0.0, 1.0, 0.0),
        "b2": (0.0, 2.0, 2.0),
    }
    test = make_test(["x1", "x2", "x3"], ["y1", "y2"], ["a1", "a2"], ["b1", "b2"])
    result = run_association_test(test, lookup_encoder(table))

    a, b = [table["a1"], table["a2"]], [table["b1"], table["b2"]]
    s = {k: hand_s(table[k], a, b) for k in ("x1", "x2", "x3", "y1", "y2")}
    sx, sy = [s["x1"], s["x2"], s["x3"]], [s["y1"], s["y2"]]
    assert result.effect_size == pytest.approx(hand_d(sx, sy), abs=1e-9)

    # C(5, 3) = 10 partitions; statistic = sum s(X_i) - sum s(Y_i).
    names = list(s)
    observed = sum(sx) - sum(sy)
    stats = []
    for i in range(5):
        for j in range(i + 1, 5):
            for k in range(j + 1, 5):
                chosen = {names[i], names[j], names[k]}
                stats.append(sum(s[n] for n in chosen) - sum(s[n] for n in names if n not in chosen))
    expected_p = sum(abs(st) >= abs(observed) - 1e-12 for st in stats) / 10
    assert result.p_value == pytest.approx(expected_p, abs=1e-9)
    assert result.p_value * 10 == pytest.approx(round(result.p_value * 10), abs=1e-9)
    assert result.exact


def test_mirror_symmetric_case_has_zero_effect_and_p_one() -> None:
    # Reflecting across the diagonal swaps A and B; X and Y each hold one point on either side.
    table = {
        "x1": (0.9, 0.3),
        "x2": (0.3, 0.9),
        "y1": (1.8, 0.6),
        "y2": (1.5, 4.5),
        "a": (1.0, 0.0),
        "b": (0.0, 1.0),
    }
    result = run_association_test(make_test(["x1", "x2"], ["y1", "y2"], ["a"], ["b"]), lookup_encoder(table))
    assert result.effect_size == pytest.approx(0.0, abs=1e-9)
    # s = (c, -c, c, -c): subset sums 0, 2c, 0, 0, -2c, 0 -> all six are at least as far from 0 as the
    # observed 0.
    assert result.p_value == pytest.approx(1.0, abs=1e-9)


def test_swapping_the_targets_flips_the_effect_and_keeps_the_p_value() -> None:
    test, encode = _random_case()
    forward = run_association_test(test, encode, permutations=20_000)
    swapped = AssociationTest(test.name, test.targets_y, test.targets_x, test.attributes_a, test.attributes_b)
    backward = run_association_test(swapped, encode, permutations=20_000)
    assert forward.effect_size > 0.3
    assert backward.effect_size == pytest.approx(-forward.effect_size, abs=1e-9)
    # Two-sided: a strong association towards B is as significant as one towards A.
    assert backward.p_value == pytest.approx(forward.p_value, abs=1e-9) and forward.p_value < 0.2


def test_constant_scores_give_nan_effect_size() -> None:
    table = {"x": (1.0, 1.0), "y": (2.0, 2.0), "a": (1.0, 0.0), "b": (0.0, 1.0)}
    result = run_association_test(make_test(["x"], ["y"], ["a"], ["b"]), lookup_encoder(table))
    assert math.isnan(result.effect_size)
    assert result.p_value == pytest.approx(1.0)


def _random_case(n: int = 8, dim: int = 3) -> tuple[AssociationTest, Callable[[list[str]], np.ndarray]]:
    rng = np.random.default_rng(123)
    table: dict[str, tuple[float, ...]] = {}
    for i in range(n):
        table[f"x{i}"] = tuple(rng.normal(size=dim) + [0.4, 0.0, 0.0])
        table[f"y{i}"] = tuple(rng.normal(size=dim))
    for i in range(4):
        table[f"a{i}"] = tuple(rng.normal(size=dim) + [1.0, 0.0, 0.0])
        table[f"b{i}"] = tuple(rng.normal(size=dim) + [0.0, 1.0, 0.0])
    test = make_test(
        [f"x{i}" for i in range(n)],
        [f"y{i}" for i in range(n)],
        [f"a{i}" for i in range(4)],
        [f"b{i}" for i in range(4)],
    )
    return test, lookup_encoder(table)


def test_sampled_p_value_is_seeded_and_close_to_exact() -> None:
    test, encode = _random_case()
    exact = run_association_test(test, encode, permutations=20_000)
    assert exact.exact  # C(16, 8) = 12870
    assert 0.005 < exact.p_value < 0.995

    first = run_association_test(test, encode, permutations=5_000, seed=7)
    again = run_association_test(test, encode, permutations=5_000, seed=7)
    assert not first.exact
    assert first.p_value == again.p_value
    assert first.effect_size == exact.effect_size
    # Binomial standard error at 5000 draws is at most 0.007.
    assert first.p_value == pytest.approx(exact.p_value, abs=0.03)
    assert first.p_value * 5001 == pytest.approx(round(first.p_value * 5001), abs=1e-6)


def test_duplicate_texts_are_encoded_once() -> None:
    table = {"x": (1.0, 0.0), "y": (0.0, 1.0), "a": (1.0, 0.2), "b": (0.2, 1.0)}
    calls: list[list[str]] = []
    run_association_test(make_test(["x", "a"], ["y", "b"], ["a", "x"], ["b"]), lookup_encoder(table, calls))
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0])) == 4


def test_encode_with_wrong_shape_is_rejected() -> None:
    test = make_test(["x"], ["y"], ["a"], ["b"])
    with pytest.raises(ValueError, match="shape"):
        run_association_test(test, lambda texts: np.zeros((len(texts) - 1, 2)))


# ---------------------------------------------------------------------------------------------------------
# load_association_tests / bundled probes


def _record(**overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        key: {"category": key.upper(), "examples": [f"{key} one.", f"{key} two."]}
        for key in ("targ1", "targ2", "attr1", "attr2")
    }
    record.update(overrides)
    return record


def _write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_names_tests_by_stem_and_line(tmp_path: Path) -> None:
    single = _write(tmp_path / "single.jsonl", json.dumps(_record()))
    multi = _write(
        tmp_path / "multi.jsonl", json.dumps(_record()), "", json.dumps(_record()), json.dumps(_record())
    )
    tests = load_association_tests([single, multi])
    assert [t.name for t in tests] == ["single", "multi", "multi_2", "multi_3"]
    assert tests[0].targets_x == Category("TARG1", ("targ1 one.", "targ1 two."))
    assert tests[0].attributes_b.name == "ATTR2"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (json.dumps({k: v for k, v in _record().items() if k != "attr2"}), "missing key.*'attr2'"),
        (json.dumps(_record(targ2={"category": "Y", "examples": []})), "'targ2' has an empty 'examples'"),
        (json.dumps(_record(attr1={"examples": ["a."]})), "'attr1' is missing key 'category'"),
        (json.dumps(_record(targ1={"category": "X", "examples": ["ok.", 3]})), "'targ1' example 1"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_file_error_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = _write(tmp_path / "broken.jsonl", json.dumps(_record()), bad_line)
    with pytest.raises(ValueError, match=message) as info:
        load_association_tests([path])
    assert str(path) in str(info.value)
    assert "line 2" in str(info.value)


def test_a_file_in_another_encoding_names_its_first_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "legacy.jsonl"
    good = json.dumps(_record()).encode()
    path.write_bytes(
        good
        + b"\n"
        + json.dumps(_record(targ1={"category": "X", "examples": ["caf\u00e9."]}), ensure_ascii=False).encode(
            "cp1252"
        )
    )
    with pytest.raises(SeatFormatError, match=rf"{path}, line 2: not UTF-8"):
        load_association_tests([path])


def test_a_byte_order_mark_is_read_and_hidden_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "mine.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(_record()).encode() + b"\r\n")
    (tmp_path / "._mine.jsonl").write_bytes(b"\x00\x05\x16\x07\xff")  # a macOS resource fork
    (tmp_path / ".#mine.jsonl").symlink_to(tmp_path / "no-such-file")  # an editor's lock link
    paths = user_test_paths(tmp_path)
    assert paths == [tmp_path / "mine.jsonl"]
    assert [t.name for t in load_association_tests(paths)] == ["mine"]
    assert user_test_paths(tmp_path / "absent") == []


def test_duplicate_test_names_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    first = _write(tmp_path / "same.jsonl", json.dumps(_record()))
    second = _write(tmp_path / "other" / "same.jsonl", json.dumps(_record()))
    with pytest.raises(SeatFormatError, match="already used"):
        load_association_tests([first, second])


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.jsonl", "")
    with pytest.raises(ValueError, match="no tests"):
        load_association_tests([path])


def test_bundled_probes_load() -> None:
    paths = bundled_test_paths()
    tests = load_association_tests(paths)
    assert len(tests) >= 5
    assert {t.name for t in tests} >= {
        "gender_career_family",
        "gender_pronouns_career_family",
        "gender_math_arts",
        "gender_science_arts",
        "names_pleasant_unpleasant",
        "age_pleasant_unpleasant",
        "disability_pleasant_unpleasant",
    }
    for test in tests:
        for category in (test.targets_x, test.targets_y, test.attributes_a, test.attributes_b):
            assert len(category.examples) >= 8, (test.name, category.name)
            assert len(set(category.examples)) == len(category.examples), (test.name, category.name)


def test_bundled_probe_runs_with_a_toy_encoder() -> None:
    def encode(texts: list[str]) -> np.ndarray:
        return np.array([[len(t), t.count("e") + 1.0, t.count("a") + 1.0] for t in texts])

    test = load_association_tests(bundled_test_paths())[0]
    result = run_association_test(test, encode, permutations=500)
    assert not result.exact and 0 < result.p_value <= 1 and math.isfinite(result.effect_size)


# ---------------------------------------------------------------------------------------------------------
# swap_gender_terms / counterfactual_invariance


def test_swap_gender_terms_uses_gender_terms_and_names_but_not_age() -> None:
    # The detailed swapping rules are specified in test_augment.py; this pins the groups the probe uses.
    assert swap_gender_terms("John's father met Mr. Smith.") == "Amy's mother met Mrs. Smith."
    assert swap_gender_terms("A young man told her.") == "A young woman told him."


def test_swap_round_trips_when_unambiguous() -> None:
    text = "My uncle and his sons visited the queen herself."
    assert swap_gender_terms(swap_gender_terms(text)) == text


def test_swap_gender_terms_follows_a_user_term_map(tmp_path: Path) -> None:
    user_file = tmp_path / "counterfactual_terms.json"
    user_file.write_text(json.dumps({"groups": {"gender": [["lad", "lass"]]}}), encoding="utf-8")
    assert swap_gender_terms("The lad and he", load_term_map(user_file)) == "The lass and she"


def test_counterfactual_invariance_with_fake_encoder() -> None:
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts])

    result = counterfactual_invariance(["he runs", "The cat sat.", "she walks far"], encode)
    c1 = cos((7.0, 1.0), (8.0, 1.0))  # "he runs" vs "she runs"
    c2 = cos((13.0, 1.0), (12.0, 1.0))  # "she walks far" vs "he walks far"
    assert result.n_texts == 2
    assert result.mean_cosine == pytest.approx((c1 + c2) / 2, abs=1e-12)
    lo, hi = sorted([c1, c2])
    assert result.p05_cosine == pytest.approx(lo + 0.05 * (hi - lo), abs=1e-12)
    assert [w[:2] for w in result.worst] == (
        [("he runs", "she runs"), ("she walks far", "he walks far")]
        if c1 < c2
        else [("she walks far", "he walks far"), ("he runs", "she runs")]
    )
    assert result.worst[0][2] == pytest.approx(lo, abs=1e-12)
    assert len(calls) == 1


def test_counterfactual_invariance_with_nothing_to_swap() -> None:
    def encode(texts: list[str]) -> np.ndarray:
        raise AssertionError("encode should not be called")

    result = counterfactual_invariance(["The cat sat.", "the shepherd"], encode)
    assert result.n_texts == 0
    assert math.isnan(result.mean_cosine) and math.isnan(result.p05_cosine)
    assert result.worst == []


def test_counterfactual_invariance_uses_the_given_term_map(tmp_path: Path) -> None:
    user_file = tmp_path / "counterfactual_terms.json"
    user_file.write_text(json.dumps({"groups": {"gender": [["lad", "lass"]]}}), encoding="utf-8")

    def encode(texts: list[str]) -> np.ndarray:
        return np.array([[len(t), 1.0] for t in texts])

    result = counterfactual_invariance(["a lad", "a cat"], encode, term_map=load_term_map(user_file))
    assert result.n_texts == 1 and result.worst[0][:2] == ("a lad", "a lass")


def test_counterfactual_invariance_samples_in_hash_order_not_alphabetical() -> None:
    def encode(texts: list[str]) -> np.ndarray:
        return np.array([[len(t), 1.0] for t in texts])

    texts = [f"He paid bill {i}" for i in range(20)] + [f"She paid bill {i}" for i in range(20)]
    sampled = counterfactual_invariance(texts, encode, max_texts=10, n_worst=10)
    assert sampled.n_texts == 10
    scored = {original for original, _, _ in sampled.worst}
    # An alphabetical prefix would hold only "He ..." texts; a hash-ordered sample holds both.
    assert any(t.startswith("He ") for t in scored) and any(t.startswith("She ") for t in scored)
    assert counterfactual_invariance(texts[::-1], encode, max_texts=10, n_worst=10) == sampled


def test_the_group_gap_check_reads_each_formats_own_primary_metric() -> None:
    metrics = pd.DataFrame(
        {
            "dataset": ["binary", "binary", "triplet", "labelled_texts"],
            "metric": [
                "accuracy_group_gap",
                "average_precision_group_gap",
                "accuracy_group_gap",
                "knn_accuracy_group_gap",
            ],
        }
    )
    kept = primary_group_gaps(metrics)
    assert list(zip(kept["dataset"], kept["metric"], strict=True)) == [
        ("binary", "average_precision_group_gap"),
        ("triplet", "accuracy_group_gap"),
        ("labelled_texts", "knn_accuracy_group_gap"),
    ]


def _fairness_check_on(tmp_path: Path, rows: list[tuple[str, str, str, float]]) -> dg.AssetCheckResult:
    """``fairness_within_bounds`` on a warehouse holding one challenger and these fairness rows."""
    settings = Settings(home=tmp_path, base_model=str(tmp_path / "no-model-needed"))
    with Warehouse(settings.warehouse_path).connect() as connection:
        register_model(
            connection, {"version": "v1", "path": str(tmp_path), "base_model": settings.base_model}
        )
        connection.executemany(
            "INSERT INTO fairness_metrics VALUES (?, ?, ?, ?, 'v1', now())", [list(row) for row in rows]
        )
    _, checks = build_evaluation_assets(settings)
    (check,) = [c for c in checks if c.check_key.name == "fairness_within_bounds"]
    return check(st_assets_warehouse=WarehouseResource(path=str(settings.warehouse_path)))


def test_a_fairness_check_on_nan_scores_fails_and_one_on_no_gendered_text_passes(tmp_path: Path) -> None:
    effects = [("base", "gender_career_family", "effect_size", 0.5)]  # the challenger scored none
    nan_invariance = [("v1", "counterfactual_invariance", "mean_cosine", float("nan"))]
    swapped = _fairness_check_on(
        tmp_path / "a", [*effects, *nan_invariance, ("v1", "counterfactual_invariance", "n_texts", 12.0)]
    )
    assert (
        not swapped.passed
        and "invariance not scored (NaN) though eval texts were swapped" in swapped.description
    )
    nothing_to_swap = _fairness_check_on(
        tmp_path / "b", [*effects, *nan_invariance, ("v1", "counterfactual_invariance", "n_texts", 0.0)]
    )
    assert nothing_to_swap.passed
    assert "invariance not measured: no eval text holds a term to swap" in nothing_to_swap.description


def test_checks_fail_for_a_challenger_the_reports_have_not_scored(tmp_path: Path) -> None:
    # The reports ran for v0; v1 was registered after them (a finetuned_model run of its own).
    settings = Settings(home=tmp_path, base_model=str(tmp_path / "no-model-needed"))
    with Warehouse(settings.warehouse_path).connect() as connection:
        for version in ("v0", "v1"):
            register_model(
                connection, {"version": version, "path": str(tmp_path), "base_model": settings.base_model}
            )
        connection.executemany(
            "INSERT INTO fairness_metrics VALUES (?, ?, ?, ?, 'v0', now())",
            [
                ("base", "gender_career_family", "effect_size", 0.1),
                ("v0", "gender_career_family", "effect_size", 0.1),
                ("v0", "counterfactual_invariance", "mean_cosine", 0.95),
            ],
        )
        connection.executemany(
            "INSERT INTO evaluation_metrics VALUES (?, 'all', 'primary_score', ?, NULL, NULL, 100, 'v0', now())",
            [("base", 0.5), ("v0", 0.6)],
        )
    _, checks = build_evaluation_assets(settings)
    warehouse = WarehouseResource(path=str(settings.warehouse_path))
    for check in checks:
        result = check(st_assets_warehouse=warehouse)
        assert not result.passed, check.check_key.name
        assert "has not scored v1 yet" in (result.description or "")


def test_the_gate_refuses_a_challenger_that_fairness_report_never_scored(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, base_model=str(tmp_path / "unused-model"))
    with Warehouse(settings.warehouse_path).connect() as connection:
        register_model(
            connection, {"version": "v1", "path": str(tmp_path), "base_model": settings.base_model}
        )
        # evaluation_report's rows: v1 clearly beats the base model; fairness_metrics holds nothing for v1.
        connection.executemany(
            "INSERT INTO evaluation_metrics VALUES (?, ?, ?, ?, ?, ?, 100, 'v1', now())",
            [
                ["base", "all", "primary_score", 0.5, None, None],
                ["v1", "all", "primary_score", 0.7, None, None],
                ["v1", "base", "primary_score_difference", 0.2, 0.15, 0.25],
            ],
        )
    assets, _ = build_evaluation_assets(settings)
    warehouse = WarehouseResource(path=str(settings.warehouse_path))
    (champion_model,) = [a for a in assets if a.key.to_user_string() == "champion_model"]
    # A report written before the gate compared on rows held out from both models is not enough.
    with pytest.raises(RuntimeError, match="compared v1 with base in an earlier version"):
        champion_model(dg.build_asset_context(), st_assets_warehouse=warehouse)
    with Warehouse(settings.warehouse_path).connect() as connection:
        connection.executemany(
            "INSERT INTO evaluation_metrics VALUES (?, 'base', ?, ?, NULL, NULL, 100, 'v1', now())",
            [
                ["v1", "compared_score_challenger", 0.7],
                ["base", "compared_score_incumbent", 0.5],
                ["v1", "eval_rows_incumbent_trained_on", 0.0],
            ],
        )
    with pytest.raises(RuntimeError, match="fairness_report has not scored v1"):
        champion_model(dg.build_asset_context(), st_assets_warehouse=warehouse)
    with Warehouse(settings.warehouse_path).connect(read_only=True) as connection:
        assert connection.execute(
            "SELECT count(*) FROM model_registry WHERE status = 'champion'"
        ).fetchone() == (0,)
