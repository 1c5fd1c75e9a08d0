"""Held-out evaluation: the metrics that fit each pair format, with bootstrap CIs, for any encode function."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from st_assets.steps.formats import PairFormat
from st_assets.steps.split import normalise_text

Encode = Callable[[list[str]], np.ndarray]

# Maps a (resamples, n) matrix of eval-example indices to one metric value per resample; the
# identity row ``arange(n)`` gives the point estimate, so both come from the same code.
_Statistic = Callable[[np.ndarray], np.ndarray]

# The metric that decides promotion, per format. Unlabelled text has none of its own.
PRIMARY_METRIC: dict[PairFormat, str] = {
    PairFormat.SCORED: "spearman",
    PairFormat.BINARY: "average_precision",
    PairFormat.TRIPLET: "accuracy",
    PairFormat.ANCHOR_POSITIVE: "mrr@10",
    PairFormat.LABELLED_TEXTS: "knn_accuracy",
}

CONFIDENCE = 0.95
# The gate asks one question, "is the challenger better?": the lower end of a two-sided 90% interval is
# a one-sided 95% bound, the usual level for that test (a 95% interval's lower end tests at 97.5%).
GATE_CONFIDENCE = 0.90
# Fewer rows than this give no interval: with one row every resample is that row, and the "CI" is a point.
MIN_INTERVAL_ROWS = 10

# Resamples are drawn in blocks of at most this many indices, so a large eval split never needs a
# (n_boot, n) matrix (and its float intermediates) all at once.
_MAX_BLOCK_CELLS = 1 << 20


@dataclass(frozen=True)
class Metric:
    """One number about one model on one held-out dataset (a pair format), with its 95% bootstrap CI.

    The CI is NaN for a metric that is not resampled (the binary threshold comes from training data)
    or when no bootstrap was run. ``group`` is set for a metric of one group's eval rows only.
    """

    dataset: str
    metric: str
    value: float
    rows: int
    ci_low: float = math.nan
    ci_high: float = math.nan
    group: str | None = None


@dataclass(frozen=True)
class ScoreDifference:
    """Challenger vs incumbent primary score on the same eval rows, with a paired-bootstrap 90% CI (its
    lower end a one-sided 95% bound)."""

    challenger_score: float
    incumbent_score: float
    difference: float
    ci_low: float
    ci_high: float
    rows: int


@dataclass(frozen=True)
class _FormatScores:
    """One model on one format's eval rows: per-example statistics the bootstrap can resample."""

    pair_format: PairFormat
    # The units scored and resampled: eval rows; distinct anchors for anchor_positive; distinct (anchor,
    # positive) for triplets.
    rows: int
    statistics: dict[str, _Statistic]
    # Numbers fixed before evaluation (the binary threshold, chosen on training pairs): no CI.
    constants: dict[str, float]
    # Each unit's group (None where its row has none), when the rows carry a group column.
    groups: np.ndarray | None = None
    # The eval row each unit stands for (its first), when units are not rows; else None.
    units: np.ndarray | None = None


class EmbeddingCache:
    """Encodes each distinct text once per model."""

    def __init__(self, encode: Encode) -> None:
        self._encode = encode
        self._vectors: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(text for text in texts if text not in self._vectors))
        if missing:
            self._vectors.update(zip(missing, self._encode(missing), strict=True))
        return np.stack([self._vectors[text] for text in texts]) if texts else np.zeros((0, 0), np.float32)


def _cached(encode: Encode) -> EmbeddingCache:
    return encode if isinstance(encode, EmbeddingCache) else EmbeddingCache(encode)


# ---------------------------------------------------------------------------------------------------------
# Vectorised statistics: each takes (resamples, n) arrays and returns (resamples,)


