"""The bundled entry point loads: eight assets in one graph, the checks, the job and the sensor."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pydantic
import pytest

from scripts.release_stale_runs import release_stale_runs
from st_assets.defs.builder import build_definitions
from st_assets.defs.resources import (
    BLOCKING_VALIDATION_CHECKS,
    MAX_TABLE_ROWS,
    WAREHOUSE_POOL,
    WarehouseResource,
    markdown_table,
    stops_when_interrupted,
)
from st_assets.defs.training import TrainingConfig
from st_assets.defs.validation import base_model_token_counter
from st_assets.settings import SETTINGS_FILE, Settings, home_settings, settings_reference
from st_assets.steps.training_code import TrainingSettingError
from st_assets.store.registry import get_champion
from st_assets.store.warehouse import Warehouse
from st_assets_tests.conftest import EIGHT_ASSETS, REPO_ROOT, write_bundled_slice


def test_bundled_definitions_load_with_the_eight_assets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ST_ASSETS_HOME", str(tmp_path))
    import st_assets.definitions

    module = importlib.reload(st_assets.definitions)
    defs: dg.Definitions = module.defs
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == set(EIGHT_ASSETS)
    assert graph.get(dg.AssetKey("corpus_embeddings")).parent_keys == {
        dg.AssetKey("champion_model"),
        dg.AssetKey("validated_pairs"),
    }
    checks = {key.name for key in graph.asset_check_keys}
    assert checks == {
        "validation_suite",
        "split_is_leak_free",
        "challenger_not_worse_than_base",
        "fairness_within_bounds",
        "group_gap_within_tolerance",
        "batch_distribution_stable",
    }
    # What the assets below validated_pairs hold a later run to: the checks that block.
    blocking = {spec.name for node in graph.assets_defs for spec in node.check_specs if spec.blocking}
    assert blocking == set(BLOCKING_VALIDATION_CHECKS)
    # Every asset that reads validated_pairs shows it in the lineage, so a new eval split makes it stale.
    for reader in ["finetuned_model", "evaluation_report", "fairness_report", "corpus_embeddings"]:
        assert dg.AssetKey("validated_pairs") in graph.get(dg.AssetKey(reader)).parent_keys
    sensor = defs.resolve_sensor_def("incoming_files_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert str(tmp_path) in sensor.description
    for key in keys:
        node = graph.get(dg.AssetKey(key))
        assert node.description and node.group_name and node.code_version


def test_loading_the_definitions_does_not_import_torch(tmp_path: Path) -> None:
    # The code server loads them on every reload and for every sensor tick run in a fresh process:
    # torch and sentence-transformers cost seconds and half a gigabyte, and only a running step needs them.
    # Nor does a token limit, which counts with the base model's tokenizer.
    (tmp_path / "settings.yaml").write_text("max_text_tokens: 100\n")
    script = (
        "import sys, st_assets.definitions as d; d.defs.resolve_asset_graph(); "
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "ST_ASSETS_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    assert loaded.stdout.strip() == "[]", loaded.stderr


def test_pipeline_runs_queue_one_at_a_time_on_the_projects_instance(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from st_assets.defs.builder import PIPELINE_JOB, PIPELINE_RUN_TAG, build_definitions
    from st_assets.settings import Settings

    shutil.copy(Path(__file__).resolve().parents[1] / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    finally:
        instance.dispose()
    assert {"key": PIPELINE_RUN_TAG, "limit": 1} in limits
    job = build_definitions(Settings(home=tmp_path / "home")).resolve_job_def(PIPELINE_JOB)
    assert PIPELINE_RUN_TAG in job.tags


def test_a_loss_that_does_not_exist_for_its_format_fails_as_the_definitions_load(tmp_path: Path) -> None:
    for losses, named in (
        ({"scored": "CoSentLoss"}, "CoSentLoss"),
        ({"triplet": "CoSENTLoss"}, "CoSENTLoss"),
    ):
        with pytest.raises(ValueError, match=f"loss '{named}' does not fit format"):
            build_definitions(Settings(home=tmp_path, losses=losses))


@pytest.mark.parametrize(
    ("setting", "value"), [("matryoshka_dims", [64, 0]), ("matryoshka_dims", [-3]), ("base_model", "")]
)
def test_a_setting_that_could_only_fail_mid_run_fails_as_the_settings_load(
    tmp_path: Path, setting: str, value: object
) -> None:
    with pytest.raises(pydantic.ValidationError, match=setting):
        Settings(home=tmp_path, **{setting: value})


def test_a_home_under_the_users_folder_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # As a .env file or a service unit passes it: no shell expanded the ~.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ST_ASSETS_HOME", "~/st")
    import st_assets.definitions

    module = importlib.reload(st_assets.definitions)
    sensor = module.defs.resolve_sensor_def("incoming_files_sensor")
    assert str(tmp_path / "st" / "incoming") in sensor.description
    assert Settings(home=Path("~/st")).warehouse_path == tmp_path / "st" / "st_assets.duckdb"


def test_the_bundled_definitions_and_the_command_read_the_homes_settings_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / SETTINGS_FILE).write_text("score_scale: 5\nepochs: 2\nsensor_enabled: false\n")
    monkeypatch.setenv("ST_ASSETS_HOME", str(tmp_path))
    import st_assets.definitions

    defs = importlib.reload(st_assets.definitions).defs
    assert "score_scale=5.0" in (defs.resolve_assets_def("labelled_pairs").descriptions_by_key.popitem()[1])
    assert defs.resolve_sensor_def("incoming_files_sensor").default_status == dg.DefaultSensorStatus.STOPPED
    settings = home_settings(tmp_path)
    assert (settings.score_scale, settings.epochs, settings.home) == (5.0, 2, tmp_path)
    # A misspelt setting, the home itself, or a bad value: an error naming the file, not a silent default.
    for text, named in (
        ("score_scal: 5\n", "['score_scal'] are not settings here"),
        ("home: /elsewhere\n", "['home'] are not settings here"),
        ("epochs: 0\n", "epochs"),
        ("- 5\n", "expected a mapping of settings"),
    ):
        (tmp_path / SETTINGS_FILE).write_text(text)
        with pytest.raises(ValueError, match=re.escape(named)) as raised:
            home_settings(tmp_path)
        assert str(tmp_path / SETTINGS_FILE) in str(raised.value)
    (tmp_path / SETTINGS_FILE).unlink()
    assert home_settings(tmp_path) == Settings(home=tmp_path)


def test_a_projects_own_asset_reads_the_tables_through_the_warehouse_resource(
    materialised_home: tuple[Settings, dg.ExecuteInProcessResult],
) -> None:
    settings, _ = materialised_home

    @dg.asset(deps=["corpus_embeddings"], pool=WAREHOUSE_POOL)
    def embedded_models(st_assets_warehouse: WarehouseResource) -> list[str]:
        with st_assets_warehouse.connect(read_only=True) as connection:
            rows = connection.execute("SELECT DISTINCT model_version FROM embeddings").fetchall()
        return [version for (version,) in rows]

    defs = dg.Definitions.merge(build_definitions(settings), dg.Definitions(assets=[embedded_models]))
    result = dg.materialize(
        defs.resolve_asset_graph().assets_defs,
        selection=["embedded_models"],
        instance=dg.DagsterInstance.ephemeral(),
    )
    with Warehouse(settings.warehouse_path).connect(read_only=True) as connection:
        champion = get_champion(connection)
    assert champion is not None
    assert result.output_for_node("embedded_models") == [champion.version]


_SLOW_ASSET = """
import time
import dagster as dg

