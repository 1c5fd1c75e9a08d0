"""The whole graph materialised with dg.materialize: every contract table filled, idempotent re-runs."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from st_assets.defs.builder import PIPELINE_JOB, build_definitions
from st_assets.defs.evaluation import current_comparison
from st_assets.defs.resources import WarehouseResource, model_encoder
from st_assets.settings import Settings
from st_assets.steps.fairness import bundled_test_paths, load_association_tests, run_association_test
from st_assets.steps.split import rows_holding, split_texts
from st_assets.store.registry import get_champion, get_latest_challenger
from st_assets.store.warehouse import Warehouse
from st_assets_tests.conftest import EIGHT_ASSETS, REPO_ROOT, materialize_everything, write_bundled_slice

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
    assert all(check.passed for check in checks), {name: c.description for name, c in by_name.items()}
    training = result.asset_materializations_for_node("finetuned_model")[0].metadata
    curve = training["eval_score_curve"].value
    assert training["last_eval_score"].value == curve[-1] and training["best_eval_score"].value == max(curve)
    # Each check says what it found, and a pass that compared nothing says so.
    descriptions = {name: check.description or "" for name, check in by_name.items()}
    assert descriptions["split_is_leak_free"] == "no text is in both the train and the eval split"
    assert re.match(
        r"primary_score: challenger 0\.\d+ ≥ base model 0\.", descriptions["challenger_not_worse_than_base"]
    )
    assert "invariance" in descriptions["fairness_within_bounds"]
    drift = by_name["batch_distribution_stable"]
    # Every row arrived in one batch: nothing came before it to compare with.
    assert drift.metadata["history_rows"].value == 0
    assert "looks like history" not in descriptions["batch_distribution_stable"]
    assert (
        "lengths not compared: too few texts to compare (0 history"
        in descriptions["batch_distribution_stable"]
    )


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
    # A launchpad override alone trains nothing either, and the decision says it went unused.
    result = materialize_everything(
        settings, instance, {"ops": {"finetuned_model": {"config": {"learning_rate": 1e-4}}}}
    )
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        after = {t: _count(connection, f"SELECT count(*) FROM {t}") for t in CONTRACT_TABLES}
    assert after == before
    training = result.asset_materializations_for_node("finetuned_model")[0].metadata
    assert training["trained"].value is False
    assert "run config learning_rate unused: add force: true" in training["training_decision"].value
    forced = materialize_everything(
        settings, instance, {"ops": {"finetuned_model": {"config": {"force": True}}}}
    )
    forced_training = forced.asset_materializations_for_node("finetuned_model")[0].metadata
    assert forced_training["reused_existing_version"].value is True
    embedding = result.asset_materializations_for_node("corpus_embeddings")[0].metadata
    assert embedding["texts_encoded"].value == 0
    assert len(list(settings.models_dir.iterdir())) == 1


def test_a_changed_training_setting_trains_once_and_an_override_run_does_not_undo_itself(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path)
    instance = dg.DagsterInstance.ephemeral()
    materialize_everything(settings, instance)

    def training_of(result: dg.ExecuteInProcessResult) -> tuple[bool, str]:
        metadata = result.asset_materializations_for_node("finetuned_model")[0].metadata
        return metadata["trained"].value, metadata["training_decision"].value

    # settings.yaml now says two epochs: the next run trains with them, though no row is new.
    two_epochs = settings.model_copy(update={"epochs": 2})
    trained, decision = training_of(materialize_everything(two_epochs, instance))
    assert trained and "training settings changed since the last training: epochs 1 → 2" in decision
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        latest = get_latest_challenger(connection)
        config = connection.execute("SELECT config FROM model_registry WHERE version = ?", [latest.version])
        assert json.loads(config.fetchone()[0])["epochs"] == 2
    assert training_of(materialize_everything(two_epochs, instance))[0] is False
    # A forced run with an override trains with it; the next run, under the home's settings, does not
    # train back to them.
    forced = {"ops": {"finetuned_model": {"config": {"force": True, "learning_rate": 1e-4}}}}
    assert training_of(materialize_everything(two_epochs, instance, forced))[0] is True
    trained, decision = training_of(materialize_everything(two_epochs, instance))
    assert not trained and "no new training rows" in decision


def _data_versions(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    """The data version Dagster recorded for each asset the run materialised."""
    materialisations = [event.materialization for event in result.get_asset_materialization_events()]
    return {item.asset_key.path[-1]: item.tags["dagster/data_version"] for item in materialisations}


def test_a_few_new_rows_are_embedded_without_retraining(tmp_path: Path, tiny_model_path: Path) -> None:
    settings = small_home(tmp_path, tiny_model_path)
    instance = dg.DagsterInstance.ephemeral()
    first = _data_versions(materialize_everything(settings, instance))
    (tmp_path / "incoming" / "more.jsonl").write_text(
        '{"text": "my parcel with the new card never came", "label": "card_arrival"}\n'
        '{"text": "where is the card you posted me", "label": "card_arrival"}\n'
    )
    result = materialize_everything(settings, instance)
    training = result.asset_materializations_for_node("finetuned_model")[0].metadata
    assert training["trained"].value is False
    assert "skip training" in training["training_decision"].value
    # Dagster's data versions follow the data: new file content changes the ingested data and the
    # embeddings, while the model and the champion stay the versions they were.
    second = _data_versions(result)
    assert second["raw_texts"] != first["raw_texts"]
    assert second["corpus_embeddings"] != first["corpus_embeddings"]
    assert second["finetuned_model"] == first["finetuned_model"] == training["model_version"].value
    assert second["champion_model"] == first["champion_model"]
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        found = _count(
            connection, "SELECT count(*) FROM embeddings WHERE text = 'where is the card you posted me'"
        )
        assert found == 1
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE version <> 'base'") == 1
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE status = 'champion'") == 1


def test_the_same_rows_in_other_files_and_order_give_the_same_model_and_scores(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    one_file = small_home(tmp_path / "one", tiny_model_path)
    rows = pd.read_csv(one_file.incoming_dir / "support.csv")
    two_files = small_home(tmp_path / "two", tiny_model_path)
    (two_files.incoming_dir / "support.csv").unlink()
    # The same rows, reversed and split over two files named the other way round.
    reversed_rows = rows.iloc[::-1]
    reversed_rows.iloc[: len(rows) // 2].to_csv(two_files.incoming_dir / "a_later.csv", index=False)
    reversed_rows.iloc[len(rows) // 2 :].to_csv(two_files.incoming_dir / "z_earlier.csv", index=False)

    def scores(settings: Settings) -> list[tuple]:
        materialize_everything(settings)
        with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
            return connection.execute(
                "SELECT model_version, dataset, metric, value, ci_low, ci_high FROM evaluation_metrics "
                "ORDER BY ALL"
            ).fetchall()

    # The model version and every score, bootstrap intervals included, are those of the content.
    first, second = scores(one_file), scores(two_files)
    assert any(row[4] is not None for row in first)
    assert first == second


def test_rows_appended_to_a_file_are_the_only_new_arrivals(tmp_path: Path, tiny_model_path: Path) -> None:
    settings = small_home(tmp_path, tiny_model_path)
    instance = dg.DagsterInstance.ephemeral()
    graph_assets = build_definitions(settings).resolve_asset_graph().assets_defs
    dg.materialize(graph_assets, selection=["raw_texts"], instance=instance)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        before = dict(connection.execute("SELECT row_hash, arrived_at FROM raw_texts").fetchall())
    support = tmp_path / "incoming" / "support.csv"
    support.write_text(support.read_text() + "where is the card you posted me,card_arrival\n")
    dg.materialize(graph_assets, selection=["raw_texts"], instance=instance)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        after = connection.execute(
            "SELECT row_hash, arrived_at, record FROM raw_texts WHERE source_file = 'support.csv'"
        ).fetchall()
    kept = [row for row in after if row[0] in before]
    appended = [row for row in after if row[0] not in before]
    assert len(kept) == 30 and all(arrived == before[row_hash] for row_hash, arrived, _ in kept)
    assert len(appended) == 1 and "posted me" in appended[0][2]
    assert appended[0][1] > max(before.values())


def _write_new_arrivals(incoming: Path, count: int) -> None:
    """A new file of ``count`` card_arrival texts in ``incoming``."""
    lines = [
        f'{{"text": "new arrival number {i} about my card", "label": "card_arrival"}}' for i in range(count)
    ]
    (incoming / "more.jsonl").write_text("\n".join(lines) + "\n")


def test_enough_new_rows_retrain_and_the_gate_decides(tmp_path: Path, tiny_model_path: Path) -> None:
    settings = small_home(tmp_path, tiny_model_path, retrain_min_new_pairs=5, keep_model_versions=1)
    instance = dg.DagsterInstance.ephemeral()
    runs = [materialize_everything(settings, instance)]
    _write_new_arrivals(tmp_path / "incoming", 12)
    result = materialize_everything(settings, instance)
    runs.append(result)
    training = result.asset_materializations_for_node("finetuned_model")[0].metadata
    assert training["trained"].value is True
    assert "≥ 5" in training["training_decision"].value
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE version <> 'base'") == 2
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE status = 'champion'") == 1
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE decision IS NOT NULL") >= 2
    # A third version: the training texts kept are the champion's and the latest challenger's alone.
    (tmp_path / "incoming" / "third.jsonl").write_text(
        "".join(
            f'{{"text": "third batch question {i} on a card", "label": "card_arrival"}}\n' for i in range(12)
        )
    )
    third = materialize_everything(settings, instance)
    runs.append(third)
    assert third.asset_materializations_for_node("finetuned_model")[0].metadata["trained"].value is True
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        champion = get_champion(connection)
        latest = get_latest_challenger(connection)
        kept = {
            version
            for (version,) in connection.execute(
                "SELECT DISTINCT model_version FROM training_texts"
            ).fetchall()
        }
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE version <> 'base'") == 3
        marked_removed = {
            version
            for (version,) in connection.execute(
                "SELECT version FROM model_registry WHERE folder_removed_at IS NOT NULL"
            ).fetchall()
        }
    assert champion is not None and latest is not None
    assert kept == {latest.version} | ({champion.version} - {"base"})
    # keep_model_versions 1: only the champion's folder and the latest challenger's are left on disk; the
    # other versions keep their registry rows, marked, and the runs that removed them say so.
    on_disk = {path.name for path in settings.models_dir.iterdir() if not path.name.startswith(".")}
    assert on_disk == {latest.version} | ({champion.version} - {"base"})
    assert len(on_disk | marked_removed) == 3 and not on_disk & marked_removed
    reported = [
        version
        for run in runs
        for version in run.asset_materializations_for_node("finetuned_model")[0]
        .metadata["model_folders_removed"]
        .value
    ]
    assert sorted(reported) == sorted(marked_removed)


def test_rows_a_rejected_challenger_trained_on_are_not_new_again(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path, retrain_min_new_pairs=5)
    instance = dg.DagsterInstance.ephemeral()
    materialize_everything(settings, instance)
    _write_new_arrivals(tmp_path / "incoming", 12)
    # No challenger beats a margin of 1: this one trains on the new rows and is rejected.
    strict = settings.model_copy(update={"promotion_margin": 1.0})
    rejected = materialize_everything(strict, instance)
    assert rejected.asset_materializations_for_node("finetuned_model")[0].metadata["trained"].value is True
    (tmp_path / "incoming" / "one_more.jsonl").write_text(
        '{"text": "and one more card question", "label": "card_arrival"}\n'
    )
    result = materialize_everything(strict, instance)
    training = result.asset_materializations_for_node("finetuned_model")[0].metadata
    assert training["trained"].value is False
    assert "< 5" in training["training_decision"].value
    # The metadata names the version the asset last built (the rejected one) and, apart, the champion.
    built = rejected.asset_materializations_for_node("finetuned_model")[0].metadata["model_version"].value
    assert training["model_version"].value == built != training["champion_version"].value
    # Nor is the rejected challenger gated again on the grown eval split, until it is built again.
    gate = result.asset_materializations_for_node("champion_model")[0].metadata
    assert "the decision stands" in gate["decision"].value
    forced = materialize_everything(
        strict, instance, run_config={"ops": {"finetuned_model": {"config": {"force": True}}}}
    )
    regated = forced.asset_materializations_for_node("champion_model")[0].metadata
    assert "margin 1.0" in regated["decision"].value


def test_the_champions_age_counts_from_its_last_build_and_a_scheduled_run_trains(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path)
    instance = dg.DagsterInstance.ephemeral()
    materialize_everything(settings, instance)
    # As if the champion had first been built a month ago and built again (force: true) just now.
    with duckdb.connect(str(settings.warehouse_path)) as connection:
        connection.execute(
            "UPDATE model_registry SET created_at = created_at - INTERVAL 30 DAY WHERE status = 'champion'"
        )
    _write_new_arrivals(tmp_path / "incoming", 1)
    result = materialize_everything(settings, instance)
    training = result.asset_materializations_for_node("finetuned_model")[0].metadata
    assert training["trained"].value is False, training["training_decision"].value

    def one_new_row_trains(name: str, **tags: str) -> str:
        (tmp_path / "incoming" / f"{name}.jsonl").write_text(
            f'{{"text": "one more question about my card, {name}", "label": "card_arrival"}}\n'
        )
        training = (
            materialize_everything(settings, instance, tags=tags)
            .asset_materializations_for_node("finetuned_model")[0]
            .metadata
        )
        assert training["trained"].value is True, training["training_decision"].value
        return str(training["training_decision"].value)

    # Last built a month ago: one new row is enough (retrain_after_days).
    with duckdb.connect(str(settings.warehouse_path)) as connection:
        connection.execute(
            "UPDATE model_registry SET last_built_at = last_built_at - INTERVAL 30 DAY WHERE status = 'champion'"
        )
    assert "champion is 30.0 days old (≥ 7.0)" in one_new_row_trains("a_month_later")
    # A run the weekly schedule started trains on one new row too, whatever the champion's age.
    with duckdb.connect(str(settings.warehouse_path)) as connection:
        connection.execute("UPDATE model_registry SET last_built_at = now() WHERE status = 'champion'")
    decision = one_new_row_trains("scheduled", **{"dagster/schedule_name": "retraining_schedule"})
    assert "scheduled retraining run" in decision and "days old (< 7.0)" in decision


def test_bad_file_is_quarantined_whole_and_good_files_proceed(tmp_path: Path, tiny_model_path: Path) -> None:
    write_bundled_slice(tmp_path / "incoming", intents=3, per_intent=10)
    (tmp_path / "incoming" / "mystery.csv").write_text("question,answer\nhi,there\n")
    shutil.copy(tmp_path / "incoming" / "support.csv", tmp_path / "incoming" / "support_copy.csv")
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=8, min_train_rows=4)
    result = materialize_everything(settings)
    # The copy is all repeats: quarantined, but a renamed copy is not a bad file and blocks nothing.
    assert {check.check_name: check for check in result.get_asset_check_evaluations()}[
        "validation_suite"
    ].passed
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


def test_a_mostly_bad_file_blocks_the_run_until_it_leaves_incoming(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path)
    bad = tmp_path / "incoming" / "bad_scores.csv"
    bad.write_text(
        "sentence1,sentence2,score\nmy card is late,where is my card,0.9\n"
        + "".join(f"score {i} out of range,a pair on a 0-5 scale,{i % 4 + 2}\n" for i in range(6))
    )
    graph_assets = build_definitions(settings).resolve_asset_graph().assets_defs
    selection = ["raw_texts", "labelled_pairs", "validated_pairs"]
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(graph_assets, selection=selection, instance=instance, raise_on_error=False)
    suite = {check.check_name: check for check in result.get_asset_check_evaluations()}["validation_suite"]
    # 6 of the file's 7 rows fail, though only a few percent of all rows do.
    assert not suite.passed
    assert "bad_scores.csv: 6 of 7 rows quarantined (86%" in suite.description
    # The example names the first bad row, as a user finds it in the file.
    assert "e.g. row 2: score 2 outside [0, 1]" in suite.description
    assert suite.metadata["quarantine_rate"].value < settings.max_quarantine_rate
    # The command line prints a failed check's name only; the run's log carries the reason.
    errors = [
        entry.user_message for entry in instance.all_logs(result.run_id) if entry.level == logging.ERROR
    ]
    assert any("bad_scores.csv: 6 of 7 rows quarantined" in message for message in errors)
    # The rows are in the warehouse: a later run of what follows alone ("Materialize stale" in the UI)
    # must not train on them, score them or embed them.
    for downstream in ["finetuned_model", "evaluation_report", "fairness_report", "corpus_embeddings"]:
        held = dg.materialize(graph_assets, selection=[downstream], instance=instance, raise_on_error=False)
        (failure,) = held.get_step_failure_events()
        message = failure.step_failure_data.user_failure_data.description
        assert "has not passed its blocking checks: validation_suite failed: bad_scores.csv" in message
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        assert _count(connection, "SELECT count(*) FROM model_registry") == 0

    bad.unlink()
    result = dg.materialize(graph_assets, selection=selection, instance=instance, raise_on_error=False)
    suite = {check.check_name: check for check in result.get_asset_check_evaluations()}["validation_suite"]
    assert suite.passed
    assert dg.materialize(graph_assets, selection=["finetuned_model"], instance=instance).success
    # Runs that planned the checks and have not run them (queued by the sensor, or cancelled) leave the
    # passed evaluation standing.
    pipeline_job = build_definitions(settings).resolve_job_def(PIPELINE_JOB)
    for _ in range(30):
        instance.create_run_for_job(pipeline_job, run_config={})
    assert dg.materialize(graph_assets, selection=["finetuned_model"], instance=instance).success
    # validated_pairs again without its checks: the checks did not run on these rows, so they are held too.
    unchecked = dg.materialize(
        graph_assets,
        selection=dg.AssetSelection.assets("validated_pairs").without_checks(),
        instance=instance,
    )
    assert unchecked.success and not unchecked.get_asset_check_evaluations()
    held = dg.materialize(
        graph_assets, selection=["evaluation_report"], instance=instance, raise_on_error=False
    )
    (failure,) = held.get_step_failure_events()
    assert "validation_suite did not run on it" in failure.step_failure_data.user_failure_data.description
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        kept = _count(
            connection, "SELECT count(*) FROM pairs_quarantine WHERE source_file = 'bad_scores.csv'"
        )
    assert kept == 6


def test_a_file_blocked_for_long_texts_names_the_setting_that_allows_them(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path, max_text_chars=300)
    (tmp_path / "incoming" / "long_answers.csv").write_text(
        "anchor,positive\n" + "".join(f"question {i},{'a long answer ' * 30}{i}\n" for i in range(6))
    )
    result = dg.materialize(
        build_definitions(settings).resolve_asset_graph().assets_defs,
        selection=["raw_texts", "labelled_pairs", "validated_pairs"],
        raise_on_error=False,
    )
    suite = {check.check_name: check for check in result.get_asset_check_evaluations()}["validation_suite"]
    assert not suite.passed
    assert "long_answers.csv: 6 of 6 rows quarantined" in suite.description
    assert "(or, for texts over the limit, raise max_text_chars in settings.yaml)" in suite.description


def test_unlabelled_texts_alone_run_the_whole_graph(tmp_path: Path, tiny_model_path: Path) -> None:
    texts = pd.read_csv(REPO_ROOT / "data" / "incoming" / "banking77_support.csv")["text"].head(60)
    (tmp_path / "incoming").mkdir()
    texts.to_frame().to_csv(tmp_path / "incoming" / "notes.csv", index=False)
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=8, min_train_rows=4)
    result = materialize_everything(settings)
    assert result.success
    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    assert checks["challenger_not_worse_than_base"].passed
    assert "nothing to compare" in checks["challenger_not_worse_than_base"].description
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE version <> 'base'") == 1
        assert _count(connection, "SELECT count(*) FROM embeddings") == 60


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
            "SELECT model_version, group_name, value FROM group_metrics WHERE metric = 'knn_accuracy'"
        ).fetchall()
        gaps = dict(
            connection.execute(
                "SELECT model_version, value FROM evaluation_metrics WHERE metric = 'knn_accuracy_group_gap'"
            ).fetchall()
        )
        challenger = connection.execute(
            "SELECT version FROM model_registry WHERE version <> 'base'"
        ).fetchall()
    assert carried == len(texts)
    assert {group for _, group, _ in groups} == {"en-GB", "en-US"}
    assert {version for version, _, _ in groups} == {"base", challenger[0][0]}
    # Each model's gap is the distance between its two groups' accuracies.
    assert set(gaps) == {"base", challenger[0][0]}
    for version, gap in gaps.items():
        accuracies = [value for model, _, value in groups if model == version]
        assert gap == pytest.approx(max(accuracies) - min(accuracies))
    check = {c.check_name: c for c in result.get_asset_check_evaluations()}["group_gap_within_tolerance"]
    assert check.metadata["labelled_texts/knn_accuracy_group_gap"].value == pytest.approx(
        gaps[challenger[0][0]]
    )
    growth = gaps[challenger[0][0]] - gaps["base"]
    assert check.passed == (growth <= settings.group_gap_tolerance)
    assert check.metadata["largest_growth"].value == pytest.approx(growth)
    report = (tmp_path / "reports" / f"{challenger[0][0]}.html").read_text()
    assert "Metrics per group" in report and "en-GB" in report
    assert "Models compared" in report and "ProxySoftmaxLoss" in report


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
    result = materialize_everything(settings)
    challenger = result.asset_materializations_for_node("finetuned_model")[0].metadata["model_version"].value
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        seat_rows = connection.execute(
            "SELECT DISTINCT model_version, metric FROM fairness_metrics WHERE test = 'pets_vs_vehicles'"
        ).fetchall()
        long_text = connection.execute(
            "SELECT rule, reason FROM pairs_quarantine WHERE source_file = 'long.jsonl'"
        ).fetchall()
    assert {metric for _, metric in seat_rows} == {"effect_size", "p_value"}
    assert {version for version, _ in seat_rows} == {"base", challenger}
    assert long_text[0][0] == "sentence1_tokens" and "limit of 32" in long_text[0][1]
    report = (tmp_path / "reports" / f"{challenger}.html").read_text()
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
    # The data steps ran again; training failed and nothing after it ran.
    steps = {event.step_key: event.event_type_value for event in result.all_events if event.is_step_event}
    assert steps["validated_pairs"] == steps["labelled_pairs"] == "STEP_SUCCESS"
    assert [key for key, last in steps.items() if last == "STEP_FAILURE"] == ["finetuned_model"]
    assert "champion_model" not in steps and "corpus_embeddings" not in steps
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        assert connection.execute(snapshot).fetchall() == registry_before
        assert connection.execute("SELECT count(*), any_value(model_version) FROM embeddings").fetchall() == (
            embeddings_before
        )
    assert not [path for path in settings.models_dir.iterdir() if path.name.startswith(".tmp-")]


def test_a_gate_whose_report_cannot_be_written_changes_no_champion_and_gates_again(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path)
    (tmp_path / "reports").write_text("a file where the reports folder goes")
    instance = dg.DagsterInstance.ephemeral()
    graph = build_definitions(settings).resolve_asset_graph()
    failed = dg.materialize(list(graph.assets_defs), instance=instance, raise_on_error=False)
    assert not failed.success
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        assert get_champion(connection) is None
    (tmp_path / "reports").unlink()
    result = materialize_everything(settings, instance)
    gate = result.asset_materializations_for_node("champion_model")[0].metadata
    assert "decision stands" not in gate["decision"].value
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        assert get_champion(connection) is not None
    assert (tmp_path / "reports" / f"{gate['challenger_version'].value}.html").exists()


def test_after_a_base_model_change_the_challenger_faces_the_old_base_model_champion(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    # No challenger can beat a margin of 1, so the first run makes the base model champion.
    settings = small_home(tmp_path, tiny_model_path, promotion_margin=1.0)
    instance = dg.DagsterInstance.ephemeral()
    materialize_everything(settings, instance)
    other_base = tmp_path / "another-base"
    shutil.copytree(tiny_model_path, other_base)
    switched = settings.model_copy(update={"base_model": str(other_base), "promotion_margin": 0.0})
    result = materialize_everything(
        switched, instance, run_config={"ops": {"finetuned_model": {"config": {"force": True}}}}
    )
    old_base = f"base:{tiny_model_path}"
    report = result.asset_materializations_for_node("evaluation_report")[0].metadata
    assert report["incumbent_version"].value == old_base
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        scored = {
            row[0]
            for row in connection.execute(
                "SELECT DISTINCT model_version FROM evaluation_metrics WHERE metric = 'primary_score'"
            ).fetchall()
        }
    # Scored: the new base model (for "fine-tuning did not hurt") and the old one, the incumbent.
    assert {"base", old_base} <= scored


def _pool_step_spans(instance: dg.DagsterInstance, run_id: str, pool_steps: set[str]) -> list[tuple]:
    """(start, end, run, step) of each warehouse-pool step of a run, from its event log."""
    starts, spans = {}, []
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or record.step_key not in pool_steps:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[record.step_key] = record.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            spans.append((starts[record.step_key], record.timestamp, run_id, record.step_key))
    return spans


def test_two_materialisations_at_once_and_a_reader_meet_no_lock_error(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    home = tmp_path / "home"
    write_bundled_slice(home / "incoming", intents=3, per_intent=10)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    # The project's instance settings: the warehouse pool limited to one step at a time.
    shutil.copy(Path(__file__).resolve().parents[1] / "dagster.yaml", dagster_home / "dagster.yaml")
    # The instance's SQLite storage is created once before the runs, as `dagster dev` does: two processes
    # creating it at the same moment can both stamp its schema version.
    dg.DagsterInstance.from_config(str(dagster_home)).dispose()
    environment = {**os.environ, "DAGSTER_HOME": str(dagster_home)}
    command = [sys.executable, "-m", "st_assets_tests.run_pipeline", str(home), str(tiny_model_path)]
    warehouse = Warehouse(home / "st_assets.duckdb")

    def start_run(go_file: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [*command, str(go_file)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_for(path: Path) -> None:
        deadline = time.monotonic() + 300
        while not path.exists() and all(run.poll() is None for run in runs) and time.monotonic() < deadline:
            time.sleep(0.02)

    # Both processes load their imports and the instance first, then wait for their go file, so the
    # second is ready to claim the pool the moment it is let go. It is let go once the first holds the
    # pool (its first writer created the warehouse): Dagster's SQLite instance storage can hand the one
    # slot to two claims made in the same instant. Writers that meet anyway wait on the file lock.
    go_files = [tmp_path / "go-first", tmp_path / "go-second"]
    runs = [start_run(go_file) for go_file in go_files]
    for go_file in go_files:
        wait_for(go_file.with_name(go_file.name + ".ready"))
    go_files[0].touch()
    wait_for(warehouse.path)
    go_files[1].touch()
    # A reader the whole time: read-only connections, retried with backoff while a writer holds the file.
    reads, errors = 0, []
    while any(run.poll() is None for run in runs):
        if warehouse.path.exists():
            try:
                warehouse.read("SELECT count(*) FROM information_schema.tables")
                reads += 1
            except Exception as error:  # any failure of a reader is what this test looks for
                errors.append(repr(error))
        time.sleep(0.2)
    outputs = [run.communicate()[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    assert errors == [] and reads > 10
    assert not any("Could not set lock" in output for output in outputs)

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        run_ids = [record.dagster_run.run_id for record in instance.get_run_records()]
        graph = build_definitions(Settings(home=home)).resolve_asset_graph()
        pool_steps = {
            graph.get(key).assets_def.node_def.name
            for key in graph.get_all_asset_keys()
            if graph.get(key).assets_def.node_def.pools == {"st_assets_warehouse"}
        }
        spans = sorted(span for run_id in run_ids for span in _pool_step_spans(instance, run_id, pool_steps))
        pool_waits = [
            record.step_key
            for run_id in run_ids
            for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
            if record.dagster_event.message == "Step blocked by limit for pool st_assets_warehouse"
        ]
    assert len(run_ids) == 2 and len(spans) >= 2 * 7
    # The runs really overlapped in time: each started a pool step before the other's last one ended.
    first_start = {run: min(s[0] for s in spans if s[2] == run) for run in run_ids}
    last_end = {run: max(s[1] for s in spans if s[2] == run) for run in run_ids}
    assert all(first_start[run] < last_end[other] for run, other in itertools.permutations(run_ids))
    # The pool made warehouse writers take turns: steps waited while the other run held it. SQLite instance
    # storage can give the slot to two claims made in the same instant (README); two such writers meet at
    # the DuckDB file lock instead, and the assertions above show that the later one waited without error.
    assert pool_waits, "no step ever waited for the st_assets_warehouse pool"
    with duckdb.connect(str(home / "st_assets.duckdb"), read_only=True) as connection:
        assert _count(connection, "SELECT count(*) FROM model_registry WHERE status = 'champion'") == 1
        raw_rows = _count(connection, "SELECT count(*) FROM raw_texts")
        distinct_rows = _count(connection, "SELECT count(DISTINCT (source_file, row_number)) FROM raw_texts")
    assert raw_rows == distinct_rows  # the second run ingested nothing twice


def test_embedding_shards_split_encoding_by_file_and_corpus_embeddings_writes_them(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path, embedding_partitions=True)
    (tmp_path / "incoming" / "odd...name.jsonl").write_text('{"text": "where is my parcel", "label": "x"}\n')
    instance = dg.DagsterInstance.ephemeral()
    assets = list(build_definitions(settings).resolve_asset_graph().assets_defs)
    upstream = ["raw_texts", "labelled_pairs", "validated_pairs", "finetuned_model"]
    dg.materialize(
        assets,
        selection=[*upstream, "evaluation_report", "fairness_report", "champion_model"],
        instance=instance,
    )
    # One partition per accepted file; a name Dagster cannot take as a key is left to corpus_embeddings.
    partitions = instance.get_dynamic_partitions("incoming_files")
    assert sorted(partitions) == ["helpdesk_pairs.csv", "support.csv"]
    shards = {
        key: dg.materialize(assets, selection=["embedding_shards"], partition_key=key, instance=instance)
        for key in partitions
    }
    texts_per_shard = {
        key: result.asset_materializations_for_node("embedding_shards")[0].metadata["texts"].value
        for key, result in shards.items()
    }
    embedded = dg.materialize(assets, selection=["corpus_embeddings"], instance=instance)
    metadata = embedded.asset_materializations_for_node("corpus_embeddings")[0].metadata
    assert metadata["texts_from_shards"].value == sum(texts_per_shard.values())
    assert metadata["texts_encoded"].value == 1  # the odd file's one text, encoded here
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        champion_path = connection.execute(
            "SELECT path FROM model_registry WHERE status = 'champion'"
        ).fetchall()
        stored = connection.execute("SELECT text, embedding FROM embeddings ORDER BY text LIMIT 5").fetchall()
    # Vectors from the shards are the ones the champion's encoder gives.
    encoder = model_encoder(champion_path[0][0], settings)
    expected = encoder([text for text, _ in stored])
    assert np.allclose(np.array([vector for _, vector in stored]), expected, atol=1e-6)


def test_the_default_graph_has_no_partitioned_asset(tmp_path: Path) -> None:
    graph = build_definitions(Settings(home=tmp_path)).resolve_asset_graph()
    assert not any(graph.get(key).is_partitioned for key in graph.get_all_asset_keys())


def test_a_later_pair_joining_train_and_eval_texts_is_quarantined_and_moves_nothing(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    pd.DataFrame(
        {
            "sentence1": [f"question number {i}" for i in range(30)],
            "sentence2": [f"answer number {i}" for i in range(30)],
            "score": 0.8,
        }
    ).to_csv(incoming / "pairs.csv", index=False)
    settings = Settings(home=tmp_path, min_train_rows=4)
    graph_assets = build_definitions(settings).resolve_asset_graph().assets_defs
    selection = ["raw_texts", "labelled_pairs", "validated_pairs"]
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize(graph_assets, selection=selection, instance=instance)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        before = dict(connection.execute("SELECT sentence2, split FROM validated_pairs").fetchall())
    train_texts = [text for text, side in before.items() if side == "train"]
    eval_texts = [text for text, side in before.items() if side == "eval"]
    # Six valid pairs over texts already split, each joining a train text to an eval text.
    links = [(train_texts[i % len(train_texts)], eval_texts[i % len(eval_texts)]) for i in range(6)]
    pd.DataFrame(
        {"sentence1": [a for a, _ in links], "sentence2": [b for _, b in links], "score": 0.9}
    ).to_csv(incoming / "links.csv", index=False)
    result = dg.materialize(graph_assets, selection=selection, instance=instance)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        after = dict(connection.execute("SELECT sentence2, split FROM validated_pairs").fetchall())
        quarantined = connection.execute(
            "SELECT rule, reason FROM pairs_quarantine WHERE source_file = 'links.csv'"
        ).fetchall()
    assert after == before
    assert len(quarantined) == 6
    assert (
        quarantined[0][0] == "split_bridge"
        and "(train)" in quarantined[0][1]
        and "(eval)" in quarantined[0][1]
    )
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["split_is_leak_free"].passed
    # Every row of links.csv is quarantined, yet none is a bad row: the file does not block the run.
    assert checks["validation_suite"].passed


def test_rows_all_linked_into_one_group_fail_the_check_with_the_cause(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    # Thirty questions with one shared answer: one group, so one side of the split holds every row.
    pd.DataFrame(
        {"anchor": [f"question number {i}" for i in range(30)], "positive": "see the help page"}
    ).to_csv(incoming / "faq.csv", index=False)
    settings = Settings(home=tmp_path, min_train_rows=4)
    graph_assets = build_definitions(settings).resolve_asset_graph().assets_defs
    result = dg.materialize(
        graph_assets,
        selection=["raw_texts", "labelled_pairs", "validated_pairs"],
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    check = {c.check_name: c for c in result.get_asset_check_evaluations()}["validation_suite"]
    assert not check.passed
    assert "30 of the 30 valid rows are linked by shared texts into one group" in check.description
    assert "no eval rows" in check.description or "only 0 train rows" in check.description


def test_a_home_with_no_data_file_fails_the_check_naming_the_empty_folder(tmp_path: Path) -> None:
    # ST_ASSETS_HOME=/new/home make demo: nothing copies the bundled data into a new home.
    settings = Settings(home=tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        build_definitions(settings).resolve_asset_graph().assets_defs,
        selection=["raw_texts", "labelled_pairs", "validated_pairs"],
        instance=instance,
        raise_on_error=False,
    )
    check = {c.check_name: c for c in result.get_asset_check_evaluations()}["validation_suite"]
    assert not check.passed
    assert f"only 0 train rows (no data file in {settings.incoming_dir})" in check.description
    assert any(
        log.step_key == "raw_texts" and f"no data file in {settings.incoming_dir}" in log.user_message
        for log in instance.all_logs(result.run_id)
    )


def test_a_home_moved_to_another_folder_runs_and_serves_from_there(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path / "before", tiny_model_path)
    materialize_everything(settings)
    shutil.move(tmp_path / "before", tmp_path / "after")
    moved = settings.model_copy(update={"home": tmp_path / "after"})
    # No new rows, so nothing trains and no version is registered again: the registry still names the
    # old folder, and every model is found in the moved home's models/ instead.
    assert materialize_everything(moved).success
    with Warehouse(moved.warehouse_path).connect(read_only=True) as connection:
        champion = get_champion(connection)
        challenger = get_latest_challenger(connection)
    assert champion is not None and challenger is not None
    assert Path(challenger.path) == moved.models_dir / challenger.version
    assert champion.version == "base" or Path(champion.path) == moved.models_dir / champion.version
    # A version whose folder is gone from both places is named, with where it was looked for.
    shutil.rmtree(moved.models_dir / challenger.version)
    with pytest.raises(FileNotFoundError, match=f"the folder of model {challenger.version} is missing"):
        current_comparison(WarehouseResource(path=str(moved.warehouse_path)))


@pytest.fixture(scope="module")
def promoted_home(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path
) -> tuple[Settings, dg.DagsterInstance]:
    """A home materialised once with enough rows and training for the tiny model's challenger to be
    promoted over its base (the last test using it may run the graph again)."""
    home = tmp_path_factory.mktemp("promoted")
    write_bundled_slice(home / "incoming", intents=6, per_intent=20)
    settings = Settings(
        home=home, base_model=str(tiny_model_path), batch_size=8, epochs=4, learning_rate=1e-3
    )
    instance = dg.DagsterInstance.ephemeral()
    materialize_everything(settings, instance)
    return settings, instance


def test_a_fine_tuned_champion_is_probed_and_serves_through_its_own_weights(
    promoted_home: tuple[Settings, dg.DagsterInstance], tiny_model_path: Path
) -> None:
    settings, _ = promoted_home
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        champion = get_champion(connection)
        assert champion is not None and champion.version != "base"
        stored = connection.execute(
            "SELECT text, embedding FROM embeddings ORDER BY text LIMIT 20"
        ).fetchall()
        effect_sizes = dict(
            connection.execute(
                "SELECT model_version, value FROM fairness_metrics "
                "WHERE evaluated_for = ? AND metric = 'effect_size' AND test = 'gender_career_family'",
                [champion.version],
            ).fetchall()
        )
    champion_encoder = model_encoder(champion.path, settings)
    base_encoder = model_encoder(str(tiny_model_path), settings)
    # The embeddings table holds the champion's vectors, not the base model's.
    texts = [text for text, _ in stored]
    vectors = np.array([vector for _, vector in stored])
    assert np.allclose(vectors, champion_encoder(texts), atol=1e-5)
    assert not np.allclose(vectors, base_encoder(texts), atol=1e-2)
    # Each model's association effect size is its own encoder's (the promoted challenger's and the base's).
    (probe,) = [
        test for test in load_association_tests(bundled_test_paths()) if test.name == "gender_career_family"
    ]
    for version, encoder in ((champion.version, champion_encoder), ("base", base_encoder)):
        expected = run_association_test(
            probe, encoder, permutations=settings.fairness_permutations, seed=settings.seed
        )
        assert effect_sizes[version] == pytest.approx(expected.effect_size, abs=1e-4)
    assert effect_sizes[champion.version] != pytest.approx(effect_sizes["base"], abs=1e-3)


def test_a_champion_is_compared_only_on_eval_rows_it_did_not_train_on(
    promoted_home: tuple[Settings, dg.DagsterInstance],
) -> None:
    settings, instance = promoted_home
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        champion = connection.execute(
            "SELECT version FROM model_registry WHERE status = 'champion'"
        ).fetchall()
        first_train = connection.execute("SELECT * FROM validated_pairs WHERE split = 'train'").df()
    assert champion[0][0] != "base"
    # Another seed reshuffles the split: eval rows now include rows the champion trained on.
    reshuffled = settings.model_copy(update={"seed": 7})
    result = materialize_everything(
        reshuffled, instance, {"ops": {"finetuned_model": {"config": {"force": True}}}}
    )
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        eval_rows = connection.execute("SELECT * FROM validated_pairs WHERE split = 'eval'").df()
    trained_on = rows_holding(eval_rows, split_texts(first_train))
    assert 0 < trained_on.sum() < len(eval_rows)
    report = result.asset_materializations_for_node("evaluation_report")[0].metadata
    assert report["eval_rows_incumbent_trained_on"].value == trained_on.sum()
    # The difference is scored on the eval rows held out from both models, and the gate says so.
    challenger = report["challenger_version"].value
    held_out = eval_rows[~trained_on]
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        rows = connection.execute(
            "SELECT eval_rows FROM evaluation_metrics WHERE evaluated_for = ? AND metric = ?",
            [challenger, "primary_score_difference"],
        ).fetchall()
    assert rows == [(len(held_out),)]
    gate = result.asset_materializations_for_node("champion_model")[0].metadata
    assert f"{trained_on.sum()} eval rows the incumbent trained on" in gate["decision"].value


def test_a_base_model_champion_saved_over_in_place_is_embedded_anew(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    base = tmp_path / "base"
    shutil.copytree(tiny_model_path, base)
    settings = small_home(tmp_path / "home", base)
    instance = dg.DagsterInstance.ephemeral()
    materialize_everything(settings, instance)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        assert connection.execute(
            "SELECT version FROM model_registry WHERE status = 'champion'"
        ).fetchall() == [("base",)]
    # The team saves a retrained base over the same folder: the champion is still version 'base'.
    model = SentenceTransformer(str(base), device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5).add_(0.01)
    model.save(str(base))
    _write_new_arrivals(tmp_path / "home" / "incoming", 1)
    result = materialize_everything(settings, instance)
    embedding = result.asset_materializations_for_node("corpus_embeddings")[0].metadata
    assert embedding["rebuilt"].value is True
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        stored = connection.execute("SELECT text, embedding FROM embeddings ORDER BY text LIMIT 5").df()
    fresh = SentenceTransformer(str(base), device="cpu").encode(
        stored["text"].tolist(), normalize_embeddings=True
    )
    assert np.allclose(np.stack(stored["embedding"].to_numpy()), fresh, atol=1e-4)


def test_a_base_model_below_the_invariance_floor_serves_and_its_decision_says_so(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path, invariance_threshold=1.0)
    (tmp_path / "incoming" / "gendered.jsonl").write_text(
        "".join(
            f'{{"text": "{who} says {pronoun} card number {i} never arrived", "label": "card_arrival"}}\n'
            for i, (who, pronoun) in enumerate([("my wife", "her"), ("my husband", "his")] * 6)
        )
    )
    materialize_everything(settings)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        decisions = dict(connection.execute("SELECT status, decision FROM model_registry").fetchall())
    # No model keeps every vector through a gender swap: the challenger is rejected and the base serves.
    assert "counterfactual invariance" in decisions["rejected"]
    assert "base model promoted: the first challenger did not pass the gate" in decisions["champion"]
    assert "its own counterfactual invariance" in decisions["champion"]
    assert "below the threshold 1.0 too" in decisions["champion"]


def test_a_rejected_version_saved_over_a_read_file_keeps_its_earlier_rows(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path)
    instance = dg.DagsterInstance.ephemeral()
    materialize_everything(settings, instance)
    support = tmp_path / "incoming" / "support.csv"
    original = support.read_text(encoding="utf-8")

    def support_rows() -> tuple[int, int]:
        with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
            return connection.execute(
                "SELECT (SELECT count(*) FROM validated_pairs WHERE source_file = 'support.csv'), "
                "(SELECT count(DISTINCT arrived_at) FROM raw_texts WHERE source_file = 'support.csv')"
            ).fetchone()

    before = support_rows()
    # Re-exported from a spreadsheet in a legacy encoding: rejected whole, and nothing read before is lost.
    support.write_bytes(
        (original + "my card payment to the café failed,card_payment_not_recognised\n").encode("cp1252")
    )
    materialize_everything(settings, instance)
    assert support_rows() == before
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        (reason,) = connection.execute(
            "SELECT reason FROM pairs_quarantine WHERE source_file = 'support.csv' AND row_number IS NULL"
        ).fetchone()
    assert "not valid utf-8" in reason and "rows of the version read before are kept" in reason
    # Fixed in place: only the added row is new; the others keep their first arrival.
    support.write_text(original + "my card payment to the cafe failed,card_payment_not_recognised\n")
    materialize_everything(settings, instance)
    valid_rows, arrivals = support_rows()
    assert valid_rows == before[0] + 1 and arrivals == 2
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        assert connection.execute(
            "SELECT count(*) FROM pairs_quarantine WHERE source_file = 'support.csv' AND row_number IS NULL"
        ).fetchone() == (0,)


def test_a_window_that_forms_no_training_pair_trains_nothing_and_still_embeds(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = small_home(tmp_path, tiny_model_path, retrain_min_new_pairs=1)
    instance = dg.DagsterInstance.ephemeral()
    materialize_everything(settings, instance)
    # The new texts are of one new intent: a window of them, with no replay, has no other label to tell
    # them from.
    (tmp_path / "incoming" / "new_intents.jsonl").write_text(
        "".join(
            f'{{"text": "a question of a brand new kind {i}", "label": "new_intent"}}\n' for i in range(10)
        )
    )
    windowed = settings.model_copy(update={"train_window_rows": 3, "replay_fraction": 0.0})
    result = materialize_everything(windowed, instance)
    training = result.asset_materializations_for_node("finetuned_model")[0].metadata
    assert training["trained"].value is False
    assert (
        "but nothing trained: no training pairs: the 3 rows selected" in training["training_decision"].value
    )
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        embedded = connection.execute(
            "SELECT count(*) FROM embeddings WHERE text LIKE 'a question of a brand new kind%'"
        ).fetchone()
    assert embedded == (10,)
    # Forced, the same window is an error: the run was asked to train.
    forced = dg.materialize(
        build_definitions(windowed).resolve_asset_graph().assets_defs,
        selection=["finetuned_model"],
        instance=instance,
        run_config={"ops": {"finetuned_model": {"config": {"force": True}}}},
        raise_on_error=False,
    )
    assert not forced.success
    (failure,) = [event for event in forced.all_events if event.event_type_value == "STEP_FAILURE"]
    assert "no training pairs" in str(failure.step_failure_data.error)
    # Another try would select the same rows: no retry.
    assert "STEP_UP_FOR_RETRY" not in [event.event_type_value for event in forced.all_events]


def test_a_challenger_without_a_score_where_the_base_model_scores_fails_the_check(
    materialised_home: tuple[Settings, dg.ExecuteInProcessResult], tmp_path: Path
) -> None:
    settings, _ = materialised_home
    copy = settings.model_copy(update={"home": tmp_path})
    shutil.copy(settings.warehouse_path, copy.warehouse_path)
    with duckdb.connect(str(copy.warehouse_path)) as connection:
        challenger = get_latest_challenger(connection)
        assert challenger is not None
        # As a challenger whose embeddings are NaN scores.
        connection.execute(
            "UPDATE evaluation_metrics SET value = 'NaN' WHERE evaluated_for = ? AND model_version = ? "
            "AND metric = 'primary_score'",
            [challenger.version, challenger.version],
        )
    check = dg.AssetCheckKey(dg.AssetKey("evaluation_report"), "challenger_not_worse_than_base")
    result = dg.materialize(
        list(build_definitions(copy).resolve_asset_graph().assets_defs),
        selection=dg.AssetSelection.checks(check),
        raise_on_error=False,
    )
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed
    assert "the challenger has no primary score where the base model scores" in evaluation.description
