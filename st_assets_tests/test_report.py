"""The standalone HTML report: every section present, charts inline, user text escaped, written atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest

from st_assets.steps.report import LIMITS_NOTE, render_html_report, write_html_report

MODELS = [("base", "base"), ("challenger", "v-20240601-abc"), ("champion", "v-20240501-def")]


def _evaluation() -> pd.DataFrame:
    rows = []
    for i, (role, version) in enumerate(MODELS):
        rows += [
            {
                "model_version": version,
                "role": role,
                "dataset": "labelled_texts",
                "metric": "knn_accuracy",
                "value": 0.7 + i / 20,
                "ci_low": 0.65 + i / 20,
                "ci_high": 0.75 + i / 20,
            },
            {
                "model_version": version,
                "role": role,
                "dataset": "scored",
                "metric": "spearman",
                "value": -0.1 + i / 5,
                "ci_low": -0.3 + i / 5,
                "ci_high": 0.1 + i / 5,
            },
            {
                "model_version": version,
                "role": role,
                "dataset": "binary",
                "metric": "threshold",
                "value": 0.5,
                "ci_low": math.nan,
                "ci_high": math.nan,
            },
        ]
    return pd.DataFrame(rows)


def _fairness() -> pd.DataFrame:
    rows = []
    for i, (role, version) in enumerate(MODELS):
        rows += [
            {
                "model_version": version,
                "role": role,
                "test": "seat_gender_career",
                "metric": "effect_size",
                "value": 0.4 - i / 2,
            },
            {
                "model_version": version,
                "role": role,
                "test": "seat_gender_career",
                "metric": "p_value",
                "value": 0.03,
            },
            {
                "model_version": version,
                "role": role,
                "test": "<script>alert('x')</script>",
                "metric": "effect_size",
                "value": 0.1,
            },
            {
                "model_version": version,
                "role": role,
                "test": "counterfactual_invariance",
                "metric": "mean_cosine",
                "value": math.nan,
            },
        ]
    return pd.DataFrame(rows)


def _edge_cases() -> pd.DataFrame:
    rows = []
    for role, version in MODELS[:2]:
        rows += [
            {"kind": "negation", "n": 8, "mean_cosine": 0.897, "min_cosine": 0.845, "expectation": "mean cosine <= 0.85",
             "passed": False, "worst_variant": "I can't log in", "model_version": version, "role": role},
            {"kind": "emoji", "n": 8, "mean_cosine": 0.934, "min_cosine": 0.904, "expectation": "mean cosine >= 0.8",
             "passed": True, "worst_variant": "I forgot my PIN 🔒", "model_version": version, "role": role},
        ]  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture
def page() -> str:
    return render_html_report(
        "Evaluation of v-20240601-abc",
        _evaluation(),
        _fairness(),
        _edge_cases(),
        ["primary score 0.8000 vs incumbent 0.7500: difference +0.0500 beats the margin 0.01"],
        LIMITS_NOTE,
    )


def test_the_report_names_every_metric_model_and_test(page: str) -> None:
    for name in ("knn_accuracy", "spearman", "labelled_texts", "seat_gender_career", "effect size"):
        assert name in page
    for role, version in MODELS:
        assert role in page and version in page
    assert "beats the margin 0.01" in page
    assert "I forgot my PIN 🔒" in page


def test_the_report_draws_inline_svg_charts_with_ci_whiskers(page: str) -> None:
    # One chart per (dataset, metric) and one per association test's effect size.
    assert page.count("<svg") == 3 + 2
    assert "[0.650, 0.750]" in page  # the base model's knn_accuracy CI, on the chart and in the table


def test_the_report_is_standalone(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page  # no scripts at all, including the escaped test name below
    assert "src=" not in page and "<link" not in page and "@import" not in page


def test_user_text_is_escaped(page: str) -> None:
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_the_report_states_its_limits(page: str) -> None:
    assert "can show bias" in LIMITS_NOTE and "does not prove" in LIMITS_NOTE
    assert LIMITS_NOTE in page


def test_a_custom_limits_note_is_escaped_into_the_page() -> None:
    page = render_html_report("t", pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), [], "A & B <i>")
    assert "A &amp; B &lt;i&gt;" in page
    assert "No evaluation rows." in page


def test_writing_the_report_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "reports" / "v1.html"
    write_html_report(target, "<p>old</p>")
    write_html_report(target, "<p>new</p>")
    assert target.read_text(encoding="utf-8") == "<p>new</p>"
    assert os.listdir(target.parent) == ["v1.html"]
    assert target.stat().st_mode & 0o044  # readable beyond its owner


def test_a_failed_write_keeps_the_old_report(tmp_path: Path) -> None:
    target = tmp_path / "v1.html"
    write_html_report(target, "<p>old</p>")
    with pytest.raises(UnicodeEncodeError):
        write_html_report(target, "\ud800")  # a lone surrogate cannot be written as UTF-8
    assert target.read_text(encoding="utf-8") == "<p>old</p>"
    assert os.listdir(tmp_path) == ["v1.html"]


def test_groups_and_models_get_their_own_tables_with_user_text_escaped() -> None:
    groups = pd.DataFrame(
        [
            {"model_version": version, "role": role, "dataset": "scored", "metric": "spearman",
             "group_name": name, "value": value, "ci_low": value - 0.1, "ci_high": value + 0.1, "eval_rows": 12}
            for role, version in MODELS[:2]
            for name, value in (("en-GB", 0.8), ("<b>tier</b>", 0.6))
        ]
    )  # fmt: skip
    models = pd.DataFrame(
        [
            {"role": "base", "version": "base", "loss": "—", "augment": "—"},
            {"role": "challenger", "version": MODELS[1][1], "loss": "CosineSimilarityLoss", "augment": "counterfactual"},
        ]
    )  # fmt: skip
    page = render_html_report(
        "t", _evaluation(), _fairness(), _edge_cases(), [], groups=groups, models=models
    )
    assert "Metrics per group" in page and "Models compared" in page
    assert "0.600 [0.500, 0.700]" in page and "counterfactual" in page
    assert "&lt;b&gt;tier&lt;/b&gt;" in page and "<b>tier" not in page
    # Sections stay absent when there is nothing to show.
    plain = render_html_report("t", _evaluation(), _fairness(), _edge_cases(), [])
    assert "Metrics per group" not in plain and "Models compared" not in plain
