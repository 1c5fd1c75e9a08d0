"""The ``embeddings`` table and the stored ``semantic_search`` macro, refreshed incrementally."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from st_assets.steps.embed import embedding_rows, sign_bit_columns
from st_assets.store.warehouse import Warehouse, fetch_scalar

MAX_K = 10_000
# Rows re-scored exactly per search; with these, recall@10 vs exact was 0.999 at 100k MiniLM rows (BENCHMARKS.md).
CANDIDATES_PER_K = 20
MIN_CANDIDATES = 200


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


def recorded_fingerprint(connection: duckdb.DuckDBPyConnection, model_version: str) -> str | None:
    """The fingerprint of the model files ``embeddings`` was encoded with under ``model_version``, or None
    where nothing was recorded (a table older than the record)."""
    if not _table_exists(connection, "embeddings_source"):
        return None
    value = fetch_scalar(
        connection,
        "SELECT any_value(model_fingerprint) FROM embeddings_source WHERE model_version = ?",
        [model_version],
    )
    return None if value is None else str(value)


def files_mismatch(
    connection: duckdb.DuckDBPyConnection, model_version: str, model_fingerprint: str
) -> str | None:
    """Why ``embeddings``, holding ``model_version``, was encoded from other files than the model's folder
    holds now (a base model saved over in place), or None when they agree or nothing was recorded."""
    recorded = recorded_fingerprint(connection, model_version)
    if recorded is None or recorded == model_fingerprint:
        return None
    return (
        f"the embeddings table was encoded from other files of {model_version} than its folder holds now "
        "(saved over in place); materialise corpus_embeddings to refresh it"
    )


def _record_source(
    connection: duckdb.DuckDBPyConnection, model_version: str, model_fingerprint: str | None
) -> None:
    """Inside the caller's transaction: ``embeddings`` was encoded from these model files."""
    if model_fingerprint is None:
        return
    connection.execute("DELETE FROM embeddings_source")
    connection.execute("INSERT INTO embeddings_source VALUES (?, ?)", [model_version, model_fingerprint])


def _embedded_kinds(connection: duckdb.DuckDBPyConnection) -> set[tuple[str, str | None]]:
    """The (model version, precision) pairs in ``embeddings``: another precision is another kind of vector."""
    if not _has_column(connection, "embeddings", "precision"):
        return {(version, None) for version in embedded_versions(connection)}
    return set(connection.execute("SELECT DISTINCT model_version, precision FROM embeddings").fetchall())


def _has_column(connection: duckdb.DuckDBPyConnection, table: str, column: str) -> bool:
    return bool(
        fetch_scalar(
            connection,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = ? AND column_name = ?",
            [table, column],
        )
    )


