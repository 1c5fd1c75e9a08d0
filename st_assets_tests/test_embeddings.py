"""The embeddings table: incremental refresh, whole-table swap on a new model, the search macro's errors."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from st_assets.steps.embed import corpus_texts, sign_bit_columns, sign_bit_words
from st_assets.store.embeddings import create_search_macro, refresh_embeddings
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


def test_the_same_model_at_another_precision_rebuilds_the_table(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", CountingEncoder())
    # Switching the encoder to int8 weights: no float32 vector may stay beside the int8 ones.
    switched = refresh_embeddings(
        warehouse, _corpus(["alpha", "beta", "gamma"]), "v1", CountingEncoder(), "int8"
    )
    assert (switched.encoded, switched.rebuilt) == (3, True)
    assert warehouse.read("SELECT DISTINCT precision FROM embeddings")["precision"].tolist() == ["int8"]
    again = refresh_embeddings(
        warehouse, _corpus(["alpha", "beta", "gamma"]), "v1", CountingEncoder(), "int8"
    )
    assert (again.encoded, again.rebuilt) == (0, False)


def test_a_failed_encode_leaves_the_table_as_it_was(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", CountingEncoder())

    def broken(texts: list[str]) -> np.ndarray:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        refresh_embeddings(warehouse, _corpus(["alpha", "beta", "gamma"]), "v2", broken)
    rows = warehouse.read("SELECT model_version, count(*) AS n FROM embeddings GROUP BY 1")
    assert rows.to_dict("records") == [{"model_version": "v1", "n": 2}]


def test_an_overlapping_refresh_of_the_same_model_adds_each_text_once(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", CountingEncoder())
    encoder = CountingEncoder()

    def encode_while_another_run_writes(texts: list[str]) -> np.ndarray:
        # The other run starts and finishes while this one encodes with no connection open.
        refresh_embeddings(warehouse, _corpus(["alpha", "beta", "gamma"]), "v1", CountingEncoder())
        return encoder(texts)

    refresh = refresh_embeddings(
        warehouse, _corpus(["alpha", "beta", "gamma", "delta"]), "v1", encode_while_another_run_writes
    )
    assert refresh.encoded == 2
    texts = warehouse.read("SELECT text FROM embeddings ORDER BY text")["text"].tolist()
    assert texts == ["alpha", "beta", "delta", "gamma"]


def test_a_refresh_overtaken_by_another_model_fails_without_mixing_models(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", CountingEncoder())

    def encode_while_a_new_model_takes_over(texts: list[str]) -> np.ndarray:
        refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v2", CountingEncoder(1.0))
        return CountingEncoder()(texts)

    with pytest.raises(RuntimeError, match=r"changed to model \['v2'\] while this run encoded for v1"):
        refresh_embeddings(
            warehouse, _corpus(["alpha", "beta", "gamma"]), "v1", encode_while_a_new_model_takes_over
        )
    rows = warehouse.read("SELECT model_version, count(*) AS n FROM embeddings GROUP BY 1")
    assert rows.to_dict("records") == [{"model_version": "v2", "n": 2}]


def test_a_version_whose_model_files_changed_is_embedded_anew(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(
        warehouse, _corpus(["alpha", "beta"]), "base", CountingEncoder(), model_fingerprint="a"
    )
    same_files = refresh_embeddings(
        warehouse, _corpus(["alpha", "beta", "gamma"]), "base", CountingEncoder(), model_fingerprint="a"
    )
    assert (same_files.encoded, same_files.rebuilt) == (1, False)
    # The base model saved over in place: still version 'base', other weights.
    saved_over = CountingEncoder(1.0)
    changed = refresh_embeddings(
        warehouse, _corpus(["alpha", "beta", "gamma", "delta"]), "base", saved_over, model_fingerprint="b"
    )
    assert (changed.encoded, changed.rebuilt) == (4, True)
    stored = warehouse.read("SELECT text, embedding FROM embeddings ORDER BY text")
    expected = saved_over(stored["text"].tolist())
    assert np.allclose(np.stack(stored["embedding"].to_numpy()), expected)
    again = refresh_embeddings(
        warehouse,
        _corpus(["alpha", "beta", "gamma", "delta"]),
        "base",
        CountingEncoder(1.0),
        model_fingerprint="b",
    )
    assert (again.encoded, again.rebuilt) == (0, False)


def test_a_table_older_than_the_files_record_is_recorded_on_the_next_refresh(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "base", CountingEncoder())  # nothing recorded
    unchanged = refresh_embeddings(
        warehouse, _corpus(["alpha", "beta"]), "base", CountingEncoder(), model_fingerprint="a"
    )
    assert (unchanged.encoded, unchanged.rebuilt) == (0, False)
    assert warehouse.read("SELECT * FROM embeddings_source").values.tolist() == [["base", "a"]]
    # So the files saved over afterwards are noticed, and new rows are not mixed into the old ones.
    saved_over = refresh_embeddings(
        warehouse, _corpus(["alpha", "beta", "gamma"]), "base", CountingEncoder(1.0), model_fingerprint="b"
    )
    assert (saved_over.encoded, saved_over.rebuilt) == (3, True)


def test_a_refresh_for_a_model_no_longer_champion_leaves_the_newer_table(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    # This run read v1 as champion; before its refresh began, another run promoted v2 and embedded for it.
    refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v2", CountingEncoder(1.0))
    with pytest.raises(RuntimeError, match="v1 stopped being the champion while this run embedded for it"):
        refresh_embeddings(
            warehouse,
            _corpus(["alpha", "beta"]),
            "v1",
            CountingEncoder(),
            still_current=lambda connection: False,  # the registry's champion is v2 now
        )
    rows = warehouse.read("SELECT model_version, count(*) AS n FROM embeddings GROUP BY 1")
    assert rows.to_dict("records") == [{"model_version": "v2", "n": 2}]


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
        ("SELECT * FROM semantic_search([1,0,0,0]::FLOAT[4], 2.7)", [], "k must be an integer"),
        ("SELECT * FROM semantic_search([0,0,0,0]::FLOAT[4], 3)", [], "all zeros or not finite"),
        ("SELECT * FROM semantic_search(['nan'::FLOAT,0,1,0]::FLOAT[4], 3)", [], "all zeros or not finite"),
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


def test_sign_bits_pack_like_quantize_embeddings_ubinary() -> None:
    from sentence_transformers import quantize_embeddings

    vectors = np.random.default_rng(0).standard_normal((5, 384)).astype(np.float32)
    ubinary = quantize_embeddings(vectors, precision="ubinary")
    assert sign_bit_columns(384) == ["b0", "b1", "b2", "b3", "b4", "b5"]
    assert (
        sign_bit_words(vectors).tobytes()
        == np.ascontiguousarray(ubinary).view(">u8").astype(np.uint64).tobytes()
    )
    assert sign_bit_columns(100) == ["b0", "b1"]
    assert sign_bit_words(vectors[:, :100]).shape == (5, 2)


def _clustered_vectors(count: int, dimension: int = 384, clusters: int = 100, seed: int = 0) -> np.ndarray:
    """Unit vectors around a shared offset and ``clusters`` centres, anisotropic like sentence embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dimension)) + 1.5 * rng.standard_normal(dimension)
    vectors = centres[rng.integers(clusters, size=count)] + 0.6 * rng.standard_normal((count, dimension))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def _store(tmp_path: Path, vectors: np.ndarray) -> tuple[Warehouse, pd.DataFrame]:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    corpus = _corpus([f"text {i}" for i in range(len(vectors))])
    refresh_embeddings(warehouse, corpus, "v1", lambda texts: vectors)
    return warehouse, corpus


