"""The embeddings table: incremental refresh, whole-table swap on a new model, the search macro's errors."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from st_assets.steps.embed import corpus_texts
from st_assets.store.embeddings import refresh_embeddings
from st_assets.store.warehouse import Warehouse


class CountingEncoder:
    """A deterministic 4-d encoder that records how many texts it was asked to encode."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        self.encoded = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.encoded += len(texts)
        vectors = np.array(
            [[len(t), t.count("a") + 1, t.count("e") + self.offset, 1.0] for t in texts], dtype=np.float32
        ).reshape(len(texts), 4)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True) if len(texts) else vectors


def _corpus(texts: list[str]) -> pd.DataFrame:
    return corpus_texts(pd.DataFrame({"sentence1": texts, "sentence2": None, "negative": None}))


def test_only_new_texts_are_encoded_and_vanished_texts_removed(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    encoder = CountingEncoder()
    first = refresh_embeddings(warehouse, _corpus(["alpha", "beta", "gamma"]), "v1", encoder)
    assert (first.encoded, first.rebuilt) == (3, True)
    nothing_new = refresh_embeddings(warehouse, _corpus(["alpha", "beta", "gamma"]), "v1", encoder)
    assert (nothing_new.encoded, nothing_new.removed, encoder.encoded) == (0, 0, 3)
    changed = refresh_embeddings(warehouse, _corpus(["alpha", "beta", "delta"]), "v1", encoder)
    assert (changed.encoded, changed.removed, changed.rebuilt) == (1, 1, False)
    texts = warehouse.read("SELECT text FROM embeddings ORDER BY text")["text"].tolist()
    assert texts == ["alpha", "beta", "delta"]


def test_a_new_model_rebuilds_the_whole_table_with_one_version(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", CountingEncoder())
    rebuilt = refresh_embeddings(warehouse, _corpus(["alpha", "beta", "gamma"]), "v2", CountingEncoder(1.0))
    assert (rebuilt.encoded, rebuilt.rebuilt) == (3, True)
    versions = warehouse.read("SELECT DISTINCT model_version FROM embeddings")["model_version"].tolist()
    assert versions == ["v2"]
    tables = warehouse.read("SELECT table_name FROM information_schema.tables")["table_name"].tolist()
    assert "embeddings_next" not in tables


def test_a_failed_encode_leaves_the_table_as_it_was(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", CountingEncoder())

    def broken(texts: list[str]) -> np.ndarray:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        refresh_embeddings(warehouse, _corpus(["alpha", "beta", "gamma"]), "v2", broken)
    rows = warehouse.read("SELECT model_version, count(*) AS n FROM embeddings GROUP BY 1")
    assert rows.to_dict("records") == [{"model_version": "v1", "n": 2}]


@pytest.fixture
def searchable(tmp_path: Path) -> Path:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(warehouse, _corpus(["alpha", "beta", "gamma", "delta"]), "v1", CountingEncoder())
    return warehouse.path


def test_semantic_search_ranks_by_cosine(searchable: Path) -> None:
    query = CountingEncoder()(["alpha"])[0].tolist()
    with duckdb.connect(str(searchable), read_only=True) as connection:
        rows = connection.execute(
            "SELECT text, score FROM semantic_search(?::FLOAT[4], 2)", [query]
        ).fetchall()
    assert rows[0][0] == "alpha" and rows[0][1] == pytest.approx(1.0, abs=1e-6)
    assert len(rows) == 2


@pytest.mark.parametrize(
    ("sql", "parameters", "message"),
    [
        ("SELECT * FROM semantic_search([1,0,0,0]::FLOAT[4], 0)", [], "k must be"),
        ("SELECT * FROM semantic_search([1,0,0,0]::FLOAT[4], 100000)", [], "k must be"),
        ("SELECT * FROM semantic_search(NULL::FLOAT[4], 3)", [], "NULL"),
        ("SELECT * FROM semantic_search([1,0,0]::FLOAT[3], 3)", [], "array of size 3 to array of size 4"),
    ],
)
def test_semantic_search_rejects_bad_input_clearly(
    searchable: Path, sql: str, parameters: list, message: str
) -> None:
    with (
        duckdb.connect(str(searchable), read_only=True) as connection,
        pytest.raises(duckdb.Error, match=message),
    ):
        connection.execute(sql, parameters).fetchall()


def test_user_text_is_stored_verbatim_never_executed(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    hostile = "'); DROP TABLE embeddings; --"
    refresh_embeddings(warehouse, _corpus([hostile, '=HYPERLINK("x")']), "v1", CountingEncoder())
    texts = warehouse.read("SELECT text FROM embeddings ORDER BY text")["text"].tolist()
    assert texts == sorted([hostile, '=HYPERLINK("x")'])


def test_readers_open_read_only_while_no_writer_holds_the_file(searchable: Path) -> None:
    warehouse = Warehouse(searchable)
    with warehouse.connect(read_only=True) as first, warehouse.connect(read_only=True) as second:
        assert first.execute("SELECT count(*) FROM embeddings").fetchall() == [(4,)]
        assert second.execute("SELECT count(*) FROM embeddings").fetchall() == [(4,)]
        with pytest.raises(duckdb.Error):
            first.execute("DELETE FROM embeddings")
