"""The DuckDB warehouse: schema, transactional table writes, read-only readers, the search macro."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

TABLE_SCHEMAS: dict[str, str] = {
    "ingested_files": """
        source_file VARCHAR, content_hash VARCHAR, format VARCHAR, row_count BIGINT,
        status VARCHAR, reason VARCHAR, ingested_at TIMESTAMPTZ, notes VARCHAR""",
    "raw_texts": """
        source_file VARCHAR, row_number BIGINT, row_hash VARCHAR, record VARCHAR, parse_error VARCHAR,
        content_hash VARCHAR, arrived_at TIMESTAMPTZ""",
    "labelled_pairs": """
        source_file VARCHAR, row_number BIGINT, row_hash VARCHAR, format VARCHAR, sentence1 VARCHAR,
        sentence2 VARCHAR, negative VARCHAR, score DOUBLE, label VARCHAR, group_name VARCHAR,
        parse_error VARCHAR, arrived_at TIMESTAMPTZ""",
    "validated_pairs": """
        source_file VARCHAR, row_number BIGINT, row_hash VARCHAR, format VARCHAR, sentence1 VARCHAR,
        sentence2 VARCHAR, negative VARCHAR, score DOUBLE, label VARCHAR, group_name VARCHAR,
        split VARCHAR, arrived_at TIMESTAMPTZ""",
    "pairs_quarantine": """
        source_file VARCHAR, row_number BIGINT, format VARCHAR, raw_row VARCHAR, rule VARCHAR,
        value VARCHAR, reason VARCHAR""",
    "model_registry": """
        version VARCHAR PRIMARY KEY, path VARCHAR, base_model VARCHAR, loss VARCHAR, data_version VARCHAR,
        config VARCHAR, code_version VARCHAR, train_rows BIGINT, train_seconds DOUBLE,
        created_at TIMESTAMPTZ, last_built_at TIMESTAMPTZ, status VARCHAR, primary_score DOUBLE,
        decision VARCHAR""",
    "evaluation_metrics": """
        model_version VARCHAR, dataset VARCHAR, metric VARCHAR, value DOUBLE, ci_low DOUBLE, ci_high DOUBLE,
        eval_rows BIGINT, evaluated_for VARCHAR,
        evaluated_at TIMESTAMPTZ""",
    "group_metrics": """
        model_version VARCHAR, dataset VARCHAR, group_name VARCHAR, metric VARCHAR, value DOUBLE,
        ci_low DOUBLE, ci_high DOUBLE, eval_rows BIGINT, evaluated_for VARCHAR, evaluated_at TIMESTAMPTZ""",
    "edge_case_results": """
        model_version VARCHAR, kind VARCHAR, n BIGINT, mean_cosine DOUBLE, min_cosine DOUBLE, max_cosine DOUBLE,
        expectation VARCHAR, why VARCHAR, passed BOOLEAN, worst_original VARCHAR, worst_variant VARCHAR,
        evaluated_for VARCHAR""",
    # The normalised texts (sentence1, sentence2) of the train split the champion and the latest
    # fine-tuned version trained from: an eval row holding one is not held out from that version.
    "training_texts": """
        model_version VARCHAR, text VARCHAR""",
    # One row: the fingerprint of the model files the embeddings table was encoded with. The version alone
    # does not tell: a base model champion is version 'base' whichever weights it has.
    "embeddings_source": """
        model_version VARCHAR, model_fingerprint VARCHAR""",
    "fairness_metrics": """
        model_version VARCHAR, test VARCHAR, metric VARCHAR, value DOUBLE, evaluated_for VARCHAR,
        evaluated_at TIMESTAMPTZ""",
}

# Columns added to a table after warehouses with that table existed; added in place when missing.
ADDED_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "labelled_pairs": (("group_name", "VARCHAR"),),
    "validated_pairs": (("group_name", "VARCHAR"),),
    "ingested_files": (("notes", "VARCHAR"),),
    # The home's training settings when the version was last built: a change to them trains again. And
    # when keep_model_versions removed the version's folder (NULL while it is on disk).
    "model_registry": (("training_settings", "VARCHAR"), ("folder_removed_at", "TIMESTAMPTZ")),
}

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
# The storage format new warehouse files are written in: readable by DuckDB 1.2 and later.
STORAGE_VERSION = "v1.2.0"


def checked_identifier(name: str) -> str:
    """A table or column name safe to put in SQL text; anything else raises."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a valid identifier: {name!r}")
    return name


def _is_lock_error(error: duckdb.Error) -> bool:
    return "lock" in str(error).lower()


class WarehouseLockedError(duckdb.IOException):
    """Another process held the warehouse file's lock for longer than a connection waits (a DuckDB
    IOException, as the lock error it replaces)."""


