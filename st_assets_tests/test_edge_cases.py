"""Edge-case probes: seeded, covering every kind, scored against each kind's expectation."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from st_assets.steps.edge_cases import (
    EXPECTATIONS,
    KINDS,
    edge_case_probes,
    edge_case_report,
    with_typos,
)


def _constant_encode(texts: list[str]) -> np.ndarray:
    """Every text at the same point: perfectly stable, blind to negation."""
    return np.ones((len(texts), 4))


def _random_encode(texts: list[str]) -> np.ndarray:
    """Every distinct text at its own random point: tells negation apart, stable under nothing."""
    rows = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")
        rows.append(np.random.default_rng(seed).normal(size=64))
    return np.stack(rows)


def test_probes_cover_every_kind_in_the_helpdesk_domain() -> None:
    probes = edge_case_probes()
    assert {probe.kind for probe in probes} == set(KINDS) == set(EXPECTATIONS)
    assert all(probe.original != probe.variant for probe in probes)
    negations = {(p.original, p.variant) for p in probes if p.kind == "negation"}
    assert ("I can log in to my account", "I can't log in to my account") in negations
    long_variant = next(p.variant for p in probes if p.kind == "very_long")
    assert len(long_variant.split()) > 256


def test_typos_are_seeded() -> None:
    assert edge_case_probes(seed=3) == edge_case_probes(seed=3)
    typos = {seed: [p.variant for p in edge_case_probes(seed) if p.kind == "typo"] for seed in (0, 1)}
    assert typos[0] != typos[1]


def test_a_typo_is_one_keyboard_slip_in_one_word() -> None:
    original = "Someone used my card without permission"
    slipped = with_typos(original, random.Random(0))
    changed = [(a, b) for a, b in zip(original.split(), slipped.split(), strict=True) if a != b]
    assert len(changed) == 1
    before, after = changed[0]
    assert abs(len(before) - len(after)) <= 1


def test_a_typo_always_changes_the_text() -> None:
    # Swapping the two c of "account" would leave it as it was.
    original = "I can't log in to my account"
    assert all(with_typos(original, random.Random(seed)) != original for seed in range(60))


def test_report_has_one_row_per_kind_with_counts_and_cosines() -> None:
    report = edge_case_report(_random_encode)
    assert report["kind"].tolist() == list(KINDS)
    assert {"n", "mean_cosine", "min_cosine", "max_cosine", "expectation", "passed"} <= set(report.columns)
    probes = edge_case_probes()
    assert report.set_index("kind")["n"].to_dict() == {
        kind: sum(p.kind == kind for p in probes) for kind in KINDS
    }
    assert (report["min_cosine"] <= report["mean_cosine"]).all()
    assert (report["mean_cosine"] <= report["max_cosine"]).all()


def test_a_model_blind_to_every_change_passes_stability_and_fails_negation() -> None:
    passed = edge_case_report(_constant_encode).set_index("kind")["passed"]
    assert not passed["negation"]
    assert passed.drop("negation").all()


def test_a_model_that_scatters_every_text_fails_stability_and_passes_negation() -> None:
    report = edge_case_report(_random_encode).set_index("kind")
    assert report.loc["negation", "passed"]
    assert not report.drop("negation")["passed"].any()
    # For negation the worst pair to read is the most similar one.
    negation = report.loc["negation"]
    assert negation["worst_variant"] in {p.variant for p in edge_case_probes() if p.kind == "negation"}


@pytest.mark.slow
def test_real_minilm_is_stable_on_surface_edits_but_blurs_negation() -> None:
    from st_assets.steps.models import encode_texts, load_model, resolve_base_model

    model = load_model(resolve_base_model("all-MiniLM-L6-v2"))
    report = edge_case_report(lambda texts: encode_texts(model, texts)).set_index("kind")
    assert report.loc["casing", "mean_cosine"] == pytest.approx(1.0, abs=1e-5)  # an uncased tokenizer
    assert report.drop("negation")["passed"].all()
    # The numbers noted beside EXPECTATIONS, so the thresholds' comments stay true.
    assert report.loc["negation", "mean_cosine"] == pytest.approx(0.897, abs=0.01)
    assert report.loc["typo", "mean_cosine"] == pytest.approx(0.780, abs=0.01)
    assert not report.loc["negation", "passed"]
