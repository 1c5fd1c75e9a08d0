"""The st-assets command on a materialised warehouse: search and read-only SQL with embed()."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from st_assets import cli
from st_assets.settings import Settings
from st_assets.store.registry import get_champion
from st_assets.store.warehouse import Warehouse


@pytest.fixture
def home(materialised_home: tuple[Settings, object], monkeypatch: pytest.MonkeyPatch) -> Settings:
    settings, _ = materialised_home
    monkeypatch.setenv("ST_ASSETS_HOME", str(settings.home))
    return settings


def test_search_prints_top_k_rows(home: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["search", "my card has not arrived", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "text_id\ttext\tscore"
    assert len(lines) == 4


def _stored_text(settings: Settings) -> str:
    """A text the embeddings table holds, with no quote to escape and no twin in another case."""
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        (text,) = connection.execute(
            "SELECT any_value(text) AS text FROM embeddings WHERE text NOT LIKE '%''%' "
            "GROUP BY lower(text) HAVING count(*) = 1 ORDER BY text LIMIT 1"
        ).fetchone()
    return text


def test_search_and_sql_embed_find_a_stored_text_first(
    home: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _stored_text(home)
    assert cli.main(["search", text, "-k", "2"]) == 0
    _, found, score = capsys.readouterr().out.strip().splitlines()[1].split("\t")
    assert found == text and float(score) == pytest.approx(1.0, abs=1e-3)
    assert cli.main(["sql", f"SELECT text, score FROM semantic_search(embed('{text}'), 1)"]) == 0
    found, score = capsys.readouterr().out.strip().splitlines()[1].split("\t")
    assert found == text and float(score) == pytest.approx(1.0, abs=1e-3)


def test_sql_can_call_embed_inside_semantic_search(
    home: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    statement = "SELECT text, score FROM semantic_search(embed('reset my password'), 2)"
    assert cli.main(["sql", statement]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_sql_is_read_only(home: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sql", "DELETE FROM embeddings"]) == 2
    assert "read-only" in capsys.readouterr().err.lower()


@pytest.mark.parametrize(
    "statement",
    [
        # A second, writable database, from which the warehouse could be attached read-write again.
        "ATTACH '{scratch}/other.duckdb' AS other (READ_WRITE)",
        "COPY (SELECT 'x' AS a) TO '{scratch}/model.safetensors' (FORMAT csv)",
        "EXPORT DATABASE '{scratch}/export'",
        "SET enable_external_access = true",
    ],
)
def test_sql_writes_no_file_at_all(
    home: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str], statement: str
) -> None:
    assert cli.main(["sql", statement.format(scratch=tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("st-assets: ")
    assert list(tmp_path.iterdir()) == []


def test_embed_over_many_rows_encodes_in_batches_like_one_text_at_a_time(
    home: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    # 5,000 rows reach embed() in chunks of up to 2,048, each with the same seven texts.
    statement = (
        "WITH batched AS (SELECT i, embed('card number ' || (i % 7)) AS vector FROM range(5000) t(i)) "
        "SELECT count(vector) AS n, min(array_cosine_similarity(vector, (SELECT embed('card number 3')))) "
        "FILTER (WHERE i % 7 = 3) AS same FROM batched"
    )
    assert cli.main(["sql", statement]) == 0
    _, row = capsys.readouterr().out.splitlines()
    rows, cosine = row.split("\t")
    assert int(rows) == 5000
    assert float(cosine) > 0.9999


@pytest.mark.parametrize("statement", ["", "   ", "-- only a comment", "/* nothing */"])
def test_an_empty_statement_is_a_clear_error(
    home: Settings, capsys: pytest.CaptureFixture[str], statement: str
) -> None:
    assert cli.main(["sql", statement]) == 2
    assert "no statement to run" in capsys.readouterr().err


def test_null_and_small_numbers_print_as_themselves(
    home: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    statement = "SELECT NULL AS missing, 'None' AS word, 0.00004::DOUBLE AS small, 0.85234::DOUBLE AS score"
    assert cli.main(["sql", statement]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "NULL\tNone\t4e-05\t0.8523"


def test_a_reader_that_leaves_early_gets_no_traceback(
    home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head -1` does once it has its line
    with open(write_end, "w", buffering=1) as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        assert cli.main(["sql", "SELECT * FROM range(100000)"]) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["search", "   "], "empty"),
        (["search", "card", "-k", "0"], "k must be"),
        (["sql", "SELECT embed('')"], "blank"),
        (["search", "caf\udce9"], "unpaired surrogate"),  # argv bytes that are not UTF-8
    ],
)
def test_bad_input_gets_a_clear_error(
    home: Settings, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_sql_reads_null_as_null_and_prints_one_line_per_row(
    home: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    statement = (
        "SELECT embed(NULL) IS NULL AS missing, "
        "'a' || chr(9) || 'b' || chr(10) || 'c' || chr(27) || '[2J' || chr(155) AS text"
    )
    assert cli.main(["sql", statement]) == 0
    # A tab, a newline and every other control character (here ESC and C1's CSI) print escaped.
    assert capsys.readouterr().out.splitlines() == ["missing\ttext", "True\ta\\tb\\nc\\x1b[2J\\u009b"]


def _home_copy_after(
    sql: str, materialised_home: tuple[Settings, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Point ST_ASSETS_HOME at a copy of the materialised warehouse, changed by ``sql``."""
    settings, _ = materialised_home
    shutil.copy(settings.warehouse_path, tmp_path / settings.warehouse_path.name)
    with duckdb.connect(str(tmp_path / settings.warehouse_path.name)) as connection:
        connection.execute(sql)
    monkeypatch.setenv("ST_ASSETS_HOME", str(tmp_path))