@dg.asset(pool="st_assets_warehouse")
def slow() -> None:
    print("slot claimed", flush=True)
    time.sleep(600)

# In one process, as make demo runs the graph.
defs = dg.Definitions(assets=[slow], executor=dg.in_process_executor)
"""


def test_a_run_killed_mid_step_is_released_with_its_pool_slot(tmp_path: Path) -> None:
    # make demo's instance: the pool limited to one, no daemon to notice a dead run.
    shutil.copy(REPO_ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    (tmp_path / "slow.py").write_text(_SLOW_ASSET)
    environment = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    with (tmp_path / "run.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dagster", "asset", "materialize", "-f", "slow.py", "--select", "slow"],
            cwd=tmp_path,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "slot claimed" not in (tmp_path / "run.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        live = dg.DagsterInstance.from_config(str(tmp_path))
        try:
            assert release_stale_runs(live) == []  # its process still runs it
        finally:
            live.dispose()
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # as the out-of-memory killer or a closed terminal would
        process.wait()
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        assert [
            c.step_key for c in instance.event_log_storage.get_concurrency_info(WAREHOUSE_POOL).claimed_slots
        ] == ["slow"]
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.STARTED  # the killed run holds the slot for ever
        assert release_stale_runs(instance) == [run.run_id]
        assert instance.event_log_storage.get_concurrency_info(WAREHOUSE_POOL).claimed_slots == []
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert release_stale_runs(instance) == []
    finally:
        instance.dispose()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"epochs": 0}, "epochs"),
        ({"losses": {"scored": "CoSentLoss"}}, "loss 'CoSentLoss' does not fit"),
        ({"unset": ["train_window_row"]}, "unset: 'train_window_row' is no training setting"),
    ],
)
def test_a_bad_launchpad_override_fails_the_step_at_once_without_a_retry(
    tmp_path: Path, overrides: dict[str, object], named: str
) -> None:
    result = dg.materialize(
        build_definitions(Settings(home=tmp_path)).resolve_asset_graph().assets_defs,
        selection=["finetuned_model"],
        run_config={"ops": {"finetuned_model": {"config": {**overrides, "force": True}}}},
        raise_on_error=False,
    )
    events = [event.event_type_value for event in result.all_events]
    assert "STEP_FAILURE" in events and "STEP_UP_FOR_RETRY" not in events
    (failure,) = [event for event in result.all_events if event.event_type_value == "STEP_FAILURE"]
    assert "finetuned_model run config" in str(failure.step_failure_data.error)
    assert named in str(failure.step_failure_data.error)


def test_an_empty_unset_or_force_in_the_launchpad_is_its_default(tmp_path: Path) -> None:
    # Empty YAML fields are null; the launchpad says an empty field keeps the home's setting.
    result = dg.materialize(
        build_definitions(Settings(home=tmp_path)).resolve_asset_graph().assets_defs,
        selection=["finetuned_model"],
        run_config={"ops": {"finetuned_model": {"config": {"unset": None, "force": None}}}},
        raise_on_error=False,
    )
    (failure,) = result.get_step_failure_events()
    # It gets as far as training, which finds nothing here to train on.
    assert "no training pairs" in str(failure.step_failure_data.error)
    empty = TrainingConfig.model_validate({"unset": None, "force": None, "epochs": None})
    assert (empty.unset, empty.force, empty.overridden()) == ([], False, [])


def test_a_base_model_folder_that_does_not_exist_fails_at_once_naming_it(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    # Offline, the name would otherwise go to the hub and fail there, twice, without naming the folder.
    write_bundled_slice(tmp_path / "incoming", intents=3, per_intent=10)
    graph_assets = build_definitions(
        Settings(home=tmp_path, base_model=str(tiny_model_path), min_train_rows=4)
    )
    assets = graph_assets.resolve_asset_graph().assets_defs
    assert dg.materialize(assets, selection=["raw_texts", "labelled_pairs", "validated_pairs"]).success
    result = dg.materialize(
        assets,
        selection=["finetuned_model"],
        run_config={"ops": {"finetuned_model": {"config": {"base_model": "basemodels/mine"}}}},
        raise_on_error=False,
    )
    events = [event.event_type_value for event in result.all_events]
    assert "STEP_FAILURE" in events and "STEP_UP_FOR_RETRY" not in events
    (failure,) = result.get_step_failure_events()
    message = failure.step_failure_data.user_failure_data.description
    assert f"no folder at {Path.cwd() / 'basemodels' / 'mine'}" in message and "HF_HUB_OFFLINE" in message


def test_the_token_counter_names_a_base_model_folder_that_does_not_exist(tmp_path: Path) -> None:
    """``max_text_tokens`` reads the base model's tokenizer: offline, a missing folder is named there too."""
    count_tokens = base_model_token_counter(str(tmp_path / "basemodels" / "mine"))  # loads on the first count
    with pytest.raises(TrainingSettingError, match=f"no folder at {tmp_path / 'basemodels' / 'mine'}"):
        count_tokens("How do I top up?")