class Warehouse:
    """The warehouse file. Writers connect one at a time; readers open it read-only."""

    def __init__(
        self,
        path: Path,
        lock_timeout_seconds: float = 120.0,
        lock_backoff_seconds: float = 0.25,
        on_lock_wait: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.lock_timeout_seconds = lock_timeout_seconds
        self.lock_backoff_seconds = lock_backoff_seconds
        # Called once per connect, when the first attempt finds the file locked (a command says it waits).
        self.on_lock_wait = on_lock_wait

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection; while another process holds the file lock, tries again (at most two seconds
        apart) until ``lock_timeout_seconds`` have passed, then raises ``WarehouseLockedError``."""
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise FileNotFoundError(f"no warehouse at {self.path}; materialise the assets first")
        deadline = time.monotonic() + self.lock_timeout_seconds
        attempt = 0
        while True:
            # A new file is written in an older storage format, so that DuckDB clients from 1.2 on (the
            # duckdb CLI among them) open it; the format of an existing file never changes.
            config = (
                {} if read_only or self.path.exists() else {"storage_compatibility_version": STORAGE_VERSION}
            )
            try:
                connection = duckdb.connect(str(self.path), read_only=read_only, config=config)
                break
            except duckdb.IOException as error:
                if not _is_lock_error(error):
                    raise
                if time.monotonic() >= deadline:
                    advice = (
                        "another process is writing it; try again when it is done"
                        if read_only
                        else "a writer needs the file to itself, and any open connection keeps it out, "
                        "read-only ones included (a duckdb -readonly session, a notebook, a busy st-assets "
                        "serve): close them and run again"
                    )
                    raise WarehouseLockedError(
                        f"{self.path} stayed locked by another process for {self.lock_timeout_seconds:g} s: "
                        f"{advice}. DuckDB said: {error}"
                    ) from error
                if attempt == 0 and self.on_lock_wait is not None:
                    self.on_lock_wait()
                # Short, jittered waits: a writer gets in at the first gap between readers' connections.
                pause = min(1.0, self.lock_backoff_seconds * 2 ** min(attempt, 10)) * (1 + random.random())
                time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                attempt += 1
        try:
            if not read_only:
                ensure_schema(connection)
            yield connection
        finally:
            connection.close()

    def read(self, sql: str, parameters: list[object] | None = None) -> pd.DataFrame:
        """Run a read query in a read-only connection and return a DataFrame."""
        with self.connect(read_only=True) as connection:
            return connection.execute(sql, parameters or []).df()


def ensure_schema(connection: duckdb.DuckDBPyConnection) -> None:
    """Create every contract table that does not exist yet, and add columns newer than an existing table."""
    for table, columns in TABLE_SCHEMAS.items():
        connection.execute(f"CREATE TABLE IF NOT EXISTS {checked_identifier(table)} ({columns})")
    for table, added in ADDED_COLUMNS.items():
        for column, kind in added:
            connection.execute(
                f"ALTER TABLE {checked_identifier(table)} "
                f"ADD COLUMN IF NOT EXISTS {checked_identifier(column)} {checked_identifier(kind.lower())}"
            )


@dataclass(frozen=True)
class Replacement:
    """New ``rows`` for ``table``: replacing every row, or those whose ``match_column`` is in ``match_values``."""

    table: str
    rows: pd.DataFrame | pa.Table
    match_column: str | None = None
    match_values: list[object] | None = None


def replace_rows(
    connection: duckdb.DuckDBPyConnection,
    table: str,
    rows: pd.DataFrame | pa.Table,
    match_column: str | None = None,
    match_values: list[object] | None = None,
) -> None:
    """In one transaction, delete the old rows and insert ``rows`` by column name.

    Deletes every row, or only those whose ``match_column`` is in ``match_values``.
    """
    replace_tables(connection, [Replacement(table, rows, match_column, match_values)])


def replace_tables(connection: duckdb.DuckDBPyConnection, replacements: list[Replacement]) -> None:
    """Apply every replacement in one transaction: readers see all of the tables new, or none."""
    # Only tables with rows to insert are registered: an empty frame may carry no columns at all.
    names = {index: f"_incoming_rows_{index}" for index, r in enumerate(replacements) if len(r.rows)}
    for index, name in names.items():
        connection.register(name, replacements[index].rows)
    try:
        connection.execute("BEGIN TRANSACTION")
        for index, replacement in enumerate(replacements):
            table = checked_identifier(replacement.table)
            if replacement.match_column is None:
                connection.execute(f"DELETE FROM {table}")
            else:
                connection.execute(
                    f"DELETE FROM {table} WHERE {checked_identifier(replacement.match_column)} "
                    "IN (SELECT unnest(?))",
                    [list(replacement.match_values or [])],
                )
            if index in names:
                connection.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {names[index]}")
        connection.execute("COMMIT")
    except Exception:
        connection.execute("ROLLBACK")
        raise
    finally:
        for name in names.values():
            connection.unregister(name)


def fetch_first(
    connection: duckdb.DuckDBPyConnection, sql: str, parameters: list[object] | None = None
) -> tuple | None:
    """The first row of a query, or None; reads the result to its end, as DuckDB requires before the next query."""
    rows = connection.execute(sql, parameters or []).fetchall()
    return rows[0] if rows else None


def fetch_scalar(
    connection: duckdb.DuckDBPyConnection, sql: str, parameters: list[object] | None = None
) -> object:
    """The first column of the first row of a query."""
    row = fetch_first(connection, sql, parameters)
    return row[0] if row else None


def table_row_count(connection: duckdb.DuckDBPyConnection, table: str) -> int:
    """Number of rows in a contract table."""
    return int(fetch_scalar(connection, f"SELECT count(*) FROM {checked_identifier(table)}"))
