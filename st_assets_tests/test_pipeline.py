"""The whole graph materialised with dg.materialize: every contract table filled, idempotent re-runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest

from st_assets.defs.builder import build_definitions
from st_assets.settings import Settings
from st_assets.store.warehouse import Warehouse
from st_assets_tests.conftest import EIGHT_ASSETS, materialize_everything, write_bundled_slice

CONTRACT_TABLES = (
    "raw_texts",
    "labelled_pairs",
    "validated_pairs",
    "pairs_quarantine",
    "model_registry",
    "evaluation_metrics",
    "fairness_metrics",
    "embeddings",
)


def small_home(home: Path, tiny_model_path: Path, **overrides: object) -> Settings:
    """Three intents of the bundled slice in ``home``, trained with the tiny model."""
    write_bundled_slice(home / "incoming", intents=3, per_intent=10)
    return Settings(home=home, base_model=str(tiny_model_path), batch_size=8, min_train_rows=4, **overrides)


def _count(connection: duckdb.DuckDBPyConnection, sql: str) -> int:
    return connection.execute(sql).fetchall()[0][0]


def test_every_asset_materialises_and_checks_pass(
    materialised_home: tuple[Settings, dg.ExecuteInProcessResult],
) -> None:
    _, result = materialised_home
    assert result.success
    materialised = {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}
    assert materialised == set(EIGHT_ASSETS)
    checks = result.get_asset_check_evaluations()
    by_name = {check.check_name: check for check in checks}
    assert set(by_name) == {
        "validation_suite",
        "split_is_leak_free",
        "challenger_not_worse_than_base",
        "fairness_within_bounds",
        "group_gap_within_tolerance",
        "batch_distribution_stable",
    }
    assert by_name["validation_suite"].passed and by_name["split_is_leak_free"].passed


def test_contract_tables_have_rows_and_one_champion(
    materialised_home: tuple[Settings, dg.ExecuteInProcessResult],
) -> None:
    settings, _ = materialised_home
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        for table in CONTRACT_TABLES:
            if table != "pairs_quarantine":
                assert _count(connection, f"SELECT count(*) FROM {table}") > 0, table
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE status = 'champion'") == 1
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE version <> 'base'") == 1
        assert _count(connection, "SELECT count(*) FROM evaluation_metrics WHERE model_version = 'base'") > 0
        assert _count(connection, "SELECT count(*) FROM fairness_metrics WHERE metric = 'effect_size'") >= 10
        assert _count(connection, "SELECT count(DISTINCT split) FROM validated_pairs") == 2
        raw = _count(connection, "SELECT count(*) FROM raw_texts")
        valid = _count(connection, "SELECT count(*) FROM validated_pairs")
        quarantined = _count(connection, "SELECT count(*) FROM pairs_quarantine WHERE row_number IS NOT NULL")
        assert raw == valid + quarantined
        champion = connection.execute(
            "SELECT version FROM model_registry WHERE status = 'champion'"
        ).fetchall()
        versions = connection.execute("SELECT DISTINCT model_version FROM embeddings").fetchall()
        assert versions == champion
        texts = _count(connection, "SELECT count(DISTINCT text) FROM embeddings")
        assert texts == _count(connection, "SELECT count(*) FROM embeddings")


def test_semantic_search_macro_works_from_a_plain_duckdb_client(
    materialised_home: tuple[Settings, dg.ExecuteInProcessResult],
) -> None:
    settings, _ = materialised_home
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        text, vector = connection.execute("SELECT text, embedding FROM embeddings LIMIT 1").fetchall()[0]
        dimension = len(vector)
        rows = connection.execute(
            f"SELECT text_id, text, score FROM semantic_search(?::FLOAT[{dimension}], 3)", [vector]
        ).fetchall()
    assert len(rows) == 3
    assert rows[0][1] == text
    assert rows[0][2] == pytest.approx(1.0, abs=1e-5)
    assert rows[0][2] >= rows[1][2] >= rows[2][2]


def test_materialising_twice_adds_no_rows_and_trains_no_new_version(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path)
    instance = dg.DagsterInstance.ephemeral()
    materialize_everything(settings, instance)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        before = {t: _count(connection, f"SELECT count(*) FROM {t}") for t in CONTRACT_TABLES}
    result = materialize_everything(settings, instance)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        after = {t: _count(connection, f"SELECT count(*) FROM {t}") for t in CONTRACT_TABLES}
    assert after == before
    training = result.asset_materializations_for_node("finetuned_model")[0].metadata
    assert training["trained"].value is False
    forced = materialize_everything(
        settings, instance, {"ops": {"finetuned_model": {"config": {"force": True}}}}
    )
    forced_training = forced.asset_materializations_for_node("finetuned_model")[0].metadata
    assert forced_training["reused_existing_version"].value is True
    embedding = result.asset_materializations_for_node("corpus_embeddings")[0].metadata
    assert embedding["texts_encoded"].value == 0
    assert len(list(settings.models_dir.iterdir())) == 1


def test_a_few_new_rows_are_embedded_without_retraining(tmp_path: Path, tiny_model_path: Path) -> None:
    settings = small_home(tmp_path, tiny_model_path)
    instance = dg.DagsterInstance.ephemeral()
    materialize_everything(settings, instance)
    (tmp_path / "incoming" / "more.jsonl").write_text(
        '{"text": "my parcel with the new card never came", "label": "card_arrival"}\n'
        '{"text": "where is the card you posted me", "label": "card_arrival"}\n'
    )
    result = materialize_everything(settings, instance)
    training = result.asset_materializations_for_node("finetuned_model")[0].metadata
    assert training["trained"].value is False
    assert "skip training" in training["training_decision"].value
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        found = _count(
            connection, "SELECT count(*) FROM embeddings WHERE text = 'where is the card you posted me'"
        )
        assert found == 1
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE version <> 'base'") == 1
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE status = 'champion'") == 1


def test_enough_new_rows_retrain_and_the_gate_decides(tmp_path: Path, tiny_model_path: Path) -> None:
    settings = small_home(tmp_path, tiny_model_path, retrain_min_new_pairs=5)
    instance = dg.DagsterInstance.ephemeral()
    materialize_everything(settings, instance)
    lines = [
        f'{{"text": "new arrival number {i} about my card", "label": "card_arrival"}}' for i in range(12)
    ]
    (tmp_path / "incoming" / "more.jsonl").write_text("\n".join(lines) + "\n")
    result = materialize_everything(settings, instance)
    training = result.asset_materializations_for_node("finetuned_model")[0].metadata
    assert training["trained"].value is True
    assert "≥ 5" in training["training_decision"].value
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE version <> 'base'") == 2
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE status = 'champion'") == 1
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE decision IS NOT NULL") >= 2


def test_bad_file_is_quarantined_whole_and_good_files_proceed(tmp_path: Path, tiny_model_path: Path) -> None:
    write_bundled_slice(tmp_path / "incoming", intents=3, per_intent=10)
    (tmp_path / "incoming" / "mystery.csv").write_text("question,answer\nhi,there\n")
    shutil.copy(tmp_path / "incoming" / "support.csv", tmp_path / "incoming" / "support_copy.csv")
    settings = Settings(
        home=tmp_path,
        base_model=str(tiny_model_path),
        batch_size=8,
        min_train_rows=4,
        max_quarantine_rate=0.6,
    )
    materialize_everything(settings)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        whole = connection.execute(
            "SELECT row_number, reason FROM pairs_quarantine WHERE source_file = 'mystery.csv'"
        ).fetchall()
        duplicates = _count(
            connection, "SELECT count(*) FROM pairs_quarantine WHERE source_file = 'support_copy.csv'"
        )
    assert len(whole) == 1 and whole[0][0] is None
    assert "match no pair format" in whole[0][1]
    assert duplicates == 30


def test_a_batch_unlike_history_is_flagged_with_its_statistic(tmp_path: Path, tiny_model_path: Path) -> None:
    settings = small_home(tmp_path, tiny_model_path)
    instance = dg.DagsterInstance.ephemeral()
    first = materialize_everything(settings, instance)
    stable = {c.check_name: c for c in first.get_asset_check_evaluations()}["batch_distribution_stable"]
    assert stable.passed  # one batch: nothing to compare with
    lines = [
        f'{{"text": "a much longer complaint number {i} about the fee I was charged twice on my '
        f'statement last week", "label": "extra_charge_on_statement"}}'
        for i in range(40)
    ]
    (tmp_path / "incoming" / "fees.jsonl").write_text("\n".join(lines) + "\n")
    second = materialize_everything(settings, instance)
    flagged = {c.check_name: c for c in second.get_asset_check_evaluations()}["batch_distribution_stable"]
    assert not flagged.passed
    assert flagged.severity == dg.AssetCheckSeverity.WARN
    assert flagged.metadata["label_js_distance"].value > 0.3


def test_rows_with_a_group_get_per_group_metrics_gaps_a_check_and_a_report_section(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path, min_group_rows=1)
    support = tmp_path / "incoming" / "support.csv"
    texts = pd.read_csv(support)
    texts["group"] = ["en-GB" if i % 2 else "en-US" for i in range(len(texts))]
    texts.to_csv(support, index=False)
    result = materialize_everything(settings)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        carried = _count(connection, "SELECT count(*) FROM validated_pairs WHERE group_name IS NOT NULL")
        groups = connection.execute(
            "SELECT DISTINCT model_version, group_name FROM group_metrics WHERE metric = 'knn_accuracy'"
        ).fetchall()
        gaps = connection.execute(
            "SELECT model_version, value FROM evaluation_metrics WHERE metric = 'knn_accuracy_group_gap'"
        ).fetchall()
        challenger = connection.execute(
            "SELECT version FROM model_registry WHERE version <> 'base'"
        ).fetchall()
    assert carried == len(texts)
    assert {group for _, group in groups} == {"en-GB", "en-US"}
    assert {version for version, _ in groups} == {"base", challenger[0][0]}
    assert len(gaps) == 2 and all(0 <= value <= 1 for _, value in gaps)
    check = {c.check_name: c for c in result.get_asset_check_evaluations()}["group_gap_within_tolerance"]
    assert "labelled_texts/knn_accuracy_group_gap" in check.metadata
    report = (tmp_path / "reports" / f"{challenger[0][0]}.html").read_text()
    assert "Metrics per group" in report and "en-GB" in report


def test_a_warehouse_from_before_the_group_column_gains_it_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as connection:
        connection.execute(
            "CREATE TABLE validated_pairs (source_file VARCHAR, sentence1 VARCHAR, split VARCHAR)"
        )
        connection.execute("INSERT INTO validated_pairs VALUES ('a.csv', 'kept', 'train')")
    with Warehouse(path).connect() as connection:
        rows = connection.execute("SELECT sentence1, group_name FROM validated_pairs").fetchall()
    assert rows == [("kept", None)]


def test_user_seat_file_and_token_bound_reach_the_reports(tmp_path: Path, tiny_model_path: Path) -> None:
    write_bundled_slice(tmp_path / "incoming", intents=3, per_intent=10)
    (tmp_path / "incoming" / "long.jsonl").write_text(
        '{"text": "' + "card " * 40 + '", "label": "card_arrival"}\n'
    )
    (tmp_path / "fairness_tests").mkdir()
    words = {
        "targ1": ["cat", "dog", "bird"],
        "targ2": ["car", "bus", "train"],
        "attr1": ["good", "nice", "happy"],
        "attr2": ["bad", "awful", "sad"],
    }
    seat = {
        key: {"category": key, "examples": [f"This is {w}." for w in values]} for key, values in words.items()
    }
    (tmp_path / "fairness_tests" / "pets_vs_vehicles.jsonl").write_text(json.dumps(seat) + "\n")
    settings = Settings(
        home=tmp_path, base_model=str(tiny_model_path), batch_size=8, min_train_rows=4, max_text_tokens=32
    )
    materialize_everything(settings)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        seat_rows = connection.execute(
            "SELECT DISTINCT model_version, metric FROM fairness_metrics WHERE test = 'pets_vs_vehicles'"
        ).fetchall()
        long_text = connection.execute(
            "SELECT rule, reason FROM pairs_quarantine WHERE source_file = 'long.jsonl'"
        ).fetchall()
    assert {metric for _, metric in seat_rows} == {"effect_size", "p_value"}
    assert {version for version, _ in seat_rows} >= {"base"}
    assert long_text[0][0] == "sentence1_tokens" and "limit of 32" in long_text[0][1]
    report = next((tmp_path / "reports").glob("*.html")).read_text()
    assert "pets_vs_vehicles" in report


def test_a_failed_run_leaves_the_champion_and_tables_as_they_were(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path)
    instance = dg.DagsterInstance.ephemeral()
    materialize_everything(settings, instance)
    snapshot = "SELECT version, status FROM model_registry ORDER BY version"
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        registry_before = connection.execute(snapshot).fetchall()
        embeddings_before = connection.execute(
            "SELECT count(*), any_value(model_version) FROM embeddings"
        ).fetchall()
    broken = settings.model_copy(update={"base_model": str(tmp_path / "no-such-model")})
    graph = build_definitions(broken).resolve_asset_graph()
    result = dg.materialize(
        list(graph.assets_defs),
        instance=instance,
        raise_on_error=False,
        run_config={"ops": {"finetuned_model": {"config": {"force": True}}}},
    )
    assert not result.success
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        assert connection.execute(snapshot).fetchall() == registry_before
        assert connection.execute("SELECT count(*), any_value(model_version) FROM embeddings").fetchall() == (
            embeddings_before
        )
    assert not [path for path in settings.models_dir.iterdir() if path.name.startswith(".tmp-")]
