"""Encode + write N texts through ``refresh_embeddings`` (torch and onnx encoders) vs raw ``encode``.

    .venv/bin/python -m benchmarks.bench_embeddings [--n 10000]

Prints a markdown table of ratios measured in this one run (the machine's load moves absolute times,
not ratios measured back to back), for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from st_assets.steps.embed import corpus_texts
from st_assets.steps.encoders import build_encoder
from st_assets.steps.models import resolve_base_model
from st_assets.store.embeddings import refresh_embeddings
from st_assets.store.warehouse import Warehouse

REPO_ROOT = Path(__file__).resolve().parents[1]
BANKING77 = REPO_ROOT.parent / "shared" / "data" / "banking77" / "train.csv"
BATCH_SIZE = 64


def banking77_texts(count: int) -> list[str]:
    """The first ``count`` distinct Banking77 training texts."""
    return pd.read_csv(BANKING77)["text"].drop_duplicates().head(count).tolist()


@dataclass(frozen=True)
class Timing:
    """Wall-clock and CPU seconds of one action (CPU time moves less when other processes load the machine)."""

    wall: float
    cpu: float


def timed(action: Callable[[], object]) -> Timing:
    """How long ``action`` took."""
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def refresh_timing(
    warehouse: Warehouse, texts: list[str], encode: Callable[[list[str]], np.ndarray]
) -> Timing:
    """How long one ``refresh_embeddings`` of ``texts`` took (encoding included)."""
    corpus = corpus_texts(pd.DataFrame({"sentence1": texts}))
    return timed(lambda: refresh_embeddings(warehouse, corpus, "bench", encode))


def file_bytes(warehouse: Warehouse) -> int:
    """Size of the warehouse file after a checkpoint."""
    with warehouse.connect() as connection:
        connection.execute("CHECKPOINT")
    return warehouse.path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of Banking77 texts (at most 10,003)")
    arguments = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = banking77_texts(arguments.n)
    # 1% new texts: the same texts with a seeded edit, so they are new rows of realistic length.
    rng = np.random.default_rng(0)
    edited = [
        f"{texts[i]} Thanks!" for i in rng.choice(len(texts), size=max(1, len(texts) // 100), replace=False)
    ]
    model_path = resolve_base_model("all-MiniLM-L6-v2")

    load_before = os.getloadavg()[0]
    export = timed(lambda: build_encoder(model_path, "onnx", BATCH_SIZE))  # exports if not there yet
    torch_encoder = build_encoder(model_path, "torch", BATCH_SIZE)
    onnx_encoder = build_encoder(model_path, "onnx", BATCH_SIZE)
    torch_encoder(texts[:BATCH_SIZE]), onnx_encoder(texts[:BATCH_SIZE])  # warm up both runtimes

    baseline = timed(
        lambda: torch_encoder.model.encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=True)
    )
    with tempfile.TemporaryDirectory() as folder:
        torch_warehouse = Warehouse(Path(folder) / "torch.duckdb")
        onnx_warehouse = Warehouse(Path(folder) / "onnx.duckdb")
        empty_bytes = file_bytes(Warehouse(Path(folder) / "empty.duckdb"))
        full = {
            "torch": refresh_timing(torch_warehouse, texts, torch_encoder),
            "onnx": refresh_timing(onnx_warehouse, texts, onnx_encoder),
        }
        nothing_new = refresh_timing(onnx_warehouse, texts, onnx_encoder)
        one_percent_new = refresh_timing(onnx_warehouse, texts + edited, onnx_encoder)
        rows = len(onnx_warehouse.read("SELECT text_id FROM embeddings"))
        table_bytes = file_bytes(onnx_warehouse) - empty_bytes

    print(
        f"\n{date.today()}, {platform.machine()} {os.cpu_count()} cores (load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after), {len(texts):,} Banking77 texts, batch {BATCH_SIZE}; raw "
        f"SentenceTransformer.encode {baseline.wall:.1f} s ({len(texts) / baseline.wall:.0f} texts/s); "
        f"ONNX export or load {export.wall:.1f} s\n"
    )
    print("| what | seconds (wall / CPU) | ratio, wall (CPU) | target |")
    print("|---|---|---|---|")
    for backend, target in (("torch", ">= 0.95x"), ("onnx", ">= 1.2x")):
        timing = full[backend]
        print(
            f"| encode + write, {backend} backend | {timing.wall:.1f} / {timing.cpu:.1f} | "
            f"{baseline.wall / timing.wall:.2f}x ({baseline.cpu / timing.cpu:.2f}x) raw encode speed | {target} |"
        )
    for what, timing, target in (
        ("no new text", nothing_new, "<= 2%"),
        (f"{len(edited)} new texts (1%)", one_percent_new, "<= 5%"),
    ):
        print(
            f"| re-materialise, {what} | {timing.wall:.2f} / {timing.cpu:.2f} | "
            f"{timing.wall / full['onnx'].wall:.1%} ({timing.cpu / full['onnx'].cpu:.1%}) of a full onnx embed "
            f"| {target} |"
        )
    print(
        f"| warehouse file per 100k embeddings | | {table_bytes / rows * 100_000 / 1e6:.0f} MB, extrapolated "
        f"from {table_bytes / 1e6:.1f} MB over an empty warehouse for {rows:,} rows | |"
    )


if __name__ == "__main__":
    main()
