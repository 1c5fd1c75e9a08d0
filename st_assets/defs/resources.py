"""Shared Dagster pieces: the warehouse pool name, table metadata helpers."""

from functools import lru_cache
from pathlib import Path

import dagster as dg
import duckdb

from st_assets.settings import Settings
from st_assets.steps.encoders import Encoder, build_encoder
from st_assets.steps.models import model_fingerprint
from st_assets.steps.train import resolve_device
from st_assets.store.warehouse import checked_identifier, table_row_count

# Every asset that writes the warehouse runs under this pool; dagster.yaml limits it to one at a time.
WAREHOUSE_POOL = "st_assets_warehouse"

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


def markdown_table(rows: list[dict[str, object]]) -> str:
    """A small markdown table for metadata (floats to 4 places)."""
    if not rows:
        return "_(none)_"
    headers = list(rows[0])

    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(row[h]) for h in headers) + " |" for row in rows]
    return "\n".join(lines)