def test_semantic_search_finds_the_exact_top_10_on_clustered_vectors(tmp_path: Path) -> None:
    vectors = _clustered_vectors(5_000)
    warehouse, corpus = _store(tmp_path, vectors)
    queries = 0.5 * _clustered_vectors(20, seed=1) + 0.5 * vectors[:20]  # between clusters, not on a row
    recalls = []
    with warehouse.connect(read_only=True) as connection:
        for query in queries:
            exact = set(corpus["text_id"].to_numpy()[np.argsort(-(vectors @ query))[:10]])
            rows = connection.execute(
                "SELECT text_id FROM semantic_search(?::FLOAT[384], 10)", [query.tolist()]
            )
            recalls.append(len(exact & {row[0] for row in rows.fetchall()}) / 10)
    assert np.mean(recalls) >= 0.98


def test_semantic_search_rescores_enough_candidates_for_a_large_k(tmp_path: Path) -> None:
    vectors = _clustered_vectors(600)
    warehouse, corpus = _store(tmp_path, vectors)
    query = vectors[0]
    exact = corpus["text_id"].to_numpy()[np.argsort(-(vectors @ query))[:300]].tolist()
    with warehouse.connect(read_only=True) as connection:
        rows = connection.execute(
            "SELECT text_id, score FROM semantic_search(?::FLOAT[384], 300)", [query.tolist()]
        )
        found = rows.fetchall()
    assert [row[0] for row in found] == exact
    assert found[0][1] == pytest.approx(1.0, abs=1e-6)


