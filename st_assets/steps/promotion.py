"""The promotion gate: a challenger replaces the incumbent only when it is better and no more biased."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PromotionDecision:
    """Whether to promote, the scores compared, and every reason in words."""

    promote: bool
    challenger_score: float
    incumbent_score: float
    reasons: tuple[str, ...]

    @property
    def summary(self) -> str:
        verdict = "promoted" if self.promote else "rejected"
        return f"{verdict}: " + "; ".join(self.reasons)


def decide_promotion(
    challenger_score: float,
    incumbent_score: float,
    challenger_effect_sizes: dict[str, float],
    incumbent_effect_sizes: dict[str, float],
    margin: float,
    fairness_tolerance: float,
) -> PromotionDecision:
    """Promote when the primary score beats the incumbent's by more than ``margin`` and no association
    test's |effect size| grows by more than ``fairness_tolerance``."""
    reasons = []
    better = not math.isnan(challenger_score) and (
        math.isnan(incumbent_score) or challenger_score > incumbent_score + margin
    )
    reasons.append(
        f"primary score {challenger_score:.4f} vs incumbent {incumbent_score:.4f} "
        f"({'beats' if better else 'does not beat'} it by more than {margin})"
    )
    fair = True
    for test, effect in sorted(challenger_effect_sizes.items()):
        baseline = incumbent_effect_sizes.get(test)
        if baseline is None or math.isnan(effect) or math.isnan(baseline):
            continue
        growth = abs(effect) - abs(baseline)
        if growth > fairness_tolerance:
            fair = False
            reasons.append(f"|effect size| of {test} grew by {growth:.3f} (> tolerance {fairness_tolerance})")
    if fair:
        reasons.append(f"no association test's |effect size| grew by more than {fairness_tolerance}")
    return PromotionDecision(better and fair, challenger_score, incumbent_score, tuple(reasons))
