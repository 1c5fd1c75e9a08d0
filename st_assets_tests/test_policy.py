"""The retraining policy: when new data should (and should not) start a training run."""

from __future__ import annotations

import math

from st_assets.settings import Settings
from st_assets.steps.policy import decide_retraining

SETTINGS = Settings(retrain_min_new_pairs=200, retrain_drift_auc=0.75, retrain_after_days=7)


def _decide(**overrides: object) -> tuple[bool, str]:
    arguments = dict(
        has_champion=True,
        new_train_rows=10,
        drift_auc=0.55,
        champion_age_days=1.0,
        scheduled=False,
        forced=False,
        settings=SETTINGS,
    )
    arguments.update(overrides)
    decision = decide_retraining(**arguments)
    return decision.train, decision.summary


def test_a_first_run_always_trains() -> None:
    assert _decide(has_champion=False, new_train_rows=0)[0]


def test_a_small_fresh_batch_does_not_retrain_and_says_why() -> None:
    train, summary = _decide()
    assert not train
    assert "10 new training rows (< 200)" in summary and "drift AUC 0.550" in summary


def test_enough_new_rows_retrain() -> None:
    assert _decide(new_train_rows=250)[0]


def test_drifted_new_texts_retrain_even_when_few() -> None:
    train, summary = _decide(drift_auc=0.9)
    assert train and "> 0.75" in summary


def test_an_old_champion_or_a_scheduled_run_retrains_on_any_new_data() -> None:
    assert _decide(champion_age_days=8.0)[0]
    assert _decide(scheduled=True)[0]


def test_nothing_new_never_retrains_unless_forced() -> None:
    assert not _decide(new_train_rows=0, scheduled=True, champion_age_days=30.0)[0]
    assert _decide(new_train_rows=0, forced=True)[0]


def test_unmeasured_drift_is_reported_not_counted() -> None:
    train, summary = _decide(drift_auc=math.nan)
    assert not train and "drift not measured" in summary