def test_a_table_without_sign_bits_is_rebuilt_once(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    encoder = CountingEncoder()
    refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", encoder)
    with warehouse.connect() as connection:
        for column in sign_bit_columns(4):
            connection.execute(f"ALTER TABLE embeddings DROP COLUMN {column}")
    upgraded = refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", encoder)
    assert (upgraded.encoded, upgraded.rebuilt) == (2, True)
    assert refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", encoder).encoded == 0
    with warehouse.connect(read_only=True) as connection:
        rows = connection.execute("SELECT text FROM semantic_search([1, 0, 0, 0]::FLOAT[4], 1)").fetchall()
    assert len(rows) == 1


_LOCK_CHILD = """
import sys, time
from pathlib import Path
import duckdb
import st_assets.store.warehouse as warehouse_module

attempts = 0
real_connect = duckdb.connect

def counting_connect(*args, **kwargs):
    global attempts
    attempts += 1
    return real_connect(*args, **kwargs)

warehouse_module.duckdb.connect = counting_connect
role, path, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
warehouse = warehouse_module.Warehouse(path)
if role == "holder":
    with warehouse.connect() as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS held (x INTEGER)")
        go.touch()
        time.sleep(1.0)
    sys.exit(0)
while not go.exists():
    time.sleep(0.01)
started = time.monotonic()
with warehouse.connect(read_only=role == "reader") as connection:
    connection.execute("SELECT count(*) FROM held").fetchall()
print(f"{role} attempts={attempts} waited={time.monotonic() - started:.2f}")
"""


def test_a_writer_and_a_reader_wait_for_a_held_write_lock_instead_of_failing(tmp_path: Path) -> None:
    """DuckDB lets one process write; others retry with backoff in ``Warehouse.connect`` until it is free."""
    import subprocess
    import sys

    path, go = tmp_path / "w.duckdb", tmp_path / "go"
    with Warehouse(path).connect():
        pass  # the reader needs the file to exist
    command = [sys.executable, "-c", _LOCK_CHILD]
    # The waiting processes start (and import) first, so they knock while the holder holds the lock.
    waiting = [
        subprocess.Popen(
            [*command, role, str(path), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for role in ("writer", "reader")
    ]
    holder = subprocess.run(
        [*command, "holder", str(path), str(go)], capture_output=True, text=True, timeout=120
    )
    assert holder.returncode == 0, holder.stderr
    outputs = [process.communicate(timeout=120) for process in waiting]
    for process, (stdout, stderr) in zip(waiting, outputs, strict=True):
        assert process.returncode == 0, stderr
        attempts = int(stdout.split("attempts=")[1].split()[0])
        assert attempts > 1, f"expected a retry after a lock error, got: {stdout}"


def test_a_rebuild_overtaken_by_a_newer_model_does_not_put_the_older_table_back(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v0", CountingEncoder())

    def encode_while_a_newer_model_takes_over(texts: list[str]) -> np.ndarray:
        refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v2", CountingEncoder(1.0))
        return CountingEncoder()(texts)

    with pytest.raises(RuntimeError, match=r"changed to model \['v2'\] while this run encoded for v1"):
        refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", encode_while_a_newer_model_takes_over)
    assert warehouse.read("SELECT DISTINCT model_version FROM embeddings")["model_version"].tolist() == ["v2"]


def test_an_append_overtaken_by_a_rebuild_at_another_precision_fails(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(warehouse, _corpus(["alpha"]), "v1", CountingEncoder())

    def encode_while_the_table_turns_int8(texts: list[str]) -> np.ndarray:
        refresh_embeddings(warehouse, _corpus(["alpha"]), "v1", CountingEncoder(), precision="int8")
        return CountingEncoder()(texts)

    with pytest.raises(RuntimeError, match="while this run encoded for v1"):
        refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", encode_while_the_table_turns_int8)
    assert warehouse.read("SELECT DISTINCT precision FROM embeddings")["precision"].tolist() == ["int8"]


def test_an_empty_corpus_for_a_new_model_is_an_error_not_a_silent_success(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", CountingEncoder())
    with pytest.raises(ValueError, match="nothing to embed"):
        refresh_embeddings(warehouse, _corpus([]), "v2", CountingEncoder())


def test_an_emptied_table_stays_empty_on_the_next_run_with_an_empty_corpus(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    refresh_embeddings(warehouse, _corpus(["alpha", "beta"]), "v1", CountingEncoder())
    emptied = refresh_embeddings(warehouse, _corpus([]), "v1", CountingEncoder())
    again = refresh_embeddings(warehouse, _corpus([]), "v1", CountingEncoder())
    assert (emptied.removed, again.encoded, again.removed, again.rebuilt) == (2, 0, 0, False)
    assert warehouse.read("SELECT count(*) AS n FROM embeddings")["n"][0] == 0


def test_the_macro_sums_bit_counts_as_integers_for_older_clients(tmp_path: Path) -> None:
    # DuckDB 1.x returns bit_count as TINYINT: summed over 384 bits unconverted it overflows past 127, and
    # the macro fails in every 1.x client reading the warehouse. This DuckDB widens it itself, so only the
    # stored definition shows the conversion.
    with duckdb.connect(str(tmp_path / "w.duckdb")) as connection:
        connection.execute("CREATE TABLE embeddings (text_id VARCHAR, text VARCHAR, embedding FLOAT[384])")
        create_search_macro(connection, 384)
        (definition,) = connection.execute(
            "SELECT macro_definition FROM duckdb_functions() WHERE function_name = 'semantic_search'"
        ).fetchone()
    assert definition.count("bit_count(") == 6
    assert definition.count("CAST(bit_count(") == 6
    assert definition.count("CAST(bit_count(") == len(
        re.findall(r"CAST\(bit_count\([^()]*\([^()]*\)\) AS INTEGER\)", definition)
    )


def test_a_refresh_with_nothing_new_brings_an_older_macro_up_to_date(searchable: Path) -> None:
    with duckdb.connect(str(searchable)) as connection:
        # As an earlier version stored it: no check on the query vector.
        connection.execute("CREATE OR REPLACE MACRO semantic_search(q, k) AS TABLE SELECT 'old' AS text_id")
    refresh = refresh_embeddings(
        Warehouse(searchable), _corpus(["alpha", "beta", "gamma", "delta"]), "v1", CountingEncoder()
    )
    assert refresh.encoded == 0
    with (
        duckdb.connect(str(searchable), read_only=True) as connection,
        pytest.raises(duckdb.Error, match="all zeros or not finite"),
    ):
        connection.execute("SELECT * FROM semantic_search([0,0,0,0]::FLOAT[4], 3)").fetchall()
