"""Training with the tiny model: every format trains, versions are content-addressed and reused."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydantic
import pytest
import torch
from datasets import Dataset

from st_assets.defs.training import TrainingConfig
from st_assets.settings import Settings
from st_assets.steps import train as train_step
from st_assets.steps.augment import TermMap, counterfactual_augment, load_term_map
from st_assets.steps.formats import PAIR_COLUMNS, PairFormat
from st_assets.steps.models import encode_texts, load_model, model_fingerprint, remove_abandoned_scratch
from st_assets.steps.pairs import labelled_texts_to_pairs
from st_assets.steps.proxy_loss import PROXY_LEARNING_RATE, PROXY_PASSES, ProxySoftmaxLoss, label_proxies
from st_assets.steps.split import split_texts
from st_assets.steps.train import (
    LABEL_COLUMNS,
    DistinctBatchSampler,
    build_datasets,
    build_evaluator,
    choose_losses,
    data_version,
    select_training_rows,
    train_model,
    training_batch_size,
    training_config,
)
from st_assets.steps.training_code import NoTrainingPairsError, TrainingSettingError


def _unit_vectors_of(vectors: dict[str, list[float]]) -> Callable[[list[str]], np.ndarray]:
    """An encoder that looks each text up in ``vectors`` and scales it to unit length."""

    def encode(batch: list[str]) -> np.ndarray:
        batch_vectors = np.array([vectors[text] for text in batch], dtype=float)
        return batch_vectors / np.linalg.norm(batch_vectors, axis=1, keepdims=True)

    return encode


def _pairs(pair_format: PairFormat, count: int = 12) -> pd.DataFrame:
    rows = []
    for i in range(count):
        row = dict.fromkeys(PAIR_COLUMNS)
        row.update(
            source_file="f.csv",
            row_number=i + 1,
            row_hash=str(i),
            format=pair_format.value,
            sentence1=f"first sentence {i}",
        )
        if pair_format in (PairFormat.SCORED, PairFormat.BINARY):
            row.update(sentence2=f"second sentence {i}", score=float(i % 2))
        elif pair_format is PairFormat.TRIPLET:
            row.update(sentence2=f"positive {i}", negative=f"negative {i}")
        elif pair_format is PairFormat.ANCHOR_POSITIVE:
            row.update(sentence2=f"answer {i}")
        elif pair_format is PairFormat.LABELLED_TEXTS:
            row.update(label=f"intent{i % 3}")
        rows.append(row)
    return pd.DataFrame(rows)


# Labelled texts as same-label pairs with in-batch negatives, not the default proxies.
MNRL = {PairFormat.LABELLED_TEXTS: "MultipleNegativesRankingLoss"}


@pytest.mark.parametrize("pair_format", list(PairFormat))
def test_each_format_trains_and_saves_a_loadable_model(
    pair_format: PairFormat, tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=4)
    trained = train_model(_pairs(pair_format), settings)
    assert not trained.reused
    assert (trained.path / "model.safetensors").exists()
    assert any("loss" in entry for entry in trained.log_history)
    vectors = encode_texts(load_model(trained.path), ["hello there"])
    assert vectors.shape == (1, 32)


def test_same_rows_and_settings_reuse_the_version_without_training(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=4)
    pairs = _pairs(PairFormat.SCORED)
    first = train_model(pairs, settings)
    again = train_model(pairs.sample(frac=1.0, random_state=1), settings)
    assert again.reused and again.version == first.version
    changed = train_model(pairs, settings.model_copy(update={"learning_rate": 1e-4}))

    def config_with(option: dict[str, object], formats: list[PairFormat], evaluates: bool = True) -> dict:
        return training_config(settings.model_copy(update=option), formats, evaluates)

    scored, labelled = [PairFormat.SCORED], [PairFormat.LABELLED_TEXTS]
    for option in ({"matryoshka_dims": [16, 32]}, {"epochs": 2}, {"keep_best_checkpoint": False}):
        assert config_with(option, scored) != config_with({}, scored)
    pairs_loss = {"losses": MNRL}
    assert config_with(pairs_loss | {"hard_negatives": True}, labelled) != config_with(pairs_loss, labelled)
    # Labelled texts trained towards proxies (the default) have no pairs to mine a negative for.
    assert config_with({"hard_negatives": True}, labelled) == config_with({}, labelled)
    # Settings that cannot act on the run leave the version alone.
    assert config_with({"hard_negatives": True}, scored) == config_with({}, scored)
    assert config_with({"keep_best_checkpoint": False}, scored, False) == config_with({}, scored, False)
    assert config_with({"replay_fraction": 0.5}, scored) == config_with({}, scored)
    assert config_with({"matryoshka_dims": [16, 32]}, scored) == config_with(
        {"matryoshka_dims": [32, 16]}, scored
    )
    assert changed.version != first.version
    assert sorted(p.name for p in settings.models_dir.iterdir()) == sorted([first.version, changed.version])


def test_the_default_batch_size_is_8_for_scored_pairs_alone_and_recorded_resolved(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path))
    assert training_batch_size(settings, [PairFormat.SCORED]) == 8
    for formats in (
        [PairFormat.BINARY],
        [PairFormat.TRIPLET],
        [PairFormat.SCORED, PairFormat.LABELLED_TEXTS],
    ):
        assert training_batch_size(settings, formats) == 32
    assert training_batch_size(settings.model_copy(update={"batch_size": 16}), [PairFormat.SCORED]) == 16
    # The version hashes the batch size trained with, so the default and its explicit value are one model.
    pairs = _pairs(PairFormat.SCORED)
    by_default = train_model(pairs, settings.model_copy(update={"eval_steps": 0}))
    explicit = train_model(pairs, settings.model_copy(update={"eval_steps": 0, "batch_size": 8}))
    assert by_default.config["batch_size"] == 8
    assert explicit.reused and explicit.version == by_default.version


def test_examples_trained_on_count_every_epoch(tmp_path: Path, tiny_model_path: Path) -> None:
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=4, eval_steps=0, epochs=2)
    trained = train_model(_pairs(PairFormat.LABELLED_TEXTS), settings)  # 12 texts, each 3 times an epoch
    assert (trained.train_rows, trained.train_examples) == (12, 12 * PROXY_PASSES * 2)
    assert train_model(_pairs(PairFormat.LABELLED_TEXTS), settings).train_examples == 12 * PROXY_PASSES * 2


def test_mined_label_negatives_are_of_another_label_and_skip_near_duplicates() -> None:
    vectors = {
        "a1": [1.0, 0.0, 0.0],
        "a2": [0.8, 0.6, 0.0],  # a1's positive: cosine 0.8
        "b1": [0.99, 0.0, 0.141],  # the same question filed under B: cosine 0.99 to a1
        "b2": [0.5, 0.0, 0.866],  # a real hard negative for a1: cosine 0.5
        "c1": [0.0, 0.0, 1.0],
        "c2": [0.0, 1.0, 0.0],
    }
    texts = pd.DataFrame({"sentence1": list(vectors), "label": list("AABBCC"), "format": "labelled_texts"})

    encode = _unit_vectors_of(vectors)

    datasets, label_of_text = build_datasets(texts, seed=0, encode=encode)
    triplets = datasets["labelled_texts"].to_pandas()
    assert len(triplets) == 6
    assert all(
        label_of_text[n] != label_of_text[a]
        for a, n in zip(triplets["anchor"], triplets["negative"], strict=True)
    )
    negative_of = dict(zip(triplets["anchor"], triplets["negative"], strict=True))
    assert negative_of["a1"] == "b2"  # b1 is nearer but within 5% of the positive's score


@pytest.mark.parametrize("pair_format", [PairFormat.LABELLED_TEXTS, PairFormat.ANCHOR_POSITIVE])
def test_negatives_mined_a_block_of_anchors_at_a_time_match_one_block(
    pair_format: PairFormat, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = _pairs(pair_format, count=40)
    texts = pd.unique(pairs[["sentence1", "sentence2"]].to_numpy().ravel())
    rng = np.random.default_rng(3)
    vectors = dict(zip(texts, rng.normal(size=(len(texts), 8)), strict=True))

    encode = _unit_vectors_of(vectors)

    def mined_negatives() -> list[str]:
        datasets, _ = build_datasets(pairs, seed=0, encode=encode)
        return list(datasets[pair_format.value]["negative"])

    in_one_block = mined_negatives()
    monkeypatch.setattr(train_step, "MINING_BLOCK_ROWS", 3)
    assert mined_negatives() == in_one_block
    assert len(set(in_one_block)) > 1


@pytest.mark.parametrize("pair_format", [PairFormat.LABELLED_TEXTS, PairFormat.ANCHOR_POSITIVE])
def test_hard_negatives_train_with_a_mined_negative_column(
    pair_format: PairFormat, tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = _pairs(pair_format)
    model = load_model(tiny_model_path)
    datasets, _ = build_datasets(pairs, seed=0, encode=lambda texts: encode_texts(model, texts))
    mined = datasets[pair_format.value].to_pandas()
    assert list(mined.columns) == ["anchor", "positive", "negative"]
    assert (mined["negative"] != mined["positive"]).all()
    trained_on: list[list[str]] = []

    class RecordingTrainer(train_step.SentenceTransformerTrainer):
        """The real trainer, noting the columns of what it is given to train on."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            trained_on.append(kwargs["train_dataset"].column_names)  # type: ignore[union-attr]
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(train_step, "SentenceTransformerTrainer", RecordingTrainer)
    settings = Settings(
        home=tmp_path, base_model=str(tiny_model_path), batch_size=4, hard_negatives=True, losses=MNRL
    )
    trained = train_model(pairs, settings)
    assert trained_on == [["anchor", "positive", "negative"]]
    assert trained.config["hard_negatives"] is True
    assert any("loss" in entry for entry in trained.log_history)


