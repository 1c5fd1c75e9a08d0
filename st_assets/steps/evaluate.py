"""Held-out evaluation: the metrics that fit each pair format, for any model given as an encode function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import average_precision_score, f1_score

from st_assets.steps.formats import PairFormat

Encode = Callable[[list[str]], np.ndarray]

# The metric that decides promotion, per format. Unlabelled text has none of its own.
PRIMARY_METRIC: dict[PairFormat, str] = {
    PairFormat.SCORED: "spearman",
    PairFormat.BINARY: "average_precision",
    PairFormat.TRIPLET: "accuracy",
    PairFormat.ANCHOR_POSITIVE: "mrr@10",
    PairFormat.LABELLED_TEXTS: "knn_accuracy",
}


@dataclass(frozen=True)
class Metric:
    """One number about one model on one held-out dataset (a pair format)."""

    dataset: str
    metric: str
    value: float
    rows: int


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


def _row_cosines(encode: Encode, left: list[str], right: list[str]) -> np.ndarray:
    return np.einsum("ij,ij->i", encode(left), encode(right))


def _ranking_metrics(similarities: np.ndarray, relevant: np.ndarray, prefix: str = "") -> dict[str, float]:
    """MRR@10, NDCG@10 and Recall@1/5/10 from a query x corpus similarity and relevance matrix."""
    order = np.argsort(-similarities, axis=1)[:, :10]
    hits = np.take_along_axis(relevant, order, axis=1)
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), -1)
    reciprocal_ranks = np.where(first_hit >= 0, 1.0 / (first_hit + 1), 0.0)
    discounts = 1.0 / np.log2(np.arange(2, 2 + hits.shape[1]))
    relevant_counts = relevant.sum(axis=1)
    ideal = np.array([discounts[: min(count, 10)].sum() for count in relevant_counts])
    ndcg = np.divide((hits * discounts).sum(axis=1), ideal, out=np.zeros(len(ideal)), where=ideal > 0)
    metrics = {"mrr@10": reciprocal_ranks.mean(), "ndcg@10": ndcg.mean()}
    for k in (1, 5, 10):
        found = hits[:, :k].sum(axis=1)
        metrics[f"recall@{k}"] = np.mean(found / np.maximum(relevant_counts, 1))
    return {prefix + name: float(value) for name, value in metrics.items()}


def _best_threshold(cosines: np.ndarray, labels: np.ndarray) -> float:
    """The cosine cut-off with the best accuracy on training pairs (midway between observed values)."""
    observed = np.unique(cosines)
    candidates = np.concatenate(
        [[observed[0] - 1e-6], (observed[:-1] + observed[1:]) / 2, [observed[-1] + 1e-6]]
    )
    accuracies = [np.mean((cosines >= threshold) == labels) for threshold in candidates]
    return float(candidates[int(np.argmax(accuracies))])


def evaluate_format(
    pair_format: PairFormat, eval_rows: pd.DataFrame, train_rows: pd.DataFrame, encode: Encode
) -> dict[str, float]:
    """Metrics of one model on one format's eval rows (train rows serve as corpus or threshold data)."""
    if pair_format is PairFormat.SCORED:
        cosines = _row_cosines(encode, eval_rows["sentence1"].tolist(), eval_rows["sentence2"].tolist())
        scores = eval_rows["score"].to_numpy()
        if len(eval_rows) < 3 or np.std(scores) == 0:
            return {}
        return {
            "spearman": float(spearmanr(cosines, scores).statistic),
            "pearson": float(pearsonr(cosines, scores).statistic),
        }
    if pair_format is PairFormat.BINARY:
        train_sample = train_rows.head(2000)
        threshold = (
            _best_threshold(
                _row_cosines(encode, train_sample["sentence1"].tolist(), train_sample["sentence2"].tolist()),
                train_sample["score"].to_numpy() == 1,
            )
            if len(train_sample)
            else 0.5
        )
        cosines = _row_cosines(encode, eval_rows["sentence1"].tolist(), eval_rows["sentence2"].tolist())
        labels = eval_rows["score"].to_numpy() == 1
        predicted = cosines >= threshold
        metrics = {
            "accuracy": float(np.mean(predicted == labels)),
            "f1": float(f1_score(labels, predicted)),
            "threshold": threshold,
        }
        if 0 < labels.sum() < len(labels):
            metrics["average_precision"] = float(average_precision_score(labels, cosines))
        return metrics
    if pair_format is PairFormat.TRIPLET:
        anchors = eval_rows["sentence1"].tolist()
        positive = _row_cosines(encode, anchors, eval_rows["sentence2"].tolist())
        negative = _row_cosines(encode, anchors, eval_rows["negative"].tolist())
        return {"accuracy": float(np.mean(positive > negative))}
    if pair_format is PairFormat.ANCHOR_POSITIVE:
        queries = eval_rows["sentence1"].tolist()
        corpus = list(dict.fromkeys(eval_rows["sentence2"].tolist()))
        position = {text: index for index, text in enumerate(corpus)}
        relevant = np.zeros((len(queries), len(corpus)), dtype=bool)
        for row, positive_text in enumerate(eval_rows["sentence2"]):
            relevant[row, position[positive_text]] = True
        return _ranking_metrics(encode(queries) @ encode(corpus).T, relevant)
    if pair_format is PairFormat.LABELLED_TEXTS:
        if train_rows.empty:
            return {}
        similarities = encode(eval_rows["sentence1"].tolist()) @ encode(train_rows["sentence1"].tolist()).T
        train_labels = train_rows["label"].to_numpy()
        eval_labels = eval_rows["label"].to_numpy()
        nearest = train_labels[similarities.argmax(axis=1)]
        relevant = eval_labels[:, None] == train_labels[None, :]
        return {
            "knn_accuracy": float(np.mean(nearest == eval_labels)),
            **_ranking_metrics(similarities, relevant),
        }
    return {}


def evaluate_model(validated_pairs: pd.DataFrame, encode: Encode) -> list[Metric]:
    """Every metric of one model on the eval split of every format present."""
    metrics = []
    for pair_format_value, rows in validated_pairs.groupby("format", sort=True):
        pair_format = PairFormat(pair_format_value)
        eval_rows = rows[rows["split"] == "eval"]
        if eval_rows.empty:
            continue
        values = evaluate_format(pair_format, eval_rows, rows[rows["split"] == "train"], encode)
        metrics += [Metric(pair_format.value, name, value, len(eval_rows)) for name, value in values.items()]
    return metrics


def primary_score(metrics: list[Metric]) -> float:
    """The number promotion compares: each format's primary metric, weighted by its eval rows."""
    primaries = [m for m in metrics if PRIMARY_METRIC.get(PairFormat(m.dataset)) == m.metric]
    total_rows = sum(m.rows for m in primaries)
    if not total_rows:
        return float("nan")
    return sum(m.value * m.rows for m in primaries) / total_rows
