"""The embedding API behind ``st-assets serve``: embed, compare and search with the current champion.

The warehouse is only ever read, on short-lived read-only connections, so the Dagster writer can take
the file between requests. A newly promoted champion is picked up without a restart. When the
``embeddings`` table was built by another model than the loaded champion (the table has not been
refreshed yet), ``/search`` answers 409 Conflict rather than mixing vectors of two models.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import duckdb
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from st_assets.steps.encoders import Encoder, build_encoder
from st_assets.steps.models import model_fingerprint, unpaired_surrogate
from st_assets.store.embeddings import embedded_versions, files_mismatch
from st_assets.store.registry import get_champion
from st_assets.store.warehouse import Warehouse, WarehouseLockedError

logger = logging.getLogger(__name__)

# What a client is told when the warehouse cannot be read; the server's log has the error, with the
# paths and processes that a client need not see.
_NO_WAREHOUSE = "no warehouse yet: materialise the assets first"
_WAREHOUSE_BUSY = "the warehouse cannot be read right now (another process holds it); retry shortly"
_WAREHOUSE_UNREADABLE = "the warehouse cannot be read; the server's log says why"

MAX_SEARCH_K = 100
# Worst case of JSON text: every character escaped as a surrogate pair, "\ud83d\ude00" (12 bytes).
_JSON_BYTES_PER_CHAR = 12


class EmbedRequest(BaseModel):
    """Texts to embed."""

    texts: list[str] = Field(min_length=1, description="Non-blank texts, within the server's limits.")


class EmbedResponse(BaseModel):
    """One unit-length vector per text, in request order."""

    embeddings: list[list[float]]
    model_version: str
    dimension: int


class SimilarityRequest(BaseModel):
    """Pairs of texts to compare."""

    pairs: list[tuple[str, str]] = Field(
        min_length=1, description="[text_a, text_b] pairs; each text counts against the text limit."
    )


class SimilarityResponse(BaseModel):
    """Cosine similarity of each pair, in request order."""

    scores: list[float]
    model_version: str


class SearchResult(BaseModel):
    """One row of ``embeddings`` and its cosine similarity to the query."""

    text_id: str
    text: str
    score: float


class SearchResponse(BaseModel):
    """The top-k rows of ``embeddings`` for a query, best first."""

    results: list[SearchResult]
    model_version: str


class HealthResponse(BaseModel):
    """The champion the server embeds with."""

    status: str
    model_version: str
    dimension: int


class ErrorResponse(BaseModel):
    """Why a request could not be served."""

    detail: str


@dataclass(frozen=True)
class LoadedChampion:
    """The champion model in memory, the registry version it came from and the fingerprint of its files."""

    version: str
    fingerprint: str
    encoder: Encoder

    @property
    def dimension(self) -> int:
        return self.encoder.dimension

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        return self.encoder(texts)


def load_torch_encoder(model_path: str) -> Encoder:
    """The champion's encoder: torch gives the vectors ``corpus_embeddings`` stores with the default
    ONNX backend (to about 2e-7); a table built with ``onnx-int8`` holds approximations of them."""
    return build_encoder(model_path, backend="torch")


class ServiceUnavailable(Exception):
    """No champion can be served yet: no warehouse, no promoted model, or the warehouse is busy."""


class ChampionWatcher:
    """Keeps the champion model loaded, re-reading ``model_registry`` at most every ``refresh_seconds``."""

    def __init__(self, warehouse: Warehouse, refresh_seconds: float) -> None:
        self._warehouse = warehouse
        self._refresh_seconds = refresh_seconds
        self._loaded: LoadedChampion | None = None
        self._problem = "the champion has not been looked up yet"
        self._checked_at: float | None = None
        self._refresh_lock = threading.Lock()

    def current(self) -> LoadedChampion:
        """The champion to serve with; raises ServiceUnavailable when there is none."""
        # One request re-reads the registry (and loads a new model if it changed); the others keep
        # serving with the model already loaded instead of queueing behind a slow load.
        if self._refresh_due() and self._refresh_lock.acquire(blocking=self._loaded is None):
            try:
                if self._refresh_due():
                    self._refresh()
            finally:
                self._refresh_lock.release()
        loaded = self._loaded
        if loaded is None:
            raise ServiceUnavailable(self._problem)
        return loaded

    def _refresh_due(self) -> bool:
        return self._checked_at is None or time.monotonic() - self._checked_at >= self._refresh_seconds

    def _refresh(self) -> None:
        try:
            with self._warehouse.connect(read_only=True) as connection:
                champion = get_champion(connection)
        except FileNotFoundError as error:
            logger.warning("%s", error)
            self._set_unavailable(_NO_WAREHOUSE)
            return
        except duckdb.Error as error:
            # A writer holding the file, or worse: keep the model we have and look again next time.
            logger.warning("the warehouse cannot be read: %s", error)
            self._problem = (
                _WAREHOUSE_BUSY if isinstance(error, WarehouseLockedError) else _WAREHOUSE_UNREADABLE
            )
            return
        finally:
            self._checked_at = time.monotonic()
        if champion is None:
            self._set_unavailable("no champion model yet: materialise the assets first")
            return
        try:
            # A base model champion saved over in place is still version 'base': its files tell.
            fingerprint = model_fingerprint(champion.path)
        except OSError as error:
            logger.warning("the files of champion %s cannot be read: %s", champion.version, error)
            self._problem = (
                f"the files of champion {champion.version} cannot be read; the server log says why"
            )
            return
        if self._loaded is not None and (self._loaded.version, self._loaded.fingerprint) == (
            champion.version,
            fingerprint,
        ):
            return
        try:
            encoder = load_torch_encoder(champion.path)
        except Exception:
            # A half-written or missing model folder must not take down a working server.
            logger.exception("could not load champion %s from %s", champion.version, champion.path)
            self._problem = f"champion {champion.version} could not be loaded; the server log says why"
            return
        previous = self._loaded.version if self._loaded else None
        self._loaded = LoadedChampion(champion.version, fingerprint, encoder)
        logger.info("serving champion %s (was %s)", champion.version, previous)

    def _set_unavailable(self, problem: str) -> None:
        if self._loaded is not None:
            logger.warning("no longer serving champion %s: %s", self._loaded.version, problem)
        self._loaded = None
        self._problem = problem


@dataclass(frozen=True)
class TextLimits:
    """How much one request may ask for: texts per request and characters per text."""

    max_texts: int
    max_text_chars: int

    @property
    def max_body_bytes(self) -> int:
        """Large enough for any request within the text limits, so this check only stops abuse."""
        return self.max_texts * (self.max_text_chars * _JSON_BYTES_PER_CHAR + 16) + 4096

    def check_count(self, count: int, location: tuple[str | int, ...], message: str) -> None:
        """Raise a 422 with ``message`` when a request holds more than ``max_texts`` texts."""
        if count > self.max_texts:
            raise RequestValidationError([_error(location, message, count)])

    def check_texts(self, located_texts: list[tuple[tuple[str | int, ...], str]]) -> None:
        """Raise a 422 listing every text, by its location in the request, that is blank or too long."""
        errors = []
        for location, text in located_texts:
            if not text.strip():
                errors.append(_error(location, "the text is empty or blank", text))
            elif (position := unpaired_surrogate(text)) is not None:
                message = (
                    f"the text has an unpaired UTF-16 surrogate at character {position} (half a character)"
                )
                errors.append(
                    _error(location, message, text[:80].encode("utf-8", "backslashreplace").decode())
                )
            elif len(text) > self.max_text_chars:
                message = f"the text has {len(text)} characters; at most {self.max_text_chars} are allowed"
                errors.append(_error(location, message, text[:80] + "..."))
        if errors:
            raise RequestValidationError(errors)


def _error(location: tuple[str | int, ...], message: str, value: object) -> dict[str, Any]:
    # Same shape as FastAPI's own 422 errors, so clients parse one format.
    return {"type": "value_error", "loc": location, "msg": message, "input": value}


_UNAVAILABLE = {503: {"model": ErrorResponse, "description": "No warehouse or champion yet, or it is busy."}}


def create_app(
    warehouse_path: Path,
    max_texts: int = 256,
    max_text_chars: int = 2000,
    refresh_seconds: float = 5.0,
) -> FastAPI:
    """The API for the warehouse at ``warehouse_path``; the champion is re-checked every ``refresh_seconds``."""
    # Few, short lock retries: a request should fail fast with 503 rather than hang behind a writer.
    warehouse = Warehouse(warehouse_path, lock_timeout_seconds=0.5, lock_backoff_seconds=0.05)
    champions = ChampionWatcher(warehouse, refresh_seconds)
    limits = TextLimits(max_texts, max_text_chars)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Load the champion before the first request so that request does not pay for it.
        try:
            champions.current()
        except ServiceUnavailable as error:
            logger.warning("starting without a champion: %s", error)
        yield

    app = FastAPI(
        title="st-assets embedding API",
        summary="Embed, compare and search texts with the champion sentence-transformer.",
        description=(
            f"At most {max_texts} texts per request (a pair counts as two) and {max_text_chars} characters "
            f"per text. The champion is re-read from `model_registry` every {refresh_seconds:g} s."
        ),
        version="1",
        lifespan=lifespan,
    )

    @app.exception_handler(ServiceUnavailable)
    async def service_unavailable(_: Request, error: ServiceUnavailable) -> JSONResponse:
        return JSONResponse(
            status_code=503,
            content={"detail": str(error)},
            headers={"Retry-After": str(max(1, round(refresh_seconds)))},
        )

    @app.middleware("http")
    async def limit_body_size(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # Refuse oversized bodies before they are read and parsed, not after.
        if request.method in {"POST", "PUT", "PATCH"}:
            declared = request.headers.get("content-length")
            if declared is None:
                return JSONResponse(
                    status_code=411, content={"detail": "the request must declare a Content-Length"}
                )
            if not declared.isdigit() or int(declared) > limits.max_body_bytes:
                return JSONResponse(
                    status_code=413,
                    content={
                        "detail": f"the request body of {declared} bytes is over the limit of "
                        f"{limits.max_body_bytes} bytes"
                    },
                )
        return await call_next(request)

    @app.get("/health", responses=_UNAVAILABLE)
    def health() -> HealthResponse:
        """The champion version the server embeds with; 503 until there is one."""
        champion = champions.current()
        return HealthResponse(status="ok", model_version=champion.version, dimension=champion.dimension)

    @app.post("/embed", responses=_UNAVAILABLE)
    def embed(request: EmbedRequest) -> EmbedResponse:
        """Unit-length embeddings of the texts, with the champion version that made them."""
        limits.check_count(
            len(request.texts),
            ("body", "texts"),
            f"too many texts: {len(request.texts)}; at most {limits.max_texts} are allowed per request",
        )
        limits.check_texts([(("body", "texts", index), text) for index, text in enumerate(request.texts)])
        champion = champions.current()
        vectors = champion.encode(request.texts)
        return EmbedResponse(
            embeddings=vectors.tolist(), model_version=champion.version, dimension=champion.dimension
        )

    @app.post("/similarity", responses=_UNAVAILABLE)
    def similarity(request: SimilarityRequest) -> SimilarityResponse:
        """Cosine similarity of each pair of texts under the champion."""
        limits.check_count(
            2 * len(request.pairs),
            ("body", "pairs"),
            f"too many pairs: {len(request.pairs)}; at most {limits.max_texts // 2} are allowed per "
            f"request ({limits.max_texts} texts)",
        )
        limits.check_texts(
            [
                (("body", "pairs", index, side), text)
                for index, pair in enumerate(request.pairs)
                for side, text in enumerate(pair)
            ]
        )
        champion = champions.current()
        # Each distinct text is encoded once, however many pairs it appears in.
        distinct = list(dict.fromkeys(text for pair in request.pairs for text in pair))
        row_of = {text: row for row, text in enumerate(distinct)}
        vectors = champion.encode(distinct)
        scores = [float(vectors[row_of[a]] @ vectors[row_of[b]]) for a, b in request.pairs]
        return SimilarityResponse(scores=scores, model_version=champion.version)

    @app.get(
        "/search",
        responses={
            **_UNAVAILABLE,
            409: {"model": ErrorResponse, "description": "`embeddings` was built by another model version."},
        },
    )
    def search(
        q: Annotated[str, Query(min_length=1, description="The query text.")],
        k: Annotated[int, Query(ge=1, le=MAX_SEARCH_K, description="How many rows to return.")] = 5,
    ) -> SearchResponse:
        """The k rows of ``embeddings`` closest to ``q``; 409 while the table lags behind the champion."""
        limits.check_texts([(("query", "q"), q)])
        champion = champions.current()
        vector = champion.encode([q])[0].tolist()
        with _read_connection(warehouse) as connection:
            versions = embedded_versions(connection)
            if not versions:
                raise ServiceUnavailable("no embeddings yet: materialise corpus_embeddings first")
            if versions != {champion.version}:
                raise HTTPException(
                    409,
                    f"the embeddings table holds model version(s) {sorted(versions)} but the champion is "
                    f"{champion.version}; materialise corpus_embeddings to refresh it",
                )
            if problem := files_mismatch(connection, champion.version, champion.fingerprint):
                raise HTTPException(409, problem)
            rows = connection.execute(
                f"SELECT text_id, text, score FROM semantic_search(?::FLOAT[{champion.dimension:d}], ?)",
                [vector, k],
            ).fetchall()
        return SearchResponse(
            results=[SearchResult(text_id=row[0], text=row[1], score=row[2]) for row in rows],
            model_version=champion.version,
        )

    return app


@contextmanager
def _read_connection(warehouse: Warehouse) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection for one request; a missing or locked warehouse becomes a 503."""
    try:
        with warehouse.connect(read_only=True) as connection:
            yield connection
    except FileNotFoundError as error:
        logger.warning("%s", error)
        raise ServiceUnavailable(_NO_WAREHOUSE) from error
    except WarehouseLockedError as error:
        logger.warning("the warehouse cannot be read: %s", error)
        raise ServiceUnavailable(_WAREHOUSE_BUSY) from error
    except duckdb.Error as error:
        logger.warning("the warehouse cannot be read: %s", error)
        raise ServiceUnavailable(_WAREHOUSE_UNREADABLE) from error
