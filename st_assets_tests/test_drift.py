"""Tests for st_assets.steps.drift: same distributions pass, shifted ones are flagged, seeded, small = NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest

from st_assets.steps.drift import (
    EMBEDDING_MAX_AUC,
    DriftResult,
    embedding_drift,
    label_drift,
    length_drift,
)

LABELS = ["card_arrival", "pin_blocked", "top_up", "transfer_failed", "refund"]


def _texts(rng: np.random.Generator, count: int, scale: int = 1) -> list[str]:
    return ["x" * (int(length) * scale) for length in rng.integers(20, 80, size=count)]


def _labels(rng: np.random.Generator, count: int, shares: list[float] | None = None) -> list[str]:
    return [str(label) for label in rng.choice(LABELS, size=count, p=shares)]


def _vectors(rng: np.random.Generator, count: int, offset: float = 0.0, width: int = 16) -> np.ndarray:
    return rng.normal(size=(count, width)) + offset


def test_lengths_from_the_same_distribution_are_not_drifted() -> None:
    rng = np.random.default_rng(0)
    result = length_drift(_texts(rng, 300), _texts(rng, 300))
    assert not result.drifted
    assert result.statistic < 0.2


def test_lengths_three_times_longer_are_drifted() -> None:
    rng = np.random.default_rng(0)
    result = length_drift(_texts(rng, 300), _texts(rng, 100, scale=3))
    assert result.drifted
    assert result.p_value < 0.01 and result.statistic > 0.2
    assert "median length" in result.detail


def test_a_tiny_significant_length_shift_in_a_huge_sample_is_not_drifted() -> None:
    history = ["x" * 50] * 5_000 + ["x" * 51] * 5_000
    batch = ["x" * 50] * 4_000 + ["x" * 51] * 6_000
    result = length_drift(history, batch)
    assert result.p_value < 0.01
    assert not result.drifted


def test_labels_from_the_same_distribution_are_not_drifted() -> None:
    rng = np.random.default_rng(0)
    result = label_drift(_labels(rng, 500), _labels(rng, 200))
    assert not result.drifted
    assert result.p_value > 0.01


def test_a_small_batch_over_many_labels_is_not_drifted_by_chance_alone() -> None:
    # 77 intents, as Banking77: 100 rows drawn from the history's own distribution sit more than 0.3
    # apart from it by sampling alone; the chi-square test says that is chance.
    rng = np.random.default_rng(0)
    intents = [f"intent_{number}" for number in range(77)]
    history = [str(label) for label in rng.choice(intents, size=8000)]
    results = [
        label_drift(history, [str(label) for label in rng.choice(intents, size=100)]) for _ in range(10)
    ]
    assert all(result.statistic > 0.3 for result in results)
    assert not any(result.drifted for result in results)
    shifted = label_drift(history, [str(label) for label in rng.choice(intents[:5], size=100)])
    assert shifted.drifted and shifted.p_value < 0.01


def test_labels_concentrated_on_one_class_are_drifted_and_the_class_is_named() -> None:
    rng = np.random.default_rng(0)
    batch = _labels(rng, 200, shares=[0.92, 0.02, 0.02, 0.02, 0.02])
    result = label_drift(_labels(rng, 500), batch)
    assert result.drifted and result.statistic > 0.3
    assert "'card_arrival'" in result.detail.split("most over-represented:")[1].split(",")[0]


def test_a_label_only_the_batch_has_counts() -> None:
    rng = np.random.default_rng(0)
    result = label_drift(_labels(rng, 200), ["brand_new_intent"] * 60 + _labels(rng, 40))
    assert result.drifted
    assert "'brand_new_intent' 60% of batch vs 0% of history" in result.detail


def test_vectors_from_the_same_distribution_are_not_drifted() -> None:
    rng = np.random.default_rng(0)
    result = embedding_drift(_vectors(rng, 300), _vectors(rng, 200), seed=1)
    assert not result.drifted
    assert 0.3 < result.statistic < EMBEDDING_MAX_AUC


def test_vectors_shifted_by_a_mean_offset_are_drifted() -> None:
    rng = np.random.default_rng(0)
    result = embedding_drift(_vectors(rng, 300), _vectors(rng, 200, offset=1.0), seed=1)
    assert result.drifted and result.statistic > 0.9
    assert result.p_value < 1e-6


def test_repeated_vectors_from_the_same_distribution_are_not_drifted() -> None:
    # One anchor over many rows (NLI premises, search queries): repeats must not read as a new domain.
    rng = np.random.default_rng(0)
    result = embedding_drift(
        _vectors(rng, 200, width=384), np.repeat(_vectors(rng, 50, width=384), 4, axis=0), seed=1
    )
    assert not result.drifted
    assert "50 vectors per side" in result.detail


def test_embedding_drift_caps_and_balances_both_sides() -> None:
    rng = np.random.default_rng(0)
    result = embedding_drift(_vectors(rng, 2_500), _vectors(rng, 30), seed=1)
    assert "30 vectors per side" in result.detail


def test_drift_results_are_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(0)
    reference, new = _vectors(rng, 120), _vectors(rng, 80, offset=0.2)
    assert embedding_drift(reference, new, seed=3) == embedding_drift(reference, new, seed=3)
    history, batch = _texts(rng, 50), _texts(rng, 50, scale=2)
    assert length_drift(history, batch) == length_drift(history, batch)


@pytest.mark.parametrize(
    "result",
    [
        length_drift(["a"] * 19, ["b"] * 500),
        label_drift(["a"] * 500, ["b"] * 19),
        label_drift(["a"] * 500, [None] * 100),
        embedding_drift(np.zeros((500, 4)), np.ones((19, 4)), seed=0),
    ],
    ids=["lengths", "labels", "missing_labels", "vectors"],
)
def test_small_samples_are_not_drifted_and_have_no_statistic(result: DriftResult) -> None:
    assert not result.drifted
    assert math.isnan(result.statistic)
    assert "too few" in result.detail


def test_embedding_drift_rejects_vectors_of_different_widths() -> None:
    with pytest.raises(ValueError, match="equal width"):
        embedding_drift(np.zeros((30, 4)), np.zeros((30, 5)), seed=0)
