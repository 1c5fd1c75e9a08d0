"""The serving asset: the champion's embeddings of every validated text, refreshed incrementally."""

import dagster as dg

from st_assets.defs.resources import WAREHOUSE_POOL, model_encoder, table_metadata
from st_assets.settings import Settings
from st_assets.steps.embed import corpus_texts
from st_assets.store.embeddings import refresh_embeddings
from st_assets.store.registry import get_champion
from st_assets.store.warehouse import Warehouse


def build_serving_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    """``corpus_embeddings`` for these settings."""
    warehouse = Warehouse(settings.warehouse_path)

    @dg.asset(
        deps=["champion_model", "validated_pairs"],
        # A warehouse held by another writer past the connection retries is worth one more try.
        retry_policy=dg.RetryPolicy(max_retries=2, delay=5),
        group_name="serving",
        kinds={"duckdb", "pytorch"},
        pool=WAREHOUSE_POOL,
        code_version="1",
        owners=["team:ml-platform"],
        description=(
            "DuckDB table `embeddings` (text_id, text, model_version, embedding FLOAT[d]) holding every "
            "validated text embedded by the champion, plus the stored table macro "
            "`semantic_search(query_vector, k)`. Only texts the champion has not embedded yet are encoded; "
            "a new champion rebuilds the table aside and swaps it in one transaction."
        ),
    )
    def corpus_embeddings(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        with warehouse.connect() as connection:
            champion = get_champion(connection)
            if champion is None:
                raise RuntimeError("no champion model yet; materialise champion_model first")
            pairs = connection.execute("SELECT sentence1, sentence2, negative FROM validated_pairs").df()
        corpus = corpus_texts(pairs)
        encode = model_encoder(champion.path, settings)
        refresh = refresh_embeddings(warehouse, corpus, champion.version, encode)
        with warehouse.connect() as connection:
            metadata = table_metadata(connection, "embeddings")
        context.log.info(
            f"embeddings for {champion.version}: encoded {refresh.encoded}, removed {refresh.removed}, "
            f"total {refresh.total}{' (rebuilt)' if refresh.rebuilt else ''}"
        )
        return dg.MaterializeResult(
            metadata={
                **metadata,
                "model_version": champion.version,
                "texts_encoded": refresh.encoded,
                "texts_removed": refresh.removed,
                "rebuilt": refresh.rebuilt,
            }
        )

    return [corpus_embeddings]