def _is_constant(values: np.ndarray) -> np.ndarray:
    # Comparing extremes, not the variance: a float mean of equal values can leave ~1e-17 residues.
    return values.max(axis=1) == values.min(axis=1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x_centred = x - x.mean(axis=1, keepdims=True)
    y_centred = y - y.mean(axis=1, keepdims=True)
    numerator = (x_centred * y_centred).sum(axis=1)
    denominator = np.sqrt((x_centred**2).sum(axis=1) * (y_centred**2).sum(axis=1))
    defined = ~(_is_constant(x) | _is_constant(y)) & (denominator > 0)
    # A model whose cosines are all equal (collapsed) explains none of the gold order: 0, not NaN, so
    # one such format cannot make the whole primary score NaN. Gold scores all equal, or cosines that
    # are not numbers (a broken model), stay undefined.
    undefined = np.where(_is_constant(y) | ~np.isfinite(x).all(axis=1), np.nan, 0.0)
    return np.divide(numerator, denominator, out=undefined, where=defined)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Average ranks for ties, as scipy.stats.spearmanr; a resample repeats examples, so ties are common.
    return _pearson_rows(rankdata(x, axis=1), rankdata(y, axis=1))


def _average_precision_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Average precision per row, treating a run of tied scores as one threshold (as scikit-learn does)."""
    n = scores.shape[1]
    order = np.argsort(-scores, axis=1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    sorted_labels = np.take_along_axis(labels, order, axis=1)
    precision = np.cumsum(sorted_labels, axis=1) / np.arange(1, n + 1)
    run_ends = np.ones_like(sorted_scores, dtype=bool)
    run_ends[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    # Each position takes the precision at the end of its tie run: the nearest run end at or after it.
    end_index = np.where(run_ends, np.arange(n), n)
    end_index = np.minimum.accumulate(end_index[:, ::-1], axis=1)[:, ::-1]
    precision_at_threshold = np.take_along_axis(precision, end_index, axis=1)
    positives = sorted_labels.sum(axis=1)
    return np.divide(
        (sorted_labels * precision_at_threshold).sum(axis=1),
        positives,
        out=np.full(len(scores), np.nan),
        where=positives > 0,
    )


def _f1_rows(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    true_positives = (predicted & labels).sum(axis=1)
    wrong = (predicted != labels).sum(axis=1)
    denominator = 2 * true_positives + wrong
    # No positives predicted or present: 0, as scikit-learn's default zero_division.
    return np.divide(2 * true_positives, denominator, out=np.zeros(len(labels)), where=denominator > 0)


def _mean_of(values: np.ndarray) -> _Statistic:
    return lambda indices: values[indices].mean(axis=1)


def _weighted_mean_of(values: np.ndarray, weights: np.ndarray) -> _Statistic:
    return lambda indices: (values[indices] * weights[indices]).sum(axis=1) / weights[indices].sum(axis=1)


def _paired(
    function: Callable[[np.ndarray, np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray
) -> _Statistic:
    return lambda indices: function(x[indices], y[indices])


# ---------------------------------------------------------------------------------------------------------
# Per-example scores of one model on one format


def _row_cosines(encode: Encode, left: list[str], right: list[str]) -> np.ndarray:
    return np.einsum("ij,ij->i", encode(left), encode(right))


# Query x corpus similarities are computed this many cells at a time, never as one matrix.
_RANKING_BLOCK_CELLS = 1 << 22


def _top_matches(
    query_vectors: np.ndarray, corpus_vectors: np.ndarray, k: int = 10, excluded: np.ndarray | None = None
) -> np.ndarray:
    """Per query, the corpus positions of its ``k`` most similar texts, most similar first; ``excluded``
    names per query one corpus position ranked last (its own text), or -1.

    In blocks of queries, so time and memory grow with the corpus, not with queries x corpus at once.
    """
    k = min(k, len(corpus_vectors))
    block = max(1, _RANKING_BLOCK_CELLS // max(1, len(corpus_vectors)))
    tops = []
    for start in range(0, len(query_vectors), block):
        similarities = query_vectors[start : start + block] @ corpus_vectors.T
        if excluded is not None:
            own = excluded[start : start + block]
            (queries,) = np.nonzero(own >= 0)
            similarities[queries, own[queries]] = -np.inf
        top = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(similarities, top, axis=1), axis=1, kind="stable")
        tops.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(tops) if tops else np.zeros((0, k), dtype=np.int64)


def _ranking_scores(hits: np.ndarray, relevant_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query MRR@10, NDCG@10 and Recall@1/5/10 from whether each of a query's top 10 is relevant
    and how many corpus texts are relevant to it."""
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), -1)
    reciprocal_ranks = np.where(first_hit >= 0, 1.0 / (np.maximum(first_hit, 0) + 1), 0.0)
    discounts = 1.0 / np.log2(np.arange(2, 2 + hits.shape[1]))
    ideal = np.array([discounts[: min(count, 10)].sum() for count in relevant_counts])
    ndcg = np.divide((hits * discounts).sum(axis=1), ideal, out=np.zeros(len(ideal)), where=ideal > 0)
    scores = {"mrr@10": reciprocal_ranks, "ndcg@10": ndcg}
    for k in (1, 5, 10):
        scores[f"recall@{k}"] = hits[:, :k].sum(axis=1) / np.maximum(relevant_counts, 1)
    return scores


