"""Training with the tiny model: every format trains, versions are content-addressed and reused."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset

from st_assets.settings import Settings
from st_assets.steps.formats import PAIR_COLUMNS, PairFormat
from st_assets.steps.models import encode_texts, load_model
from st_assets.steps.train import DistinctBatchSampler, choose_losses, data_version, train_model


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
    assert changed.version != first.version
    assert sorted(p.name for p in settings.models_dir.iterdir()) == sorted([first.version, changed.version])


def test_data_version_ignores_row_order_and_file_names() -> None:
    pairs = _pairs(PairFormat.SCORED)
    renamed = pairs.assign(source_file="other.csv").iloc[::-1]
    assert data_version(pairs) == data_version(renamed)
    assert data_version(pairs) != data_version(pairs.assign(score=0.5))


def test_loss_override_must_fit_the_format() -> None:
    assert choose_losses([PairFormat.SCORED], {"scored": "CoSENTLoss"}) == {"scored": "CoSENTLoss"}
    with pytest.raises(ValueError, match="does not fit format scored"):
        choose_losses([PairFormat.SCORED], {"scored": "TripletLoss"})


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
