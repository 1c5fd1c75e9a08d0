"""The serving assets: the champion's embeddings of every validated text, refreshed incrementally, and,
when enabled, the same encoding split by incoming file so executors can run it in parallel."""

import hashlib

import dagster as dg
import duckdb

from st_assets.defs.resources import (
    WAREHOUSE_POOL,
    WarehouseResource,
    model_encoder,
    require_passed_validation,
    settings_code_version,
    stops_when_interrupted,
    table_metadata,
)
from st_assets.settings import Settings
from st_assets.steps.embed import ShardedEncoder, corpus_texts, shard_directory, shard_path, write_shard
from st_assets.steps.models import model_fingerprint
from st_assets.store.embeddings import refresh_embeddings
from st_assets.store.registry import ModelVersion, get_champion, require_model_folder

EMBEDDING_SHARDS = "embedding_shards"

# One partition per accepted incoming file, added by raw_texts when embedding_partitions is on.
INCOMING_FILE_PARTITIONS = dg.DynamicPartitionsDefinition(name="incoming_files")


def _model_key(champion: ModelVersion) -> str:
    """The champion's version and the fingerprint of its files: a base model champion is always version
    ``base``, whichever model and weights that is."""
    # Hashed: a hub model's fingerprint is its name, which may hold "/" and share a prefix with others.
    return f"{champion.version}-{hashlib.sha256(model_fingerprint(champion.path).encode()).hexdigest()[:12]}"


def _champion_version(connection: duckdb.DuckDBPyConnection) -> str | None:
    champion = get_champion(connection)
    return champion.version if champion else None


def build_serving_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    """``corpus_embeddings``, and ``embedding_shards`` when ``settings.embedding_partitions`` is on."""

    @dg.asset(
        partitions_def=INCOMING_FILE_PARTITIONS,
        deps=["champion_model", "validated_pairs"],
        group_name="serving",
        kinds={"pytorch", "parquet"},
        code_version=settings_code_version("2", settings, {"encode_backend"}),
        owners=["team:ml-platform"],
        description=(
            "The champion's vectors for the texts of one incoming file (a dynamic partition per file), "
            "written as a Parquet shard under cache/embeddings/<model version>-<fingerprint>/. Encoding only; the "
            "warehouse is read, never written, so partitions run in parallel (a backfill launches one run "
            "per file) and corpus_embeddings then writes the table in one transaction from the shards."
        ),
    )
    def embedding_shards(
        context: dg.AssetExecutionContext, st_assets_warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        require_passed_validation(context)
        source_file = context.partition_key
        with st_assets_warehouse.connect(read_only=True) as connection:
            champion = get_champion(connection)
            if champion is None:
                raise RuntimeError("no champion model yet; materialise champion_model first")
            require_model_folder(champion)
            pairs = connection.execute(
                "SELECT sentence1, sentence2, negative FROM validated_pairs WHERE source_file = ?",
                [source_file],
            ).df()
        texts = corpus_texts(pairs)
        encoder = model_encoder(champion.path, settings)
        path = shard_path(settings.cache_dir, _model_key(champion), source_file, encoder.precision)
        if len(texts):
            write_shard(path, texts, encoder(texts["text"].tolist()))
        context.log.info(f"{source_file}: {len(texts)} texts embedded by {champion.version}")
        return dg.MaterializeResult(
            metadata={
                "source_file": source_file,
                "model_version": champion.version,
                "texts": len(texts),
                "shard": dg.MetadataValue.path(str(path)),
            }
        )

    @dg.asset(
        deps=[
            "champion_model",
            "validated_pairs",
            *([embedding_shards] if settings.embedding_partitions else []),
        ],
        # A warehouse held by another writer past the connection retries is worth one more try.
        retry_policy=dg.RetryPolicy(max_retries=2, delay=5),
        group_name="serving",
        kinds={"duckdb", "pytorch"},
        pool=WAREHOUSE_POOL,
        code_version=settings_code_version("2", settings, {"encode_backend"}),
        owners=["team:ml-platform"],
        description=(
            "DuckDB table `embeddings` (text_id, text, model_version, precision, embedding FLOAT[d]) holding every "
            "validated text embedded by the champion, plus the stored table macro "
            "`semantic_search(query_vector, k)`. Only texts the champion has not embedded yet are encoded "
            "(taking vectors from embedding_shards where present); a new champion, or the same version whose "
            "files changed (recorded in embeddings_source), rebuilds the table aside and swaps it in one "
            "transaction. A run whose model stopped being champion meanwhile writes nothing."
        ),
    )
    @stops_when_interrupted
    def corpus_embeddings(
        context: dg.AssetExecutionContext, st_assets_warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        require_passed_validation(context)
        with st_assets_warehouse.connect() as connection:
            champion = get_champion(connection)
            if champion is None:
                raise RuntimeError("no champion model yet; materialise champion_model first")
            require_model_folder(champion)
            pairs = connection.execute("SELECT sentence1, sentence2, negative FROM validated_pairs").df()
        corpus = corpus_texts(pairs)
        encoder = model_encoder(champion.path, settings)
        encode = ShardedEncoder(
            shard_directory(settings.cache_dir, _model_key(champion), encoder.precision), encoder
        )
        refresh = refresh_embeddings(
            st_assets_warehouse.warehouse(),
            corpus,
            champion.version,
            encode,
            encoder.precision,
            model_fingerprint=model_fingerprint(champion.path),
            # Another run may promote a champion while this one loads its encoder and embeds.
            still_current=lambda connection: _champion_version(connection) == champion.version,
        )
        with st_assets_warehouse.connect() as connection:
            metadata = table_metadata(connection, "embeddings")
        context.log.info(
            f"embeddings for {champion.version}: {refresh.encoded} new ({encode.from_shards} from shards), "
            f"removed {refresh.removed}, total {refresh.total}{' (rebuilt)' if refresh.rebuilt else ''}"
        )
        return dg.MaterializeResult(
            data_version=dg.DataVersion(f"{champion.version}-{refresh.total}"),
            metadata={
                **metadata,
                "model_version": champion.version,
                "texts_encoded": encode.encoded,
                "texts_from_shards": encode.from_shards,
                "texts_removed": refresh.removed,
                "rebuilt": refresh.rebuilt,
            },
        )

    return [corpus_embeddings, *([embedding_shards] if settings.embedding_partitions else [])]
