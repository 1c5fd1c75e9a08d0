"""Shared Dagster pieces: the warehouse resource and its pool, the encoder cache, metadata helpers."""

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache, wraps
from pathlib import Path
from typing import ParamSpec, TypeVar

import dagster as dg
import duckdb
from dagster._core.storage.asset_check_execution_record import COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES
from pydantic import Field

from st_assets.settings import Settings
from st_assets.steps.encoders import Encoder, build_encoder
from st_assets.steps.models import model_fingerprint, resolve_device
from st_assets.store.warehouse import Warehouse, checked_identifier, table_row_count

# Every asset that writes the warehouse runs under this pool; dagster.yaml limits it to one at a time.
WAREHOUSE_POOL = "st_assets_warehouse"
# The key the graph's assets and checks ask for the warehouse resource by (their parameter name).
WAREHOUSE_RESOURCE = "st_assets_warehouse"


_P = ParamSpec("_P")
_R = TypeVar("_R")


def stops_when_interrupted(compute: Callable[_P, _R]) -> Callable[_P, _R]:
    """For an asset with a retry policy, which Dagster applies to an interrupt too: Ctrl-C (or a run
    terminated) fails the step instead of starting it again."""

    @wraps(compute)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return compute(*args, **kwargs)
        except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError) as interrupt:
            raise dg.Failure(
                "interrupted: the step stops without another try", allow_retries=False
            ) from interrupt

    return run


def settings_code_version(code: str, settings: Settings, names: set[str]) -> str:
    """``code`` with a digest of the named settings: Dagster shows the asset stale once one of them changes
    (a home's settings.yaml edited), until it is materialised under them."""
    values = settings.model_dump(mode="json", include=names)
    return f"{code}-{hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]}"


VALIDATED_PAIRS = dg.AssetKey("validated_pairs")
# The blocking checks of validated_pairs. Its rows are in the warehouse before they run.
BLOCKING_VALIDATION_CHECKS = ("validation_suite", "split_is_leak_free")


# Evaluations looked through for the one of the latest materialisation: a run materialising validated_pairs
# while another's checks wait in the queue can finish in the other order.
_EVALUATIONS_LOOKED_AT = 20


def _check_evaluation_of(
    instance: dg.DagsterInstance, key: dg.AssetCheckKey, materialisation_id: int
) -> dg.AssetCheckEvaluation | None:
    """The latest evaluation of the check ``key`` on the materialisation ``materialisation_id``; rows of
    runs that planned the check and did not evaluate it (queued, cancelled, failed before it) are not
    evaluations and are passed over."""
    for record in instance.event_log_storage.get_asset_check_execution_history(
        key, limit=_EVALUATIONS_LOOKED_AT, status=COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES
    ):
        # A completed row holds its evaluation event (Dagster checks this as it builds the record).
        evaluation = record.event.dagster_event.asset_check_evaluation_data
        target = evaluation.target_materialization_data
        if target is not None and target.storage_id == materialisation_id:
            return evaluation
    return None