def create_search_macro(connection: duckdb.DuckDBPyConnection, dimension: int) -> None:
    """(Re)create ``semantic_search(q, k)``: top-k rows of ``embeddings`` by cosine similarity to ``q``.

    Two stages, so that a search reads 48 bytes a row instead of 1.5 KB (d=384): the ``CANDIDATES_PER_K
    * k`` (at least ``MIN_CANDIDATES``) rows whose sign bits are nearest to ``q``'s in Hamming distance,
    then the exact cosine on those only, fetched by rowid (selecting the vectors in the first stage
    would read every vector). ``q``'s sign bits are computed once per query, in SQL, so the macro
    works from any DuckDB client.
    """
    dimension = int(dimension)
    columns = sign_bit_columns(dimension)
    valid_k = f"""CASE WHEN k IS NULL OR k < 1 OR k > {MAX_K} OR k <> floor(k)
        THEN error('semantic_search: k must be an integer between 1 and {MAX_K}') ELSE k END"""
    # Bit 63 - (i-1) % 64 of word (i-1) // 64 is q[i] > 0: the packing of steps.embed.sign_bit_words.
    query_words = ", ".join(
        f"list_aggregate(bits[{64 * word + 1}:{64 * word + 64}], 'bit_or')::UBIGINT AS q{column}"
        for word, column in enumerate(columns)
    )
    # INTEGER: DuckDB 1.x counts bits in a TINYINT, and the sum over several words would overflow it.
    hamming = " + ".join(f"bit_count(xor({column}, q{column}))::INTEGER" for column in columns)
    connection.execute(
        f"""
        CREATE OR REPLACE MACRO semantic_search(q, k) AS TABLE
        WITH query AS (
            SELECT CASE WHEN q IS NULL THEN error('semantic_search: the query vector is NULL')
                        -- A cosine with no direction is NaN for every row: no ranking at all.
                        WHEN NOT list_bool_and(list_transform(q::FLOAT[], lambda x: isfinite(x)))
                          OR list_bool_and(list_transform(q::FLOAT[], lambda x: x = 0))
                        THEN error('semantic_search: the query vector is all zeros or not finite')
                        ELSE q::FLOAT[{dimension}] END AS vector
        ),
        query_bits AS (
            SELECT {query_words}
            FROM (
                SELECT list_transform(vector::FLOAT[], lambda x, i:
                    CASE WHEN x > 0 THEN 1::UBIGINT << (63 - (i - 1) % 64) ELSE 0::UBIGINT END) AS bits
                FROM query
            )
        ),
        candidates AS (
            SELECT rowid AS candidate
            FROM embeddings, query_bits
            ORDER BY {hamming}
            -- No error() here: a LIMIT the optimiser can fold keeps this a top-N (heap), not a full sort.
            LIMIT greatest({int(CANDIDATES_PER_K)} * least(k, {MAX_K}), {int(MIN_CANDIDATES)})
        )
        SELECT text_id, text, array_cosine_similarity(embedding, vector) AS score
        FROM embeddings, query
        WHERE rowid IN (SELECT candidate FROM candidates)
        ORDER BY score DESC
        LIMIT {valid_k}
        """
    )


def refresh_embeddings(
    warehouse: Warehouse,
    corpus: pd.DataFrame,
    model_version: str,
    encode: Callable[[list[str]], np.ndarray],
    precision: str = "float32",
    still_current: Callable[[duckdb.DuckDBPyConnection], bool] | None = None,
    model_fingerprint: str | None = None,
) -> EmbeddingRefresh:
    """Make ``embeddings`` hold exactly ``corpus`` embedded by ``model_version``, encoding only what is missing.

    Same model and precision: new texts are appended and vanished texts deleted in one transaction.
    New model, or the same one at another precision (int8 vectors differ from float32 ones): the whole
    table is built aside and swapped in one transaction, so readers never see two kinds of vector.
    Encoding happens with no connection open, so readers are not locked out meanwhile; a run that
    overlaps it may write in that time, so the append skips texts already there, and a table that
    another model took over meanwhile fails this refresh rather than mixing two models or putting an
    older model's table back. ``model_fingerprint`` names the model's files: a table encoded from other
    files under the same version (a base model saved over in place) is rebuilt. ``still_current``, asked in the writing connection, fails the refresh when
    ``model_version`` is no longer the one to serve (another run promoted a champion since it was read).
    An empty corpus is an error for a new model; for the table's own model it empties the table, as the
    corpus is empty, and an emptied table stays so.
    """
    with warehouse.connect() as connection:
        embedded_before = embedded_versions(connection)
        kinds_before = _embedded_kinds(connection)
        # None: the table predates the record, and its version is taken at its word (and recorded below).
        recorded = recorded_fingerprint(connection, model_version)
        # A table written before the sign-bit or precision columns existed is rebuilt whole, once.
        incremental = (
            embedded_before == {model_version}
            and (model_fingerprint is None or recorded in (None, model_fingerprint))
            and _has_column(connection, "embeddings", "b0")
            and _has_column(connection, "embeddings", "precision")
            and {row[0] for row in connection.execute("SELECT DISTINCT precision FROM embeddings").fetchall()}
            == {precision}
        )
        existing = (
            {row[0] for row in connection.execute("SELECT text_id FROM embeddings").fetchall()}
            if incremental
            else set()
        )
        if incremental:
            # The macro as this version writes it: a warehouse kept across an upgrade gets its fixes too.
            create_search_macro(connection, _embedding_dimension(connection))
            if recorded is None and model_fingerprint is not None:
                # Recorded now, whatever else this run does: files saved over later are then noticed.
                _record_source(connection, model_version, model_fingerprint)
        # An empty table already holds exactly an empty corpus, whichever model emptied it.
        already_empty = not embedded_before and _table_exists(connection, "embeddings")
    wanted = set(corpus["text_id"])
    # A list of booleans, not Series.isin(set): that costs some 20 microseconds a row on a string column.
    new_texts = corpus[np.array([text_id not in existing for text_id in corpus["text_id"]], dtype=bool)]
    stale = sorted(existing - wanted)
    if corpus.empty and already_empty:
        return EmbeddingRefresh(model_version, 0, 0, 0, rebuilt=False)
    if new_texts.empty and not incremental:
        # Checked first: an empty corpus must not leave another model's vectors in place as if current.
        raise ValueError("nothing to embed: the corpus is empty")
    if new_texts.empty and not stale:
        return EmbeddingRefresh(model_version, 0, 0, len(wanted), rebuilt=False)
    vectors = encode(new_texts["text"].tolist()) if len(new_texts) else None

    with warehouse.connect() as connection:
        if still_current is not None and not still_current(connection):
            raise RuntimeError(
                f"{model_version} stopped being the champion while this run embedded for it; "
                "materialise corpus_embeddings again"
            )
        # An append, or a rebuild from an older model's table, must not overwrite a newer one.
        if _embedded_kinds(connection) != kinds_before:
            raise RuntimeError(
                f"embeddings changed to model {sorted(embedded_versions(connection))} while this run "
                f"encoded for {model_version}; materialise corpus_embeddings again"
            )
        if vectors is not None:
            connection.register(
                "_new_embeddings", embedding_rows(new_texts, vectors, model_version, precision)
            )
        source = (model_version, model_fingerprint)
        if incremental:
            _apply_increment(connection, stale, has_new=vectors is not None, source=source)
        else:
            _swap_in_full_table(connection, dimension=vectors.shape[1], source=source)
    return EmbeddingRefresh(model_version, len(new_texts), len(stale), len(wanted), rebuilt=not incremental)


