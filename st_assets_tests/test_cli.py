"""The st-assets command on a materialised warehouse: search and read-only SQL with embed()."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pytest

from st_assets import cli
from st_assets.settings import Settings


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
    statement = "SELECT embed(NULL) IS NULL AS missing, 'a' || chr(9) || 'b' || chr(10) || 'c' AS text"
    assert cli.main(["sql", statement]) == 0
    assert capsys.readouterr().out.splitlines() == ["missing\ttext", "True\ta\\tb\\nc"]


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
        with pytest.raises(SystemExit, match="no champion model yet"):
            cli.main(["sql", calls])


def test_search_refuses_embeddings_of_another_model_and_sql_warns(
    materialised_home: tuple[Settings, object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _home_copy_after(
        "UPDATE embeddings SET model_version = 'an-older-champion'", materialised_home, tmp_path, monkeypatch
    )
    assert cli.main(["search", "my card has not arrived"]) == 2
    assert "an-older-champion" in capsys.readouterr().err
    assert cli.main(["sql", "SELECT text FROM semantic_search(embed('my card'), 1)"]) == 0
    assert "materialise corpus_embeddings" in capsys.readouterr().err