def _best_threshold(cosines: np.ndarray, labels: np.ndarray) -> float:
    """The cosine cut-off with the best accuracy on training pairs (midway between observed values)."""
    observed = np.unique(cosines)
    candidates = np.concatenate(
        [[observed[0] - 1e-6], (observed[:-1] + observed[1:]) / 2, [observed[-1] + 1e-6]]
    )
    accuracies = [np.mean((cosines >= threshold) == labels) for threshold in candidates]
    return float(candidates[int(np.argmax(accuracies))])


def _score_format(
    pair_format: PairFormat, eval_rows: pd.DataFrame, train_rows: pd.DataFrame, encode: Encode
) -> _FormatScores | None:
    """Per-example scores of one model on one format's eval rows (train rows serve as corpus or threshold
    data); None when the format has no metric on these rows."""
    rows = len(eval_rows)
    if pair_format is PairFormat.SCORED:
        gold = eval_rows["score"].to_numpy(dtype=np.float64)
        if rows < 3 or np.ptp(gold) == 0:
            return None
        cosines = _row_cosines(encode, eval_rows["sentence1"].tolist(), eval_rows["sentence2"].tolist())
        cosines = cosines.astype(np.float64)
        statistics = {
            "spearman": _paired(_spearman_rows, cosines, gold),
            "pearson": _paired(_pearson_rows, cosines, gold),
        }
        return _FormatScores(pair_format, rows, statistics, {})
    if pair_format is PairFormat.BINARY:
        # A seeded sample, not the first rows: files come in name order, and one file may hold one class.
        train_sample = train_rows.sample(n=min(2000, len(train_rows)), random_state=0)
        threshold = (
            _best_threshold(
                _row_cosines(encode, train_sample["sentence1"].tolist(), train_sample["sentence2"].tolist()),
                train_sample["score"].to_numpy() == 1,
            )
            if len(train_sample)
            else 0.5
        )
        cosines = _row_cosines(encode, eval_rows["sentence1"].tolist(), eval_rows["sentence2"].tolist())
        cosines = cosines.astype(np.float64)
        labels = eval_rows["score"].to_numpy() == 1
        predicted = cosines >= threshold
        statistics = {
            "accuracy": _mean_of((predicted == labels).astype(np.float64)),
            "f1": _paired(_f1_rows, predicted, labels),
        }
        # Average precision needs both classes among the eval pairs.
        if 0 < labels.sum() < len(labels):
            statistics["average_precision"] = _paired(_average_precision_rows, cosines, labels)
        return _FormatScores(pair_format, rows, statistics, {"threshold": threshold})
    if pair_format is PairFormat.TRIPLET:
        anchors = eval_rows["sentence1"].tolist()
        positive = _row_cosines(encode, anchors, eval_rows["sentence2"].tolist())
        negative = _row_cosines(encode, anchors, eval_rows["negative"].tolist())
        # One unit per (anchor, positive): its negatives are not independent draws, so the bootstrap
        # resamples the unit with all its rows (accuracy stays the share of rows right).
        keys = pd.Series(
            [
                (normalise_text(a), normalise_text(p))
                for a, p in zip(anchors, eval_rows["sentence2"], strict=True)
            ]
        )
        unit_of_row, _ = pd.factorize(keys)
        right = np.bincount(unit_of_row, weights=(positive > negative).astype(float))
        size = np.bincount(unit_of_row).astype(float)
        return _FormatScores(
            pair_format,
            len(size),
            {"accuracy": _weighted_mean_of(right / size, size)},
            {},
            units=np.unique(unit_of_row, return_index=True)[1],
        )
    if pair_format is PairFormat.ANCHOR_POSITIVE:
        # Texts compare as the split compares them (normalise_text): answers differing in case are one
        # corpus text, and an anchor written twice is one query.
        anchor_keys = [normalise_text(text) for text in eval_rows["sentence1"]]
        answer_keys = [normalise_text(text) for text in eval_rows["sentence2"]]
        corpus_text: dict[str, str] = {}
        for key, text in zip(answer_keys, eval_rows["sentence2"], strict=True):
            corpus_text.setdefault(key, text)
        position = {key: index for index, key in enumerate(corpus_text)}
        # Every answer of an anchor is a right one. Each distinct anchor is one query, and the unit the
        # bootstrap resamples: its rows share one ranking, and counting an anchor with k answers k times
        # would narrow the interval as if they were k independent queries.
        positives_of: dict[str, set[int]] = {}
        first_row: dict[str, int] = {}
        for row, (anchor, answer) in enumerate(zip(anchor_keys, answer_keys, strict=True)):
            positives_of.setdefault(anchor, set()).add(position[answer])
            first_row.setdefault(anchor, row)
        queries = list(first_row)
        # A query that is also another row's answer does not find itself: that is no retrieval.
        own_text = np.array([position.get(anchor, -1) for anchor in queries])
        top = _top_matches(
            encode([eval_rows["sentence1"].iloc[first_row[anchor]] for anchor in queries]),
            encode(list(corpus_text.values())),
            excluded=own_text,
        )
        hits = np.array(
            [
                [int(match) in positives_of[anchor] for match in matches]
                for anchor, matches in zip(queries, top, strict=True)
            ],
            dtype=bool,
        ).reshape(top.shape)
        per_query = _ranking_scores(hits, np.array([len(positives_of[anchor]) for anchor in queries]))
        return _FormatScores(
            pair_format,
            len(queries),
            {name: _mean_of(v) for name, v in per_query.items()},
            {},
            units=np.array([first_row[anchor] for anchor in queries]),
        )
    if pair_format is PairFormat.LABELLED_TEXTS:
        if train_rows.empty:
            return None
        top = _top_matches(encode(eval_rows["sentence1"].tolist()), encode(train_rows["sentence1"].tolist()))
        train_labels = train_rows["label"].to_numpy()
        eval_labels = eval_rows["label"].to_numpy()
        hits = train_labels[top] == eval_labels[:, None]
        texts_of_label = train_rows["label"].value_counts()
        relevant_counts = texts_of_label.reindex(eval_labels, fill_value=0).to_numpy()
        per_query = {
            "knn_accuracy": hits[:, 0].astype(np.float64),
            **_ranking_scores(hits, relevant_counts),
        }
        return _FormatScores(pair_format, rows, {name: _mean_of(v) for name, v in per_query.items()}, {})
    return None