def test_a_device_torch_cannot_use_fails_at_once_naming_it(tmp_path: Path, tiny_model_path: Path) -> None:
    result = dg.materialize(
        build_definitions(Settings(home=tmp_path, base_model=str(tiny_model_path)))
        .resolve_asset_graph()
        .assets_defs,
        selection=["finetuned_model"],
        run_config={"ops": {"finetuned_model": {"config": {"device": "cuda:99", "force": True}}}},
        raise_on_error=False,
    )
    events = [event.event_type_value for event in result.all_events]
    assert "STEP_FAILURE" in events and "STEP_UP_FOR_RETRY" not in events
    (failure,) = result.get_step_failure_events()
    assert "device cuda:99: torch sees" in failure.step_failure_data.user_failure_data.description


def test_the_readmes_settings_table_is_every_setting_with_its_default() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- settings-reference:start -->\n")[1].split("\n<!-- settings-reference:end -->")[
        0
    ]
    assert table == settings_reference()
    assert all(f"| `{name}` |" in table for name in set(Settings.model_fields) - {"home"})
    assert all(field.description for field in Settings.model_fields.values())


def test_the_readmes_example_of_new_rows_is_new_and_enough_to_retrain() -> None:
    bundled = pd.read_csv(REPO_ROOT / "data" / "incoming" / "banking77_support.csv")
    new_rows = pd.read_csv(REPO_ROOT / "data" / "examples" / "banking77_new_rows.csv")
    assert list(new_rows.columns) == ["text", "label"]
    assert not set(new_rows["text"].str.lower().str.strip()) & set(bundled["text"].str.lower().str.strip())
    defaults = Settings()
    assert len(new_rows) * (1 - defaults.eval_fraction) > 1.1 * defaults.retrain_min_new_pairs


