"""Held-out metrics, their bootstrap CIs and the promotion gate, from hand-made encoders whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pydantic
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import average_precision_score, f1_score

from st_assets.settings import Settings
from st_assets.steps import evaluate as evaluate_step
from st_assets.steps.evaluate import (
    GATE_CONFIDENCE,
    MIN_INTERVAL_ROWS,
    EmbeddingCache,
    Metric,
    ScoreDifference,
    _percentile_interval,
    compare_to_incumbent,
    evaluate_groups,
    evaluate_model,
    primary_rows,
    primary_score,
)
from st_assets.steps.promotion import decide_promotion

VECTORS = {
    "card lost": [1.0, 0.0],
    "lost my card": [0.9, 0.1],
    "card gone": [0.95, 0.05],
    "pin blocked": [0.0, 1.0],
    "pin locked": [0.1, 0.9],
    "forgot pin": [0.2, 0.8],
}


def _encode(texts: list[str]) -> np.ndarray:
    vectors = np.array([VECTORS[text] for text in texts])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _pairs(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in ("sentence2", "negative", "score", "label"):
        if column not in frame:
            frame[column] = None
    return frame


def test_knn_accuracy_and_mrr_for_labelled_texts() -> None:
    pairs = _pairs(
        [
            {"format": "labelled_texts", "sentence1": "card lost", "label": "card", "split": "train"},
            {"format": "labelled_texts", "sentence1": "pin blocked", "label": "pin", "split": "train"},
            {"format": "labelled_texts", "sentence1": "lost my card", "label": "card", "split": "eval"},
            {"format": "labelled_texts", "sentence1": "forgot pin", "label": "card", "split": "eval"},
        ]
    )
    metrics = {m.metric: m.value for m in evaluate_model(pairs, _encode)}
    assert metrics["knn_accuracy"] == 0.5
    assert metrics["mrr@10"] == pytest.approx((1.0 + 0.5) / 2)
    assert metrics["recall@1"] == 0.5


def test_ranking_metrics_do_not_depend_on_how_many_queries_are_scored_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(3)
    vectors = {f"text {i}": rng.standard_normal(8) for i in range(240)}

    def encode(texts: list[str]) -> np.ndarray:
        found = np.array([vectors[text] for text in texts])
        return found / np.linalg.norm(found, axis=1, keepdims=True)

    texts = list(vectors)
    labelled = pd.DataFrame(
        {
            "format": "labelled_texts",
            "sentence1": texts,
            "label": [f"intent {i % 6}" for i in range(240)],
            "split": ["eval" if i < 60 else "train" for i in range(240)],
        }
    )
    answers = pd.DataFrame(
        {
            "format": "anchor_positive",
            "sentence1": [f"text {i % 30}" for i in range(90)],
            "sentence2": [f"text {100 + i}" for i in range(90)],
            "split": "eval",
        }
    )
    pairs = _pairs(pd.concat([labelled, answers]).to_dict("records"))
    whole = {(m.dataset, m.metric): m.value for m in evaluate_model(pairs, encode)}
    # One query row at a time (each block holds a single query), as a corpus too large for memory is scored.
    monkeypatch.setattr("st_assets.steps.evaluate._RANKING_BLOCK_CELLS", 1)
    blocked = {(m.dataset, m.metric): m.value for m in evaluate_model(pairs, encode)}
    assert blocked == whole
    assert 0 < whole[("labelled_texts", "recall@10")] < 1 and 0 < whole[("anchor_positive", "mrr@10")] < 1


def test_no_group_named_means_no_group_metrics_and_no_encoding() -> None:
    pairs = _pairs(
        [
            {"format": "labelled_texts", "sentence1": "card lost", "label": "card", "split": "train"},
            {"format": "labelled_texts", "sentence1": "lost my card", "label": "card", "split": "eval"},
        ]
    ).assign(group_name=None)

    def encode(texts: list[str]) -> np.ndarray:
        raise AssertionError("encoded texts although no eval row names a group")

    assert evaluate_groups(pairs, encode) == ([], [])
    assert evaluate_groups(pairs.drop(columns="group_name"), encode) == ([], [])


def test_an_anchor_with_two_answers_counts_either_as_right() -> None:
    # A perfect retriever: "card lost" has two answers, each in its own row, "forgot pin" one.
    pairs = _pairs(
        [
            {
                "format": "anchor_positive",
                "sentence1": "card lost",
                "sentence2": "lost my card",
                "split": "eval",
            },
            {
                "format": "anchor_positive",
                "sentence1": "card lost",
                "sentence2": "card gone",
                "split": "eval",
            },
            {
                "format": "anchor_positive",
                "sentence1": "forgot pin",
                "sentence2": "pin locked",
                "split": "eval",
            },
        ]
    )
    metrics = {m.metric: m.value for m in evaluate_model(pairs, _encode)}
    assert metrics["mrr@10"] == 1.0 and metrics["ndcg@10"] == pytest.approx(1.0)
    assert metrics["recall@5"] == 1.0


def test_a_query_does_not_find_itself_and_answers_differing_in_case_are_one_text() -> None:
    # Paraphrases given both ways round, and an answer written in two cases: a perfect retriever.
    rows = [
        ("card lost", "lost my card"),
        ("lost my card", "card lost"),
        ("forgot pin", "pin locked"),
        ("pin blocked", "Pin Locked"),
    ]
    pairs = _pairs(
        [{"format": "anchor_positive", "sentence1": a, "sentence2": b, "split": "eval"} for a, b in rows]
    )

    def encode(texts: list[str]) -> np.ndarray:
        return _encode([text.lower() for text in texts])

    metrics = {m.metric: m.value for m in evaluate_model(pairs, encode)}
    assert metrics["mrr@10"] == 1.0 and metrics["recall@1"] == 1.0


def test_an_anchor_with_many_answers_is_one_query_to_the_bootstrap() -> None:
    # The same anchors and rankings, once with one row per anchor and once with each answer written six
    # ways: the rows add no information, and must not narrow the interval.
    rng = np.random.default_rng(0)
    anchors = [f"question {i}" for i in range(12)]
    answers = [f"answer {i}" for i in range(12)]
    vectors = {text: rng.normal(size=8) for text in anchors + answers}
    for i, anchor in enumerate(anchors):
        if i % 2 == 0:  # half the anchors sit next to their answer
            vectors[anchor] = vectors[answers[i]] + 0.1 * rng.normal(size=8)

    def encode(texts: list[str]) -> np.ndarray:
        matrix = np.array([vectors[" ".join(text.split())] for text in texts])
        return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)

    def intervals(copies: int) -> tuple[float, float, int]:
        rows = [
            {
                "format": "anchor_positive",
                "sentence1": anchor,
                "sentence2": answer + " " * copy,
                "split": "eval",
            }
            for anchor, answer in zip(anchors, answers, strict=True)
            for copy in range(copies)
        ]
        (mrr,) = [m for m in evaluate_model(_pairs(rows), encode, n_boot=300) if m.metric == "mrr@10"]
        return mrr.ci_low, mrr.ci_high, mrr.rows

    assert intervals(6) == intervals(1)
    assert intervals(1)[2] == 12


def test_a_triplet_with_many_negatives_is_one_unit_to_the_bootstrap() -> None:
    # Each (anchor, positive) once with one negative, once with that negative written six ways: the
    # accuracy is the same, and the rows add no independent information to narrow its interval.
    rng = np.random.default_rng(1)
    texts = [f"{kind} {i}" for i in range(12) for kind in ("anchor", "positive", "negative")]
    vectors = {text: rng.normal(size=8) for text in texts}

    def encode(texts: list[str]) -> np.ndarray:
        matrix = np.array([vectors[" ".join(text.split())] for text in texts])
        return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)

    def accuracy(copies: int) -> Metric:
        rows = [
            {
                "format": "triplet",
                "sentence1": f"anchor {i}",
                "sentence2": f"positive {i}",
                "negative": f"negative {i}" + " " * copy,
                "split": "eval",
            }
            for i in range(12)
            for copy in range(copies)
        ]
        (metric,) = [m for m in evaluate_model(_pairs(rows), encode, n_boot=300) if m.metric == "accuracy"]
        return metric

    one, six = accuracy(1), accuracy(6)
    assert six.value == one.value and (six.ci_low, six.ci_high) == (one.ci_low, one.ci_high)
    assert six.rows == one.rows == 12


def test_a_collapsed_model_correlates_zero_and_a_broken_one_stays_undefined() -> None:
    texts = list(VECTORS)
    pairs = _pairs(
        [
            {"format": "scored", "sentence1": a, "sentence2": b, "score": score, "split": "eval"}
            for a, b, score in zip(texts, texts[1:], [0.1, 0.5, 0.9, 0.3, 0.7], strict=False)
        ]
    )

    def collapsed(batch: list[str]) -> np.ndarray:
        return np.ones((len(batch), 2)) / np.sqrt(2)

    metrics = evaluate_model(pairs, collapsed)
    assert {m.metric: m.value for m in metrics}["spearman"] == 0.0
    assert primary_score(metrics) == 0.0
    assert compare_to_incumbent(pairs, _encode, collapsed).difference == primary_score(
        evaluate_model(pairs, _encode)
    )

    def broken(batch: list[str]) -> np.ndarray:  # vectors that are not numbers stay undefined, not 0
        return np.full((len(batch), 2), np.nan)

    assert math.isnan({m.metric: m.value for m in evaluate_model(pairs, broken)}["spearman"])


def test_spearman_for_scored_pairs_follows_the_cosine_order() -> None:
    pairs = _pairs(
        [
            {
                "format": "scored",
                "sentence1": "card lost",
                "sentence2": "lost my card",
                "score": 0.9,
                "split": "eval",
            },
            {
                "format": "scored",
                "sentence1": "card lost",
                "sentence2": "forgot pin",
                "score": 0.4,
                "split": "eval",
            },
            {
                "format": "scored",
                "sentence1": "card lost",
                "sentence2": "pin blocked",
                "score": 0.1,
                "split": "eval",
            },
        ]
    )
    metrics = {m.metric: m.value for m in evaluate_model(pairs, _encode)}
    assert metrics["spearman"] == pytest.approx(1.0)


def test_triplet_accuracy_and_binary_threshold_from_training_pairs() -> None:
    pairs = _pairs(
        [
            {
                "format": "triplet",
                "sentence1": "card lost",
                "sentence2": "card gone",
                "negative": "pin locked",
                "split": "eval",
            },
            {
                "format": "binary",
                "sentence1": "card lost",
                "sentence2": "card gone",
                "score": 1.0,
                "split": "train",
            },
            {
                "format": "binary",
                "sentence1": "card lost",
                "sentence2": "pin locked",
                "score": 0.0,
                "split": "train",
            },
            {
                "format": "binary",
                "sentence1": "pin blocked",
                "sentence2": "forgot pin",
                "score": 1.0,
                "split": "eval",
            },
            {
                "format": "binary",
                "sentence1": "pin blocked",
                "sentence2": "lost my card",
                "score": 0.0,
                "split": "eval",
            },
        ]
    )
    metrics = {(m.dataset, m.metric): m.value for m in evaluate_model(pairs, _encode)}
    assert metrics[("triplet", "accuracy")] == 1.0
    assert metrics[("binary", "accuracy")] == 1.0
    assert metrics[("binary", "average_precision")] == 1.0


def test_primary_score_weights_formats_by_eval_rows() -> None:
    metrics = [
        Metric("scored", "spearman", 0.5, 10),
        Metric("labelled_texts", "knn_accuracy", 1.0, 30),
        Metric("labelled_texts", "mrr@10", 0.0, 30),
    ]
    assert primary_score(metrics) == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert primary_rows(metrics) == 40
    # Unlabelled texts have no primary metric: their rows are not part of the score's weight.
    assert primary_rows([*metrics, Metric("unlabelled_texts", "alignment", 0.9, 50)]) == 40


def test_embedding_cache_encodes_each_text_once() -> None:
    calls = []
    cache = EmbeddingCache(lambda texts: calls.append(list(texts)) or _encode(texts))
    cache(["card lost", "pin blocked", "card lost"])
    cache(["card lost", "forgot pin"])
    assert calls == [["card lost", "pin blocked"], ["forgot pin"]]


def test_a_metric_built_without_a_ci_has_nan_bounds() -> None:
    metric = Metric("scored", "spearman", 0.5, 10)
    assert math.isnan(metric.ci_low) and math.isnan(metric.ci_high)


# ---------------------------------------------------------------------------------------------------------
# Encoders that place each pair at a chosen cosine: sentence1 "a<i>" is [1, 0], sentence2 "b<i>" sits at
# angle arccos(cosine_i) from it.


def _pair_encoder(cosines: np.ndarray, prefix: str = "") -> dict[str, np.ndarray]:
    vectors = {}
    for i, cosine in enumerate(cosines):
        vectors[f"{prefix}a{i}"] = np.array([1.0, 0.0])
        vectors[f"{prefix}b{i}"] = np.array([cosine, math.sqrt(max(0.0, 1 - cosine**2))])
    return vectors


def _encoder(vectors: dict[str, np.ndarray], calls: list[str] | None = None):
    def encode(texts: list[str]) -> np.ndarray:
        if calls is not None:
            calls.extend(texts)
        return np.stack([vectors[text] for text in texts])

    return encode


def _pair_rows(pair_format: str, targets: np.ndarray, split: str = "eval", prefix: str = "") -> pd.DataFrame:
    return _pairs(
        [
            {
                "format": pair_format,
                "sentence1": f"{prefix}a{i}",
                "sentence2": f"{prefix}b{i}",
                "score": float(target),
                "split": split,
            }
            for i, target in enumerate(targets)
        ]
    )


def test_point_estimates_match_scipy_and_sklearn_on_tied_cosines() -> None:
    rng = np.random.default_rng(3)
    # Rounded to one decimal so many cosines tie, the case where ranking metrics are easy to get wrong.
    cosines = np.round(rng.uniform(-0.2, 1.0, 60), 1)
    gold = np.round(np.clip(cosines + rng.normal(0, 0.3, 60), 0, 1), 1)
    labels = (gold > 0.5).astype(float)
    train_cosines = np.round(rng.uniform(-0.2, 1.0, 40), 2)
    train_labels = (train_cosines > 0.45).astype(float)
    vectors = {
        **_pair_encoder(cosines),
        **_pair_encoder(train_cosines, prefix="t"),
    }
    pairs = pd.concat(
        [
            _pair_rows("scored", gold),
            _pair_rows("binary", labels),
            _pair_rows("binary", train_labels, split="train", prefix="t"),
        ]
    )
    metrics = {(m.dataset, m.metric): m for m in evaluate_model(pairs, _encoder(vectors), n_boot=200)}
    assert metrics[("scored", "spearman")].value == pytest.approx(spearmanr(cosines, gold).statistic)
    assert metrics[("scored", "pearson")].value == pytest.approx(pearsonr(cosines, gold).statistic)
    assert metrics[("binary", "average_precision")].value == pytest.approx(
        average_precision_score(labels, cosines)
    )
    threshold = metrics[("binary", "threshold")].value
    predicted = cosines >= threshold
    assert metrics[("binary", "f1")].value == pytest.approx(f1_score(labels, predicted))
    assert metrics[("binary", "accuracy")].value == pytest.approx(np.mean(predicted == labels))
    assert math.isnan(metrics[("binary", "threshold")].ci_low)  # chosen on training pairs, not resampled


def _labelled_and_triplet_pairs(
    n: int, noise: float, seed: int
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Labelled texts in 4 intents plus triplets; ``noise`` blurs the intent directions."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:4]
    rows, vectors = [], {}
    for i in range(n):
        intent = i % 4
        text = f"text{i}"
        vectors[text] = centres[intent] + rng.normal(0, noise, 8)
        rows.append(
            {
                "format": "labelled_texts",
                "sentence1": text,
                "label": f"intent{intent}",
                "split": ["train", "eval"][i % 2],
            }
        )
    for i in range(n // 2):
        anchor, positive, negative = f"anchor{i}", f"positive{i}", f"negative{i}"
        vectors[anchor] = centres[0] + rng.normal(0, noise, 8)
        vectors[positive] = centres[0] + rng.normal(0, noise, 8)
        vectors[negative] = centres[1] + rng.normal(0, noise, 8)
        rows.append(
            {
                "format": "triplet",
                "sentence1": anchor,
                "sentence2": positive,
                "negative": negative,
                "split": "eval",
            }
        )
    unit = {text: vector / np.linalg.norm(vector) for text, vector in vectors.items()}
    return _pairs(rows), unit


def test_every_metric_has_a_seeded_ci_around_its_value() -> None:
    pairs, vectors = _labelled_and_triplet_pairs(240, noise=0.6, seed=1)
    first = evaluate_model(pairs, _encoder(vectors), n_boot=300, seed=7)
    again = evaluate_model(pairs, _encoder(vectors), n_boot=300, seed=7)
    other_seed = evaluate_model(pairs, _encoder(vectors), n_boot=300, seed=8)
    assert first == again
    assert [(m.ci_low, m.ci_high) for m in first] != [(m.ci_low, m.ci_high) for m in other_seed]
    names = {(m.dataset, m.metric) for m in first}
    assert {("labelled_texts", name) for name in ("knn_accuracy", "mrr@10", "ndcg@10", "recall@1")} <= names
    for metric in first:
        assert metric.ci_low <= metric.value <= metric.ci_high, metric
        assert metric.ci_high - metric.ci_low < 0.5, metric


def test_no_bootstrap_leaves_the_cis_nan() -> None:
    pairs, vectors = _labelled_and_triplet_pairs(40, noise=0.6, seed=1)
    metrics = evaluate_model(pairs, _encoder(vectors), n_boot=0)
    assert metrics and all(math.isnan(m.ci_low) and math.isnan(m.ci_high) for m in metrics)


def test_a_model_compared_with_itself_differs_by_exactly_zero() -> None:
    pairs, vectors = _labelled_and_triplet_pairs(80, noise=0.6, seed=2)
    comparison = compare_to_incumbent(pairs, _encoder(vectors), _encoder(vectors), n_boot=200)
    assert comparison.difference == 0.0
    assert (comparison.ci_low, comparison.ci_high) == (0.0, 0.0)  # paired: same rows for both models


def test_compare_to_incumbent_scores_as_primary_score_and_finds_a_real_gain() -> None:
    pairs, sharp = _labelled_and_triplet_pairs(200, noise=0.3, seed=3)
    _, blurred = _labelled_and_triplet_pairs(200, noise=1.5, seed=3)
    comparison = compare_to_incumbent(pairs, _encoder(sharp), _encoder(blurred), n_boot=500, seed=1)
    assert comparison.challenger_score == pytest.approx(primary_score(evaluate_model(pairs, _encoder(sharp))))
    assert comparison.incumbent_score == pytest.approx(
        primary_score(evaluate_model(pairs, _encoder(blurred)))
    )
    assert comparison.difference == pytest.approx(comparison.challenger_score - comparison.incumbent_score)
    assert 0 < comparison.ci_low <= comparison.difference <= comparison.ci_high


def test_compare_to_incumbent_encodes_each_text_once_per_model() -> None:
    pairs, vectors = _labelled_and_triplet_pairs(40, noise=0.6, seed=4)
    challenger_calls: list[str] = []
    incumbent_calls: list[str] = []
    compare_to_incumbent(
        pairs, _encoder(vectors, challenger_calls), _encoder(vectors, incumbent_calls), n_boot=10
    )
    assert challenger_calls and len(challenger_calls) == len(set(challenger_calls))
    assert sorted(incumbent_calls) == sorted(challenger_calls)


def test_without_any_scorable_format_the_comparison_is_nan() -> None:
    pairs = _pairs([{"format": "unlabelled_texts", "sentence1": "card lost", "split": "eval"}])
    comparison = compare_to_incumbent(pairs, _encode, _encode)
    assert math.isnan(comparison.difference) and math.isnan(comparison.ci_low)


def test_the_gate_reads_a_90_percent_interval_a_one_sided_95_percent_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # "Is the challenger better?" is one-sided: the 5th percentile of the paired differences is its bound.
    draws = np.arange(101.0)
    assert _percentile_interval(draws, 100, GATE_CONFIDENCE) == pytest.approx((5.0, 95.0))
    assert _percentile_interval(draws, 100) == pytest.approx((2.5, 97.5))  # every other metric's 95% CI
    pairs, sharp = _labelled_and_triplet_pairs(200, noise=0.3, seed=3)
    _, blurred = _labelled_and_triplet_pairs(200, noise=1.5, seed=3)
    # The gate's comparison takes its interval of the paired differences at GATE_CONFIDENCE.
    intervals: list[tuple[tuple[float, ...], tuple[float, float]]] = []

    def recorded(*args: float) -> tuple[float, float]:
        interval = _percentile_interval(*args)  # type: ignore[arg-type]
        intervals.append((args[1:], interval))
        return interval

    monkeypatch.setattr(evaluate_step, "_percentile_interval", recorded)
    gain = compare_to_incumbent(pairs, _encoder(sharp), _encoder(blurred), n_boot=500, seed=1)
    ((arguments, interval),) = intervals
    assert arguments == (gain.rows, GATE_CONFIDENCE) and interval == (gain.ci_low, gain.ci_high)
    decision = decide_promotion(
        gain, {}, {}, 1.0, margin=0.0, fairness_tolerance=0.2, invariance_threshold=0.9
    )
    assert "90% CI of the difference" in decision.summary and "(a one-sided 95% test)" in decision.summary


def test_a_win_on_fewer_rows_than_an_interval_needs_gets_no_ci_and_no_promotion() -> None:
    # One scored pair (or a few): every resample is the same rows, so a percentile "CI" is a point.
    targets = np.linspace(0.1, 0.9, MIN_INTERVAL_ROWS - 1)
    pairs = _pair_rows("scored", targets)
    challenger = _encoder(_pair_encoder(targets))
    incumbent = _encoder(_pair_encoder(targets[::-1]))
    few = compare_to_incumbent(pairs, challenger, incumbent, n_boot=200)
    assert few.difference > 1 and few.rows == MIN_INTERVAL_ROWS - 1
    assert math.isnan(few.ci_low) and math.isnan(few.ci_high)
    decision = decide_promotion(
        few, {}, {}, 1.0, margin=0.0, fairness_tolerance=0.2, invariance_threshold=0.9
    )
    assert not decision.promote
    assert f"only {MIN_INTERVAL_ROWS - 1} eval rows were compared" in decision.summary
    assert all(math.isnan(m.ci_low) for m in evaluate_model(pairs, challenger, n_boot=200))
    # A comparison stored before the minimum existed may carry a CI over few rows: still no promotion.
    stored = ScoreDifference(0.9, 0.5, 0.4, 0.2, 0.6, 5)
    assert not decide_promotion(
        stored, {}, {}, 1.0, margin=0.0, fairness_tolerance=0.2, invariance_threshold=0.9
    ).promote
    # At the minimum the interval is there, and the same kind of win is promoted.
    targets = np.linspace(0.1, 0.9, MIN_INTERVAL_ROWS)
    enough = compare_to_incumbent(
        _pair_rows("scored", targets),
        _encoder(_pair_encoder(targets)),
        _encoder(_pair_encoder(targets[::-1])),
        n_boot=200,
    )
    assert 0 < enough.ci_low <= enough.difference
    assert decide_promotion(
        enough, {}, {}, 1.0, margin=0.0, fairness_tolerance=0.2, invariance_threshold=0.9
    ).promote


# ---------------------------------------------------------------------------------------------------------
# The promotion gate


def _gain(difference: float = 0.05, ci_low: float = 0.02, ci_high: float = 0.08) -> ScoreDifference:
    return ScoreDifference(0.7 + difference, 0.7, difference, ci_low, ci_high, 100)


def test_settings_refuse_fewer_resamples_than_the_gate_needs() -> None:
    # Without a bootstrap CI the gate can never see a gain, so nothing would ever be promoted.
    with pytest.raises(pydantic.ValidationError, match="bootstrap_samples"):
        Settings(bootstrap_samples=0)


def test_a_better_no_more_biased_and_invariant_challenger_is_promoted() -> None:
    decision = decide_promotion(
        _gain(), {"t": 0.5}, {"t": 0.45}, 0.97, margin=0.01, fairness_tolerance=0.2, invariance_threshold=0.9
    )
    assert decision.promote
    assert decision.summary.startswith("promoted: ")
    assert len(decision.reasons) == 4  # score, CI, association tests, invariance: each said in words
    assert "lies above zero" in decision.summary and "meets the threshold 0.9" in decision.summary


def test_a_challenger_not_beating_the_margin_is_not_promoted() -> None:
    decision = decide_promotion(
        _gain(0.005, 0.001, 0.01), {}, {}, 0.97, margin=0.01, fairness_tolerance=0.2, invariance_threshold=0.9
    )
    assert not decision.promote
    assert "does not beat the margin 0.01" in decision.summary


def test_a_challenger_whose_gain_ci_reaches_zero_is_not_promoted() -> None:
    decision = decide_promotion(
        _gain(0.05, -0.01, 0.11), {}, {}, 0.97, margin=0.01, fairness_tolerance=0.2, invariance_threshold=0.9
    )
    assert not decision.promote
    assert "beats the margin" in decision.summary
    assert "[-0.0100, +0.1100] does not lie above zero" in decision.summary


def test_a_challenger_more_biased_beyond_tolerance_is_not_promoted() -> None:
    decision = decide_promotion(
        _gain(),
        {"gender": -1.1, "race": 0.3},
        {"gender": 0.6, "race": 0.3},
        0.97,
        margin=0.0,
        fairness_tolerance=0.2,
        invariance_threshold=0.9,
    )
    assert not decision.promote
    assert "|effect size| of gender grew by 0.500" in decision.summary
    assert "race" not in decision.summary


def test_a_challenger_below_the_invariance_threshold_is_not_promoted() -> None:
    decision = decide_promotion(
        _gain(), {}, {}, 0.85, margin=0.0, fairness_tolerance=0.2, invariance_threshold=0.9
    )
    assert not decision.promote
    assert "counterfactual invariance 0.850 is below the threshold 0.9" in decision.summary


def test_unmeasured_invariance_does_not_block_promotion() -> None:
    decision = decide_promotion(
        _gain(), {}, {}, math.nan, margin=0.0, fairness_tolerance=0.2, invariance_threshold=0.9
    )
    assert decision.promote
    assert "not measured" in decision.summary


def test_invariance_that_could_not_be_computed_on_swapped_texts_blocks_promotion() -> None:
    decision = decide_promotion(
        _gain(),
        {},
        {},
        math.nan,
        swapped_texts=40,
        margin=0.0,
        fairness_tolerance=0.2,
        invariance_threshold=0.9,
    )
    assert not decision.promote
    assert "counterfactual invariance is NaN over 40 swapped texts" in decision.summary


def test_an_incumbent_without_association_results_blocks_promotion() -> None:
    decision = decide_promotion(
        _gain(), {"gender": 0.4}, {}, 0.97, margin=0.0, fairness_tolerance=0.2, invariance_threshold=0.9
    )
    assert not decision.promote
    assert "incumbent has no association-test results" in decision.summary


def test_without_a_primary_score_nothing_is_promoted() -> None:
    nan = math.nan
    decision = decide_promotion(
        ScoreDifference(nan, nan, nan, nan, nan, 0),
        {},
        {},
        0.97,
        margin=0.0,
        fairness_tolerance=0.2,
        invariance_threshold=0.9,
    )
    assert not decision.promote
    assert "no primary score to compare" in decision.summary


# ---------------------------------------------------------------------------------------------------------
# Per-group metrics


def _grouped_scored_pairs(seed: int = 5) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """40 rows where the model ranks group "clear" perfectly, 40 where it guesses ("noisy"), 5 in a tiny
    group and 5 with no group; returns the pairs, the encoder's vectors and each group's (cosines, gold)."""
    rng = np.random.default_rng(seed)
    gold = rng.uniform(0, 1, 90)
    cosines = np.concatenate([gold[:40], rng.uniform(0, 1, 50)])
    pairs = _pair_rows("scored", gold)
    pairs["group_name"] = ["clear"] * 40 + ["noisy"] * 40 + ["tiny"] * 5 + [None] * 5
    slices = {"clear": slice(0, 40), "noisy": slice(40, 80), "tiny": slice(80, 85)}
    return pairs, _pair_encoder(cosines), {g: (cosines[s], gold[s]) for g, s in slices.items()}


def test_each_group_is_scored_on_its_own_rows_and_the_gap_spans_the_large_groups() -> None:
    pairs, vectors, by_group = _grouped_scored_pairs()
    per_group, gaps = evaluate_groups(pairs, _encoder(vectors), n_boot=300, min_group_rows=10)
    spearman = {m.group: m for m in per_group if m.metric == "spearman"}
    assert set(spearman) == {"clear", "noisy", "tiny"}  # rows without a group belong to none
    for group, (cosines, gold) in by_group.items():
        assert spearman[group].value == pytest.approx(spearmanr(cosines, gold).statistic)
    assert spearman["clear"].value == pytest.approx(1.0)
    assert spearman["noisy"].rows == 40
    assert spearman["noisy"].ci_low < spearman["noisy"].value < spearman["noisy"].ci_high
    gap = next(m for m in gaps if m.metric == "spearman_group_gap")
    # "tiny" has 5 eval rows, below min_group_rows: listed, but not part of the gap.
    assert gap.value == pytest.approx(spearman["clear"].value - spearman["noisy"].value)
    assert gap.rows == 80
    assert 0.3 < gap.ci_low <= gap.value <= gap.ci_high  # clearly above zero


def test_a_resample_leaving_one_group_undefined_adds_no_gap_of_zero() -> None:
    # Binary pairs: "sure" ranks its 5 positives first (average precision 1), "rare" has 1 positive in 10
    # rows, ranked last, so a third of resamples hold no positive of "rare" and its precision is undefined.
    cosines = np.concatenate([np.linspace(0.9, 0.5, 10), np.linspace(0.9, 0.5, 10)])
    labels = np.array([1] * 5 + [0] * 5 + [0] * 9 + [1])
    pairs = _pair_rows("binary", labels)
    pairs["group_name"] = ["sure"] * 10 + ["rare"] * 10
    train = _pair_rows("binary", np.array([0, 1] * 5), split="train", prefix="t")
    vectors = _pair_encoder(cosines) | _pair_encoder(np.linspace(0.2, 0.8, 10), prefix="t")
    _, gaps = evaluate_groups(pd.concat([pairs, train]), _encoder(vectors), n_boot=500, min_group_rows=10)
    gap = next(m for m in gaps if m.metric == "average_precision_group_gap")
    # Every defined draw puts "rare" well below 1: an interval reaching 0 would be made of undefined draws.
    assert gap.value == pytest.approx(0.9) and gap.ci_low > 0.5


def test_group_metrics_are_seeded_and_absent_without_a_group_column() -> None:
    pairs, vectors, _ = _grouped_scored_pairs()
    first = evaluate_groups(pairs, _encoder(vectors), n_boot=100, seed=3)
    assert first == evaluate_groups(pairs, _encoder(vectors), n_boot=100, seed=3)
    assert evaluate_groups(pairs.drop(columns="group_name"), _encoder(vectors)) == ([], [])
    one_group = pairs.assign(group_name="everyone")
    per_group, gaps = evaluate_groups(one_group, _encoder(vectors), n_boot=0)
    assert {m.group for m in per_group} == {"everyone"} and gaps == []
    assert all(math.isnan(m.ci_low) for m in per_group)


def test_retrieval_metrics_per_group_rank_against_the_whole_corpus() -> None:
    pairs = _pairs(
        [
            {"format": "labelled_texts", "sentence1": "card lost", "label": "card", "split": "train"},
            {"format": "labelled_texts", "sentence1": "pin blocked", "label": "pin", "split": "train"},
            {"format": "labelled_texts", "sentence1": "lost my card", "label": "card", "split": "eval"},
            {"format": "labelled_texts", "sentence1": "card gone", "label": "card", "split": "eval"},
            {"format": "labelled_texts", "sentence1": "forgot pin", "label": "card", "split": "eval"},
        ]
    ).assign(group_name=[None, None, "en-GB", "en-GB", "en-US"])
    per_group, gaps = evaluate_groups(pairs, _encode, n_boot=0, min_group_rows=1)
    accuracy = {m.group: m.value for m in per_group if m.metric == "knn_accuracy"}
    assert accuracy == {"en-GB": 1.0, "en-US": 0.0}
    assert {m.metric: m.value for m in gaps}["knn_accuracy_group_gap"] == 1.0


def test_a_new_group_leaves_another_groups_interval_unchanged() -> None:
    pairs, vectors, _ = _grouped_scored_pairs()
    before = evaluate_groups(pairs, _encoder(vectors), n_boot=200, seed=3)[0]
    # The five rows without a group join one that sorts before every other name.
    regrouped = pairs.assign(group_name=pairs["group_name"].fillna("adults"))
    after = evaluate_groups(regrouped, _encoder(vectors), n_boot=200, seed=3)[0]
    noisy = [(m.metric, m.value, m.ci_low, m.ci_high) for m in before if m.group == "noisy"]
    assert noisy and noisy == [(m.metric, m.value, m.ci_low, m.ci_high) for m in after if m.group == "noisy"]
