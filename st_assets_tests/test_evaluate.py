"""Held-out metrics computed from a hand-made encoder whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from st_assets.steps.evaluate import EmbeddingCache, Metric, evaluate_model, primary_score
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


def test_embedding_cache_encodes_each_text_once() -> None:
    calls = []
    cache = EmbeddingCache(lambda texts: calls.append(list(texts)) or _encode(texts))
    cache(["card lost", "pin blocked", "card lost"])
    cache(["card lost", "forgot pin"])
    assert calls == [["card lost", "pin blocked"], ["forgot pin"]]


def test_a_better_and_no_more_biased_challenger_is_promoted() -> None:
    decision = decide_promotion(0.8, 0.7, {"t": 0.5}, {"t": 0.45}, margin=0.01, fairness_tolerance=0.2)
    assert decision.promote


def test_a_worse_challenger_is_not_promoted() -> None:
    decision = decide_promotion(0.69, 0.7, {}, {}, margin=0.0, fairness_tolerance=0.2)
    assert not decision.promote
    assert "does not beat" in decision.summary


def test_a_challenger_more_biased_beyond_tolerance_is_not_promoted() -> None:
    decision = decide_promotion(
        0.9, 0.7, {"gender": -1.1}, {"gender": 0.6}, margin=0.0, fairness_tolerance=0.2
    )
    assert not decision.promote
    assert "gender grew by 0.500" in decision.summary
