"""The incoming-files sensor evaluated against a real Dagster instance."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dagster as dg
import duckdb
from dagster._core.test_utils import create_run_for_test

from st_assets.defs.builder import PIPELINE_JOB, build_definitions
from st_assets.settings import Settings
from st_assets.steps.ingest import file_content_hash
from st_assets_tests.conftest import hold_open, write_bundled_slice


def _tick(
    defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None
) -> tuple[list[dg.RunRequest], str | None, str | None]:
    sensor = defs.resolve_sensor_def("incoming_files_sensor")
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
    result = sensor.evaluate_tick(context)
    return result.run_requests or [], result.skip_message, result.cursor


def test_a_dropped_file_requests_one_run_that_trains_and_embeds(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    settings = Settings(home=tmp_path, base_model=str(tiny_model_path), batch_size=8, min_train_rows=4)
    defs = build_definitions(settings)
    with dg.instance_for_test() as instance:
        requests, skip, cursor = _tick(defs, instance, None)
        assert requests == [] and "no new content" in skip

        write_bundled_slice(tmp_path / "incoming", intents=3, per_intent=10)
        requests, skip, cursor = _tick(defs, instance, cursor)
        assert requests == [] and "stop changing" in skip
        requests, _, cursor = _tick(defs, instance, cursor)
        assert len(requests) == 1

        run = defs.resolve_job_def(PIPELINE_JOB).execute_in_process(
            instance=instance, run_config=requests[0].run_config, tags=requests[0].tags
        )
        assert run.success
        with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
            assert (
                connection.execute("SELECT count(*) FROM model_registry WHERE version <> 'base'").fetchall()[
                    0
                ][0]
                == 1
            )
            assert connection.execute("SELECT count(*) FROM embeddings").fetchall()[0][0] > 0

        requests, skip, cursor = _tick(defs, instance, cursor)
        assert requests == [] and "no new content" in skip


def _settled_tick(
    defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None
) -> tuple[list[dg.RunRequest], str | None]:
    """Two ticks: the first sees a file's new size, the second requests it once the size held still."""
    waiting, _, cursor = _tick(defs, instance, cursor)
    assert waiting == []
    requests, _, cursor = _tick(defs, instance, cursor)
    return requests, cursor