def test_data_version_ignores_row_order_and_file_names() -> None:
    pairs = _pairs(PairFormat.SCORED)
    renamed = pairs.assign(source_file="other.csv").iloc[::-1]
    assert data_version(pairs) == data_version(renamed)
    assert data_version(pairs) != data_version(pairs.assign(score=0.5))


def test_loss_override_must_fit_the_format() -> None:
    assert choose_losses([PairFormat.SCORED], {"scored": "CoSENTLoss"}) == {"scored": "CoSENTLoss"}
    assert choose_losses([PairFormat.SCORED, PairFormat.BINARY], {"scored": "CoSENTLoss"}) == {
        "scored": "CoSENTLoss",
        "binary": "OnlineContrastiveLoss",
    }
    with pytest.raises(pydantic.ValidationError, match="does not fit format scored"):
        Settings(losses={"scored": "TripletLoss"})


def test_a_loss_override_for_a_misspelt_format_is_an_error() -> None:
    with pytest.raises(pydantic.ValidationError, match="labelled_texts"):
        Settings(losses={"labeled_texts": "CachedMultipleNegativesRankingLoss"})


def test_batches_never_hold_two_texts_of_one_label() -> None:
    anchors = [f"text {i}" for i in range(40)]
    dataset = Dataset.from_dict({"anchor": anchors, "positive": [f"pos {i}" for i in range(40)]})
    label_of_text = {text: f"label{i % 5}" for i, text in enumerate(anchors)}
    sampler = DistinctBatchSampler(
        dataset, batch_size=8, drop_last=False, label_of_text=label_of_text, seed=1
    )
    batches = list(sampler)
    assert sorted(index for batch in batches for index in batch) == list(range(40))
    for batch in batches:
        labels = [label_of_text[anchors[index]] for index in batch]
        assert len(labels) == len(set(labels)) <= 5
    assert len(sampler) == len(batches)


def test_a_window_trains_on_recent_rows_plus_a_replay_sample(tmp_path: Path) -> None:
    pairs = _pairs(PairFormat.SCORED, count=40)
    pairs["arrived_at"] = pd.to_datetime("2026-01-01", utc=True) + pd.to_timedelta(pairs.index, unit="D")
    settings = Settings(home=tmp_path, train_window_rows=8, replay_fraction=0.5, seed=3)
    selected = select_training_rows(pairs, settings)
    newest = set(pairs.sort_values("arrived_at").tail(8)["row_number"])
    assert newest <= set(selected["row_number"])
    assert len(selected) == 8 + 4
    assert selected.equals(select_training_rows(pairs, settings))
    by_days = select_training_rows(
        pairs, settings.model_copy(update={"train_window_rows": None, "train_window_days": 2.5})
    )
    assert len(by_days) == 3 + 2


