"""Ingestion assets: files in ``incoming/`` into ``raw_texts``, then normalised into ``labelled_pairs``."""

import hashlib
from datetime import UTC, datetime

import dagster as dg
import pandas as pd
from pydantic import Field

from st_assets.defs.resources import (
    WAREHOUSE_POOL,
    WarehouseResource,
    markdown_table,
    settings_code_version,
    stops_when_interrupted,
    table_metadata,
)
from st_assets.defs.serving import INCOMING_FILE_PARTITIONS
from st_assets.settings import Settings
from st_assets.steps.formats import PairFormat
from st_assets.steps.ingest import FileChangedError, list_incoming_files, read_incoming_file
from st_assets.steps.pairs import normalise_pairs
from st_assets.store.warehouse import Replacement, replace_rows, replace_tables

# Dagster refuses partition keys containing any of these.
_INVALID_IN_PARTITION_KEYS = ("...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0")


def _add_file_partitions(context: dg.AssetExecutionContext, accepted: list[str]) -> None:
    """One ``incoming_files`` partition per accepted file not yet one (names Dagster cannot take as a
    partition key are left to corpus_embeddings, which embeds whatever no shard holds)."""
    usable = [name for name in accepted if not any(bad in name for bad in _INVALID_IN_PARTITION_KEYS)]
    existing = set(context.instance.get_dynamic_partitions(INCOMING_FILE_PARTITIONS.name))
    for name in sorted(set(accepted) - set(usable) - existing):
        context.log.warning(f"{name!r} cannot be a partition key; corpus_embeddings embeds its texts itself")
    if new_keys := [name for name in usable if name not in existing]:
        context.instance.add_dynamic_partitions(INCOMING_FILE_PARTITIONS.name, new_keys)


# raw_texts metadata: the files it left for a later run (changed since the sensor saw them settle).
FILES_NOT_READ = "files_not_read"
EARLIER_ROWS_KEPT = "the rows of the version read before are kept (fix the file to replace them)"


class RawTextsConfig(dg.Config):
    """What a run of ``raw_texts`` may read."""

    settled_content: list[str] | None = Field(
        default=None,
        description=(
            "sha256 of the file contents the sensor saw settle; set, a file whose content is not among them "
            "(still being written) is left for a later run. Unset (runs by hand or schedule): every file."
        ),
    )