def test_sql_works_before_any_champion_exists(
    materialised_home: tuple[Settings, object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _home_copy_after(
        "UPDATE model_registry SET status = 'candidate'", materialised_home, tmp_path, monkeypatch
    )
    assert cli.main(["sql", "SELECT count(*) AS n FROM pairs_quarantine"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "n"
    # Mentioning embed( in a string or a comment is no call.
    mentions = "SELECT count(*) AS n FROM raw_texts WHERE record LIKE '%embed(%' -- embed(x)\n"
    assert cli.main(["sql", mentions]) == 0
    for calls in (
        "SELECT embed('my card')",
        "SELECT \"embed\"('my card')",
        "SELECT 1 AS \"it's\", embed('x')",
    ):
        assert cli.main(["sql", calls]) == 2
        assert capsys.readouterr().err == (
            "st-assets: no champion model yet: materialise the assets first (make demo)\n"
        )


@pytest.mark.parametrize(
    ("change", "search_says", "sql_says"),
    [
        # The table holds another model's vectors.
        (
            "UPDATE embeddings SET model_version = 'an-older-champion'",
            "an-older-champion",
            "materialise corpus_embeddings",
        ),
        # As after the champion's folder was saved over in place and before corpus_embeddings ran again.
        (
            "UPDATE embeddings_source SET model_fingerprint = 'files saved over since'",
            "encoded from other files",
            "saved over in place",
        ),
    ],
)
def test_search_refuses_embeddings_the_champion_did_not_make_and_sql_warns(
    change: str,
    search_says: str,
    sql_says: str,
    materialised_home: tuple[Settings, object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _home_copy_after(change, materialised_home, tmp_path, monkeypatch)
    assert cli.main(["search", "my card has not arrived"]) == 2
    assert search_says in capsys.readouterr().err
    assert cli.main(["sql", "SELECT text FROM semantic_search(embed('my card'), 1)"]) == 0
    assert sql_says in capsys.readouterr().err


def test_a_command_says_it_waits_while_another_process_writes(
    materialised_home: tuple[Settings, object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _home_copy_after("SELECT 1", materialised_home, tmp_path, monkeypatch)
    # A writer in another process holds the file lock for two seconds, as a materialising step does.
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('holding', flush=True); "
            "time.sleep(2)",
            str(tmp_path / "st_assets.duckdb"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "holding"
    assert cli.main(["sql", "SELECT count(*) AS n FROM model_registry"]) == 0
    writer.wait(timeout=30)
    captured = capsys.readouterr()
    assert captured.err.count("another process is writing the warehouse; waiting for it") == 1
    assert captured.out.splitlines()[0] == "n"


def test_a_champion_whose_files_do_not_load_is_one_line_not_a_traceback(
    materialised_home: tuple[Settings, object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, _ = materialised_home
    with Warehouse(settings.warehouse_path).connect(read_only=True) as connection:
        champion = get_champion(connection)
    assert champion is not None
    damaged = tmp_path / "damaged"
    shutil.copytree(champion.path, damaged)
    weights = next(damaged.rglob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    _home_copy_after(
        f"UPDATE model_registry SET path = '{damaged}' WHERE status = 'champion'",
        materialised_home,
        tmp_path,
        monkeypatch,
    )
    assert cli.main(["search", "card"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"st-assets: champion {champion.version} could not be loaded from {damaged}: ")
    assert "Traceback" not in error


@pytest.mark.parametrize("port", ["70000", "-1", "eighty"])
def test_serve_refuses_a_port_that_is_not_one(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--port", port])
    assert exited.value.code == 2
    assert f"'{port}' is not a TCP port (0 to 65535)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "said"), [("epocs: 2\n", "['epocs'] are not settings here"), ("a: [\n", "not valid YAML")]
)
def test_a_bad_settings_file_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str, said: str
) -> None:
    (tmp_path / "settings.yaml").write_text(text)
    monkeypatch.setenv("ST_ASSETS_HOME", str(tmp_path))
    assert cli.main(["sql", "SELECT 1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"st-assets: {tmp_path / 'settings.yaml'}: ") and said in error
    assert "Traceback" not in error


def test_the_command_starts_without_loading_torch() -> None:
    # `st-assets sql` needs no model: importing torch would cost seconds and hundreds of MB per call.
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, st_assets.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "False"
