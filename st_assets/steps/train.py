"""Fine-tune a sentence-transformer on the train split: one dataset and one loss per pair format."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
from sentence_transformers.base.evaluation.sequential import SequentialEvaluator
from sentence_transformers.base.sampler import DefaultBatchSampler
from sentence_transformers.sentence_transformer import losses
from sentence_transformers.sentence_transformer.evaluation import (
    BinaryClassificationEvaluator,
    EmbeddingSimilarityEvaluator,
    InformationRetrievalEvaluator,
    TripletEvaluator,
)
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from sentence_transformers.util.dataset import DEFAULT_LABEL_COLUMNS
from transformers import EarlyStoppingCallback, TrainerCallback

from st_assets.settings import Settings
from st_assets.steps.augment import TEXT_COLUMNS, counterfactual_augment, load_swapped_groups
from st_assets.steps.formats import CONTENT_COLUMNS, LOSS_NAMES, PairFormat
from st_assets.steps.models import (
    encode_texts,
    fsync_path,
    fsync_tree,
    load_model,
    longest_input,
    model_fingerprint,
    remove_abandoned_scratch,
    require_base_model,
    resolve_base_model,
    resolve_device,
)
from st_assets.steps.pairs import labelled_texts_to_pairs
from st_assets.steps.proxy_loss import (
    PROXY_LEARNING_RATE,
    PROXY_LOSS,
    PROXY_PASSES,
    ProxySoftmaxLoss,
    label_proxies,
)
from st_assets.steps.split import linked_groups, normalise_text, split_texts
from st_assets.steps.training_code import TRAINING_CODE_VERSION, NoTrainingPairsError, TrainingSettingError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedModel:
    """A fine-tuned model version on disk and what made it."""

    version: str
    path: Path
    base_model: str
    losses: dict[str, str]
    data_version: str
    config: dict[str, object]
    train_rows: int
    augmentation: dict[str, object]
    train_seconds: float
    train_examples: int
    # Optimiser steps; None for a version trained before they were recorded.
    train_steps: int | None
    reused: bool
    log_history: list[dict[str, float]]
    # Normalised split texts of the rows it trained on: the window's selection with augmented copies, and
    # the labelled texts' partners.
    trained_texts: frozenset[str]

    @property
    def loss_summary(self) -> str:
        dims = list(self.config.get("matryoshka_dims") or [])
        return ", ".join(f"{name}={loss_label(loss, dims)}" for name, loss in sorted(self.losses.items()))


def loss_label(loss: str, matryoshka_dims: list[int]) -> str:
    """The loss as trained: wrapped in MatryoshkaLoss (over the dimensions given) when there are any."""
    return f"MatryoshkaLoss({loss}; {'/'.join(map(str, matryoshka_dims))})" if matryoshka_dims else loss


# Scored pairs regress each pair's cosine on its score, so more, smaller steps teach more per epoch: on
# STS-B, dev Spearman 0.889 / 0.891 / 0.893 / 0.893 at batch 32 / 16 / 8 / 4, 4 taking 23% longer
# (BENCHMARKS.md). The other formats showed no such gain, and in-batch-negative losses draw their
# negatives from the batch.
SCORED_BATCH_SIZE = 8
DEFAULT_BATCH_SIZE = 32


def training_batch_size(settings: Settings, formats: list[PairFormat]) -> int:
    """The batch size set, or else 8 when every format in the run is scored pairs, and 32 otherwise."""
    if settings.batch_size is not None:
        return settings.batch_size
    return SCORED_BATCH_SIZE if set(formats) == {PairFormat.SCORED} else DEFAULT_BATCH_SIZE


def proxy_formats(losses_by_format: Mapping[str, str]) -> set[PairFormat]:
    """The formats that train with ProxySoftmaxLoss: a text and its label per example, no pairs."""
    return {PairFormat(name) for name, loss in losses_by_format.items() if loss == PROXY_LOSS}


TRAINING_FIELDS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "warmup_ratio",
    "max_seq_length",
    "seed",
    "matryoshka_dims",
    "hard_negatives",
    "eval_steps",
    "keep_best_checkpoint",
    "early_stopping_patience",
    "train_window_rows",
    "train_window_days",
    "replay_fraction",
    "augment",
)


# Formats whose rows get a mined negative with hard_negatives.
MINED_FORMATS = frozenset({PairFormat.ANCHOR_POSITIVE, PairFormat.LABELLED_TEXTS})


def training_config(settings: Settings, formats: list[PairFormat], evaluates: bool) -> dict[str, object]:
    """The settings that change what training produces (and so the model version), defaults resolved.

    A setting that cannot act on this run (replay without a window, checkpoint choice without
    in-training evaluation, mining without pairs to mine for) is left out, so changing it retrains
    nothing.
    """
    losses_by_format = choose_losses(formats, settings.losses)
    config = {name: getattr(settings, name) for name in TRAINING_FIELDS}
    config["batch_size"] = training_batch_size(settings, formats)
    config["matryoshka_dims"] = sorted(settings.matryoshka_dims, reverse=True)  # the order the loss uses
    if settings.train_window_rows is None and settings.train_window_days is None:
        del config["replay_fraction"]
    if not (MINED_FORMATS & set(formats)) - proxy_formats(losses_by_format):
        del config["hard_negatives"]
    if not evaluates:
        for name in ("eval_steps", "keep_best_checkpoint", "early_stopping_patience"):
            del config[name]
    if PairFormat.SCORED in formats:
        # The scale scores were read on, recorded with the model; it means nothing to other formats.
        config["score_scale"] = settings.score_scale
        if settings.score_scales:
            # Recorded only when set, so versions made before per-file scales existed stay the same.
            config["score_scales"] = dict(settings.score_scales)
    return config


def data_version(train_pairs: pd.DataFrame) -> str:
    """Hash of the training rows' content, independent of row order and source file names."""
    lines = sorted(
        json.dumps([None if pd.isna(value) else value for value in row], ensure_ascii=False)
        for row in train_pairs[list(CONTENT_COLUMNS)].itertuples(index=False, name=None)
    )
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def model_version(
    base_model: str, base_fingerprint: str, data_hash: str, config: dict[str, object], losses_by_format: dict
) -> str:
    """Content-addressed version: the same base (name and files), data, config, losses and code give the
    same version."""
    payload = json.dumps(
        [base_model, base_fingerprint, data_hash, config, losses_by_format, TRAINING_CODE_VERSION],
        sort_keys=True,
        default=str,
    )
    return "v" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def choose_losses(formats: list[PairFormat], overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The loss per format present: the format's default unless overridden (Settings checked the names)."""
    return {
        pair_format.value: (overrides or {}).get(pair_format.value, LOSS_NAMES[pair_format][0])
        for pair_format in formats
    }


def select_training_rows(train_pairs: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """The rows to train on: everything, or the recent window plus a seeded replay sample of older rows.

    The replay sample keeps a retrain on a small new batch from forgetting what older data taught.
    """
    if settings.train_window_rows is None and settings.train_window_days is None:
        return train_pairs
    ordered = train_pairs.sort_values(["arrived_at", "source_file", "row_number"], kind="stable")
    recent_mask = pd.Series(False, index=ordered.index)
    if settings.train_window_rows is not None:
        recent_mask.iloc[-settings.train_window_rows :] = True
    if settings.train_window_days is not None:
        newest = ordered["arrived_at"].max()
        recent_mask |= ordered["arrived_at"] >= newest - pd.Timedelta(days=settings.train_window_days)
    recent, older = ordered[recent_mask], ordered[~recent_mask]
    # Rounded up: a small batch still brings some older rows along.
    # Rounded first: 0.07 x 100 is 7.000000000000001 in floating point, which must not round up to 8.
    replay_count = min(len(older), math.ceil(round(settings.replay_fraction * len(recent), 9)))
    replay = older.sample(n=replay_count, random_state=settings.seed) if replay_count else older.iloc[:0]
    return pd.concat([recent, replay])


# A mined negative must be clearly less similar to the anchor than its positive: a candidate within 5%
# of the positive's score is most often the same text under another label (label noise), not a negative.
NEGATIVE_RELATIVE_MARGIN = 0.95
# Anchors per block of the mining similarity matrix: 1,024 x 100k candidates is 400 MB of float32.
MINING_BLOCK_ROWS = 1024


def _pick_negatives(
    anchors: np.ndarray,
    candidates: np.ndarray,
    anchor_keys: np.ndarray,
    candidate_keys: np.ndarray,
    own: np.ndarray,
) -> np.ndarray:
    """Per anchor, the most similar candidate of another key clearly below ``own``; else the least similar one.

    Anchors and candidates are unit vectors; the similarities are computed a block of anchors at a time, so
    memory grows with the number of candidates, not with its square.
    """
    picked = np.zeros(len(anchors), dtype=np.int64)
    for start in range(0, len(anchors), MINING_BLOCK_ROWS):
        block = slice(start, start + MINING_BLOCK_ROWS)
        similarities = anchors[block] @ candidates.T
        allowed = anchor_keys[block, None] != candidate_keys[None, :]
        if not allowed.any(axis=1).all():
            raise NoNegativeError("an anchor has no candidate of another key")
        # 5% of the positive's score below it, on either side of zero (0.95 x a negative score is above it).
        ceiling = own[block, None] - (1 - NEGATIVE_RELATIVE_MARGIN) * np.abs(own[block, None])
        below = allowed & (similarities < ceiling)
        nearest = np.where(below, similarities, -np.inf).argmax(axis=1)
        fallback = np.where(allowed, similarities, np.inf).argmin(axis=1)
        picked[block] = np.where(below.any(axis=1), nearest, fallback)
    return picked


class NoNegativeError(ValueError):
    """Some anchor has no candidate that may be its negative: every other text shares its key."""


def _mine_label_negatives(
    pairs: pd.DataFrame, label_of_text: dict[str, str], encode: Callable[[list[str]], np.ndarray]
) -> list[str]:
    """Per anchor/positive pair, the most similar text of another label that is clearly less similar."""
    texts = list(label_of_text)
    vectors = encode(texts)
    position = {text: index for index, text in enumerate(texts)}
    anchors = np.array([position[text] for text in pairs["anchor"]])
    positives = np.array([position[text] for text in pairs["positive"]])
    labels = np.asarray([label_of_text[text] for text in texts])
    anchor_vectors = vectors[anchors]
    best = _pick_negatives(
        anchor_vectors,
        vectors,
        anchor_keys=labels[anchors],
        candidate_keys=labels,
        own=np.einsum("ij,ij->i", anchor_vectors, vectors[positives]),
    )
    return [texts[index] for index in best]


def _mined(mine: Callable[[], list[str]]) -> dict[str, list[str]]:
    """``{"negative": mined negatives}``, or nothing when some anchor has no possible negative."""
    try:
        return {"negative": mine()}
    except NoNegativeError:
        logger.warning("hard negatives skipped: some anchor has no text that may be its negative")
        return {}


def build_datasets(
    train_pairs: pd.DataFrame,
    seed: int,
    encode: Callable[[list[str]], np.ndarray] | None = None,
    original_of_text: Mapping[str, str] | None = None,
    label_partners: pd.DataFrame | None = None,
    losses_by_format: Mapping[str, str] | None = None,
) -> tuple[dict[str, Dataset], dict[str, str]]:
    """One Hugging Face dataset per format, with the columns its losses expect, plus each text's label.

    With ``encode`` (the base model), anchor/positive and labelled-text data get one mined hard
    negative per anchor, never a counterfactual copy of the anchor's own positive (``original_of_text``).
    ``label_partners`` (labelled texts beyond ``train_pairs``, as around a window) supply positives.
    Labelled texts that train with ProxySoftmaxLoss (``losses_by_format``) are one text and its label's
    index (in label order) per row instead of pairs, each text PROXY_PASSES times.
    """
    proxied = proxy_formats(losses_by_format or {})
    datasets: dict[str, Dataset] = {}
    label_of_text: dict[str, str] = {}
    for pair_format_value, rows in train_pairs.groupby("format", sort=True):
        pair_format = PairFormat(pair_format_value)
        if pair_format is PairFormat.SCORED:
            data = {"sentence1": rows["sentence1"], "sentence2": rows["sentence2"], "score": rows["score"]}
        elif pair_format is PairFormat.BINARY:
            data = {"sentence1": rows["sentence1"], "sentence2": rows["sentence2"], "label": rows["score"]}
        elif pair_format is PairFormat.TRIPLET:
            data = {"anchor": rows["sentence1"], "positive": rows["sentence2"], "negative": rows["negative"]}
        elif pair_format is PairFormat.ANCHOR_POSITIVE:
            data = {"anchor": rows["sentence1"], "positive": rows["sentence2"]}
            if encode is not None and len(rows) > 1:
                data |= _mined(partial(_mine_answer_negatives, rows, encode, original_of_text or {}))
        elif pair_format in proxied:
            if rows["label"].nunique() < 2:
                continue  # a softmax over one label's proxy is certain: nothing to learn
            label_index = {label: index for index, label in enumerate(sorted(rows["label"].unique()))}
            data = {
                "text": list(rows["sentence1"]) * PROXY_PASSES,
                "label": list(rows["label"].map(label_index)) * PROXY_PASSES,
            }
        elif pair_format is PairFormat.LABELLED_TEXTS:
            pairs = labelled_texts_to_pairs(rows, seed, label_partners)
            labelled = rows if label_partners is None else pd.concat([label_partners, rows])
            labels_here = dict(zip(labelled["sentence1"], labelled["label"], strict=True))
            label_of_text.update(labels_here)
            data = {"anchor": pairs["anchor"], "positive": pairs["positive"]}
            if encode is not None and pairs["label"].nunique() > 1:
                data |= _mined(partial(_mine_label_negatives, pairs, labels_here, encode))
        else:
            data = {"anchor": rows["sentence1"], "positive": rows["sentence1"]}
        columns = {key: list(value) for key, value in data.items()}
        if len(next(iter(columns.values()))) == 0:
            continue
        datasets[pair_format.value] = Dataset.from_dict(columns)
    return datasets, label_of_text


def _answer_groups(anchors: list[str], positives: list[str]) -> np.ndarray:
    """A group id per row: rows that share an anchor or an answer, directly or through other rows.

    Another answer to the same question is not a negative of it, nor is the same answer.
    """
    return np.asarray(
        linked_groups(
            [
                [f"q:{normalise_text(anchor)}", f"a:{normalise_text(positive)}"]
                for anchor, positive in zip(anchors, positives, strict=True)
            ]
        )
    )


def _mine_answer_negatives(
    rows: pd.DataFrame, encode: Callable[[list[str]], np.ndarray], original_of_text: Mapping[str, str]
) -> list[str]:
    """Per anchor, the most similar positive of another row that is clearly less similar than its own.

    The relative margin skips near-duplicates of the true answer, the usual false negatives; a
    counterfactual copy of the true answer counts as the answer itself.
    """
    anchors, positives = rows["sentence1"].tolist(), rows["sentence2"].tolist()
    anchor_vectors, positive_vectors = encode(anchors), encode(positives)
    answer_keys = _answer_groups(
        [original_of_text.get(text, text) for text in anchors],
        [original_of_text.get(text, text) for text in positives],
    )
    best = _pick_negatives(
        anchor_vectors,
        positive_vectors,
        anchor_keys=answer_keys,
        candidate_keys=answer_keys,
        own=np.einsum("ij,ij->i", anchor_vectors, positive_vectors),
    )
    return [positives[index] for index in best]


def build_evaluator(eval_pairs: pd.DataFrame, train_pairs: pd.DataFrame) -> SequentialEvaluator | None:
    """The sentence-transformers evaluator that fits each format present in the eval split."""
    evaluators = []
    for pair_format_value, rows in eval_pairs.groupby("format", sort=True):
        pair_format = PairFormat(pair_format_value)
        name = pair_format.value
        # Scores that do not vary leave Spearman undefined: no evaluator rather than a NaN score.
        if pair_format is PairFormat.SCORED and len(rows) >= 3 and rows["score"].nunique() > 1:
            evaluators.append(
                EmbeddingSimilarityEvaluator(
                    rows["sentence1"].tolist(),
                    rows["sentence2"].tolist(),
                    rows["score"].tolist(),
                    name=name,
                    write_csv=False,
                )
            )
        elif pair_format is PairFormat.BINARY and rows["score"].nunique() == 2:
            evaluators.append(
                BinaryClassificationEvaluator(
                    rows["sentence1"].tolist(),
                    rows["sentence2"].tolist(),
                    rows["score"].astype(int).tolist(),
                    name=name,
                    write_csv=False,
                )
            )
        elif pair_format is PairFormat.TRIPLET:
            evaluators.append(
                TripletEvaluator(
                    rows["sentence1"].tolist(),
                    rows["sentence2"].tolist(),
                    rows["negative"].tolist(),
                    name=name,
                    write_csv=False,
                )
            )
        elif pair_format is PairFormat.ANCHOR_POSITIVE:
            corpus = {f"d{i}": text for i, text in enumerate(dict.fromkeys(rows["sentence2"]))}
            corpus_id = {text: key for key, text in corpus.items()}
            # One query per distinct anchor, every one of its positives relevant.
            positives_of: dict[str, set[str]] = {}
            for anchor, positive in zip(rows["sentence1"], rows["sentence2"], strict=True):
                positives_of.setdefault(anchor, set()).add(corpus_id[positive])
            evaluators.append(
                InformationRetrievalEvaluator(
                    queries={f"q{i}": anchor for i, anchor in enumerate(positives_of)},
                    corpus=corpus,
                    relevant_docs={f"q{i}": docs for i, docs in enumerate(positives_of.values())},
                    name=name,
                    write_csv=False,
                )
            )
        elif pair_format is PairFormat.LABELLED_TEXTS:
            corpus_rows = train_pairs[train_pairs["format"] == name]
            if corpus_rows.empty:
                continue
            corpus = {f"d{i}": text for i, text in enumerate(corpus_rows["sentence1"])}
            docs_of_label: dict[str, set[str]] = {}
            for key, label in zip(corpus, corpus_rows["label"], strict=True):
                docs_of_label.setdefault(label, set()).add(key)
            queries = {f"q{i}": text for i, text in enumerate(rows["sentence1"])}
            relevant = {f"q{i}": docs_of_label.get(label, set()) for i, label in enumerate(rows["label"])}
            if not any(relevant.values()):
                continue  # no eval text shares a label with the texts trained on (a window of new labels)
            evaluators.append(
                InformationRetrievalEvaluator(
                    queries={key: text for key, text in queries.items() if relevant[key]},
                    corpus=corpus,
                    relevant_docs={key: docs for key, docs in relevant.items() if docs},
                    name=name,
                    write_csv=False,
                )
            )
    if not evaluators:
        return None
    return SequentialEvaluator(evaluators, main_score_function=lambda scores: float(np.mean(scores)))


# The columns the trainer's collator reads a pair's score or label from.
LABEL_COLUMNS = list(DEFAULT_LABEL_COLUMNS)


class DistinctBatchSampler(DefaultBatchSampler):
    """Batches with no repeated text and, for labelled texts, no two anchors of the same label.

    In-batch-negative losses treat every other text in the batch as a negative; a same-label
    text there is a false negative that teaches the model to push paraphrases apart.
    """

    def __init__(
        self,
        dataset: Dataset,
        *args: object,
        label_of_text: dict[str, str],
        original_of_text: dict[str, str] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.dataset = dataset
        self.label_of_text = label_of_text
        self.original_of_text = original_of_text or {}
        self.text_columns = [
            name for name in self.dataset.column_names if name not in (self.valid_label_columns or [])
        ]
        self.epoch = 0
        self._batches: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _keys(self, index: int) -> set[str]:
        row = self.dataset[index]
        texts = [row[name] for name in self.text_columns]
        # A counterfactual copy's text keys as the text it was swapped from too: the two mean the same.
        # Compared as the split compares texts: "How do I reset my PIN?" is "how do i reset my pin?".
        keys = {f"text:{normalise_text(text)}" for text in texts}
        keys |= {
            f"text:{normalise_text(original)}"
            for text in texts
            if (original := self.original_of_text.get(text))
        }
        # Labels of every text, negatives included: a mined negative of label L next to an anchor
        # of label L would be a false negative for that anchor.
        keys |= {f"label:{label}" for text in texts if (label := self.label_of_text.get(text)) is not None}
        return keys

    @property
    def in_batch_negatives(self) -> bool:
        """False for data with a score or label per pair: its losses learn from each pair alone."""
        return not set(self.valid_label_columns or []) & set(self.dataset.column_names)

    def _epoch_batches(self) -> list[list[int]]:
        if self._batches is not None and self._batches[0] == self.epoch:
            return self._batches[1]
        rng = np.random.default_rng(self.seed + self.epoch)
        remaining = [int(index) for index in rng.permutation(len(self.dataset))]
        if not self.in_batch_negatives:
            batches = [
                remaining[start : start + self.batch_size]
                for start in range(0, len(remaining), self.batch_size)
            ]
            if self.drop_last and batches and len(batches[-1]) < self.batch_size:
                batches.pop()
            self._batches = (self.epoch, batches)
            return batches
        keys = {index: self._keys(index) for index in remaining}
        batches = []
        while remaining:
            batch: list[int] = []
            seen: set[str] = set()
            deferred = []
            for position, index in enumerate(remaining):
                if len(batch) == self.batch_size:
                    deferred += remaining[position:]  # full: the rest waits, in order
                    break
                if not keys[index] & seen:
                    batch.append(index)
                    seen |= keys[index]
                else:
                    deferred.append(index)
            if not self.drop_last or len(batch) == self.batch_size:
                batches.append(batch)
            remaining = deferred if len(batch) > 1 or not self.drop_last else []
        if len(self.text_columns) == 2:
            # An (anchor, positive) batch of one row has no negative: its loss is 0 and it teaches nothing.
            # Such batches are what is left when one label holds most rows.
            batches = [batch for batch in batches if len(batch) > 1]
        self._batches = (self.epoch, batches)
        return batches

    def rows_left_out(self) -> int:
        """Rows of this epoch's order that no batch holds (one-row batches with no negative)."""
        return len(self.dataset) - sum(len(batch) for batch in self._epoch_batches())

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._epoch_batches()

    def __len__(self) -> int:
        return len(self._epoch_batches())


def short_batches(sampler: DistinctBatchSampler) -> float | None:
    """Examples per batch of the first epoch when label-distinct batches average under 3/4 of what batches
    of ``batch_size`` would hold of the same rows (all of them in one batch, when fewer); else None."""
    batches = list(sampler)
    held = sum(len(batch) for batch in batches)
    if not sampler.in_batch_negatives or not held:
        return None
    per_batch = held / len(batches)
    return per_batch if per_batch < 0.75 * held / math.ceil(held / sampler.batch_size) else None


class _LogToLogger(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            logger.info("step %s/%s: %s", state.global_step, state.max_steps, logs)


class _TiesGoToTheLaterCheckpoint(TrainerCallback):
    """An evaluation that ties the best score so far makes its checkpoint the best: the same score after
    more training. The trainer keeps the first of equal checkpoints, which on a saturated metric (MRR 1.0
    on a few eval anchors) is the first one, barely trained."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        # Runs after early stopping's own callback, which still counts the tie as no improvement.
        if value is not None and state.best_metric is not None and value == state.best_metric:
            state.best_metric = math.nextafter(value, -math.inf)


def train_model(
    train_pairs: pd.DataFrame, settings: Settings, eval_pairs: pd.DataFrame | None = None
) -> TrainedModel:
    """Train (or reuse) the version these rows and settings define, written atomically to ``models/<version>``.

    ``eval_pairs`` (the held-out split) feeds the in-training evaluator; with ``keep_best_checkpoint``
    the best-scoring checkpoint is the one saved.
    """
    base_path = resolve_base_model(settings.base_model)
    selected = select_training_rows(train_pairs, settings)
    # Around a window, a labelled text's positive may be any training text of its label, not only a
    # recent one: otherwise a new text whose label has no other recent text would not train at all.
    windowed = settings.train_window_rows is not None or settings.train_window_days is not None
    label_partners = (
        train_pairs[train_pairs["format"] == PairFormat.LABELLED_TEXTS.value].sort_values(
            list(CONTENT_COLUMNS), kind="stable", na_position="first", ignore_index=True
        )
        if windowed
        else None
    )
    augmentation: dict[str, object] = {"added_rows": 0, "terms_swapped": {}}
    original_of_text: dict[str, str] = {}
    if settings.augment == "counterfactual":
        held_out_texts = (
            {text for column in TEXT_COLUMNS if column in eval_pairs for text in eval_pairs[column].dropna()}
            if eval_pairs is not None
            else set()
        )
        augmented = counterfactual_augment(
            selected,
            load_swapped_groups(settings.home, settings.counterfactual_groups),
            settings.counterfactual_groups,
            held_out_texts=held_out_texts,
        )
        selected = augmented.rows
        original_of_text = augmented.original_of_text
        augmentation = {
            "added_rows": augmented.added_rows,
            "terms_swapped": augmented.terms_swapped,
            "held_out_skipped": augmented.held_out_skipped,
        }
    # The data version ignores row order, so training must too: the same rows in another order (another
    # file name, another arrival order) train the same weights.
    selected = selected.sort_values(
        list(CONTENT_COLUMNS), kind="stable", na_position="first", ignore_index=True
    )
    formats = sorted({PairFormat(value) for value in selected["format"].unique()})
    losses_by_format = choose_losses(formats, settings.losses)
    if PairFormat.LABELLED_TEXTS in proxy_formats(losses_by_format):
        label_partners = None  # each text trains towards its label's proxy: no positive to find
    evaluator = (
        build_evaluator(eval_pairs, selected) if eval_pairs is not None and settings.eval_steps != 0 else None
    )
    config = training_config(settings, formats, evaluates=evaluator is not None)
    if label_partners is not None and len(label_partners) and PairFormat.LABELLED_TEXTS in formats:
        # The positives come from rows outside the selection: they shape the weights too.
        config["label_partners_version"] = data_version(label_partners)
    if evaluator is not None and (settings.keep_best_checkpoint or settings.early_stopping_patience):
        # The eval split picks the checkpoint (or the stopping step), so it shapes the weights too.
        config["eval_data_version"] = data_version(eval_pairs)
    batch_size = int(config["batch_size"])
    data_hash = data_version(selected)
    version = model_version(
        settings.base_model, model_fingerprint(base_path), data_hash, config, losses_by_format
    )
    target = settings.models_dir / version
    common = dict(
        version=version,
        path=target,
        base_model=settings.base_model,
        losses=losses_by_format,
        data_version=data_hash,
        config=config,
        train_rows=len(selected),
        augmentation=augmentation,
        trained_texts=frozenset(
            split_texts(selected)
            # Around a window, labelled texts take their positives from every training text of their label.
            | (
                split_texts(label_partners)
                if label_partners is not None and PairFormat.LABELLED_TEXTS in formats
                else set()
            )
        ),
    )
    if (target / "training.json").exists():
        saved = json.loads((target / "training.json").read_text())
        return TrainedModel(
            **common,
            train_seconds=saved["train_seconds"],
            train_examples=saved["train_examples"],
            train_steps=saved.get("train_steps"),
            reused=True,
            log_history=saved["log_history"],
        )

    require_base_model(settings.base_model)  # offline, a model that is not here fails naming its folder
    device = resolve_device(settings.device)
    try:
        model = load_model(base_path, device=device)
    except OSError as error:
        from huggingface_hub import constants

        if Path(base_path).exists() or not constants.HF_HUB_OFFLINE:
            raise  # online, the hub may answer the next try
        # Offline, a model the cache holds only part of (an interrupted download) fails alike every try.
        raise TrainingSettingError(
            f"base model {settings.base_model!r}: offline (HF_HUB_OFFLINE), it does not load from the Hugging "
            f"Face cache ({error})"
        ) from error
    # A max_seq_length below the base model's bounds training alone: the saved model reads as many tokens
    # as its base does (all-MiniLM-L6-v2 itself was trained at 128 and reads 256), or the training's, if more.
    base_reads = model.max_seq_length
    dimension = model.get_embedding_dimension()
    if settings.matryoshka_dims and max(settings.matryoshka_dims) > dimension:
        raise TrainingSettingError(
            f"matryoshka_dims {settings.matryoshka_dims}: the base model's embeddings have {dimension} dimensions"
        )
    # Longer than the position table would fail on the first long text, in training or later encoding.
    limit = longest_input(model)
    model.max_seq_length = min(settings.max_seq_length, limit) if limit else settings.max_seq_length
    mining_encoder = (
        (lambda texts: encode_texts(model, texts, batch_size)) if settings.hard_negatives else None
    )
    datasets, label_of_text = build_datasets(
        selected, settings.seed, mining_encoder, original_of_text, label_partners, losses_by_format
    )
    for name, dataset in list(datasets.items()):
        sampler = DistinctBatchSampler(
            dataset,
            batch_size,
            drop_last=False,
            valid_label_columns=LABEL_COLUMNS,
            seed=settings.seed,
            label_of_text=label_of_text,
            original_of_text=original_of_text,
        )
        if left_out := sampler.rows_left_out():
            logger.warning(
                f"{left_out} of {len(dataset)} {name} pairs left out of training: a batch holds one text "
                "of each label, and these were left with no text of another label to share a batch with"
            )
        if left_out == len(dataset):
            del datasets[name]
        elif short := short_batches(sampler):
            logger.warning(
                f"{name} batches hold {short:.1f} examples on average, against batch_size {batch_size}: a "
                "batch holds no text twice and at most one text of each label (with hard negatives, the "
                "negatives' labels count too), so few labels or often repeated texts (a shared answer) make "
                "small batches and more steps"
            )
    if not datasets:
        raise NoTrainingPairsError(
            f"no training pairs: the {len(selected)} rows selected left nothing to train on in any format "
            "(labelled texts need texts of at least two labels)"
        )
    loss_modules = {
        name: _loss(model, losses_by_format[name], settings, dataset, batch_size)
        for name, dataset in datasets.items()
    }

    settings.models_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_scratch(settings.models_dir)
    # A folder of its own for this training (checkpoints included), removed however training ends.
    scratch = Path(tempfile.mkdtemp(dir=settings.models_dir, prefix=f".tmp-{version}-"))
    try:
        # Fractions of the trainer's own step count, which the batch sampler sets (it can yield more
        # batches than rows // batch_size): four evaluations an epoch, the last one on the last step.
        eval_steps = settings.eval_steps or 0.25 / settings.epochs
        keep_best = evaluator is not None and settings.keep_best_checkpoint
        args = SentenceTransformerTrainingArguments(
            output_dir=str(scratch / "trainer"),
            num_train_epochs=settings.epochs,
            per_device_train_batch_size=batch_size,
            learning_rate=settings.learning_rate,
            # The proxies (in the loss, which the trainer optimises with the model) at their own rate.
            learning_rate_mapping={r"(^|\.)proxies$": PROXY_LEARNING_RATE}
            if proxy_formats(losses_by_format)
            else {},
            warmup_steps=settings.warmup_ratio,  # a float below 1 is a ratio of the total steps
            seed=settings.seed,
            data_seed=settings.seed,
            # a partial, not a lambda: the trainer pickles its arguments with each checkpoint
            batch_sampler=partial(
                DistinctBatchSampler, label_of_text=label_of_text, original_of_text=original_of_text
            ),
            eval_strategy="steps" if evaluator is not None else "no",
            eval_steps=eval_steps,
            save_strategy="steps" if keep_best else "no",
            save_steps=eval_steps,
            save_total_limit=1 if keep_best else None,
            load_best_model_at_end=keep_best,
            # Early stopping reads this metric too, with or without the best checkpoint kept.
            metric_for_best_model="eval_sequential_score" if evaluator is not None else None,
            greater_is_better=True,
            report_to="none",
            logging_steps=0.1 / settings.epochs,
            disable_tqdm=True,
            use_cpu=device == "cpu",
            dataloader_num_workers=0,
        )
        single = len(datasets) == 1
        callbacks: list[TrainerCallback] = [_LogToLogger()]
        if settings.early_stopping_patience and evaluator is not None:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
        if keep_best and evaluator is not None:
            callbacks.append(_TiesGoToTheLaterCheckpoint(str(args.metric_for_best_model)))
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=next(iter(datasets.values())) if single else datasets,
            loss=next(iter(loss_modules.values())) if single else loss_modules,
            evaluator=evaluator,
            callbacks=callbacks,
        )
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        best_step = trainer.state.best_global_step
        if keep_best and best_step is not None and best_step != trainer.state.global_step:
            # The card holds the last evaluation's metrics, and the weights kept are an earlier
            # checkpoint's: score them again for the card, leaving its training log as it was.
            training_logs = list(model.model_card_data.training_logs)
            evaluator(model, epoch=trainer.state.epoch, steps=best_step)
            model.model_card_data.training_logs = training_logs
        # Examples the trainer went through (pairs, triplets or texts), for an honest pairs-per-second.
        train_examples = round(sum(len(dataset) for dataset in datasets.values()) * trainer.state.epoch)
        log_history = [
            {key: value for key, value in entry.items() if isinstance(value, int | float)}
            for entry in trainer.state.log_history
        ]
        record = {
            "version": version,
            "base_model": settings.base_model,
            "data_version": data_hash,
            "losses": losses_by_format,
            "config": config,
            "code_version": TRAINING_CODE_VERSION,
            "train_rows": len(selected),
            "augmentation": augmentation,
            "train_seconds": train_seconds,
            "train_examples": train_examples,
            "train_steps": trainer.state.global_step,
            "best_checkpoint": trainer.state.best_model_checkpoint
            and Path(trainer.state.best_model_checkpoint).name,
            "log_history": log_history,
        }
        model.max_seq_length = max(base_reads, model.max_seq_length)
        model.save(str(scratch / "model"))
        for saved in (scratch / "model").rglob("*"):
            if saved.is_file():
                os.chmod(saved, 0o644)  # safetensors writes the weights private; other users load them too
        _append_model_card(scratch / "model" / "README.md", record)
        (scratch / "model" / "training.json").write_text(json.dumps(record, indent=2, default=str))
        fsync_tree(scratch / "model")
        try:
            # rename is atomic: the version folder appears whole or not at all.
            os.rename(scratch / "model", target)
            fsync_path(target.parent)
        except OSError:
            if not (target / "training.json").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return TrainedModel(
        **common,
        train_seconds=train_seconds,
        train_examples=train_examples,
        train_steps=trainer.state.global_step,
        reused=False,
        log_history=log_history,
    )


def _loss(
    model: SentenceTransformer, name: str, settings: Settings, dataset: Dataset, batch_size: int
) -> torch.nn.Module:
    """The loss ``name`` on ``model``, wrapped in MatryoshkaLoss when dimensions are set; ProxySoftmaxLoss
    starts its proxies at the mean base-model embedding of each label's texts in ``dataset``."""
    if name == PROXY_LOSS:
        # build_datasets repeats the texts pass after pass: the first pass holds each text once.
        one_pass = dataset.select(range(len(dataset) // PROXY_PASSES))
        vectors = encode_texts(model, list(one_pass["text"]), batch_size)
        loss: torch.nn.Module = ProxySoftmaxLoss(model, label_proxies(vectors, list(one_pass["label"])))
    else:
        loss = getattr(losses, name)(model)
    if settings.matryoshka_dims:
        loss = losses.MatryoshkaLoss(
            model, loss, matryoshka_dims=sorted(settings.matryoshka_dims, reverse=True)
        )
    return loss


def _append_model_card(readme: Path, record: dict[str, object]) -> None:
    """Add what st_assets knows (data version, losses, config, in-training metrics) to the model card."""
    evaluations = [entry for entry in record["log_history"] if "eval_sequential_score" in entry]
    lines = [
        "",
        "## Trained by st_assets",
        "",
        f"- version: `{record['version']}`",
        f"- base model: `{record['base_model']}`",
        f"- training data version (hash of the training rows): `{record['data_version']}` "
        f"({record['train_rows']} rows)",
        "- losses: "
        + ", ".join(
            f"{k}: {loss_label(v, record['config'].get('matryoshka_dims') or [])}"
            for k, v in record["losses"].items()
        ),
        f"- config: `{json.dumps(record['config'], sort_keys=True)}`",
        f"- code version: `{record['code_version']}`; training took {record['train_seconds']:.0f} s",
        f"- counterfactual augmentation: {record['augmentation']['added_rows']} rows added "
        f"({record['augmentation']['terms_swapped']})",
    ]
    if evaluations:
        best = max(entry["eval_sequential_score"] for entry in evaluations)
        kept = (
            f"the weights are those of {record['best_checkpoint']}"
            if record["best_checkpoint"]
            else "the weights are those of the last step"
        )
        lines.append(
            f"- in-training eval score (mean of the formats' primary metrics): best {best:.4f} "
            f"over {len(evaluations)} evaluations; {kept}"
        )
    existing = readme.read_text(encoding="utf-8") if readme.exists() else f"# {record['version']}\n"
    readme.write_text(existing + "\n".join(lines) + "\n", encoding="utf-8")