def test_a_windowed_version_records_the_texts_it_trained_on(tmp_path: Path, tiny_model_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        base_model=str(tiny_model_path),
        batch_size=4,
        train_window_rows=4,
        replay_fraction=0.25,
        eval_steps=0,
    )
    scored = _pairs(PairFormat.SCORED, count=20)
    scored["arrived_at"] = pd.to_datetime("2026-01-01", utc=True) + pd.to_timedelta(scored.index, unit="D")
    trained = train_model(scored, settings)
    selected = select_training_rows(scored, settings)
    assert trained.trained_texts == split_texts(selected) and len(selected) == 5
    # Around a window a labelled text's positive may be any training text of its label: all of them count.
    labelled = _pairs(PairFormat.LABELLED_TEXTS, count=20)
    labelled["arrived_at"] = scored["arrived_at"]
    assert train_model(labelled, settings.model_copy(update={"losses": MNRL})).trained_texts == split_texts(
        labelled
    )


def test_counterfactual_augmentation_is_recorded_with_the_version(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    pairs = _pairs(PairFormat.SCORED)
    pairs.loc[0, "sentence1"] = "He lost his card"
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=4)
    plain = train_model(pairs, settings)
    augmented = train_model(pairs, settings.model_copy(update={"augment": "counterfactual"}))
    assert augmented.version != plain.version
    assert augmented.augmentation["added_rows"] == 1
    assert augmented.augmentation["terms_swapped"] == {"he": 1, "his": 1}
    assert augmented.train_rows == plain.train_rows + 1
    assert "1 rows added" in (augmented.path / "README.md").read_text()


def test_same_inputs_and_seed_train_identical_weights(tmp_path: Path, tiny_model_path: Path) -> None:
    pairs = _pairs(PairFormat.LABELLED_TEXTS)
    first = train_model(pairs, Settings(home=tmp_path / "a", base_model=str(tiny_model_path), batch_size=4))
    second = train_model(pairs, Settings(home=tmp_path / "b", base_model=str(tiny_model_path), batch_size=4))
    texts = ["hello there", "reset my password"]
    assert first.version == second.version
    np.testing.assert_allclose(
        encode_texts(load_model(first.path), texts), encode_texts(load_model(second.path), texts), atol=1e-6
    )


def test_default_schedule_evaluates_each_quarter_epoch_counted_in_real_steps(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    # Three intents at batch 4: label-distinct batches hold 3 pairs, so an epoch takes more steps
    # than rows // batch_size. The schedule follows the steps the trainer really takes.
    pairs = _pairs(PairFormat.LABELLED_TEXTS, count=30)
    eval_pairs = pairs.iloc[:6].assign(sentence1=lambda f: "held out " + f["sentence1"])
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=4)
    trained = train_model(pairs.iloc[6:], settings, eval_pairs=eval_pairs)
    eval_at = [entry["step"] for entry in trained.log_history if "eval_sequential_score" in entry]
    last_step = max(entry["step"] for entry in trained.log_history)
    assert last_step > len(pairs.iloc[6:]) // 4
    assert 3 <= len(eval_at) <= 4
    assert eval_at[-1] == last_step


@pytest.mark.parametrize("keep_best_checkpoint", [True, False])
def test_early_stopping_ends_training_when_the_eval_score_stops_rising(
    tmp_path: Path, tiny_model_path: Path, keep_best_checkpoint: bool
) -> None:
    # A learning rate too small to reorder anything: the eval split's Spearman never improves.
    pairs = _pairs(PairFormat.SCORED, count=24)
    eval_pairs = pairs.iloc[:6].assign(sentence1=lambda f: "held out " + f["sentence1"])
    settings = Settings(
        home=tmp_path,
        base_model=str(tiny_model_path),
        batch_size=4,
        epochs=3,
        eval_steps=1,
        learning_rate=1e-12,
        early_stopping_patience=1,
        keep_best_checkpoint=keep_best_checkpoint,
    )
    trained = train_model(pairs.iloc[6:], settings, eval_pairs=eval_pairs)
    last_step = max(entry["step"] for entry in trained.log_history)
    assert last_step == 2  # the first evaluation sets the best score, the second stops training


def test_eval_split_drives_in_training_evaluation_and_the_card(tmp_path: Path, tiny_model_path: Path) -> None:
    pairs = _pairs(PairFormat.SCORED, count=24)
    eval_pairs = pairs.iloc[:6].assign(sentence1=lambda f: "held out " + f["sentence1"])
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=4, eval_steps=2)
    trained = train_model(pairs.iloc[6:], settings, eval_pairs=eval_pairs)
    scores = [
        entry["eval_sequential_score"] for entry in trained.log_history if "eval_sequential_score" in entry
    ]
    assert len(scores) >= 2
    assert "in-training eval score" in (trained.path / "README.md").read_text()


def test_a_launchpad_loss_for_one_format_keeps_the_configured_losses_of_the_others(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, losses={"binary": "ContrastiveLoss"}, epochs=1)
    run = TrainingConfig(losses={"scored": "CoSENTLoss"}, epochs=2).apply(settings)
    assert run.losses == {"binary": "ContrastiveLoss", "scored": "CoSENTLoss"}
    assert run.epochs == 2 and settings.losses == {"binary": "ContrastiveLoss"}


def test_every_setting_that_shapes_training_can_be_set_for_one_run() -> None:
    # score_scale acts when pairs are read, before training: a run of finetuned_model cannot change it.
    shaping = {*train_step.TRAINING_FIELDS, "base_model", "losses", "device", "counterfactual_groups"}
    assert shaping - {"score_scale"} <= set(TrainingConfig.model_fields)
    run = TrainingConfig(train_window_rows=50, counterfactual_groups=["gender"]).apply(Settings())
    assert (run.train_window_rows, run.counterfactual_groups) == (50, ["gender"])


