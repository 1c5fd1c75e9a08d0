"""``semantic_search`` top-10 in DuckDB vs numpy brute force over 100k x 384 embeddings, in one process.

    .venv/bin/python -m benchmarks.bench_search [--rows 100000] [--queries 100]

The corpus: the Banking77 training texts encoded once with the onnx backend, minus ``--queries`` held-out
texts that become the queries, plus copies of those vectors with seeded Gaussian noise (sigma 0.015-0.035
per copy, re-normalised: cosine 0.86-0.93 to the original, as close as real Banking77 neighbours are)
until there are ``--rows`` rows. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from benchmarks.bench_embeddings import banking77_texts
from st_assets.steps.embed import corpus_texts
from st_assets.steps.encoders import build_encoder
from st_assets.steps.models import resolve_base_model
from st_assets.store.embeddings import refresh_embeddings
from st_assets.store.warehouse import Warehouse

K = 10
SEARCH_SQL = f"SELECT text_id FROM semantic_search(?::FLOAT[384], {K})"
EXACT_SQL = f"""SELECT text_id FROM embeddings
    ORDER BY array_cosine_similarity(embedding, ?::FLOAT[384]) DESC LIMIT {K}"""


def noisy_copies(vectors: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """``vectors`` followed by seeded noisy unit-length copies of them, ``rows`` rows in all."""
    rng = np.random.default_rng(seed)
    copies = [vectors]
    while sum(len(copy) for copy in copies) < rows:
        sigma = rng.uniform(0.015, 0.035, size=(len(vectors), 1)).astype(np.float32)
        noisy = vectors + sigma * rng.standard_normal(vectors.shape).astype(np.float32)
        copies.append(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
    return np.vstack(copies)[:rows]


def numpy_top_k(matrix: np.ndarray, ids: np.ndarray, query: np.ndarray) -> list[str]:
    """The brute-force baseline: one matrix-vector product and an argpartition."""
    scores = matrix @ query
    top = np.argpartition(-scores, K)[:K]
    return ids[top[np.argsort(-scores[top])]].tolist()


def store(path: Path, vectors: np.ndarray) -> np.ndarray:
    """Write ``vectors`` as the ``embeddings`` table of a warehouse at ``path``; their text ids, in order."""
    corpus = corpus_texts(pd.DataFrame({"sentence1": [f"text {row}" for row in range(len(vectors))]}))
    refresh_embeddings(Warehouse(path), corpus, "bench", lambda texts: vectors)
    return corpus["text_id"].to_numpy()


def recall(found: list[str], exact: list[str]) -> float:
    return len(set(found) & set(exact)) / len(exact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    arguments = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()[0]

    texts = banking77_texts(10_003)
    encoded_at = time.perf_counter()
    vectors = build_encoder(resolve_base_model("all-MiniLM-L6-v2"), "onnx")(texts)
    encode_seconds = time.perf_counter() - encoded_at
    order = np.random.default_rng(0).permutation(len(vectors))
    queries, real = vectors[order[: arguments.queries]], vectors[order[arguments.queries :]]
    matrix = noisy_copies(real, arguments.rows)

    with tempfile.TemporaryDirectory() as folder:
        written_at = time.perf_counter()
        ids = store(Path(folder) / "search.duckdb", matrix)
        write_seconds = time.perf_counter() - written_at
        file_mb = (Path(folder) / "search.duckdb").stat().st_size / 1e6
        real_ids = store(Path(folder) / "real.duckdb", real)

        numpy_ms, macro_ms, recalls, exact_sql_ms = [], [], [], []
        with duckdb.connect(str(Path(folder) / "search.duckdb"), read_only=True) as connection:
            for query in queries[:5]:  # warm up caches and the macro's plan
                connection.execute(SEARCH_SQL, [query.tolist()]).fetchall()
                numpy_top_k(matrix, ids, query)
            # Interleaved, so that the machine's load hits both alike.
            for query in queries:
                started = time.perf_counter()
                exact = numpy_top_k(matrix, ids, query)
                numpy_ms.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                found = [row[0] for row in connection.execute(SEARCH_SQL, [query.tolist()]).fetchall()]
                macro_ms.append((time.perf_counter() - started) * 1000)
                recalls.append(recall(found, exact))
            for query in queries[:20]:
                started = time.perf_counter()
                connection.execute(EXACT_SQL, [query.tolist()]).fetchall()
                exact_sql_ms.append((time.perf_counter() - started) * 1000)
        with duckdb.connect(str(Path(folder) / "real.duckdb"), read_only=True) as connection:
            real_recalls = [
                recall(
                    [row[0] for row in connection.execute(SEARCH_SQL, [query.tolist()]).fetchall()],
                    numpy_top_k(real, real_ids, query),
                )
                for query in queries
            ]

    def p(values: list[float], quantile: float) -> float:
        return float(np.quantile(values, quantile))

    print(
        f"\n{date.today()}, {platform.machine()} {os.cpu_count()} cores (load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after); {len(matrix):,} x 384 rows ({len(real):,} real MiniLM embeddings of "
        f"Banking77 texts + noisy copies), {len(queries)} held-out Banking77 texts as queries, top-{K}; encode "
        f"10k with onnx {encode_seconds:.0f} s, write {write_seconds:.1f} s, file {file_mb:.0f} MB\n"
    )
    print("| what | p50 ms | p95 ms | ratio p50 (p95) vs numpy | recall@10 vs exact | target |")
    print("|---|---|---|---|---|---|")
    print(
        f"| numpy brute force (matmul + argpartition) | {p(numpy_ms, 0.5):.1f} | {p(numpy_ms, 0.95):.1f} | 1 | 1 | |"
    )
    print(
        f"| `semantic_search(q, 10)` (Hamming pre-select + exact rescore) | {p(macro_ms, 0.5):.1f} | "
        f"{p(macro_ms, 0.95):.1f} | {p(macro_ms, 0.5) / p(numpy_ms, 0.5):.2f}x "
        f"({p(macro_ms, 0.95) / p(numpy_ms, 0.95):.2f}x) | {np.mean(recalls):.3f} (min {min(recalls):.1f}) "
        "| <= 2x, >= 0.98 |"
    )
    print(
        f"| exact SQL `ORDER BY array_cosine_similarity LIMIT 10` ({len(exact_sql_ms)} queries) | "
        f"{p(exact_sql_ms, 0.5):.1f} | {p(exact_sql_ms, 0.95):.1f} | "
        f"{p(exact_sql_ms, 0.5) / p(numpy_ms, 0.5):.2f}x | 1 | |"
    )
    print(
        f"| `semantic_search` on the {len(real):,} real embeddings only | | | | "
        f"{np.mean(real_recalls):.3f} (min {min(real_recalls):.1f}) | >= 0.98 |"
    )


if __name__ == "__main__":
    main()
