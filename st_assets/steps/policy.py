"""The retraining policy: new data is always ingested and embedded; training runs only when it should."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from st_assets.settings import Settings

# Fewer training texts than this on either side (earlier, new) make a domain classifier's AUC meaningless.
MIN_DRIFT_TEXTS = 20


@dataclass(frozen=True)
class RetrainDecision:
    """Whether to train now, and every reason in words (shown in the UI)."""

    train: bool
    reasons: tuple[str, ...]

    @property
    def summary(self) -> str:
        return ("train: " if self.train else "skip training: ") + "; ".join(self.reasons)


def decide_retraining(
    *,
    has_champion: bool,
    new_train_rows: int,
    drift_auc: float,
    champion_age_days: float | None,
    scheduled: bool,
    forced: bool,
    settings: Settings,
    changed_settings: Sequence[str] = (),
) -> RetrainDecision:
    """Train when there is no champion yet, when forced, when training settings changed since the last
    training (``changed_settings``), or on new data that is plentiful, drifted, or due (champion older
    than ``retrain_after_days``, or a scheduled run); otherwise never without new data."""
    if forced:
        return RetrainDecision(True, ("forced by run config",))
    if not has_champion:
        return RetrainDecision(True, ("no champion yet",))
    if changed_settings:
        return RetrainDecision(
            True, (f"training settings changed since the last training: {'; '.join(changed_settings)}",)
        )
    if new_train_rows == 0:
        return RetrainDecision(False, ("no new training rows since the last training",))
    reasons = []
    plenty = new_train_rows >= settings.retrain_min_new_pairs
    reasons.append(
        f"{new_train_rows} new training rows ({'≥' if plenty else '<'} {settings.retrain_min_new_pairs})"
    )
    drifted = not math.isnan(drift_auc) and drift_auc > settings.retrain_drift_auc
    reasons.append(
        f"drift AUC {drift_auc:.3f} ({'>' if drifted else '≤'} {settings.retrain_drift_auc})"
        if not math.isnan(drift_auc)
        else f"drift not measured (it needs {MIN_DRIFT_TEXTS} earlier and {MIN_DRIFT_TEXTS} new training texts)"
    )
    due = champion_age_days is not None and champion_age_days >= settings.retrain_after_days
    if champion_age_days is not None:
        reasons.append(
            f"champion is {champion_age_days:.1f} days old ({'≥' if due else '<'} {settings.retrain_after_days})"
        )
    if scheduled:
        reasons.append("scheduled retraining run")
    return RetrainDecision(plenty or drifted or due or scheduled, tuple(reasons))