def test_a_run_can_take_a_setting_of_settings_yaml_back_to_its_default() -> None:
    # An empty launchpad field keeps the home's value, so "no window" needs its own way to be said.
    home = Settings(train_window_rows=500, early_stopping_patience=2, losses={"scored": "CoSENTLoss"})
    config = TrainingConfig(unset=["train_window_rows", "losses"], epochs=2)
    run = config.apply(home)
    assert (run.train_window_rows, run.losses, run.epochs) == (None, {}, 2)
    assert run.early_stopping_patience == 2
    assert config.overridden() == ["epochs", "train_window_rows", "losses"]
    with pytest.raises(ValueError, match="unset: 'home' is no training setting"):
        TrainingConfig(unset=["home"]).apply(home)
    with pytest.raises(ValueError, match="unset: 'epochs' is given a value as well"):
        TrainingConfig(unset=["epochs"], epochs=3).apply(home)


def test_a_small_home_with_few_labels_is_told_its_batches_run_short(
    tmp_path: Path, tiny_model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 12 texts of 3 intents at batch 8: batches of at most 3 where plain batches would hold 6.
    settings = Settings(
        home=tmp_path, base_model=str(tiny_model_path), batch_size=8, eval_steps=0, losses=MNRL
    )
    with caplog.at_level(logging.WARNING, logger=train_step.logger.name):
        train_model(_pairs(PairFormat.LABELLED_TEXTS), settings)
    assert "labelled_texts batches hold 3.0 examples on average, against batch_size 8" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=train_step.logger.name):
        train_model(_pairs(PairFormat.TRIPLET), settings)  # a label per row: batches as full as plain ones
    assert "examples on average" not in caplog.text


def test_offline_a_model_the_cache_holds_only_part_of_fails_without_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its config.json is cached (the token counter fetched it, or a download stopped): not its weights.
    from huggingface_hub import constants

    entry = tmp_path / "hub" / "models--org--partial"
    (entry / "snapshots" / "abc123").mkdir(parents=True)
    (entry / "snapshots" / "abc123" / "config.json").write_text('{"model_type": "bert"}')
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    settings = Settings(home=tmp_path, base_model="org/partial", batch_size=4)
    with pytest.raises(
        TrainingSettingError, match=r"'org/partial': offline .* does not load from the Hugging"
    ):
        train_model(_pairs(PairFormat.SCORED), settings)


def test_a_max_seq_length_past_the_model_positions_is_capped(tmp_path: Path, tiny_model_path: Path) -> None:
    # The tiny model has 128 positions; a text of 300 tokens would not fit them.
    pairs = _pairs(PairFormat.SCORED, count=12)
    pairs.loc[0, "sentence1"] = "card " * 300
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=4, max_seq_length=1024)
    trained = train_model(pairs, settings)
    model = load_model(trained.path)
    # Longer than its base model's 64: the saved model reads as many as it trained on.
    assert model.max_seq_length == 126
    assert encode_texts(model, ["card " * 300]).shape == (1, model.get_embedding_dimension())


def test_label_distinct_batches_short_of_labels_are_reported(
    tmp_path: Path, tiny_model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Three intents: a batch holds at most three texts, whatever batch_size says.
    settings = Settings(
        home=tmp_path, base_model=str(tiny_model_path), batch_size=8, eval_steps=0, losses=MNRL
    )
    with caplog.at_level("WARNING", logger="st_assets.steps.train"):
        trained = train_model(_pairs(PairFormat.LABELLED_TEXTS, count=48), settings)
    assert trained.train_steps and trained.train_examples / trained.train_steps <= 3
    assert (
        "against batch_size 8: a batch holds no text twice and at most one text of each label" in caplog.text
    )
    # Saved with the version: a reused version reports them too.
    assert (
        train_model(_pairs(PairFormat.LABELLED_TEXTS, count=48), settings).train_steps == trained.train_steps
    )


def test_the_training_length_bound_is_not_saved_with_the_model(tmp_path: Path, tiny_model_path: Path) -> None:
    # A model trained at 16 tokens still reads as many as its base model when it serves and is scored.
    base_reads = load_model(tiny_model_path).max_seq_length
    assert base_reads > 16
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=4, max_seq_length=16)
    trained = train_model(_pairs(PairFormat.SCORED, count=12), settings)
    assert trained.config["max_seq_length"] == 16
    assert load_model(trained.path).max_seq_length == base_reads


def test_matryoshka_is_named_with_the_loss_and_dimensions_past_the_models_fail_as_a_setting(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=4, matryoshka_dims=[16, 8])
    trained = train_model(_pairs(PairFormat.SCORED, count=12), settings)
    assert trained.loss_summary == "scored=MatryoshkaLoss(CosineSimilarityLoss; 16/8)"
    assert "scored: MatryoshkaLoss(CosineSimilarityLoss; 16/8)" in (trained.path / "README.md").read_text()
    too_wide = settings.model_copy(update={"matryoshka_dims": [384, 16]})
    with pytest.raises(
        TrainingSettingError, match=r"matryoshka_dims \[384, 16\]: the base model's embeddings have 32"
    ):
        train_model(_pairs(PairFormat.SCORED, count=12), too_wide)


@pytest.fixture(scope="module")
def term_map() -> TermMap:
    return load_term_map()


def test_a_counterfactual_copy_is_never_its_originals_negative(term_map: TermMap) -> None:
    rows = pd.DataFrame(
        {
            "sentence1": ["How do I add my son?", "How do I add a card?", "Where is my card?"],
            "sentence2": ["Open settings and enter his details.", "Open the wallet page.", "It is posted."],
            "format": "anchor_positive",
            "row_hash": ["r1", "r2", "r3"],
        }
    )
    augmented = counterfactual_augment(rows, term_map)
    son, his, her = (
        "How do I add my son?",
        "Open settings and enter his details.",
        "Open settings and enter her details.",
    )
    assert augmented.original_of_text == {"How do I add my daughter?": son, her: his}
    # The copy's answer is the nearest candidate for the original anchor, just under the 5% margin.
    vectors = {
        son: [1.0, 0.0, 0.0],
        his: [0.9, 0.436, 0.0],
        her: [0.84, 0.0, 0.543],
        "How do I add my daughter?": [0.95, 0.0, 0.312],
        "How do I add a card?": [0.0, 1.0, 0.0],
        "Open the wallet page.": [0.5, 0.866, 0.0],
        "Where is my card?": [0.0, 0.0, 1.0],
        "It is posted.": [0.1, 0.0, 0.995],
    }

    encode = _unit_vectors_of(vectors)

    def negative_of(original_of_text: dict[str, str] | None) -> dict[str, str]:
        datasets, _ = build_datasets(augmented.rows, seed=0, encode=encode, original_of_text=original_of_text)
        mined = datasets["anchor_positive"]
        return dict(zip(mined["anchor"], mined["negative"], strict=True))

    assert negative_of(None)[son] == her  # what the twin-aware keys prevent
    assert negative_of(augmented.original_of_text)[son] == "Open the wallet page."

    dataset = Dataset.from_dict(
        {"anchor": list(augmented.rows["sentence1"]), "positive": list(augmented.rows["sentence2"])}
    )
    for seed in range(10):
        sampler = DistinctBatchSampler(
            dataset,
            batch_size=2,
            drop_last=False,
            label_of_text={},
            original_of_text=augmented.original_of_text,
            seed=seed,
        )
        for batch in sampler:
            assert {dataset[i]["anchor"] for i in batch} != {son, "How do I add my daughter?"}