def _score_formats(validated_pairs: pd.DataFrame, encode: Encode) -> list[_FormatScores]:
    """Per-example scores of one model on the eval split of every format present, in format order."""
    encode = _cached(encode)
    scored = []
    for pair_format_value, rows in validated_pairs.groupby("format", sort=True):
        eval_rows = rows[rows["split"] == "eval"]
        if eval_rows.empty:
            continue
        scores = _score_format(
            PairFormat(pair_format_value), eval_rows, rows[rows["split"] == "train"], encode
        )
        if scores is not None:
            if "group_name" in eval_rows.columns:
                groups = eval_rows["group_name"].to_numpy(dtype=object)
                scores = replace(scores, groups=groups if scores.units is None else groups[scores.units])
            scored.append(scores)
    return scored


# ---------------------------------------------------------------------------------------------------------
# Bootstrap


def _resamples(pair_format: PairFormat, rows: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of resampled eval-row indices; the same (format, rows, seed) always gives the same blocks,
    so every model evaluated on a format sees the same resamples (a paired bootstrap)."""
    # Seeding per format keeps one format's resamples unchanged when another format's data changes.
    rng = np.random.default_rng([seed, list(PairFormat).index(pair_format)])
    block = max(1, _MAX_BLOCK_CELLS // rows)
    for start in range(0, n_boot, block):
        yield rng.integers(0, rows, size=(min(block, n_boot - start), rows))


def _bootstrap(
    scores: _FormatScores, statistics: dict[str, _Statistic], n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """``n_boot`` resampled values of each statistic, all computed on the same resamples."""
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in statistics}
    for indices in _resamples(scores.pair_format, scores.rows, n_boot, seed):
        for name, statistic in statistics.items():
            blocks[name].append(statistic(indices))
    return {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in blocks.items()}


def _percentile_interval(
    values: np.ndarray, rows: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The percentile interval of the resampled ``values`` of a statistic over ``rows`` eval rows; NaN
    below ``MIN_INTERVAL_ROWS`` rows."""
    # Resamples where a metric is undefined (one class only, constant gold scores) are left out.
    finite = values[np.isfinite(values)]
    if not finite.size or rows < MIN_INTERVAL_ROWS:
        return math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def _check_resamples(n_boot: int) -> None:
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0 (0 skips the bootstrap), got {n_boot}")


def _point(statistic: _Statistic, rows: int) -> float:
    return float(statistic(np.arange(rows)[None, :])[0])


def evaluate_model(
    validated_pairs: pd.DataFrame, encode: Encode, *, n_boot: int = 1000, seed: int = 0
) -> list[Metric]:
    """Every metric of one model on the eval split of every format present, with percentile-bootstrap
    95% CIs over ``n_boot`` resamples of the eval examples (queries, pairs, triplets); ``n_boot=0`` skips
    the bootstrap and leaves the CIs NaN."""
    _check_resamples(n_boot)
    metrics = []
    for scores in _score_formats(validated_pairs, encode):
        resampled = _bootstrap(scores, scores.statistics, n_boot, seed)
        dataset = scores.pair_format.value
        for name, statistic in scores.statistics.items():
            low, high = _percentile_interval(resampled[name], scores.rows)
            metrics.append(Metric(dataset, name, _point(statistic, scores.rows), scores.rows, low, high))
        metrics += [Metric(dataset, name, value, scores.rows) for name, value in scores.constants.items()]
    return metrics


def _primaries(metrics: list[Metric]) -> list[Metric]:
    return [m for m in metrics if PRIMARY_METRIC.get(PairFormat(m.dataset)) == m.metric]


def primary_score(metrics: list[Metric]) -> float:
    """The number promotion compares: each format's primary metric, weighted by its eval rows."""
    total_rows = primary_rows(metrics)
    if not total_rows:
        return float("nan")
    return sum(m.value * m.rows for m in _primaries(metrics)) / total_rows


def primary_rows(metrics: list[Metric]) -> int:
    """The eval rows the primary score weighs: those of formats with a primary metric to score."""
    return sum(m.rows for m in _primaries(metrics))


def compare_to_incumbent(
    validated_pairs: pd.DataFrame, challenger: Encode, incumbent: Encode, n_boot: int = 1000, seed: int = 0
) -> ScoreDifference:
    """Challenger minus incumbent primary score (as ``primary_score``), with a paired, stratified bootstrap
    90% CI (``GATE_CONFIDENCE``): each resample draws eval rows within each format and scores both models
    on the same rows.

    Pass the ``EmbeddingCache`` already used for ``evaluate_model`` to avoid encoding again.
    """
    _check_resamples(n_boot)
    challenger_scores = {s.pair_format: s for s in _score_formats(validated_pairs, challenger)}
    incumbent_scores = {s.pair_format: s for s in _score_formats(validated_pairs, incumbent)}
    weighted = {"challenger": 0.0, "incumbent": 0.0}
    resampled = {"challenger": np.zeros(n_boot), "incumbent": np.zeros(n_boot)}
    total_rows = 0
    for pair_format, scores in challenger_scores.items():
        metric = PRIMARY_METRIC.get(pair_format)
        other = incumbent_scores.get(pair_format)
        if metric not in scores.statistics or other is None or metric not in other.statistics:
            continue
        statistics = {"challenger": scores.statistics[metric], "incumbent": other.statistics[metric]}
        values = _bootstrap(scores, statistics, n_boot, seed)
        for role, statistic in statistics.items():
            weighted[role] += _point(statistic, scores.rows) * scores.rows
            resampled[role] += values[role] * scores.rows
        total_rows += scores.rows
    if not total_rows:
        return ScoreDifference(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
    challenger_score = weighted["challenger"] / total_rows
    incumbent_score = weighted["incumbent"] / total_rows
    low, high = _percentile_interval(
        (resampled["challenger"] - resampled["incumbent"]) / total_rows, total_rows, GATE_CONFIDENCE
    )
    return ScoreDifference(
        challenger_score, incumbent_score, challenger_score - incumbent_score, low, high, total_rows
    )


# ---------------------------------------------------------------------------------------------------------
# Per-group metrics


GAP_SUFFIX = "_group_gap"


def primary_group_gaps(metrics: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``metrics`` (``dataset``, ``metric`` columns) that are a format's own primary-metric gap.

    ``accuracy`` is the triplet format's primary metric, not binary pairs': their accuracy gap is kept
    out.
    """
    primary = {(pair_format.value, metric + GAP_SUFFIX) for pair_format, metric in PRIMARY_METRIC.items()}
    return metrics[[pair in primary for pair in zip(metrics["dataset"], metrics["metric"], strict=True)]]


def _group_resamples(positions: np.ndarray, n_boot: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Blocks of ``n_boot`` resamples drawn from one group's eval-row positions."""
    block = max(1, _MAX_BLOCK_CELLS // len(positions))
    for start in range(0, n_boot, block):
        yield positions[rng.integers(0, len(positions), size=(min(block, n_boot - start), len(positions)))]


def evaluate_groups(
    validated_pairs: pd.DataFrame,
    encode: Encode,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_group_rows: int = 10,
) -> tuple[list[Metric], list[Metric]]:
    """Every metric per group of the eval rows that carry a ``group_name``, and each metric's largest gap.

    A group's value is the format's own statistic over that group's eval rows only (the retrieval corpus
    and the binary threshold stay those of the whole split), so per-group and overall numbers agree in
    meaning. The gap is the best minus the worst group among groups with at least ``min_group_rows`` eval
    rows, reported as metric ``<metric>_group_gap`` with a CI from resampling within each group (a
    stratified bootstrap, seeded per format and group, so every model sees the same resamples).
    """
    _check_resamples(n_boot)
    group_metrics: list[Metric] = []
    gaps: list[Metric] = []
    eval_groups = validated_pairs.loc[validated_pairs["split"] == "eval"].get("group_name", pd.Series())
    if not any(isinstance(group, str) and group for group in eval_groups):
        return group_metrics, gaps  # no eval row names a group: nothing to score, no model to run
    for scores in _score_formats(validated_pairs, encode):
        if scores.groups is None:
            continue
        named = np.array([isinstance(g, str) and bool(g) for g in scores.groups])
        names = sorted(set(scores.groups[named]))
        dataset = scores.pair_format.value
        values: dict[str, dict[str, float]] = {name: {} for name in scores.statistics}
        resampled: dict[str, dict[str, np.ndarray]] = {name: {} for name in scores.statistics}
        group_rows: dict[str, int] = {}
        for group in names:
            positions = np.flatnonzero(named & (scores.groups == group))
            group_rows[group] = len(positions)
            # Seeded by the group's name, not its rank: a new group must not change another's resamples.
            group_key = int.from_bytes(hashlib.sha256(group.encode("utf-8", "surrogatepass")).digest()[:8])
            rng = np.random.default_rng([seed, list(PairFormat).index(scores.pair_format), group_key])
            blocks: dict[str, list[np.ndarray]] = {name: [] for name in scores.statistics}
            for indices in _group_resamples(positions, n_boot, rng):
                for name, statistic in scores.statistics.items():
                    blocks[name].append(statistic(indices))
            for name, statistic in scores.statistics.items():
                value = float(statistic(positions[None, :])[0])
                draws = np.concatenate(blocks[name]) if blocks[name] else np.zeros(0)
                low, high = _percentile_interval(draws, len(positions))
                group_metrics.append(Metric(dataset, name, value, len(positions), low, high, group))
                if len(positions) >= min_group_rows and math.isfinite(value):
                    values[name][group] = value
                    resampled[name][group] = draws
        for name in scores.statistics:
            if len(values[name]) < 2:
                continue
            gap = max(values[name].values()) - min(values[name].values())
            low, high = math.nan, math.nan
            if n_boot:
                stacked = np.stack(list(resampled[name].values()))
                # fmax/fmin skip a group whose resample left the metric undefined; a draw with fewer
                # than two groups defined has no gap (not a gap of 0).
                defined = np.isfinite(stacked).sum(axis=0) >= 2
                draws = np.where(defined, np.fmax.reduce(stacked) - np.fmin.reduce(stacked), np.nan)
                low, high = _percentile_interval(draws, min(group_rows[group] for group in values[name]))
            rows = int(sum(group_rows[group] for group in values[name]))
            gaps.append(Metric(dataset, name + GAP_SUFFIX, gap, rows, low, high))
    return group_metrics, gaps
