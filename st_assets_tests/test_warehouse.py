"""Table replacement in the warehouse: several tables change in one transaction, or none does."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest

from st_assets.store.warehouse import Replacement, Warehouse, replace_tables


def test_tables_replaced_together_are_all_new_or_all_old(tmp_path: Path) -> None:
    with Warehouse(tmp_path / "w.duckdb").connect() as connection:
        before = connection.execute("SELECT count(*) FROM ingested_files").fetchall()[0][0]
        rows = pd.DataFrame({"source_file": ["a.csv"], "row_number": [1], "row_hash": ["h"]})
        with pytest.raises(duckdb.Error):
            replace_tables(
                connection,
                [
                    Replacement("raw_texts", rows, "source_file", ["a.csv"]),
                    Replacement(
                        "ingested_files", pd.DataFrame({"no_such_column": [1]}), "source_file", ["a.csv"]
                    ),
                ],
            )
        assert connection.execute("SELECT count(*) FROM raw_texts").fetchall()[0][0] == 0
        assert connection.execute("SELECT count(*) FROM ingested_files").fetchall()[0][0] == before
        replace_tables(
            connection,
            [
                Replacement("raw_texts", rows, "source_file", ["a.csv"]),
                Replacement("ingested_files", pd.DataFrame(), "source_file", ["a.csv"]),
            ],
        )
        assert connection.execute("SELECT source_file FROM raw_texts").fetchall() == [("a.csv",)]