def test_counterfactual_copies_of_held_out_texts_are_not_trained_on(term_map: TermMap) -> None:
    rows = pd.DataFrame(
        {
            "sentence1": ["Can my son open an account?", "My husband lost his card."],
            "format": "unlabelled_texts",
        }
    )
    augmented = counterfactual_augment(rows, term_map, held_out_texts={"can my  daughter open an account?"})
    assert list(augmented.rows["sentence1"].iloc[2:]) == ["My wife lost her card."]
    assert augmented.held_out_skipped == 1


def test_the_same_rows_in_another_order_train_the_same_weights(tmp_path: Path, tiny_model_path: Path) -> None:
    pairs = _pairs(PairFormat.LABELLED_TEXTS)
    shuffled = pairs.sample(frac=1.0, random_state=4).assign(source_file="renamed.csv")
    first = train_model(pairs, Settings(home=tmp_path / "a", base_model=str(tiny_model_path), batch_size=4))
    second = train_model(
        shuffled, Settings(home=tmp_path / "b", base_model=str(tiny_model_path), batch_size=4)
    )
    assert first.version == second.version and not second.reused
    texts = ["first sentence 3", "another text"]
    np.testing.assert_array_equal(
        encode_texts(load_model(first.path), texts), encode_texts(load_model(second.path), texts)
    )


def test_the_eval_split_is_part_of_the_version_when_it_picks_the_checkpoint(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    pairs = _pairs(PairFormat.SCORED, count=16)
    train, eval_one, eval_two = pairs.iloc[:10], pairs.iloc[10:13], pairs.iloc[13:]
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=4)
    picked_on_one = train_model(train, settings, eval_pairs=eval_one)
    picked_on_two = train_model(train, settings, eval_pairs=eval_two)
    assert picked_on_one.version != picked_on_two.version and not picked_on_two.reused
    last_step = settings.model_copy(update={"keep_best_checkpoint": False})
    assert train_model(train, last_step, eval_pairs=eval_one).version == (
        train_model(train, last_step, eval_pairs=eval_two).version
    )


def test_another_answer_to_the_same_question_is_not_mined_as_its_negative() -> None:
    rows = pd.DataFrame(
        {
            "sentence1": ["q", "q", "r"],
            "sentence2": ["answer one", "answer two", "answer three"],
            "format": "anchor_positive",
        }
    )
    vectors = {
        "q": [1.0, 0.0],
        "r": [0.0, 1.0],
        "answer one": [0.9, 0.436],
        "answer two": [0.8, 0.6],  # q's other answer: nearer to q than answer three
        "answer three": [0.5, 0.866],
    }

    encode = _unit_vectors_of(vectors)

    datasets, _ = build_datasets(rows, seed=0, encode=encode)
    assert list(datasets["anchor_positive"]["negative"]) == ["answer three", "answer three", "answer two"]


def test_no_negative_is_mined_when_an_anchor_has_none_to_take(caplog: pytest.LogCaptureFixture) -> None:
    rows = pd.DataFrame({"sentence1": ["q1", "q2"], "sentence2": ["a", "a"], "format": "anchor_positive"})
    datasets, _ = build_datasets(rows, seed=0, encode=lambda texts: np.eye(3)[: len(texts)])
    assert datasets["anchor_positive"].column_names == ["anchor", "positive"]
    assert "hard negatives skipped" in caplog.text


def test_a_failed_training_leaves_no_scratch_folder(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(self: object) -> None:
        raise MemoryError("simulated")

    monkeypatch.setattr(train_step.SentenceTransformerTrainer, "train", out_of_memory)
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=4)
    with pytest.raises(MemoryError):
        train_model(_pairs(PairFormat.SCORED), settings)
    assert list(settings.models_dir.iterdir()) == []


def test_the_model_card_reports_the_kept_checkpoints_scores(tmp_path: Path, tiny_model_path: Path) -> None:
    pairs = _pairs(PairFormat.SCORED, count=24)
    settings = Settings(
        home=tmp_path,
        base_model=str(tiny_model_path),
        batch_size=4,
        epochs=3,
        eval_steps=1,
        learning_rate=1e-3,
    )
    trained = train_model(pairs.iloc[:18], settings, eval_pairs=pairs.iloc[18:])
    record = json.loads((trained.path / "training.json").read_text())
    assert record["best_checkpoint"] != f"checkpoint-{record['log_history'][-1]['step']}"  # an earlier one
    card = (trained.path / "README.md").read_text()
    card_score = float(re.search(r"\|\s*\**spearman_cosine\**\s*\|\s*\**(-?[0-9.]+)", card).group(1))
    evaluator = build_evaluator(pairs.iloc[18:], pairs.iloc[:18])
    assert card_score == pytest.approx(
        evaluator(load_model(trained.path))["scored_spearman_cosine"], abs=1e-4
    )
    assert f"the weights are those of {record['best_checkpoint']}" in card


def test_a_tied_best_score_keeps_the_later_checkpoint_and_the_weights_are_readable_to_all(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    pairs = _pairs(PairFormat.ANCHOR_POSITIVE, count=16)
    eval_pairs = pairs.iloc[12:].assign(sentence2=pairs["sentence1"].iloc[12:])  # each answer is its anchor
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=4, epochs=2, eval_steps=1)
    trained = train_model(pairs.iloc[:12], settings, eval_pairs=eval_pairs)
    record = json.loads((trained.path / "training.json").read_text())
    scores = [
        entry["eval_sequential_score"] for entry in record["log_history"] if "eval_sequential_score" in entry
    ]
    assert len(scores) > 2 and set(scores) == {1.0}  # saturated: every evaluation ties
    last_step = max(entry["step"] for entry in record["log_history"])
    assert record["best_checkpoint"] == f"checkpoint-{last_step}"  # all the training, not the first step's
    for saved in trained.path.rglob("*"):
        if saved.is_file():
            assert saved.stat().st_mode & 0o777 == 0o644, saved


