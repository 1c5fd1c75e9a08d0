"""The Dagster UI in headless Chromium: ``dagster dev`` on a materialised home shows the graph and the report."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from playwright import sync_api

from st_assets.settings import Settings
from st_assets_tests.conftest import EIGHT_ASSETS, REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# The code location `dagster dev -m st_assets.definitions` serves; it names the location.
LOCATION = "st_assets.definitions"
STARTUP_TIMEOUT_S = 120
PAGE_TIMEOUT_MS = 60_000


@pytest.fixture(autouse=True, scope="module")
def _chromium_installed() -> None:
    """Fail these tests, not the whole session, where Chromium is missing (.ci/run installs it).

    Fail rather than skip: a skipped UI test hides a gap.
    """
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: apt-get install chromium (.ci/run does this)")


# An instance that never launches a run: the sensor sees the home's files as new content (fresh
# DAGSTER_HOME, empty cursor) and would otherwise start training in the shared materialised home.
INSTANCE_YAML = """\
run_queue:
  max_concurrent_runs: 0
telemetry:
  enabled: false
nux:
  enabled: false
"""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_serving(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll the webserver until it answers; fail with the log tail if it dies or takes too long."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster dev exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"dagster dev did not answer in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """End dagster dev and its webserver, daemon and code-server children (one process group)."""
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=3)
    # Children (the code server above all) can outlive a parent that shut down cleanly.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def replay_materialisations(result: dg.ExecuteInProcessResult, dagster_home: Path) -> None:
    """Report the home's materialisations (with their metadata) into the UI's fresh instance.

    The fixture materialised into an ephemeral instance; re-reporting its events costs a second,
    where materialising again through the UI would retrain.
    """
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for event in result.get_asset_materialization_events():
            instance.report_runless_asset_event(event.step_materialization_data.materialization)


@pytest.fixture
def dagster_ui(
    materialised_home: tuple[Settings, dg.ExecuteInProcessResult], tmp_path: Path
) -> Iterator[str]:
    """``dagster dev`` for the materialised home in a fresh DAGSTER_HOME; yields its base URL."""
    settings, result = materialised_home
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(INSTANCE_YAML)
    replay_materialisations(result, dagster_home)
    port = free_port()
    env = {
        **os.environ,
        "ST_ASSETS_HOME": str(settings.home),
        "DAGSTER_HOME": str(dagster_home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = tmp_path / "dagster_dev.log"
    dagster = Path(sys.executable).parent / "dagster"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(dagster), "dev", "-m", LOCATION, "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Its own group, so one killpg reaches the webserver, daemon and code server too.
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log)
        yield url
    finally:
        stop_group(process)


def save_screenshot(page: sync_api.Page, name: str, tmp_path: Path) -> None:
    """Screenshot into the git-ignored artifacts folder (for people and CI) and the test's tmp path."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    shutil.copyfile(ARTIFACTS / name, tmp_path / name)


def visible(locator: sync_api.Locator) -> None:
    """Wait (boundedly: the UI loads the code location lazily) until ``locator`` is visible."""
    sync_api.expect(locator).to_be_visible(timeout=PAGE_TIMEOUT_MS)


def test_ui_shows_the_asset_graph_and_the_evaluation_report(
    dagster_ui: str,
    materialised_home: tuple[Settings, dg.ExecuteInProcessResult],
    tmp_path: Path,
) -> None:
    (report,) = materialised_home[1].asset_materializations_for_node("evaluation_report")
    challenger_version = str(report.metadata["challenger_version"].value)
    with sync_api.sync_playwright() as playwright:
        # A persistent context is how Playwright takes a user-data-dir: a new, empty one per test.
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            viewport={"width": 1600, "height": 1000},
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)

            # Global asset lineage: groups start collapsed; Alt+E is the UI's "Expand all groups".
            page.goto(f"{dagster_ui}/asset-groups")
            visible(page.get_by_text("Global asset lineage"))
            visible(page.get_by_text("ingestion", exact=True).first)
            page.keyboard.press("Alt+e")
            for name in EIGHT_ASSETS:
                visible(page.get_by_text(name, exact=True).first)
            save_screenshot(page, "asset_graph.png", tmp_path)

            # The asset's description and its latest materialisation's metadata: the report table.
            page.goto(f"{dagster_ui}/assets/evaluation_report")
            visible(page.get_by_text("held-out eval split").first)
            visible(page.get_by_text("challenger_version", exact=True).first)
            visible(page.get_by_text(challenger_version, exact=True).first)
            visible(page.get_by_text("primary_score_difference", exact=True).first)
            save_screenshot(page, "evaluation_report.png", tmp_path)
        finally:
            browser.close()
