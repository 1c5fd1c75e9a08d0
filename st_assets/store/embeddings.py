"""The ``embeddings`` table and the stored ``semantic_search`` macro, refreshed incrementally."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from st_assets.steps.embed import embedding_rows
from st_assets.store.warehouse import Warehouse, fetch_scalar

MAX_K = 10_000


@dataclass(frozen=True)
class EmbeddingRefresh:
    """What one refresh did."""

    model_version: str
    encoded: int
    removed: int
    total: int
    rebuilt: bool


def _table_exists(connection: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        fetch_scalar(
            connection, "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]
        )
    )


def embedded_versions(connection: duckdb.DuckDBPyConnection) -> set[str]:
    """The model versions present in ``embeddings`` (one, unless the table is empty or absent)."""
    if not _table_exists(connection, "embeddings"):
        return set()
    return {row[0] for row in connection.execute("SELECT DISTINCT model_version FROM embeddings").fetchall()}


def create_search_macro(connection: duckdb.DuckDBPyConnection, dimension: int) -> None:
    """(Re)create ``semantic_search(q, k)``: top-k rows of ``embeddings`` by cosine similarity to ``q``."""
    dimension = int(dimension)
    connection.execute(
        f"""
        CREATE OR REPLACE MACRO semantic_search(q, k) AS TABLE
        SELECT text_id, text, array_cosine_similarity(
            embedding,
            CASE WHEN q IS NULL THEN error('semantic_search: the query vector is NULL')
                 ELSE q::FLOAT[{dimension}] END
        ) AS score
        FROM embeddings
        ORDER BY score DESC
        LIMIT CASE WHEN k IS NULL OR k < 1 OR k > {MAX_K}
                   THEN error('semantic_search: k must be an integer between 1 and {MAX_K}')
                   ELSE k END
        """
    )


def refresh_embeddings(
    warehouse: Warehouse,
    corpus: pd.DataFrame,
    model_version: str,
    encode: Callable[[list[str]], np.ndarray],
) -> EmbeddingRefresh:
    """Make ``embeddings`` hold exactly ``corpus`` embedded by ``model_version``, encoding only what is missing.

    Same model: new texts are appended and vanished texts deleted in one transaction. New model:
    the whole table is built aside and swapped in one transaction, so readers never see two models.
    Encoding happens with no connection open, so readers are not locked out meanwhile.
    """
    with warehouse.connect() as connection:
        incremental = embedded_versions(connection) == {model_version}
        existing = (
            {row[0] for row in connection.execute("SELECT text_id FROM embeddings").fetchall()}
            if incremental
            else set()
        )
    wanted = set(corpus["text_id"])
    new_texts = corpus[~corpus["text_id"].isin(existing)]
    stale = sorted(existing - wanted)
    if new_texts.empty and not stale:
        return EmbeddingRefresh(model_version, 0, 0, len(wanted), rebuilt=False)
    if new_texts.empty and not incremental:
        raise ValueError("nothing to embed: the corpus is empty")
    vectors = encode(new_texts["text"].tolist()) if len(new_texts) else None

    with warehouse.connect() as connection:
        if vectors is not None:
            connection.register("_new_embeddings", embedding_rows(new_texts, vectors, model_version))
        if incremental:
            _apply_increment(connection, stale, has_new=vectors is not None)
        else:
            _swap_in_full_table(connection, dimension=vectors.shape[1])
    return EmbeddingRefresh(model_version, len(new_texts), len(stale), len(wanted), rebuilt=not incremental)


def _apply_increment(connection: duckdb.DuckDBPyConnection, stale: list[str], has_new: bool) -> None:
    connection.execute("BEGIN TRANSACTION")
    try:
        if stale:
            connection.execute("DELETE FROM embeddings WHERE text_id IN (SELECT unnest(?))", [stale])
        if has_new:
            connection.execute("INSERT INTO embeddings BY NAME SELECT * FROM _new_embeddings")
        connection.execute("COMMIT")
    except Exception:
        connection.execute("ROLLBACK")
        raise


def _swap_in_full_table(connection: duckdb.DuckDBPyConnection, dimension: int) -> None:
    dimension = int(dimension)
    connection.execute("DROP TABLE IF EXISTS embeddings_next")
    connection.execute(
        f"""CREATE TABLE embeddings_next (text_id VARCHAR PRIMARY KEY, text VARCHAR, model_version VARCHAR,
            embedding FLOAT[{dimension}], embedded_at TIMESTAMPTZ)"""
    )
    connection.execute("INSERT INTO embeddings_next BY NAME SELECT * FROM _new_embeddings")
    connection.execute("BEGIN TRANSACTION")
    try:
        connection.execute("DROP TABLE IF EXISTS embeddings")
        connection.execute("ALTER TABLE embeddings_next RENAME TO embeddings")
        create_search_macro(connection, dimension)
        connection.execute("COMMIT")
    except Exception:
        connection.execute("ROLLBACK")
        raise