def test_a_mined_negative_stays_below_a_positive_of_negative_similarity() -> None:
    vectors = {
        "anchor": [1.0, 0.0],
        "its answer": [-0.2, 0.98],  # cosine -0.2: a poor positive, still the positive
        "nearly as close": [-0.195, -0.981],  # -0.195: more similar than the positive
        "clearly further": [-0.5, 0.866],
        "x": [0.0, 1.0],
        "y": [0.0, -1.0],
    }
    rows = pd.DataFrame(
        {
            "sentence1": ["anchor", "x", "y"],
            "sentence2": ["its answer", "nearly as close", "clearly further"],
            "format": "anchor_positive",
        }
    )

    encode = _unit_vectors_of(vectors)

    datasets, _ = build_datasets(rows, seed=0, encode=encode)
    assert datasets["anchor_positive"]["negative"][0] == "clearly further"


def test_the_in_training_retrieval_evaluator_asks_each_anchor_once_with_all_its_answers() -> None:
    rows = pd.DataFrame(
        {
            "format": "anchor_positive",
            "sentence1": ["card lost", "card lost", "forgot pin"],
            "sentence2": ["lost my card", "card gone", "pin locked"],
        }
    )
    (retrieval,) = build_evaluator(rows, rows.iloc[:0]).evaluators
    assert sorted(retrieval.queries) == ["card lost", "forgot pin"]
    answers = {
        retrieval.queries[retrieval.queries_ids.index(query_id)]: {
            retrieval.corpus[retrieval.corpus_ids.index(doc)] for doc in docs
        }
        for query_id, docs in retrieval.relevant_docs.items()
    }
    assert answers == {"card lost": {"lost my card", "card gone"}, "forgot pin": {"pin locked"}}


def test_a_windowed_text_pairs_with_older_texts_of_its_label(tmp_path: Path, tiny_model_path: Path) -> None:
    pairs = _pairs(PairFormat.LABELLED_TEXTS, count=30)
    pairs["arrived_at"] = pd.to_datetime("2026-01-01", utc=True)
    # A quiet month, then two texts of two different intents: neither has a recent partner of its label.
    pairs.loc[[0, 1], "arrived_at"] = pd.to_datetime("2026-02-01", utc=True)
    settings = Settings(
        home=tmp_path,
        base_model=str(tiny_model_path),
        batch_size=4,
        train_window_days=7,
        replay_fraction=0.25,
        losses=MNRL,
    )
    trained = train_model(pairs, settings)
    # Two recent rows and one replayed (a quarter of two, rounded up), each with a positive of its intent.
    assert trained.train_rows == 3 and trained.train_examples >= 3
    assert "label_partners_version" in trained.config
    older = pairs.loc[pairs["arrived_at"] == pairs["arrived_at"].min()]
    more_old_texts = pd.concat([pairs, older.head(3).assign(sentence1=lambda f: f["sentence1"] + " again")])
    # Other older texts to pair with train other weights, so they give another version.
    assert train_model(more_old_texts, settings).version != trained.version


def test_partners_supply_each_text_a_positive_of_its_label_never_itself() -> None:
    recent = pd.DataFrame({"sentence1": ["new card", "new pin"], "label": ["card", "pin"]})
    everything = pd.DataFrame(
        {
            "sentence1": ["old card 1", "old card 2", "new card", "old pin", "new pin"],
            "label": ["card"] * 3 + ["pin"] * 2,
        }
    )
    pairs = labelled_texts_to_pairs(recent, seed=1, partners=everything)
    assert pairs["anchor"].tolist() == ["new card", "new pin"]
    assert pairs.loc[0, "positive"] in {"old card 1", "old card 2"} and pairs.loc[1, "positive"] == "old pin"
    lonely = pd.DataFrame({"sentence1": ["only one"], "label": ["rare"]})
    assert labelled_texts_to_pairs(lonely, seed=1, partners=lonely).empty


