"""The embedding API: the four endpoints, their 4xx/5xx answers, champion swaps, and a real server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sentence_transformers import SentenceTransformer

from st_assets import cli
from st_assets.serve import create_app
from st_assets.settings import Settings
from st_assets.store.registry import get_champion, record_decision, register_model
from st_assets.store.warehouse import Warehouse

MAX_TEXTS = 4
MAX_TEXT_CHARS = 50


@pytest.fixture(scope="module")
def client(materialised_home: tuple[Settings, object]) -> TestClient:
    """An app on the shared materialised warehouse, with small limits so the 4xx cases stay cheap."""
    settings, _ = materialised_home
    app = create_app(settings.warehouse_path, max_texts=MAX_TEXTS, max_text_chars=MAX_TEXT_CHARS)
    return TestClient(app)


@pytest.fixture(scope="module")
def champion_version(materialised_home: tuple[Settings, object]) -> str:
    settings, _ = materialised_home
    with Warehouse(settings.warehouse_path).connect(read_only=True) as connection:
        champion = get_champion(connection)
    assert champion is not None
    return champion.version


@pytest.fixture
def home_copy(materialised_home: tuple[Settings, object], tmp_path: Path) -> Settings:
    """A private copy of the materialised home that a test may change."""
    settings, _ = materialised_home
    shutil.copytree(settings.home, tmp_path / "home")
    return settings.model_copy(update={"home": tmp_path / "home"})


def test_health_reports_the_champion_version(client: TestClient, champion_version: str) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model_version": champion_version, "dimension": 32}


def test_embed_returns_one_unit_vector_per_text(client: TestClient, champion_version: str) -> None:
    response = client.post("/embed", json={"texts": ["my card has not arrived", "reset my password"]})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == champion_version
    assert body["dimension"] == 32
    vectors = np.array(body["embeddings"])
    assert vectors.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_similarity_scores_each_pair(client: TestClient, champion_version: str) -> None:
    pairs = [["reset my password", "reset my password"], ["reset my password", "my card has not arrived"]]
    response = client.post("/similarity", json={"pairs": pairs})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == champion_version
    assert body["scores"][0] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= body["scores"][1] < body["scores"][0]


def test_search_returns_top_k_rows_best_first(client: TestClient, champion_version: str) -> None:
    response = client.get("/search", params={"q": "my card has not arrived", "k": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == champion_version
    scores = [row["score"] for row in body["results"]]
    assert len(scores) == 3
    assert scores == sorted(scores, reverse=True)
    assert set(body["results"][0]) == {"text_id", "text", "score"}


def test_search_finds_a_stored_text_first(
    client: TestClient, materialised_home: tuple[Settings, object]
) -> None:
    settings, _ = materialised_home
    with Warehouse(settings.warehouse_path).connect(read_only=True) as connection:
        # One whose lower case no other text shares: an uncased model reads such twins as one text.
        (text,) = connection.execute(
            "SELECT any_value(text) AS text FROM embeddings GROUP BY lower(text) HAVING count(*) = 1 "
            "ORDER BY text LIMIT 1"
        ).fetchone()
    first = client.get("/search", params={"q": text, "k": 2}).json()["results"][0]
    assert first["text"] == text and first["score"] == pytest.approx(1.0, abs=1e-3)


def test_openapi_schema_lists_the_four_endpoints(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/health", "/embed", "/similarity", "/search"} <= set(schema["paths"])
    assert "409" in schema["paths"]["/search"]["get"]["responses"]


@pytest.mark.parametrize(
    ("method", "path", "payload", "message"),
    [
        ("post", "/embed", {"texts": []}, "at least 1 item"),
        ("post", "/embed", {"texts": "one text"}, "valid list"),
        ("post", "/embed", {"texts": ["a"] * (MAX_TEXTS + 1)}, "too many texts: 5; at most 4"),
        ("post", "/embed", {"texts": ["fine", "   "]}, "empty or blank"),
        ("post", "/embed", {"texts": ["x" * (MAX_TEXT_CHARS + 1)]}, "51 characters; at most 50"),
        ("post", "/similarity", {"pairs": []}, "at least 1 item"),
        ("post", "/similarity", {"pairs": [["only one"]]}, "Field required"),
        ("post", "/similarity", {"pairs": [["a", "b"]] * 3}, "too many pairs: 3; at most 2"),
        ("post", "/similarity", {"pairs": [["a", ""]]}, "empty or blank"),
        ("get", "/search", {"q": "card", "k": 0}, "greater than or equal to 1"),
        ("get", "/search", {"q": "card", "k": 101}, "less than or equal to 100"),
        ("get", "/search", {"q": "card", "k": "many"}, "valid integer"),
        ("get", "/search", {"q": "  "}, "empty or blank"),
        ("get", "/search", {"q": "x" * (MAX_TEXT_CHARS + 1)}, "at most 50"),
        ("get", "/search", {"k": 3}, "Field required"),
    ],
)
def test_bad_input_gets_422_with_a_clear_message(
    client: TestClient, method: str, path: str, payload: dict[str, object], message: str
) -> None:
    if method == "post":
        response = client.post(path, json=payload)
    else:
        response = client.get(path, params=payload)
    assert response.status_code == 422
    messages = [error["msg"] for error in response.json()["detail"]]
    assert any(message in text for text in messages), messages


@pytest.mark.parametrize(
    ("path", "body"),
    [("/embed", '{"texts": ["ok \\ud800 broken"]}'), ("/similarity", '{"pairs": [["a\\udc80", "b"]]}')],
)
def test_half_a_character_gets_422_not_a_server_error(client: TestClient, path: str, body: str) -> None:
    # JSON may escape a lone UTF-16 surrogate (an emoji cut in half); no tokenizer can read one.
    response = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "unpaired UTF-16 surrogate" in response.json()["detail"][0]["msg"]


def test_oversized_body_is_refused_before_parsing_with_413(client: TestClient) -> None:
    response = client.post("/embed", content=b"x" * 100_000, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "over the limit" in response.json()["detail"]


def test_body_without_content_length_is_refused_with_411(client: TestClient) -> None:
    response = client.post("/embed", content=iter([b'{"texts": ["hi"]}']))
    assert response.status_code == 411


def test_missing_warehouse_gives_503(tmp_path: Path) -> None:
    client = TestClient(create_app(tmp_path / "nowhere.duckdb"))
    response = client.get("/health")
    assert response.status_code == 503
    assert "no warehouse" in response.json()["detail"]
    assert client.post("/embed", json={"texts": ["hi"]}).status_code == 503


def test_a_file_that_is_not_a_warehouse_gives_503_without_retry_advice_or_its_error(tmp_path: Path) -> None:
    (tmp_path / "broken.duckdb").write_text("not a database")
    response = TestClient(create_app(tmp_path / "broken.duckdb")).get("/search", params={"q": "card"})
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert detail == "the warehouse cannot be read; the server's log says why"
    assert str(tmp_path) not in detail


def test_warehouse_without_champion_gives_503(tmp_path: Path) -> None:
    warehouse = Warehouse(tmp_path / "empty.duckdb")
    with warehouse.connect():
        pass  # creates the schema, with no model registered
    response = TestClient(create_app(warehouse.path)).get("/search", params={"q": "card"})
    assert response.status_code == 503
    assert "no champion" in response.json()["detail"]


def test_search_without_embeddings_table_gives_503(home_copy: Settings) -> None:
    with Warehouse(home_copy.warehouse_path).connect() as connection:
        connection.execute("DROP TABLE embeddings")
    response = TestClient(create_app(home_copy.warehouse_path)).get("/search", params={"q": "card"})
    assert response.status_code == 503
    assert "no embeddings" in response.json()["detail"]


def test_new_champion_is_served_without_restart_and_stale_search_gives_409(
    home_copy: Settings, tiny_model_path: Path, champion_version: str
) -> None:
    client = TestClient(create_app(home_copy.warehouse_path, refresh_seconds=0.2))
    assert client.get("/health").json()["model_version"] == champion_version

    # The same tiny model saved again as a new version, promoted the way the gate does it.
    new_folder = home_copy.models_dir / "promoted-by-test"
    shutil.copytree(tiny_model_path, new_folder)
    with Warehouse(home_copy.warehouse_path).connect() as connection:
        register_model(
            connection,
            {
                "version": "promoted-by-test",
                "path": str(new_folder),
                "base_model": str(tiny_model_path),
                "loss": "test",
                "data_version": "test",
            },
        )
        record_decision(connection, "promoted-by-test", True, 1.0, "promoted by test")

    deadline = time.monotonic() + 10
    served = champion_version
    while served != "promoted-by-test" and time.monotonic() < deadline:
        time.sleep(0.25)
        served = client.get("/health").json()["model_version"]
    assert served == "promoted-by-test"
    assert client.post("/embed", json={"texts": ["hi"]}).json()["model_version"] == "promoted-by-test"

    # corpus_embeddings has not been refreshed for the new champion yet.
    response = client.get("/search", params={"q": "card"})
    assert response.status_code == 409
    assert champion_version in response.json()["detail"]

    # The champion's folder saved over in place: same version, other weights, loaded without a restart.
    before = client.post("/embed", json={"texts": ["hi"]}).json()["embeddings"][0]
    model = SentenceTransformer(str(new_folder), device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5).add_(0.01)
    model.save(str(new_folder))
    deadline = time.monotonic() + 10
    after = before
    while np.allclose(after, before) and time.monotonic() < deadline:
        time.sleep(0.25)
        after = client.post("/embed", json={"texts": ["hi"]}).json()["embeddings"][0]
    assert not np.allclose(after, before)


def test_search_refuses_a_table_encoded_from_other_files_of_the_champion(home_copy: Settings) -> None:
    with Warehouse(home_copy.warehouse_path).connect() as connection:
        connection.execute("UPDATE embeddings_source SET model_fingerprint = 'files saved over since'")
    client = TestClient(create_app(home_copy.warehouse_path))
    response = client.get("/search", params={"q": "card"})
    assert response.status_code == 409
    assert "encoded from other files" in response.json()["detail"]


def test_champion_whose_model_cannot_load_leaves_the_old_one_serving(
    home_copy: Settings, champion_version: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = TestClient(create_app(home_copy.warehouse_path, refresh_seconds=0.2))
    assert client.get("/health").json()["model_version"] == champion_version
    with Warehouse(home_copy.warehouse_path).connect() as connection:
        missing = {
            "path": str(home_copy.models_dir / "missing"),
            "base_model": "-",
            "loss": "-",
            "data_version": "-",
        }
        register_model(connection, {"version": "unloadable", **missing})
        record_decision(connection, "unloadable", True, 1.0, "promoted by test")
    time.sleep(0.3)
    assert client.get("/health").json()["model_version"] == champion_version
    assert "could not load champion unloadable" in caplog.text


def test_st_assets_serve_refuses_texts_over_the_homes_max_text_chars(
    home_copy: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Validation quarantines such texts: the API holds the same limit.
    (home_copy.home / "settings.yaml").write_text("max_text_chars: 30\n")
    monkeypatch.setenv("ST_ASSETS_HOME", str(home_copy.home))
    served = []
    monkeypatch.setattr("uvicorn.run", lambda app, **_: served.append(app))
    assert cli.main(["serve"]) == 0
    client = TestClient(served[0])
    assert client.post("/embed", json={"texts": ["x" * 30]}).status_code == 200
    refused = client.post("/embed", json={"texts": ["x" * 31]})
    assert refused.status_code == 422 and "at most 30 are allowed" in refused.text


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def running_server(materialised_home: tuple[Settings, object], tmp_path: Path) -> Iterator[str]:
    """``st-assets serve`` in its own process group on a free loopback port; yields its base URL."""
    settings, _ = materialised_home
    port = _free_loopback_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "ST_ASSETS_HOME": str(settings.home)}
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "st_assets.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # importing torch on a busy machine is slow
        while True:
            assert server.poll() is None, f"server exited early:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server did not become healthy:\n{log_path.read_text()}"
            time.sleep(0.5)
        yield base_url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)


def test_real_server_on_loopback_serves_health_and_embed(running_server: str, champion_version: str) -> None:
    health = httpx.get(f"{running_server}/health", timeout=10)
    assert health.json()["model_version"] == champion_version
    response = httpx.post(f"{running_server}/embed", json={"texts": ["where is my card?"]}, timeout=30)
    assert response.status_code == 200
    assert len(response.json()["embeddings"][0]) == 32
