"""Fine-tune a sentence-transformer on the train split: one dataset and one loss per pair format."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
from sentence_transformers.base.sampler import DefaultBatchSampler
from sentence_transformers.sentence_transformer import losses
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from transformers import TrainerCallback

from st_assets.settings import Settings
from st_assets.steps.formats import PairFormat
from st_assets.steps.models import load_model, resolve_base_model
from st_assets.steps.pairs import labelled_texts_to_pairs

logger = logging.getLogger(__name__)

# Bump when a change to this module changes what a given config and data train into.
TRAINING_CODE_VERSION = "1"

LossFactory = Callable[[SentenceTransformer], torch.nn.Module]

# Losses per format; the first is the default. Each expects the dataset columns built below.
LOSSES: dict[PairFormat, dict[str, LossFactory]] = {
    PairFormat.SCORED: {
        "CosineSimilarityLoss": losses.CosineSimilarityLoss,
        "CoSENTLoss": losses.CoSENTLoss,
        "AnglELoss": losses.AnglELoss,
    },
    PairFormat.BINARY: {
        "OnlineContrastiveLoss": losses.OnlineContrastiveLoss,
        "ContrastiveLoss": losses.ContrastiveLoss,
    },
    PairFormat.TRIPLET: {
        "TripletLoss": losses.TripletLoss,
        "MultipleNegativesRankingLoss": losses.MultipleNegativesRankingLoss,
    },
    PairFormat.ANCHOR_POSITIVE: {
        "MultipleNegativesRankingLoss": losses.MultipleNegativesRankingLoss,
        "CachedMultipleNegativesRankingLoss": losses.CachedMultipleNegativesRankingLoss,
    },
    PairFormat.LABELLED_TEXTS: {
        "MultipleNegativesRankingLoss": losses.MultipleNegativesRankingLoss,
        "CachedMultipleNegativesRankingLoss": losses.CachedMultipleNegativesRankingLoss,
    },
    # SimCSE: each text is its own positive; dropout makes the two views differ.
    PairFormat.UNLABELLED_TEXTS: {"MultipleNegativesRankingLoss": losses.MultipleNegativesRankingLoss},
}


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
    train_seconds: float
    reused: bool
    log_history: list[dict[str, float]]

    @property
    def loss_summary(self) -> str:
        return ", ".join(f"{name}={loss}" for name, loss in sorted(self.losses.items()))


def training_config(settings: Settings) -> dict[str, object]:
    """The settings that change what training produces (and so the model version)."""
    fields = (
        "epochs",
        "batch_size",
        "learning_rate",
        "warmup_ratio",
        "max_seq_length",
        "seed",
        "score_scale",
    )
    return {name: getattr(settings, name) for name in fields}


def data_version(train_pairs: pd.DataFrame) -> str:
    """Hash of the training rows' content, independent of row order and source file names."""
    columns = ["format", "sentence1", "sentence2", "negative", "score", "label"]
    lines = sorted(
        json.dumps([None if pd.isna(value) else value for value in row], ensure_ascii=False)
        for row in train_pairs[columns].itertuples(index=False, name=None)
    )
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def model_version(base_model: str, data_hash: str, config: dict[str, object], losses_by_format: dict) -> str:
    """Content-addressed version: the same base, data, config, losses and code give the same version."""
    payload = json.dumps(
        [base_model, data_hash, config, losses_by_format, TRAINING_CODE_VERSION], sort_keys=True, default=str
    )
    return "v" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def choose_losses(formats: list[PairFormat], overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The loss per format present: the format's default unless overridden; unknown names raise."""
    chosen = {}
    for pair_format in formats:
        available = LOSSES[pair_format]
        name = (overrides or {}).get(pair_format.value, next(iter(available)))
        if name not in available:
            raise ValueError(
                f"loss {name!r} does not fit format {pair_format.value}; choose one of {sorted(available)}"
            )
        chosen[pair_format.value] = name
    return chosen


def build_datasets(train_pairs: pd.DataFrame, seed: int) -> tuple[dict[str, Dataset], dict[str, str]]:
    """One Hugging Face dataset per format, with the columns its losses expect, plus each text's label."""
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
        elif pair_format is PairFormat.LABELLED_TEXTS:
            pairs = labelled_texts_to_pairs(rows, seed)
            label_of_text.update(zip(rows["sentence1"], rows["label"], strict=True))
            data = {"anchor": pairs["anchor"], "positive": pairs["positive"]}
        else:
            data = {"anchor": rows["sentence1"], "positive": rows["sentence1"]}
        if len(data["anchor" if "anchor" in data else "sentence1"]) == 0:
            continue
        datasets[pair_format.value] = Dataset.from_dict({key: list(value) for key, value in data.items()})
    return datasets, label_of_text


class DistinctBatchSampler(DefaultBatchSampler):
    """Batches with no repeated text and, for labelled texts, no two anchors of the same label.

    In-batch-negative losses treat every other text in the batch as a negative; a same-label
    text there is a false negative that teaches the model to push paraphrases apart.
    """

    def __init__(
        self, dataset: Dataset, *args: object, label_of_text: dict[str, str], **kwargs: object
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.dataset = dataset
        self.label_of_text = label_of_text
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
        keys = {f"text:{text}" for text in texts}
        if (label := self.label_of_text.get(texts[0])) is not None:
            keys.add(f"label:{label}")
        return keys

    def _epoch_batches(self) -> list[list[int]]:
        if self._batches is not None and self._batches[0] == self.epoch:
            return self._batches[1]
        rng = np.random.default_rng(self.seed + self.epoch)
        remaining = [int(index) for index in rng.permutation(len(self.dataset))]
        keys = {index: self._keys(index) for index in remaining}
        batches = []
        while remaining:
            batch: list[int] = []
            seen: set[str] = set()
            deferred = []
            for index in remaining:
                if len(batch) < self.batch_size and not keys[index] & seen:
                    batch.append(index)
                    seen |= keys[index]
                else:
                    deferred.append(index)
            if not self.drop_last or len(batch) == self.batch_size:
                batches.append(batch)
            remaining = deferred if len(batch) > 1 or not self.drop_last else []
        self._batches = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._epoch_batches()

    def __len__(self) -> int:
        return len(self._epoch_batches())


class _LogToLogger(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            logger.info("step %s/%s: %s", state.global_step, state.max_steps, logs)


def resolve_device(device: str) -> str:
    """``auto`` picks cuda, then mps, then cpu."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def train_model(
    train_pairs: pd.DataFrame,
    settings: Settings,
    loss_overrides: dict[str, str] | None = None,
) -> TrainedModel:
    """Train (or reuse) the version these rows and settings define, written atomically to ``models/<version>``."""
    base_path = resolve_base_model(settings.base_model)
    formats = sorted({PairFormat(value) for value in train_pairs["format"].unique()})
    losses_by_format = choose_losses(formats, loss_overrides)
    config = training_config(settings)
    data_hash = data_version(train_pairs)
    version = model_version(settings.base_model, data_hash, config, losses_by_format)
    target = settings.models_dir / version
    common = dict(
        version=version,
        path=target,
        base_model=settings.base_model,
        losses=losses_by_format,
        data_version=data_hash,
        config=config,
        train_rows=len(train_pairs),
    )
    if (target / "training.json").exists():
        saved = json.loads((target / "training.json").read_text())
        return TrainedModel(
            **common, train_seconds=saved["train_seconds"], reused=True, log_history=saved["log_history"]
        )

    datasets, label_of_text = build_datasets(train_pairs, settings.seed)
    if not datasets:
        raise ValueError("no training pairs: every format left nothing to train on")
    device = resolve_device(settings.device)
    model = load_model(base_path, device=device)
    model.max_seq_length = settings.max_seq_length
    loss_modules = {name: LOSSES[PairFormat(name)][losses_by_format[name]](model) for name in datasets}

    scratch = settings.models_dir / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(scratch / "trainer"),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a ratio of the total steps
        seed=settings.seed,
        data_seed=settings.seed,
        batch_sampler=lambda *a, **k: DistinctBatchSampler(*a, label_of_text=label_of_text, **k),
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, sum(len(d) for d in datasets.values()) // settings.batch_size // 10),
        disable_tqdm=True,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
    )
    single = len(datasets) == 1
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=next(iter(datasets.values())) if single else datasets,
        loss=next(iter(loss_modules.values())) if single else loss_modules,
        callbacks=[_LogToLogger()],
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    log_history = [
        {key: value for key, value in entry.items() if isinstance(value, int | float)}
        for entry in trainer.state.log_history
    ]
    model.save(str(scratch / "model"))
    (scratch / "model" / "training.json").write_text(
        json.dumps(
            {
                "version": version,
                "base_model": settings.base_model,
                "data_version": data_hash,
                "losses": losses_by_format,
                "config": config,
                "code_version": TRAINING_CODE_VERSION,
                "train_rows": len(train_pairs),
                "train_seconds": train_seconds,
                "log_history": log_history,
            },
            indent=2,
        )
    )
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    try:
        # rename is atomic: the version folder appears whole or not at all.
        os.rename(scratch / "model", target)
    except OSError:
        if not (target / "training.json").exists():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return TrainedModel(**common, train_seconds=train_seconds, reused=False, log_history=log_history)
