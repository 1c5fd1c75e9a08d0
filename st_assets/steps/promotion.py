"""The promotion gate: a challenger replaces the incumbent only when it is better and no more biased."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from st_assets.steps.evaluate import MIN_INTERVAL_ROWS, ScoreDifference


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


def _score_reasons(comparison: ScoreDifference, margin: float, left_out_rows: int) -> tuple[bool, list[str]]:
    """Whether the challenger beats the incumbent by more than ``margin`` with a CI above zero."""
    left_out = (
        [f"{left_out_rows} eval rows the incumbent trained on (the split moved since) were left out"]
        if left_out_rows
        else []
    )
    if math.isnan(comparison.difference):
        return False, [
            *left_out,
            "no primary score to compare: no eval row left that both models could be scored on"
            if left_out_rows
            else "no primary score to compare: the eval split has no metric both models could be scored on",
        ]
    better = comparison.difference > margin
    # NaN bounds (no bootstrap was run, too few rows) compare False: without a CI there is no evidence of
    # a real gain.
    certain = comparison.rows >= MIN_INTERVAL_ROWS and comparison.ci_low > 0
    interval = (
        f"only {comparison.rows} eval rows were compared: too few for a CI of the difference (at least "
        f"{MIN_INTERVAL_ROWS}), so there is no evidence of a real gain"
        if comparison.rows < MIN_INTERVAL_ROWS
        else f"90% CI of the difference [{comparison.ci_low:+.4f}, {comparison.ci_high:+.4f}] "
        f"{'lies above zero' if certain else 'does not lie above zero'} (a one-sided 95% test)"
    )
    return better and certain, [
        *left_out,
        f"primary score {comparison.challenger_score:.4f} vs incumbent {comparison.incumbent_score:.4f}: "
        f"difference {comparison.difference:+.4f} {'beats' if better else 'does not beat'} the margin {margin}",
        interval,
    ]


def _fairness_reasons(
    challenger_effect_sizes: Mapping[str, float],
    incumbent_effect_sizes: Mapping[str, float],
    tolerance: float,
) -> tuple[bool, list[str]]:
    """Whether no association test's |effect size| grew by more than ``tolerance``.

    An incumbent with no results at all (its fairness report is missing) blocks: nothing was compared.
    """
    if challenger_effect_sizes and not incumbent_effect_sizes:
        return False, [
            "the incumbent has no association-test results to compare with; materialise fairness_report"
        ]
    reasons = []
    for test, effect in sorted(challenger_effect_sizes.items()):
        baseline = incumbent_effect_sizes.get(test)
        # A test one model could not score (NaN, all s(w) equal) or the incumbent never ran gives no evidence.
        if baseline is None or math.isnan(effect) or math.isnan(baseline):
            continue
        growth = abs(effect) - abs(baseline)
        if growth > tolerance:
            reasons.append(
                f"|effect size| of {test} grew by {growth:.3f} ({baseline:+.3f} to {effect:+.3f}; "
                f"tolerance {tolerance})"
            )
    if reasons:
        return False, reasons
    return True, [f"no association test's |effect size| grew by more than {tolerance}"]


def _invariance_reason(invariance: float, swapped_texts: int, threshold: float) -> tuple[bool, str]:
    """Whether counterfactual invariance reaches ``threshold``; NaN with nothing swapped does not block,
    NaN over swapped texts (the model's vectors were not numbers) does."""
    if math.isnan(invariance):
        if swapped_texts:
            return False, f"counterfactual invariance is NaN over {swapped_texts} swapped texts"
        return True, "counterfactual invariance not measured: no eval text contains a gendered term to swap"
    if invariance >= threshold:
        return True, f"counterfactual invariance {invariance:.3f} meets the threshold {threshold}"
    return False, f"counterfactual invariance {invariance:.3f} is below the threshold {threshold}"


def decide_promotion(
    comparison: ScoreDifference,
    challenger_effect_sizes: Mapping[str, float],
    incumbent_effect_sizes: Mapping[str, float],
    challenger_invariance: float,
    *,
    swapped_texts: int = 0,
    left_out_rows: int = 0,
    margin: float,
    fairness_tolerance: float,
    invariance_threshold: float,
) -> PromotionDecision:
    """Promote only when all hold: the primary score beats the incumbent's by more than ``margin``; the
    90% CI of that difference lies above zero (a one-sided 95% test that it is better); no association
    test's |effect size| grows by more than ``fairness_tolerance``; the challenger's
    counterfactual-invariance mean cosine is at least ``invariance_threshold`` (NaN blocks only when
    ``swapped_texts`` were swapped: with no eval text holding a term to swap, there is nothing to
    measure). ``left_out_rows`` eval rows the incumbent trained
    on were left out of ``comparison``; the reasons say so.

    Every check adds a reason, passed or not, so the summary explains a promotion as well as a rejection.
    """
    better, score_reasons = _score_reasons(comparison, margin, left_out_rows)
    fair, fairness_reasons = _fairness_reasons(
        challenger_effect_sizes, incumbent_effect_sizes, fairness_tolerance
    )
    invariant, invariance_reason = _invariance_reason(
        challenger_invariance, swapped_texts, invariance_threshold
    )
    return PromotionDecision(
        promote=better and fair and invariant,
        challenger_score=comparison.challenger_score,
        incumbent_score=comparison.incumbent_score,
        reasons=(*score_reasons, *fairness_reasons, invariance_reason),
    )
