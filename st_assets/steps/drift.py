"""Statistics that say whether a new batch of training data differs from the history it joins.

Each test returns a :class:`DriftResult`; ``drifted`` is False (and the statistic NaN) when either
side is too small for the statistic to mean anything.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon

# Below this many items per side, a test would flag noise: it reports NaN and "not drifted".
MIN_SAMPLE = 20

# Lengths: both a significant KS test and a large effect, so huge samples don't flag trivial shifts.
LENGTH_P_VALUE = 0.01
LENGTH_MIN_STATISTIC = 0.2

# Labels: Jensen-Shannon distance (base 2) lies in [0, 1]; 0.3 is roughly a third of the mass moved. A
# small batch over many labels is that far from its history by chance alone, so a chi-square test of the
# two count vectors must reject the same distribution too.
LABEL_MAX_DISTANCE = 0.3
LABEL_P_VALUE = 0.01

# Embeddings: a domain classifier's cross-validated ROC AUC. 0.5 means it cannot tell the sides
# apart; 0.75 means a random new vector outscores a random reference vector 3 times in 4, a
# separation that does not come from sampling noise at a few dozen rows per side or more.
EMBEDDING_MAX_AUC = 0.75
EMBEDDING_MAX_ROWS = 2_000
EMBEDDING_FOLDS = 5
_TOP_LABELS = 3


@dataclass(frozen=True)
class DriftResult:
    """One drift test's outcome: its statistic, p-value (NaN when the test has none) and verdict."""

    statistic: float
    p_value: float
    threshold: float
    drifted: bool
    detail: str


def _too_small(threshold: float, sizes: tuple[int, int], what: str) -> DriftResult:
    return DriftResult(
        math.nan,
        math.nan,
        threshold,
        False,
        f"too few {what} to compare ({sizes[0]} history, {sizes[1]} batch; need {MIN_SAMPLE} each)",
    )


def length_drift(history_texts: Sequence[str], batch_texts: Sequence[str]) -> DriftResult:
    """Two-sample Kolmogorov-Smirnov test on character lengths.

    Drifted when p < ``LENGTH_P_VALUE`` and the KS statistic exceeds ``LENGTH_MIN_STATISTIC``.
    """
    if len(history_texts) < MIN_SAMPLE or len(batch_texts) < MIN_SAMPLE:
        return _too_small(LENGTH_MIN_STATISTIC, (len(history_texts), len(batch_texts)), "texts")
    history = np.array([len(text) for text in history_texts], dtype=float)
    batch = np.array([len(text) for text in batch_texts], dtype=float)
    result = stats.ks_2samp(history, batch)
    statistic, p_value = float(result.statistic), float(result.pvalue)
    drifted = p_value < LENGTH_P_VALUE and statistic > LENGTH_MIN_STATISTIC
    detail = (
        f"median length {np.median(batch):.0f} chars in batch vs {np.median(history):.0f} in history; "
        f"KS {statistic:.3f} (limit {LENGTH_MIN_STATISTIC}), p {p_value:.2g} (limit {LENGTH_P_VALUE})"
    )
    return DriftResult(statistic, p_value, LENGTH_MIN_STATISTIC, drifted, detail)


def _is_missing(label: object) -> bool:
    return label is None or (isinstance(label, float) and math.isnan(label))