def test_part_files_wait_renames_are_new_and_a_restart_repeats_nothing(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.csv").write_text("text,label\nhello,greet\n")
    defs = build_definitions(settings)
    with dg.instance_for_test() as instance:
        requests, cursor = _settled_tick(defs, instance, None)
        keys = [requests[0].run_key]

        (incoming / "b.csv.part").write_text("text,label\nbye,farewell\n")
        for _ in range(2):  # not waited for either: an upload in progress is not a file yet
            requests, skip, cursor = _tick(defs, instance, cursor)
            assert requests == [] and "no new content" in skip and "b.csv.part" not in skip

        (incoming / "b.csv.part").rename(incoming / "b.csv")
        requests, cursor = _settled_tick(defs, instance, cursor)
        assert len(requests) == 1
        keys.append(requests[0].run_key)

        # A restarted daemon resumes from the stored cursor: nothing is requested again.
        requests, _, _ = _tick(build_definitions(settings), instance, cursor)
        assert requests == []

        # Changed content under an old name is new data; so is each change back and forth
        # (A -> B -> A -> B), every one with a run key of its own, or Dagster would skip the run.
        original = (incoming / "a.csv").read_text()
        for content in ("text,label\nhello again,greet\n", original, "text,label\nhello again,greet\n"):
            (incoming / "a.csv").write_text(content)
            requests, cursor = _settled_tick(defs, instance, cursor)
            assert len(requests) == 1
            keys.append(requests[0].run_key)
        assert len(set(keys)) == len(keys) == 5
        assert _tick(defs, instance, cursor)[0] == []

        # A file renamed, as a rejection may ask ("name its encoding"), is read under its new name.
        (incoming / "b.csv").rename(incoming / "b.utf-8.csv")
        requests, cursor = _settled_tick(defs, instance, cursor)
        assert len(requests) == 1 and requests[0].tags["st_assets/new_files"] == "b.utf-8.csv"


def test_a_cursor_of_an_earlier_version_requests_nothing_already_seen(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.csv").write_text("text,label\nhello,greet\n")
    defs = build_definitions(Settings(home=tmp_path))
    with dg.instance_for_test() as instance:
        # That version kept whole content hashes under "seen" and every file's size.
        old_cursor = json.dumps({"seen": [file_content_hash(incoming / "a.csv")], "sizes": {"a.csv": 23}})
        requests, skip, cursor = _tick(defs, instance, old_cursor)
        assert requests == [] and "no new content" in skip
        assert _tick(defs, instance, cursor)[0] == []


def test_a_growing_file_waits_for_the_next_tick(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    defs = build_definitions(settings)
    with dg.instance_for_test() as instance:
        _, _, cursor = _tick(defs, instance, None)
        # Seen first mid-copy: the half-written file is not requested.
        (incoming / "a.csv").write_text("text,label\nhello,greet\n")
        requests, skip, cursor = _tick(defs, instance, cursor)
        assert requests == [] and "stop changing" in skip
        with (incoming / "a.csv").open("a") as handle:
            handle.write("more,greet\n")
        requests, skip, cursor = _tick(defs, instance, cursor)
        assert requests == [] and "stop changing" in skip
        requests, _, _ = _tick(defs, instance, cursor)
        assert len(requests) == 1


def _ingest_job(defs: dg.Definitions) -> dg.JobDefinition:
    """A job of ``raw_texts`` alone, to run what a sensor request would start ingesting."""
    return dg.define_asset_job("ingest", selection=["raw_texts"]).resolve(
        asset_graph=defs.resolve_asset_graph()
    )


def _ingested(settings: Settings) -> list[tuple[str, str]]:
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        return connection.execute("SELECT source_file, status FROM ingested_files ORDER BY ALL").fetchall()


def test_a_sensor_run_reads_only_contents_the_sensor_saw_settle(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.csv").write_text("text,label\nhello,greet\n")
    defs = build_definitions(settings)
    with dg.instance_for_test() as instance:
        requests, _ = _settled_tick(defs, instance, None)
        # Between the request and its run, b.csv is half copied in: its last label is cut short.
        (incoming / "b.csv").write_text(
            "text,label\nwhere is my new card,card_arrival\nmy card has not come,card_arr"
        )
        ingest = _ingest_job(defs)
        assert ingest.execute_in_process(instance=instance, run_config=requests[0].run_config).success
        assert _ingested(settings) == [("a.csv", "ingested")]
        # Without the sensor's config (a run by hand), every file is read.
        assert ingest.execute_in_process(instance=instance).success
        assert _ingested(settings) == [("a.csv", "ingested"), ("b.csv", "ingested")]


def test_a_file_name_that_is_not_utf8_is_read_under_an_escaped_name(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    # As unzipping an archive made on another system can leave it: a Latin-1 byte in the name.
    with open(os.path.join(os.fsencode(incoming), b"caf\xe9.csv"), "w") as handle:
        handle.write("text,label\nhello,greet\n")
    defs = build_definitions(settings)
    with dg.instance_for_test() as instance:
        requests, cursor = _settled_tick(defs, instance, None)
        assert len(requests) == 1 and requests[0].tags["st_assets/new_files"] == "caf\\xe9.csv"
        assert _tick(defs, instance, cursor)[0] == []
        ingest = _ingest_job(defs)
        assert ingest.execute_in_process(instance=instance, run_config=requests[0].run_config).success
    assert _ingested(settings) == [("caf\\xe9.csv", "ingested")]


def test_a_removed_file_requests_a_run_and_a_new_folder_or_a_reset_starts_afresh(tmp_path: Path) -> None:
    incoming = tmp_path / "one" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "good.csv").write_text("text,label\nhello,greet\n")
    (incoming / "bad.csv").write_text("text,label\n,\n")
    defs = build_definitions(Settings(home=tmp_path / "one"))
    with dg.instance_for_test() as instance:
        first, cursor = _settled_tick(defs, instance, None)
        # A blocking check asked to take the bad file out: the good file goes ahead in a run of its own.
        (incoming / "bad.csv").unlink()
        requests, _, cursor = _tick(defs, instance, cursor)
        assert len(requests) == 1 and requests[0].tags["st_assets/removed_files"] == "bad.csv"
        assert requests[0].run_key != first[0].run_key
        assert _tick(defs, instance, cursor)[0] == []

        # The same sensor pointed at another folder holding the same files requests them there.
        shutil.copytree(tmp_path / "one", tmp_path / "two")
        moved = build_definitions(Settings(home=tmp_path / "two"))
        requests, cursor = _settled_tick(moved, instance, cursor)
        assert len(requests) == 1

        # A cursor reset (from the UI) requests the same files again, under a key not used before.
        again, _ = _settled_tick(defs, instance, None)
        assert len(again) == 1 and again[0].run_key not in {first[0].run_key, requests[0].run_key}


def test_a_fresh_cursor_does_not_request_files_already_ingested(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.csv").write_text("text,label\nhello,greet\n")
    (incoming / "b.csv").write_text("text,label\nbye,farewell\n")
    defs = build_definitions(Settings(home=tmp_path))
    # Ingested outside the sensor (make demo's command line), then b.csv changes and c.csv arrives.
    assert dg.materialize(defs.resolve_asset_graph().assets_defs, selection=["raw_texts"]).success
    (incoming / "b.csv").write_text("text,label\nbye,farewell\nsee you,farewell\n")
    (incoming / "c.csv").write_text("text,label\nthanks,thank\n")
    with dg.instance_for_test() as instance:
        requests, _ = _settled_tick(defs, instance, None)
        assert len(requests) == 1 and requests[0].tags["st_assets/new_files"] == "b.csv,c.csv"
        assert "removed_files" not in str(requests[0].tags)
        # While a run holds the warehouse, a fresh cursor waits rather than request everything.
        writer = hold_open(tmp_path / "st_assets.duckdb", 30, read_only=False)
        try:
            requests, skip, _ = _tick(defs, instance, None)
        finally:
            writer.kill()
            writer.wait()
        assert requests == [] and "a run holds the warehouse" in skip


def test_a_fresh_cursor_over_a_warehouse_with_no_tables_yet_requests_every_file(tmp_path: Path) -> None:
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / "a.csv").write_text("text,label\nhello,greet\n")
    duckdb.connect(str(tmp_path / "st_assets.duckdb")).close()  # opened once with the duckdb client
    with dg.instance_for_test() as instance:
        requests, _ = _settled_tick(build_definitions(Settings(home=tmp_path)), instance, None)
    assert len(requests) == 1 and requests[0].tags["st_assets/new_files"] == "a.csv"


def test_a_requested_run_that_ends_before_ingesting_gives_its_files_back(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.csv").write_text("text,label\nhello,greet\n")
    defs = build_definitions(settings)
    with dg.instance_for_test() as instance:
        requests, cursor = _settled_tick(defs, instance, None)
        # Cancelled while queued: the run ended and read nothing.
        create_run_for_test(
            instance,
            job_name=PIPELINE_JOB,
            status=dg.DagsterRunStatus.CANCELED,
            tags={"dagster/run_key": requests[0].run_key},
        )
        again, cursor = _settled_tick(defs, instance, cursor)
        assert len(again) == 1 and again[0].tags["st_assets/new_files"] == "a.csv"
        assert again[0].run_key != requests[0].run_key
        # A run that read the file gives nothing back, whatever failed after raw_texts.
        run = _ingest_job(defs).execute_in_process(
            instance=instance, run_config=again[0].run_config, tags={"dagster/run_key": again[0].run_key}
        )
        assert run.success and _ingested(settings) == [("a.csv", "ingested")]
        for _ in range(2):
            requests, skip, cursor = _tick(defs, instance, cursor)
            assert requests == [] and "no new content" in skip
        assert json.loads(cursor)["pending"] == {}


def test_a_file_whose_reading_fails_twice_waits_for_new_content(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.csv").write_text("text,label\nhello,greet\n")
    # A folder where the warehouse file should be: every raw_texts attempt fails, as a file no run can
    # read would.
    settings.warehouse_path.mkdir()
    defs = build_definitions(settings)
    ingest = _ingest_job(defs)
    with dg.instance_for_test() as instance:
        requests, cursor = _settled_tick(defs, instance, None)
        for attempt in range(2):
            run = ingest.execute_in_process(
                instance=instance,
                run_config=requests[0].run_config,
                tags={"dagster/run_key": requests[0].run_key},
                raise_on_error=False,
            )
            assert not run.success
            if attempt == 0:
                # The first failure gives the file back (a lock held too long would pass next time).
                requests, cursor = _settled_tick(defs, instance, cursor)
                assert len(requests) == 1 and requests[0].tags["st_assets/new_files"] == "a.csv"
        # The second failure in the same content does not: no failing run every tick.
        for _ in range(2):
            requests, skip, cursor = _tick(defs, instance, cursor)
            assert requests == [] and "no new content" in skip
        assert json.loads(cursor)["pending"] == {}
        # New content is requested again.
        (incoming / "a.csv").write_text("text,label\nhello,greet\nbye,farewell\n")
        requests, cursor = _settled_tick(defs, instance, cursor)
        assert len(requests) == 1


def test_a_file_filled_in_at_its_final_size_waits_until_its_content_holds_still(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    content = b"text,label\nhello there,greet\ngood night,farewell\n"
    # A copy that sets the final size first, then fills it in.
    (incoming / "a.csv").write_bytes(b"\0" * len(content))
    defs = build_definitions(settings)
    with dg.instance_for_test() as instance:
        requests, skip, cursor = _tick(defs, instance, None)
        assert requests == [] and "stop changing" in skip
        (incoming / "a.csv").write_bytes(content[:20] + b"\0" * (len(content) - 20))
        requests, skip, cursor = _tick(defs, instance, cursor)
        assert requests == [] and "stop changing" in skip
        (incoming / "a.csv").write_bytes(content)
        requests, cursor = _settled_tick(defs, instance, cursor)
        assert len(requests) == 1
        assert (
            _ingest_job(defs).execute_in_process(instance=instance, run_config=requests[0].run_config).success
        )
        assert _ingested(settings) == [("a.csv", "ingested")]


def test_a_file_left_for_a_later_run_is_requested_again_when_it_returns_to_the_content_seen(
    tmp_path: Path,
) -> None:
    settings = Settings(home=tmp_path)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    content = "text,label\nhello,greet\n"
    (incoming / "a.csv").write_text(content)
    defs = build_definitions(settings)
    with dg.instance_for_test() as instance:
        requests, cursor = _settled_tick(defs, instance, None)
        # Rewritten in place between the request and its run: the run leaves it for later...
        (incoming / "a.csv").write_text(content + "bye,farewell\n")
        run = _ingest_job(defs).execute_in_process(
            instance=instance,
            run_config=requests[0].run_config,
            tags={"dagster/run_key": requests[0].run_key},
        )
        assert run.success and _ingested(settings) == []
        # ...and the export ends with the bytes the sensor first saw: it is requested again.
        (incoming / "a.csv").write_text(content)
        requests, cursor = _settled_tick(defs, instance, cursor)
        assert len(requests) == 1 and requests[0].tags["st_assets/new_files"] == "a.csv"
        run = _ingest_job(defs).execute_in_process(
            instance=instance,
            run_config=requests[0].run_config,
            tags={"dagster/run_key": requests[0].run_key},
        )
        assert _ingested(settings) == [("a.csv", "ingested")]
