"""Training throughput: pairs/s through the finetuned_model asset vs a plain sentence-transformers script.

Both train all-MiniLM-L6-v2 with MultipleNegativesRankingLoss on the same anchor/positive pairs, with the
same batch size, learning rate, warmup, epochs and seed, each in its own subprocess (so peak RSS is its
own). Usage: python -m benchmarks.bench_training [--pairs 1500] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.datasets import banking77_split

BATCH_SIZE = 32
LEARNING_RATE = 2e-5
SEED = 42


def _pairs(count: int) -> pd.DataFrame:
    train, _ = banking77_split()
    return train.groupby("label").head(max(2, count // 77)).head(count)


def run_plain(pairs_csv: Path, device: str) -> dict[str, float]:
    """The hand-written script a team would otherwise keep: same pairs, same loss, same hyper-parameters."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    from st_assets.steps.models import resolve_base_model
    from st_assets.steps.pairs import labelled_texts_to_pairs

    texts = pd.read_csv(pairs_csv).rename(columns={"text": "sentence1"})
    pairs = labelled_texts_to_pairs(texts, SEED)
    model = SentenceTransformer(resolve_base_model("all-MiniLM-L6-v2"), device=device)
    model.max_seq_length = 128
    with tempfile.TemporaryDirectory() as scratch:
        args = SentenceTransformerTrainingArguments(
            output_dir=scratch,
            num_train_epochs=1,
            per_device_train_batch_size=BATCH_SIZE,
            learning_rate=LEARNING_RATE,
            warmup_steps=0.1,
            seed=SEED,
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=device == "cpu",
        )
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_pandas(pairs[["anchor", "positive"]]),
            loss=MultipleNegativesRankingLoss(model),
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return {"pairs": len(pairs), "seconds": seconds}


def run_plugin(pairs_csv: Path, device: str) -> dict[str, float]:
    """The same data dropped into incoming/ and materialised through finetuned_model."""
    import dagster as dg

    from st_assets.defs.builder import build_definitions
    from st_assets.settings import Settings

    with tempfile.TemporaryDirectory() as home:
        (Path(home) / "incoming").mkdir()
        (Path(home) / "incoming" / "texts.csv").write_bytes(pairs_csv.read_bytes())
        settings = Settings(
            home=Path(home),
            batch_size=BATCH_SIZE,
            learning_rate=LEARNING_RATE,
            seed=SEED,
            eval_steps=0,
            eval_fraction=0.01,
            # The plain script's loss, not the labelled texts' default ProxySoftmaxLoss.
            losses={"labelled_texts": "MultipleNegativesRankingLoss"},
            device=device,  # the plain script trains on the same device: the ratio measures the plugin
        )
        graph = build_definitions(settings).resolve_asset_graph()
        selection = ["raw_texts", "labelled_pairs", "validated_pairs", "finetuned_model"]
        result = dg.materialize(
            list(graph.assets_defs), selection=selection, instance=dg.DagsterInstance.ephemeral()
        )
        metadata = result.asset_materializations_for_node("finetuned_model")[0].metadata
        return {"pairs": metadata["train_examples"].value, "seconds": metadata["train_seconds"].value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=1500)
    parser.add_argument("--side", choices=["plain", "plugin"])
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--device", default="cpu", help="cpu or cuda, the same for both sides")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side:
        run = run_plain if args.side == "plain" else run_plugin
        result = run(args.csv, args.device)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if args.device == "cuda":
            import torch

            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as scratch:
        pairs_csv = Path(scratch) / "texts.csv"
        _pairs(args.pairs).to_csv(pairs_csv, index=False)
        results = {}
        for side in ("plain", "plugin"):
            output = (
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.bench_training",
                        "--side",
                        side,
                        "--csv",
                        str(pairs_csv),
                        "--device",
                        args.device,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            results[side] = json.loads(output)
    for side, result in results.items():
        result["pairs_per_second"] = result["pairs"] / result["seconds"]
        print(
            f"{side}: {result['pairs']} pairs in {result['seconds']:.1f} s = {result['pairs_per_second']:.2f} "
            f"pairs/s, peak RSS {result['peak_rss_mb']:.0f} MB"
            + (f", peak GPU memory {result['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in result else "")
        )
    ratio = results["plugin"]["pairs_per_second"] / results["plain"]["pairs_per_second"]
    print(f"plugin / plain throughput: {ratio:.3f}x (target >= 0.95)")


if __name__ == "__main__":
    main()
