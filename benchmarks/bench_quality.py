"""Model quality through the plugin's own assets, on data the plugin never evaluates itself.

stsb:      STS-B train (scores 0-5, score_scale=5) dropped into incoming/, materialised through
           finetuned_model; Spearman of the fine-tuned and the base model on STS-B dev.
banking77: Banking77 train split 90/10 by us; the 90% as labelled texts through finetuned_model; 1-NN
           intent accuracy of the held-out 10% queries against the training texts, base vs fine-tuned.
formats:   every pair format but labelled texts, each made from STS-B train (scored, binary, triplet, anchor_positive,
           unlabelled_texts), trained one at a time and then all together through finetuned_model;
           Spearman on STS-B dev of each, base vs fine-tuned.
Usage: python -m benchmarks.bench_quality stsb|banking77|formats [--set key=json-value ...] [--split-seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from benchmarks.datasets import banking77_split, read_stsb
from st_assets.defs.builder import build_definitions
from st_assets.settings import DEFAULT_BASE_MODEL, Settings
from st_assets.steps.models import encode_texts, load_model, resolve_base_model

TRAINING_ASSETS = ["raw_texts", "labelled_pairs", "validated_pairs", "finetuned_model"]


def _train(home: Path, settings: Settings) -> tuple[str, float, int]:
    graph = build_definitions(settings).resolve_asset_graph()
    result = dg.materialize(
        list(graph.assets_defs), selection=TRAINING_ASSETS, instance=dg.DagsterInstance.ephemeral()
    )
    metadata = result.asset_materializations_for_node("finetuned_model")[0].metadata
    return (
        str(metadata["path"].value),
        float(metadata["train_seconds"].value),
        int(metadata["train_rows"].value),
    )


def dev_spearman(model: str, dev: pd.DataFrame) -> float:
    """Spearman between the model's cosines and the gold scores of STS-B ``dev``."""
    encoder = load_model(resolve_base_model(model))
    cosines = np.einsum(
        "ij,ij->i",
        encode_texts(encoder, dev["sentence1"].tolist()),
        encode_texts(encoder, dev["sentence2"].tolist()),
    )
    return float(spearmanr(cosines, dev["score"]).statistic)


def stsb(settings_overrides: dict[str, object]) -> dict[str, object]:
    """Spearman on STS-B dev: base model vs the model the plugin fine-tuned on STS-B train."""
    train, dev = read_stsb("train"), read_stsb("dev")
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        (home / "incoming").mkdir()
        train.to_csv(home / "incoming" / "stsb_train.csv", index=False)
        settings = Settings.model_validate({"home": home, "score_scale": 5.0, **settings_overrides})
        model_path, seconds, rows = _train(home, settings)

        return {
            "benchmark": "stsb",
            "settings": settings_overrides,
            "train_rows": rows,
            "train_seconds": seconds,
            "base_dev_spearman": dev_spearman(settings.base_model, dev),
            "finetuned_dev_spearman": dev_spearman(model_path, dev),
        }


def banking77(settings_overrides: dict[str, object], split_seed: int = 13) -> dict[str, object]:
    """1-NN intent accuracy of held-out queries against the training texts, base vs fine-tuned."""
    train, test = banking77_split(seed=split_seed)
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        (home / "incoming").mkdir()
        train.to_csv(home / "incoming" / "banking77_train.csv", index=False)
        settings = Settings.model_validate({"home": home, **settings_overrides})
        model_path, seconds, rows = _train(home, settings)

        def knn_accuracy(path: str) -> float:
            model = load_model(path)
            similarities = (
                encode_texts(model, test["text"].tolist()) @ encode_texts(model, train["text"].tolist()).T
            )
            predicted = train["label"].to_numpy()[similarities.argmax(axis=1)]
            return float(np.mean(predicted == test["label"].to_numpy()))

        return {
            "benchmark": "banking77",
            "settings": settings_overrides,
            "split_seed": split_seed,
            "train_rows": rows,
            "train_seconds": seconds,
            "test_queries": len(test),
            "base_1nn_accuracy": knn_accuracy(resolve_base_model(settings.base_model)),
            "finetuned_1nn_accuracy": knn_accuracy(model_path),
        }


def stsb_format_files(rows_per_format: int = 1200, seed: int = 7) -> dict[str, pd.DataFrame]:
    """One input file per pair format, built from STS-B train (scores 0-5), seeded.

    binary: score >= 4 is 1, score <= 1.5 is 0; triplet and anchor_positive: pairs scoring >= 4, the
    triplet's negative the second sentence of a random pair scoring <= 1.5; unlabelled: single sentences.
    """
    train = read_stsb("train")
    rng = np.random.default_rng(seed)
    similar = train[train["score"] >= 4].sample(frac=1.0, random_state=seed)
    unrelated = train[train["score"] <= 1.5]
    binary = pd.concat([similar.assign(label=1), unrelated.assign(label=0)]).sample(
        n=rows_per_format, random_state=seed
    )
    similar = similar.head(rows_per_format)
    sentences = pd.unique(pd.concat([train["sentence1"], train["sentence2"]]))
    return {
        "scored": train.sample(n=rows_per_format, random_state=seed)[["sentence1", "sentence2", "score"]],
        "binary": binary[["sentence1", "sentence2", "label"]],
        "triplet": pd.DataFrame(
            {
                "anchor": similar["sentence1"].to_numpy(),
                "positive": similar["sentence2"].to_numpy(),
                "negative": rng.choice(unrelated["sentence2"].to_numpy(), size=len(similar)),
            }
        ),
        "anchor_positive": similar[["sentence1", "sentence2"]].set_axis(["anchor", "positive"], axis=1),
        "unlabelled_texts": pd.DataFrame(
            {"text": rng.choice(sentences, size=rows_per_format, replace=False)}
        ),
    }


def formats(settings_overrides: dict[str, object]) -> dict[str, object]:
    """STS-B dev Spearman after training on each format alone, then on all of them in one run."""
    files = stsb_format_files()
    dev = read_stsb("dev")
    runs: dict[str, dict[str, object]] = {}
    for name in [*files, "all"]:
        with tempfile.TemporaryDirectory() as scratch:
            home = Path(scratch)
            (home / "incoming").mkdir()
            for file_name, file_rows in files.items():
                if name in ("all", file_name):
                    file_rows.to_csv(home / "incoming" / f"stsb_{file_name}.csv", index=False)
            settings = Settings.model_validate({"home": home, "score_scale": 5.0, **settings_overrides})
            model_path, seconds, train_rows = _train(home, settings)
            runs[name] = {
                "train_rows": train_rows,
                "train_seconds": seconds,
                "finetuned_dev_spearman": dev_spearman(model_path, dev),
            }
    return {
        "benchmark": "formats",
        "settings": settings_overrides,
        "base_dev_spearman": dev_spearman(str(settings_overrides.get("base_model", DEFAULT_BASE_MODEL)), dev),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("benchmark", choices=["stsb", "banking77", "formats"])
    parser.add_argument("--set", action="append", default=[], help="a Settings override, key=json-value")
    parser.add_argument("--split-seed", type=int, default=13, help="banking77: seed of the 90/10 split")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value)
    started = time.perf_counter()
    if args.benchmark == "banking77":
        result = banking77(overrides, split_seed=args.split_seed)
    else:
        result = {"stsb": stsb, "formats": formats}[args.benchmark](overrides)
    result["wall_seconds"] = time.perf_counter() - started
    print(json.dumps(result))


if __name__ == "__main__":
    main()
