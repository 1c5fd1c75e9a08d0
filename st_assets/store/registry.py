"""The model registry: one row per model version, exactly one champion once a model is promoted."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd

from st_assets.settings import MODELS_FOLDER
from st_assets.steps.models import resolve_base_model
from st_assets.store.warehouse import fetch_first, fetch_scalar

BASE_VERSION = "base"


@dataclass(frozen=True)
class ModelVersion:
    """A registered model: where it lives, what made it, and where it stands."""

    version: str
    path: str
    base_model: str
    loss: str
    data_version: str
    status: str


def _row_to_version(connection: duckdb.DuckDBPyConnection, row: tuple) -> ModelVersion:
    """The registry row as a ModelVersion; a folder missing where it was registered is looked for in the
    ``models/`` folder beside the warehouse, where it lies after the whole home was moved. A base model
    champion is looked up by its name again: its package moves with the environment (another virtualenv,
    another Python), not with the home."""
    model = ModelVersion(*row)
    if Path(model.path).exists():
        return model
    if model.version == BASE_VERSION:
        return replace(model, path=resolve_base_model(model.base_model))
    (warehouse_file,) = connection.execute(
        "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchone()
    moved = Path(warehouse_file).parent / MODELS_FOLDER / model.version if warehouse_file else None
    return replace(model, path=str(moved)) if moved is not None and moved.is_dir() else model


def require_model_folder(model: ModelVersion) -> ModelVersion:
    """``model``, once its folder is known to exist; a fine-tuned version without one is an error that
    names it and says where it was looked for (a base model may be a name the hub resolves)."""
    if model.version == BASE_VERSION or Path(model.path).exists():
        return model
    raise FileNotFoundError(
        f"the folder of model {model.version} is missing: not at {model.path}, nor in {MODELS_FOLDER}/ "
        "beside the warehouse. Restore it there from a backup: every run that compares with it or embeds "
        "with it needs it"
    )


_SELECT = "SELECT version, path, base_model, loss, data_version, status FROM model_registry"


def register_model(connection: duckdb.DuckDBPyConnection, record: dict[str, object]) -> None:
    """Insert a version, or mark an existing one as built again (same inputs reuse the version).

    A version built again that is not the champion is a candidate again: the gate decides anew.
    """
    now = datetime.now(UTC)
    exists = fetch_scalar(
        connection, "SELECT count(*) FROM model_registry WHERE version = ?", [record["version"]]
    )
    if exists:
        # The path too: the same version found under a home that moved is loaded from where it is now.
        connection.execute(
            "UPDATE model_registry SET last_built_at = ?, path = coalesce(?, path), "
            "training_settings = coalesce(?, training_settings), folder_removed_at = NULL, "
            "status = CASE WHEN status = 'champion' THEN status ELSE 'candidate' END WHERE version = ?",
            [now, record.get("path"), record.get("training_settings"), record["version"]],
        )
        return
    row = {"created_at": now, "last_built_at": now, "status": "candidate", **record}
    connection.register("_model_row", pd.DataFrame([row]))
    try:
        connection.execute("INSERT INTO model_registry BY NAME SELECT * FROM _model_row")
    finally:
        connection.unregister("_model_row")


@dataclass(frozen=True)
class FolderRemoval:
    """What ``remove_old_model_folders`` did: the versions whose folders went, and those it could not remove."""

    removed: list[str]
    failed: list[str]


def remove_old_model_folders(
    connection: duckdb.DuckDBPyConnection, models_dir: Path, keep: int, base_model: str
) -> FolderRemoval:
    """Delete from ``models_dir`` the folders of fine-tuned versions other than the champion and the ``keep``
    built most recently, oldest first; their registry rows stay, with ``folder_removed_at`` set (a version
    built again trains again and clears it). A folder that ``base_model`` (the home's) or a kept version
    trains on, as when fine-tuning goes on from an earlier version, stays. A folder that cannot be removed
    is reported, not raised."""
    rows = connection.execute(
        "SELECT version, base_model, status = 'champion' FROM model_registry WHERE version <> ? "
        "ORDER BY last_built_at DESC, version",
        [BASE_VERSION],
    ).fetchall()
    others = [(version, base) for version, base, champion in rows if not champion]
    kept_bases = [base for version, base, champion in rows if champion] + [base for _, base in others[:keep]]
    trained_on = {
        Path(name).expanduser().resolve()
        for name in [base_model, *kept_bases]
        if Path(name).expanduser().is_dir()
    }
    removed, failed = [], []
    for version, _ in reversed(others[keep:]):
        folder = models_dir / version
        if not folder.is_dir() or any(
            path == folder.resolve() or folder.resolve() in path.parents for path in trained_on
        ):
            continue
        try:
            # Renamed aside first: a half-deleted folder under the version's name would pass for the model.
            doomed = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".tmp-removed-{version}-"))
            try:
                os.rename(folder, doomed / version)
            except OSError:
                doomed.rmdir()
                raise
        except OSError as error:
            failed.append(f"{version}: {error}")
            continue
        shutil.rmtree(doomed, ignore_errors=True)  # anything left is swept later as abandoned scratch
        connection.execute(
            "UPDATE model_registry SET folder_removed_at = ? WHERE version = ?", [datetime.now(UTC), version]
        )
        removed.append(version)
    return FolderRemoval(removed, failed)


def get_champion(connection: duckdb.DuckDBPyConnection) -> ModelVersion | None:
    """The current champion, if one was promoted."""
    row = fetch_first(connection, f"{_SELECT} WHERE status = 'champion'")
    return _row_to_version(connection, row) if row else None


def get_latest_challenger(connection: duckdb.DuckDBPyConnection) -> ModelVersion | None:
    """The fine-tuned version built most recently (the one the current data and config produce)."""
    row = fetch_first(
        connection, f"{_SELECT} WHERE version <> ? ORDER BY last_built_at DESC LIMIT 1", [BASE_VERSION]
    )
    return _row_to_version(connection, row) if row else None


def record_decision(
    connection: duckdb.DuckDBPyConnection, version: str, promote: bool, primary_score: float, decision: str
) -> None:
    """Store the gate's decision; on promotion the old champion retires in the same transaction."""
    connection.execute("BEGIN TRANSACTION")
    try:
        if promote:
            connection.execute("UPDATE model_registry SET status = 'retired' WHERE status = 'champion'")
        connection.execute(
            "UPDATE model_registry SET status = ?, primary_score = ?, decision = ? WHERE version = ?",
            ["champion" if promote else "rejected", primary_score, decision, version],
        )
        connection.execute("COMMIT")
    except Exception:
        connection.execute("ROLLBACK")
        raise
