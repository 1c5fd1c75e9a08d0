"""The whole graph with the real all-MiniLM-L6-v2 on a small slice of the bundled data."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from st_assets.settings import Settings
from st_assets_tests.conftest import materialize_everything, write_bundled_slice


@pytest.mark.slow
def test_real_minilm_fine_tunes_evaluates_and_serves_the_bundled_slice(tmp_path: Path) -> None:
    write_bundled_slice(tmp_path / "incoming", intents=8, per_intent=12)
    settings = Settings(home=tmp_path, base_model="all-MiniLM-L6-v2", batch_size=16)
    result = materialize_everything(settings)
    assert result.success
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:

        def scalar(sql: str) -> object:
            return connection.execute(sql).fetchall()[0][0]

        assert scalar("SELECT count(*) FROM raw_texts") == 8 * 12 + 40
        assert (
            scalar("SELECT count(*) FROM validated_pairs") + scalar("SELECT count(*) FROM pairs_quarantine")
            == 8 * 12 + 40
        )
        assert scalar("SELECT count(*) FROM model_registry WHERE status = 'champion'") == 1
        registry = connection.execute(
            "SELECT base_model, loss, data_version FROM model_registry WHERE version <> 'base'"
        ).fetchall()
        assert registry[0][0] == "all-MiniLM-L6-v2" and "ProxySoftmaxLoss" in registry[0][1]
        base_knn = scalar(
            "SELECT value FROM evaluation_metrics WHERE model_version = 'base' AND metric = 'knn_accuracy'"
        )
        assert base_knn > 0.5  # the real model already separates banking intents well
        assert (
            scalar(
                "SELECT count(*) FROM fairness_metrics WHERE model_version = 'base' AND metric = 'p_value'"
            )
            >= 5
        )
        assert scalar("SELECT typeof(embedding) FROM embeddings LIMIT 1") == "FLOAT[384]"
        top = connection.execute(
            "SELECT text FROM semantic_search((SELECT embedding FROM embeddings "
            "WHERE text = 'How do I reset my password?'), 3)"
        ).fetchall()
        assert top[0][0] == "How do I reset my password?"
        assert any("password" in text.lower() or "login" in text.lower() for (text,) in top[1:])