def _embedding_dimension(connection: duckdb.DuckDBPyConnection) -> int:
    """d of the ``embeddings`` table's ``FLOAT[d]`` column."""
    kind = fetch_scalar(
        connection,
        "SELECT data_type FROM information_schema.columns WHERE table_name = 'embeddings' "
        "AND column_name = 'embedding'",
    )
    match = re.fullmatch(r"FLOAT\[(\d+)\]", str(kind))
    if match is None:
        raise ValueError(f"embeddings.embedding is {kind}, not FLOAT[d]")
    return int(match[1])


def _apply_increment(
    connection: duckdb.DuckDBPyConnection, stale: list[str], has_new: bool, source: tuple[str, str | None]
) -> None:
    connection.execute("BEGIN TRANSACTION")
    try:
        _record_source(connection, *source)
        if stale:
            connection.execute("DELETE FROM embeddings WHERE text_id IN (SELECT unnest(?))", [stale])
        if has_new:
            # OR IGNORE: an overlapping run of the same model may have added some of these texts.
            connection.execute("INSERT OR IGNORE INTO embeddings BY NAME SELECT * FROM _new_embeddings")
        connection.execute("COMMIT")
    except Exception:
        connection.execute("ROLLBACK")
        raise


def _swap_in_full_table(
    connection: duckdb.DuckDBPyConnection, dimension: int, source: tuple[str, str | None]
) -> None:
    dimension = int(dimension)
    connection.execute("DROP TABLE IF EXISTS embeddings_next")
    bits = ", ".join(f"{column} UBIGINT" for column in sign_bit_columns(dimension))
    connection.execute(
        f"""CREATE TABLE embeddings_next (text_id VARCHAR PRIMARY KEY, text VARCHAR, model_version VARCHAR,
            precision VARCHAR, embedding FLOAT[{dimension}], embedded_at TIMESTAMPTZ, {bits})"""
    )
    connection.execute("INSERT INTO embeddings_next BY NAME SELECT * FROM _new_embeddings")
    connection.execute("BEGIN TRANSACTION")
    try:
        connection.execute("DROP TABLE IF EXISTS embeddings")
        connection.execute("ALTER TABLE embeddings_next RENAME TO embeddings")
        create_search_macro(connection, dimension)
        _record_source(connection, *source)
        connection.execute("COMMIT")
    except Exception:
        connection.execute("ROLLBACK")
        raise