def build_ingestion_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    """``raw_texts`` and ``labelled_pairs`` for these settings."""

    @dg.asset(
        retry_policy=dg.RetryPolicy(max_retries=2, delay=5),
        group_name="ingestion",
        kinds={"duckdb", "pandas"},
        pool=WAREHOUSE_POOL,
        code_version="4",
        owners=["team:ml-platform"],
        description=(
            "Every row of every CSV, JSONL and Parquet file in incoming/, with source file, 1-based row "
            "number, row hash and arrival time. A file already ingested with the same content is skipped; "
            "an unreadable file is recorded as rejected with its reason; a rejected version saved over a file "
            "read before keeps that file's earlier rows."
        ),
    )
    @stops_when_interrupted
    def raw_texts(
        context: dg.AssetExecutionContext, config: RawTextsConfig, st_assets_warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        incoming = list_incoming_files(settings.incoming_dir)
        if not incoming:
            context.log.warning(
                f"no data file in {settings.incoming_dir}: copy CSV, JSONL or Parquet files there"
            )
        # Files left for a later run; the sensor gives them back (requests them again) when it sees this.
        not_read: list[str] = []
        if config.settled_content is not None:
            settled = set(config.settled_content)
            if unsettled := [item.source_file for item in incoming if item.content_hash not in settled]:
                context.log.info(
                    f"left for a later run, changed since the sensor saw them settle: {unsettled}"
                )
                not_read += unsettled
            incoming = [item for item in incoming if item.content_hash in settled]
        with st_assets_warehouse.connect() as connection:
            known = dict(
                connection.execute("SELECT source_file, content_hash FROM ingested_files").fetchall()
            )
            ingested = {
                name: (pair_format, row_count)
                for name, pair_format, row_count in connection.execute(
                    "SELECT source_file, format, row_count FROM ingested_files WHERE status = 'ingested'"
                ).fetchall()
            }
            new_files = [item for item in incoming if known.get(item.source_file) != item.content_hash]
            if forced := settings.pair_format:
                for item in incoming:
                    if item not in new_files and ingested.get(item.source_file, (forced,))[0] != forced:
                        context.log.warning(
                            f"{item.source_file} was read as {ingested[item.source_file][0]} before pair_format "
                            f"{forced} was set; it is read again when its content changes"
                        )
            # A changed file keeps the arrival time of every row it already held: appending five rows
            # to a file makes five new rows, not a whole file of them.
            first_arrivals = connection.execute(
                "SELECT source_file, row_hash, min(arrived_at) AS first_arrived FROM raw_texts "
                "WHERE source_file IN (SELECT unnest(?)) AND row_hash IS NOT NULL GROUP BY ALL",
                [[item.source_file for item in new_files]],
            ).df()
        arrived_at = datetime.now(UTC)
        results = []
        for item in new_files:
            try:
                results.append(read_incoming_file(item, settings.pair_format, settings.max_file_bytes))
            except FileChangedError as changed:
                context.log.warning(str(changed))
                not_read.append(item.source_file)
        # A rejected version saved over a file already ingested leaves the earlier version's rows in place,
        # as a file taken out of incoming/ does; its new content is recorded, so it is not read again.
        kept = {
            result.source_file
            for result in results
            if result.rejected_reason and result.source_file in ingested
        }
        file_rows = pd.DataFrame(
            [
                {
                    "source_file": result.source_file,
                    "content_hash": result.content_hash,
                    "format": ingested[result.source_file][0]
                    if result.source_file in kept
                    else (result.pair_format.value if result.pair_format else None),
                    "row_count": ingested[result.source_file][1]
                    if result.source_file in kept
                    else len(result.rows),
                    "status": "rejected"
                    if result.rejected_reason and result.source_file not in kept
                    else "ingested",
                    "reason": f"{result.rejected_reason}; {EARLIER_ROWS_KEPT}"
                    if result.source_file in kept
                    else result.rejected_reason,
                    "ingested_at": arrived_at,
                    "notes": "; ".join(result.notes) or None,
                }
                for result in results
            ],
            columns=[
                "source_file",
                "content_hash",
                "format",
                "row_count",
                "status",
                "reason",
                "ingested_at",
                "notes",
            ],
        )
        raw_rows = pd.concat(
            [
                result.rows.assign(content_hash=result.content_hash, arrived_at=arrived_at)
                for result in results
                if result.source_file not in kept
            ]
            or [pd.DataFrame()],
            ignore_index=True,
        )
        if len(raw_rows) and len(first_arrivals):
            known_rows = raw_rows.merge(first_arrivals, on=["source_file", "row_hash"], how="left")
            first_arrived = pd.to_datetime(known_rows["first_arrived"], utc=True)
            raw_rows["arrived_at"] = first_arrived.fillna(pd.Timestamp(arrived_at)).to_numpy()
        names = [result.source_file for result in results]
        for result in results:
            if result.source_file in kept:
                context.log.warning(f"rejected {result.rejected_reason}; {EARLIER_ROWS_KEPT}")
            elif result.rejected_reason:
                context.log.warning(f"rejected {result.rejected_reason}")
            else:
                notes = "".join(f"; {note}" for note in result.notes)
                context.log.info(
                    f"ingested {result.source_file}: {len(result.rows)} rows ({result.pair_format}){notes}"
                )
        with st_assets_warehouse.connect() as connection:
            # One transaction: a file's rows and its status are never out of step.
            replace_tables(
                connection,
                [
                    Replacement(
                        "raw_texts", raw_rows, "source_file", [name for name in names if name not in kept]
                    ),
                    Replacement("ingested_files", file_rows, "source_file", names),
                ],
            )
            metadata = table_metadata(connection, "raw_texts")
            # The contents read: everything downstream is stale when a file's content changes.
            (contents,) = connection.execute(
                "SELECT coalesce(string_agg(concat_ws(':', source_file, content_hash, status), chr(10) "
                "ORDER BY source_file), '') FROM ingested_files"
            ).fetchone()
            accepted = connection.execute(
                "SELECT source_file FROM ingested_files WHERE status = 'ingested' ORDER BY source_file"
            ).fetchall()
        if settings.embedding_partitions:
            # Every accepted file, not only this run's: a run that failed after its commit left some out.
            _add_file_partitions(context, [name for (name,) in accepted])
        return dg.MaterializeResult(
            data_version=dg.DataVersion(hashlib.sha256(contents.encode()).hexdigest()),
            metadata={
                **metadata,
                "new_files": len(results),
                FILES_NOT_READ: dg.MetadataValue.json(sorted(not_read)),
                "skipped_known_files": len(incoming) - len(new_files),
                "rejected_files": int((file_rows["status"] == "rejected").sum()) + len(kept),
                "files": dg.MetadataValue.md(
                    markdown_table(
                        file_rows[["source_file", "format", "row_count", "status"]]
                        .assign(
                            status=[
                                "rejected; earlier rows kept" if name in kept else status
                                for name, status in zip(
                                    file_rows["source_file"], file_rows["status"], strict=True
                                )
                            ]
                        )
                        .to_dict("records")
                    )
                ),
            },
        )

    @dg.asset(
        deps=[raw_texts],
        group_name="ingestion",
        kinds={"duckdb", "pandas"},
        pool=WAREHOUSE_POOL,
        code_version=settings_code_version("2", settings, {"score_scale", "score_scales"}),
        owners=["team:ml-platform"],
        description=(
            "Raw rows normalised into one shape for every pair format (scored, binary, triplet, "
            "anchor_positive, labelled_texts, unlabelled_texts): text trimmed, control characters removed, "
            f"scores divided by score_scale={settings.score_scale}"
            + (f" or by file: {settings.score_scales}." if settings.score_scales else ".")
        ),
    )
    def labelled_pairs(st_assets_warehouse: WarehouseResource) -> dg.MaterializeResult:
        with st_assets_warehouse.connect() as connection:
            raw_rows = connection.execute(
                "SELECT r.source_file, r.row_number, r.row_hash, r.record, r.parse_error, r.arrived_at FROM raw_texts r "
                "JOIN ingested_files f USING (source_file) WHERE f.status = 'ingested' "
                "ORDER BY r.source_file, r.row_number"
            ).df()
            formats = {
                name: PairFormat(value)
                for name, value in connection.execute(
                    "SELECT source_file, format FROM ingested_files WHERE status = 'ingested'"
                ).fetchall()
            }
        pairs = normalise_pairs(
            raw_rows, formats, file_scales={name: settings.score_scale_for(name) for name in formats}
        )
        with st_assets_warehouse.connect() as connection:
            replace_rows(connection, "labelled_pairs", pairs)
            metadata = table_metadata(connection, "labelled_pairs")
        counts = pairs.groupby("format").size().to_dict()
        return dg.MaterializeResult(metadata={**metadata, **{f"rows_{k}": int(v) for k, v in counts.items()}})

    return [raw_texts, labelled_pairs]