def test_a_base_model_saved_over_in_place_gives_another_fingerprint(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    base = tmp_path / "company-base"
    shutil.copytree(tiny_model_path, base)
    before = model_fingerprint(str(base))
    # st_assets writes ONNX exports into a model folder: they are not the model.
    (base / "onnx").mkdir(exist_ok=True)
    (base / "onnx" / "model.onnx").write_bytes(b"export")
    # Nor are what a desktop or a download tool leaves beside it.
    (base / ".DS_Store").write_bytes(b"finder")
    (base / ".cache" / "huggingface").mkdir(parents=True)
    (base / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("etag")
    (base / "Thumbs.db").write_bytes(b"thumbs")
    assert model_fingerprint(str(base)) == before
    config = json.loads((base / "config_sentence_transformers.json").read_text())
    (base / "config_sentence_transformers.json").write_text(json.dumps({**config, "republished": 2}))
    assert model_fingerprint(str(base)) != before
    assert (
        model_fingerprint("sentence-transformers/all-MiniLM-L6-v2")
        == "sentence-transformers/all-MiniLM-L6-v2"
    )


def test_weights_in_a_linked_subfolder_are_part_of_the_fingerprint(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "0_Transformer"
    shared.mkdir(parents=True)
    (shared / "model.safetensors").write_bytes(b"weights one")
    base = tmp_path / "base"
    base.mkdir()
    (base / "modules.json").write_text("[]")
    (base / "0_Transformer").symlink_to(shared, target_is_directory=True)
    (shared / "loop").symlink_to(base, target_is_directory=True)  # a link back up: walked once
    before = model_fingerprint(str(base))
    (shared / "model.safetensors").write_bytes(b"weights two")
    assert model_fingerprint(str(base)) != before


def test_an_abandoned_scratch_folder_is_removed_and_a_fresh_one_kept(tmp_path: Path) -> None:
    old = tmp_path / ".tmp-v1-killed"
    (old / "trainer" / "checkpoint-5").mkdir(parents=True)
    (old / "trainer" / "checkpoint-5" / "optimizer.pt").write_bytes(b"x" * 100)
    day_ago = time.time() - 2 * 24 * 3600
    for item in [old, *old.rglob("*")]:
        os.utime(item, (day_ago, day_ago))
    fresh = tmp_path / ".tmp-v2-running"
    fresh.mkdir()
    remove_abandoned_scratch(tmp_path)
    assert not old.exists() and fresh.exists()


def test_pairs_with_their_own_score_are_batched_plainly_repeated_texts_and_all() -> None:
    # Eight candidates of one query: a loss that ranks them (CoSENT) needs them in one batch.
    dataset = Dataset.from_dict(
        {
            "sentence1": ["one query"] * 8,
            "sentence2": [f"candidate {i}" for i in range(8)],
            "score": [0.5] * 8,
        }
    )
    sampler = DistinctBatchSampler(
        dataset, batch_size=4, drop_last=False, valid_label_columns=LABEL_COLUMNS, label_of_text={}, seed=1
    )
    assert [len(batch) for batch in sampler] == [4, 4]
    assert sorted(index for batch in sampler for index in batch) == list(range(8))


def test_rows_of_a_dominant_label_with_no_negative_left_are_left_out_not_trained_as_zero_loss() -> None:
    anchors = [f"big {i}" for i in range(10)] + ["small 0", "small 1"]
    label_of_text = {text: text.split()[0] for text in anchors}
    dataset = Dataset.from_dict({"anchor": anchors, "positive": [f"p {text}" for text in anchors]})
    sampler = DistinctBatchSampler(
        dataset, batch_size=8, drop_last=False, valid_label_columns=LABEL_COLUMNS, label_of_text=label_of_text
    )
    batches = list(sampler)
    # Two batches hold a "small" row beside a "big" one; the other eight "big" rows would be alone.
    assert [len(batch) for batch in batches] == [2, 2]
    assert sampler.rows_left_out() == 8


def test_texts_differing_in_case_or_spacing_never_share_a_batch() -> None:
    anchors = ["How do I reset my PIN?", "how do i  reset my pin?", "where is my card", "card not arrived"]
    dataset = Dataset.from_dict(
        {"anchor": anchors, "positive": ["at an atm", "in the app", "posted", "soon"]}
    )
    for seed in range(10):
        sampler = DistinctBatchSampler(dataset, batch_size=4, drop_last=False, label_of_text={}, seed=seed)
        for batch in sampler:
            assert not {0, 1} <= set(batch), seed


def test_labelled_texts_of_one_label_alone_are_no_training_pairs(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    pairs = _pairs(PairFormat.LABELLED_TEXTS, count=6).assign(label="only_intent")
    with pytest.raises(NoTrainingPairsError, match="at least two labels"):
        train_model(pairs, Settings(home=tmp_path, base_model=str(tiny_model_path), eval_steps=0))


def test_no_evaluator_for_eval_rows_it_could_not_score() -> None:
    scored = _pairs(PairFormat.SCORED).assign(score=0.5)  # Spearman of constant scores is undefined
    assert build_evaluator(scored, scored) is None
    # A window of a new intent: no eval text shares a label with the texts trained on.
    labelled = _pairs(PairFormat.LABELLED_TEXTS)
    assert build_evaluator(labelled, labelled.assign(label="brand_new")) is None


def test_the_replay_sample_is_not_rounded_up_by_floating_point_error(tmp_path: Path) -> None:
    pairs = _pairs(PairFormat.SCORED, count=200)
    pairs["arrived_at"] = pd.to_datetime("2026-01-01", utc=True) + pd.to_timedelta(pairs.index, unit="h")
    settings = Settings(
        home=tmp_path, train_window_rows=100, replay_fraction=0.07
    )  # 0.07 * 100 = 7.000000000000001
    assert len(select_training_rows(pairs, settings)) == 100 + 7


def test_the_score_scale_is_recorded_for_scored_pairs_alone(tmp_path: Path) -> None:
    rescaled = Settings(home=tmp_path, score_scale=5, score_scales={"x*.csv": 5})
    # A home of labelled texts trains the same model whatever scale scores would be read on.
    formats = [PairFormat.LABELLED_TEXTS]
    assert training_config(Settings(home=tmp_path), formats, True) == training_config(rescaled, formats, True)
    scored = training_config(rescaled, [PairFormat.SCORED], True)
    assert scored["score_scale"] == 5 and scored["score_scales"] == {"x*.csv": 5}


def test_training_moves_each_supervised_format_the_way_its_labels_say(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    # Losses read dataset columns by position: a reordered column would train every format backwards
    # without an error. Scored on the rows trained on, each format must end better than it began. The
    # two sides of a pair share no word (a topic and its synonym), so the untrained model cannot tell.
    topics = ["card", "pin", "loan", "fee", "cash", "rate"]
    synonyms = ["plastic", "code", "credit", "charge", "money", "interest"]
    rows = []
    for i in range(36):
        same, other = synonyms[i % 6], synonyms[(i + 1) % 6]
        common = dict.fromkeys(PAIR_COLUMNS) | {"source_file": "f.csv", "row_number": i + 1}
        rows += [
            common
            | {"row_hash": f"t{i}", "format": "triplet", "sentence1": f"my {topics[i % 6]} question"}
            | {"sentence2": f"about the {same} again", "negative": f"about the {other} again"},
            common
            | {"row_hash": f"s{i}", "format": "scored", "sentence1": f"a {topics[i % 6]} matter"}
            | {"sentence2": f"the {same if i % 2 else other} topic", "score": 0.9 if i % 2 else 0.1},
            common
            | {"row_hash": f"b{i}", "format": "binary", "sentence1": f"one {topics[i % 6]} case"}
            | {"sentence2": f"this {same if i % 2 else other} case", "score": float(i % 2)},
        ]
    pairs = pd.DataFrame(rows)
    evaluator = build_evaluator(pairs, pairs)
    settings = Settings(
        home=tmp_path,
        base_model=str(tiny_model_path),
        batch_size=8,
        epochs=3,
        learning_rate=1e-3,
        eval_steps=0,
    )
    before = evaluator(load_model(str(tiny_model_path)))
    trained = train_model(pairs, settings)
    after = evaluator(load_model(str(trained.path)))
    for metric in ("triplet_cosine_accuracy", "scored_spearman_cosine", "binary_cosine_ap"):
        assert after[metric] > before[metric] + 0.05, (metric, before[metric], after[metric])


def test_labelled_texts_train_towards_their_labels_proxies_five_passes_an_epoch(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Half of each label's texts name a topic, half its synonym. Scored by asking the topic texts for
    # the synonym texts of their label, which share no word with them: the untrained model cannot tell
    # that "question 1 about card" and "number 6 plastic" are one intent; the proxy loss must teach it.
    topics = ["card", "pin", "loan", "fee", "cash", "rate"]
    synonyms = ["plastic", "code", "credit", "charge", "money", "interest"]
    rows = [
        dict.fromkeys(PAIR_COLUMNS)
        | {"source_file": "f.csv", "row_number": i + 1, "row_hash": str(i), "format": "labelled_texts"}
        | {"label": topics[i % 6]}
        | {
            "sentence1": f"question {i} about {topics[i % 6]}"
            if i % 12 < 6
            else f"number {i} {synonyms[i % 6]}"
        }
        for i in range(48)
    ]
    texts = pd.DataFrame(rows)
    topic_texts = texts["sentence1"].str.startswith("question")
    evaluator = build_evaluator(texts[topic_texts], texts[~topic_texts])
    settings = Settings(
        home=tmp_path,
        base_model=str(tiny_model_path),
        losses={"labelled_texts": "ProxySoftmaxLoss"},
        batch_size=8,
        learning_rate=2e-3,  # the proxies keep their own 1e-3
        eval_steps=0,
    )
    datasets, _ = build_datasets(texts, seed=0, losses_by_format={"labelled_texts": "ProxySoftmaxLoss"})
    proxied = datasets["labelled_texts"]
    assert proxied.column_names == ["text", "label"] and len(proxied) == 48 * PROXY_PASSES
    # Each text with its label's index, labels in sorted order: card 0, cash 1, fee 2, loan 3, pin 4, rate 5.
    assert dict(zip(proxied["text"], proxied["label"], strict=True)) == {
        text: sorted(topics).index(label)
        for text, label in zip(texts["sentence1"], texts["label"], strict=True)
    }
    proxy_rates: list[float] = []

    class RecordingTrainer(train_step.SentenceTransformerTrainer):
        """The real trainer, noting the learning rate its optimiser gives the proxies."""

        def create_optimizer(self, *args: object, **kwargs: object) -> torch.optim.Optimizer:
            optimizer = super().create_optimizer(*args, **kwargs)
            proxies = self.loss.proxies  # type: ignore[union-attr]
            proxy_rates.extend(
                group["lr"] for group in optimizer.param_groups if any(p is proxies for p in group["params"])
            )
            return optimizer

    monkeypatch.setattr(train_step, "SentenceTransformerTrainer", RecordingTrainer)
    before = evaluator(load_model(str(tiny_model_path)))["labelled_texts_cosine_ndcg@10"]
    trained = train_model(texts, settings)
    after = evaluator(load_model(str(trained.path)))["labelled_texts_cosine_ndcg@10"]
    assert proxy_rates == [PROXY_LEARNING_RATE]
    assert trained.losses == {"labelled_texts": "ProxySoftmaxLoss"}
    # One epoch passes over each text five times, in plain batches of 8.
    assert trained.config["epochs"] == 1 and trained.train_steps == 48 * PROXY_PASSES / 8 == 30
    assert after > before + 0.2, (before, after)


def test_proxies_start_at_each_labels_mean_and_the_loss_favours_the_nearest_proxy(
    tiny_model_path: Path,
) -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    proxies = label_proxies(vectors, [1, 0, 1])
    assert np.allclose(proxies.numpy(), [[0.0, 1.0], [0.8, 0.4]])
    model = load_model(str(tiny_model_path))
    features = model.preprocess(["a card question", "a pin question"])
    with torch.no_grad():
        embedded = model(dict(features))["sentence_embedding"]
        loss = ProxySoftmaxLoss(model, embedded.clone())  # each text's own embedding is its label's proxy
        right = loss([features], torch.tensor([0, 1]))
        wrong = loss([features], torch.tensor([1, 0]))
    assert right < wrong


def test_proxy_training_under_a_window_and_matryoshka_trains_the_window_alone(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    labelled = _pairs(PairFormat.LABELLED_TEXTS, count=20)
    labelled["arrived_at"] = pd.to_datetime("2026-01-01", utc=True) + pd.to_timedelta(
        labelled.index, unit="D"
    )
    settings = Settings(
        home=tmp_path,
        base_model=str(tiny_model_path),
        losses={"labelled_texts": "ProxySoftmaxLoss"},
        matryoshka_dims=[32, 16],
        batch_size=4,
        train_window_rows=8,
        replay_fraction=0.25,
        eval_steps=0,
    )
    trained = train_model(labelled, settings)
    # Each text trains towards its label's proxy: no partner of its label from outside the window.
    selected = select_training_rows(labelled, settings)
    assert trained.trained_texts == split_texts(selected) and trained.train_rows == 8 + 2
    assert "label_partners_version" not in trained.config
    assert trained.loss_summary == "labelled_texts=MatryoshkaLoss(ProxySoftmaxLoss; 32/16)"
    assert trained.train_examples == 10 * PROXY_PASSES
    one_label = _pairs(PairFormat.LABELLED_TEXTS, count=6).assign(label="only_intent")
    with pytest.raises(NoTrainingPairsError, match="at least two labels"):
        train_model(one_label, settings.model_copy(update={"train_window_rows": None}))


def test_proxy_labelled_texts_train_with_pairs_of_another_format_in_one_run(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    rows = pd.concat([_pairs(PairFormat.LABELLED_TEXTS, count=12), _pairs(PairFormat.SCORED, count=8)])
    settings = Settings(
        home=tmp_path,
        base_model=str(tiny_model_path),
        losses={"labelled_texts": "ProxySoftmaxLoss"},
        batch_size=4,
        eval_steps=0,
    )
    trained = train_model(rows, settings)
    assert trained.losses == {"labelled_texts": "ProxySoftmaxLoss", "scored": "CosineSimilarityLoss"}
    # Each labelled text five times an epoch, each scored pair once.
    assert trained.train_examples == 12 * PROXY_PASSES + 8 and trained.train_steps == 15 + 2