def test_every_launchpad_field_is_described() -> None:
    fields = TrainingConfig.model_fields
    assert all(field.description for field in fields.values()), [
        n for n, f in fields.items() if not f.description
    ]


def test_a_training_setting_changes_the_training_assets_code_version_and_no_other(tmp_path: Path) -> None:
    def code_versions(settings: Settings) -> dict[str, str | None]:
        graph = build_definitions(settings).resolve_asset_graph()
        return {key.path[-1]: graph.get(key).code_version for key in graph.materializable_asset_keys}

    default = code_versions(Settings(home=tmp_path))
    more_epochs = code_versions(Settings(home=tmp_path, epochs=3))
    # Dagster then shows finetuned_model stale until it is materialised under the new settings.
    assert {name for name in default if default[name] != more_epochs[name]} == {"finetuned_model"}
    assert code_versions(Settings(home=tmp_path, max_quarantine_rate=0.5)) == default
    # Where a model trains is not what it becomes.
    assert code_versions(Settings(home=tmp_path, device="cpu")) == default


@pytest.mark.parametrize(
    ("changed", "stale"),
    [
        ({"score_scale": 5.0}, {"labelled_pairs"}),
        ({"eval_fraction": 0.3}, {"validated_pairs"}),
        ({"max_text_chars": 500}, {"validated_pairs"}),
        ({"bootstrap_samples": 500}, {"evaluation_report"}),
        ({"fairness_permutations": 100}, {"fairness_report"}),
        ({"encode_backend": "onnx-int8"}, {"evaluation_report", "fairness_report", "corpus_embeddings"}),
        ({"seed": 7}, {"validated_pairs", "finetuned_model", "evaluation_report", "fairness_report"}),
    ],
)
def test_a_setting_makes_stale_exactly_the_assets_it_changes(
    tmp_path: Path, changed: dict[str, object], stale: set[str]
) -> None:
    def code_versions(settings: Settings) -> dict[str, str | None]:
        graph = build_definitions(settings).resolve_asset_graph()
        return {key.path[-1]: graph.get(key).code_version for key in graph.materializable_asset_keys}

    default = code_versions(Settings(home=tmp_path))
    after = code_versions(Settings(home=tmp_path, **changed))
    assert {name for name in default if default[name] != after[name]} == stale


def test_a_metadata_table_shows_its_first_rows_and_counts_the_rest() -> None:
    rows = [{"source_file": f"file_{number}.csv", "rows": number} for number in range(MAX_TABLE_ROWS + 7)]
    table = markdown_table(rows).splitlines()
    assert table[2] == "| file_0.csv | 0 |"
    assert len([line for line in table if line.startswith("| file_")]) == MAX_TABLE_ROWS
    assert table[-1] == "_and 7 more rows, in the warehouse_"
    assert "more rows" not in markdown_table(rows[:MAX_TABLE_ROWS])


def test_an_interrupted_step_with_a_retry_policy_fails_instead_of_starting_again() -> None:
    attempts = []

    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=2))
    @stops_when_interrupted
    def interrupted(context) -> None:  # unannotated: through the wrapper Dagster reads it as a string
        attempts.append(context.retry_number)
        raise KeyboardInterrupt  # what Ctrl-C raises in the step

    result = dg.materialize([interrupted], raise_on_error=False)
    assert not result.success and attempts == [0]
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    assert "interrupted" in failure.step_failure_data.error.message