def label_drift(history_labels: Sequence[Hashable], batch_labels: Sequence[Hashable]) -> DriftResult:
    """Jensen-Shannon distance (base 2) between the label frequencies of history and batch.

    Drifted when the distance exceeds ``LABEL_MAX_DISTANCE`` and a chi-square test of homogeneity gives
    p < ``LABEL_P_VALUE``. Frequencies are over the union of labels, so a label only one side has counts fully. Missing
    labels (None/NaN) are left out: validation quarantines them before any batch is compared.
    """
    history = Counter(label for label in history_labels if not _is_missing(label))
    batch = Counter(label for label in batch_labels if not _is_missing(label))
    history_total, batch_total = sum(history.values()), sum(batch.values())
    if history_total < MIN_SAMPLE or batch_total < MIN_SAMPLE:
        return _too_small(LABEL_MAX_DISTANCE, (history_total, batch_total), "labels")
    # Sorted by text so the order (and float rounding) never depends on arrival order.
    labels = sorted(history.keys() | batch.keys(), key=str)
    history_share = np.array([history[label] / history_total for label in labels])
    batch_share = np.array([batch[label] / batch_total for label in labels])
    distance = float(jensenshannon(history_share, batch_share, base=2))
    counts = np.array([[history[label] for label in labels], [batch[label] for label in labels]])
    p_value = float(stats.chi2_contingency(counts).pvalue) if len(labels) > 1 else 1.0
    gains = batch_share - history_share
    over = [i for i in np.argsort(-gains, kind="stable")[:_TOP_LABELS] if gains[i] > 0]
    named = ", ".join(
        f"{labels[i]!r} {batch_share[i]:.0%} of batch vs {history_share[i]:.0%} of history" for i in over
    )
    detail = (
        f"JS distance {distance:.3f} (limit {LABEL_MAX_DISTANCE}), chi-square p {p_value:.2g} (limit "
        f"{LABEL_P_VALUE}); most over-represented: {named or 'none'}"
    )
    drifted = distance > LABEL_MAX_DISTANCE and p_value < LABEL_P_VALUE
    return DriftResult(distance, p_value, LABEL_MAX_DISTANCE, drifted, detail)


def embedding_drift(reference: np.ndarray, new: np.ndarray, seed: int) -> DriftResult:
    """A domain classifier: how well logistic regression tells ``new`` vectors from ``reference`` ones.

    Each side's distinct vectors are subsampled (seeded) to the smaller side's size, at most
    ``EMBEDDING_MAX_ROWS``, so classes are balanced and cost stays bounded. The statistic is the ROC AUC of out-of-fold scores
    from 5-fold stratified cross-validation; drifted when it exceeds ``EMBEDDING_MAX_AUC``. The p-value
    is the one-sided Mann-Whitney test on those scores (AUC = U / n1 n2), approximate because the
    folds' models differ.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    reference, new = np.asarray(reference, dtype=float), np.asarray(new, dtype=float)
    if reference.ndim != 2 or new.ndim != 2 or reference.shape[1] != new.shape[1]:
        raise ValueError(
            f"embedding_drift expects two 2-D arrays of equal width, got shapes {reference.shape} and {new.shape}"
        )
    # Repeats of one vector (one anchor in many rows) would land in different folds, where the
    # classifier recognises them rather than the side's distribution: each side counts distinct vectors.
    reference, new = np.unique(reference, axis=0), np.unique(new, axis=0)
    if len(reference) < MIN_SAMPLE or len(new) < MIN_SAMPLE:
        return _too_small(EMBEDDING_MAX_AUC, (len(reference), len(new)), "distinct vectors")
    rng = np.random.default_rng(seed)
    rows = min(len(reference), len(new), EMBEDDING_MAX_ROWS)
    sampled_reference = reference[np.sort(rng.choice(len(reference), rows, replace=False))]
    sampled_new = new[np.sort(rng.choice(len(new), rows, replace=False))]
    features = np.vstack([sampled_reference, sampled_new])
    is_new = np.repeat([0, 1], rows)
    # Scaling keeps lbfgs well conditioned whatever the embedding's norm.
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1_000))
    folds = StratifiedKFold(n_splits=EMBEDDING_FOLDS, shuffle=True, random_state=seed)
    scores = cross_val_predict(classifier, features, is_new, cv=folds, method="decision_function")
    auc = float(roc_auc_score(is_new, scores))
    p_value = float(
        stats.mannwhitneyu(scores[is_new == 1], scores[is_new == 0], alternative="greater").pvalue
    )
    detail = (
        f"domain classifier ROC AUC {auc:.3f} on {rows} vectors per side (0.5 = indistinguishable, "
        f"limit {EMBEDDING_MAX_AUC}), p {p_value:.2g}"
    )
    return DriftResult(auc, p_value, EMBEDDING_MAX_AUC, auc > EMBEDDING_MAX_AUC, detail)