def require_passed_validation(context: dg.AssetExecutionContext) -> None:
    """Fail unless every blocking check of ``validated_pairs`` passed on its latest materialisation in this
    instance, unless this run materialised it. A failed check stops its own run only; a later run of the
    assets below it alone ("Materialize stale") would otherwise train on, score or embed the rows it
    stopped. Rows this instance never recorded a materialisation of are not held back."""
    this_run = context.instance.get_records_for_run(
        context.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    if any(record.event_log_entry.dagster_event.asset_key == VALIDATED_PAIRS for record in this_run):
        # Materialised in this run: its blocking checks passed before this step could start, whatever
        # another run has materialised since.
        return
    latest = context.instance.fetch_materializations(VALIDATED_PAIRS, limit=1).records
    if not latest:
        return
    problems = []
    for name in BLOCKING_VALIDATION_CHECKS:
        key = dg.AssetCheckKey(VALIDATED_PAIRS, name)
        evaluation = _check_evaluation_of(context.instance, key, latest[0].storage_id)
        if evaluation is None:
            problems.append(f"{name} did not run on it (or raised an error: its run's log says)")
        elif not evaluation.passed:
            problems.append(f"{name} failed: {evaluation.description}")
    if problems:
        raise dg.Failure(
            f"validated_pairs as last materialised (run {latest[0].run_id[:8]}) has not passed its blocking "
            f"checks: {'; '.join(problems)}. Fix the file or take it out of incoming/, then materialise "
            "validated_pairs with its checks (the whole pipeline, or validated_pairs and what follows)",
            allow_retries=False,
        )


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB file every st_assets table lives in. Assets that write it run under the
    ``st_assets_warehouse`` pool, one at a time; checks and readers open it read-only. Your own assets can
    ask for it by the key ``st_assets_warehouse`` to read the tables, e.g. ``embeddings``."""

    path: str = Field(description="The warehouse file, <home>/st_assets.duckdb by default.")
    lock_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description=(
            "How long a connection waits while another process holds the file (a writer, or any reader: "
            "DuckDB lets a writer in only when no other process has the file open), logging that it waits."
        ),
    )

    def warehouse(self) -> Warehouse:
        """The file as a ``Warehouse``: connections wait while another process holds its lock."""
        return Warehouse(
            Path(self.path), lock_timeout_seconds=self.lock_timeout_seconds, on_lock_wait=self._log_wait
        )

    def _log_wait(self) -> None:
        dg.get_dagster_logger().warning(
            f"{self.path} is held by another process (a run, st-assets, a notebook, a duckdb -readonly "
            f"session); waiting up to {self.lock_timeout_seconds:.0f} s for it"
        )

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection to the file: read-write (schema ensured), or read-only for a reader."""
        with self.warehouse().connect(read_only=read_only) as connection:
            yield connection


_DUCKDB_TO_DAGSTER = {"VARCHAR": "string", "BIGINT": "int", "DOUBLE": "float", "INTEGER": "int"}


@lru_cache(maxsize=4)
def _cached_encoder(
    path: str, fingerprint: str, backend: str, batch_size: int, device: str, cache_dir: Path
) -> Encoder:
    return build_encoder(path, backend, batch_size, device, cache_dir=cache_dir)


def model_encoder(path: str, settings: Settings) -> Encoder:
    """The configured encoder (ONNX by default) for the model in ``path``, loaded once per process while
    the model's files stay the same."""
    return _cached_encoder(
        path,
        model_fingerprint(path),
        settings.encode_backend,
        settings.encode_batch_size,
        resolve_device(settings.device),
        settings.cache_dir,
    )


def table_metadata(connection: duckdb.DuckDBPyConnection, table: str) -> dict[str, object]:
    """Dagster's standard table metadata: row count, table name and column schema."""
    columns = connection.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
        "ORDER BY ordinal_position",
        [checked_identifier(table)],
    ).fetchall()
    schema = dg.TableSchema(
        columns=[dg.TableColumn(name, _DUCKDB_TO_DAGSTER.get(kind, kind.lower())) for name, kind in columns]
    )
    return {
        "dagster/row_count": table_row_count(connection, table),
        "dagster/table_name": f"st_assets.main.{table}",
        "dagster/column_schema": schema,
    }


# Metadata is stored with every materialisation: a table shows this many rows, then says how many more.
MAX_TABLE_ROWS = 50


def markdown_table(rows: list[dict[str, object]]) -> str:
    """A small markdown table for metadata (floats to 4 places; the first MAX_TABLE_ROWS rows)."""
    if not rows:
        return "_(none)_"
    headers = list(rows[0])

    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(row[h]) for h in headers) + " |" for row in rows[:MAX_TABLE_ROWS]]
    if len(rows) > MAX_TABLE_ROWS:
        lines.append(f"\n_and {len(rows) - MAX_TABLE_ROWS} more rows, in the warehouse_")
    return "\n".join(lines)
