"""The ``st-assets`` command: semantic search, read-only SQL and the embedding API on the warehouse."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from st_assets.settings import Settings, home_settings
from st_assets.store.embeddings import MAX_K, embedded_versions, files_mismatch
from st_assets.store.registry import get_champion, require_model_folder
from st_assets.store.warehouse import Warehouse

_CALLS_EMBED = re.compile(r"\bembed\s*\(", re.IGNORECASE)
# Strings, quoted names and comments, which may hold embed( without calling it (a quoted "embed" is
# the function's name, and stays).
_QUOTED_OR_COMMENT = re.compile(
    r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$\$.*?\$\$|--[^\n]*|/\*.*?\*/", re.DOTALL
)
# One row per line, one tab between cells: escape what would break either, and every other control
# character, which a terminal would act on (a stored file name may hold an escape sequence).
_ESCAPES = str.maketrans(
    {chr(code): f"\\x{code:02x}" for code in [*range(0x20), 0x7F]}
    | {chr(code): f"\\u{code:04x}" for code in range(0x80, 0xA0)}
    | {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
)


def _port(value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port (0 to 65535)")
    return int(value)


def _settings() -> Settings:
    return home_settings(Path(os.environ.get("ST_ASSETS_HOME", "data")))


class NoChampionError(ValueError):
    """No model has been promoted yet, so there is nothing to embed a query with."""


class ModelLoadError(ValueError):
    """The champion's folder is there, but its files do not load as a model."""


class ChampionEncoder:
    """Loads the champion model once and embeds texts with it."""

    def __init__(self, warehouse: Warehouse) -> None:
        with warehouse.connect(read_only=True) as connection:
            champion = get_champion(connection)
        if champion is None:
            raise NoChampionError("no champion model yet: materialise the assets first (make demo)")
        from st_assets.steps.models import load_model, model_fingerprint

        self.version = champion.version
        path = require_model_folder(champion).path
        self.fingerprint = model_fingerprint(path)
        try:
            self.model = load_model(path)
        except Exception as error:  # a half-written or damaged folder: any loader error, said in one line
            raise ModelLoadError(
                f"champion {champion.version} could not be loaded from {path}: {error}"
            ) from error
        self.dimension = self.model.get_embedding_dimension()

    def encode(self, texts: list[str]) -> np.ndarray:
        """One float32 row per text, in one batched pass."""
        from st_assets.steps.models import encode_texts

        return np.asarray(encode_texts(self.model, texts), dtype=np.float32)


def register_embed_function(connection: duckdb.DuckDBPyConnection, encoder: ChampionEncoder) -> None:
    """Make ``embed(text)`` callable from SQL on this connection, returning ``FLOAT[d]``.

    Vectorised: DuckDB hands over up to 2,048 texts at a time and each distinct text is encoded once,
    in one batch, so ``embed(text)`` over a table costs about what one encode of its texts does.
    """
    dimension = int(encoder.dimension)
    vector_type = pa.list_(pa.float32(), dimension)

    def embed(texts: pa.Array) -> pa.Array:
        values = texts.to_pylist()
        for text in values:
            if text is not None and not text.strip():
                raise ValueError(f"embed(): the text {text!r} is blank")
        # NULL in, NULL out, as SQL functions do: labelled texts have no sentence2, for one.
        distinct = list(dict.fromkeys(text for text in values if text is not None))
        rows = dict(zip(distinct, encoder.encode(distinct), strict=True)) if distinct else {}
        return pa.array([None if text is None else rows[text] for text in values], type=vector_type)

    connection.create_function(
        "embed",
        embed,
        [duckdb.sqltype("VARCHAR")],
        duckdb.sqltype(f"FLOAT[{dimension}]"),
        type="arrow",
        null_handling="special",
    )


def _require_champion_embeddings(connection: duckdb.DuckDBPyConnection, encoder: ChampionEncoder) -> None:
    """Refuse to compare a champion's query vector with rows another model (or other files) embedded."""
    versions = embedded_versions(connection)
    if not versions:
        raise ValueError("no embeddings yet: materialise corpus_embeddings first")
    if versions != {encoder.version}:
        raise ValueError(
            f"the embeddings table holds model version(s) {sorted(versions)} but the champion is "
            f"{encoder.version}; materialise corpus_embeddings to refresh it"
        )
    if problem := files_mismatch(connection, encoder.version, encoder.fingerprint):
        raise ValueError(problem)


def search(warehouse: Warehouse, query: str, k: int) -> list[tuple[str, str, float]]:
    """Top-k rows of ``embeddings`` for a text query, embedded with the champion model."""
    if not query.strip():
        raise ValueError("the search text is empty")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
    encoder = ChampionEncoder(warehouse)
    vector = encoder.encode([query])[0].tolist()
    with warehouse.connect(read_only=True) as connection:
        _require_champion_embeddings(connection, encoder)
        return connection.execute(
            f"SELECT text_id, text, score FROM semantic_search(?::FLOAT[{int(encoder.dimension)}], ?)",
            [vector, k],
        ).fetchall()


def run_sql(warehouse: Warehouse, sql: str) -> tuple[list[str], list[tuple]]:
    """Run one statement on a read-only connection, with ``embed()`` when it calls it; returns columns and rows.

    Only a statement that calls ``embed()`` loads the champion, so the warehouse can be queried (the
    quarantine, say) before any model is trained. The connection reaches no other file: no ATTACH,
    COPY TO or EXPORT, which would write past a read-only warehouse, and no reading files either.
    """
    unquoted = _QUOTED_OR_COMMENT.sub(lambda m: "embed" if m[0].lower() == '"embed"' else " ", sql)
    calls_embed = _CALLS_EMBED.search(unquoted) is not None
    encoder = ChampionEncoder(warehouse) if calls_embed else None
    with warehouse.connect(read_only=True) as connection:
        connection.execute("SET enable_external_access = false")
        connection.execute("SET lock_configuration = true")
        if encoder is not None:
            versions = embedded_versions(connection)
            if versions and versions != {encoder.version}:
                print(
                    f"warning: embed() uses the champion {encoder.version}, but the embeddings table holds "
                    f"{sorted(versions)}; materialise corpus_embeddings before comparing them",
                    file=sys.stderr,
                )
            elif versions and (problem := files_mismatch(connection, encoder.version, encoder.fingerprint)):
                print(f"warning: embed() uses the champion's current files, but {problem}", file=sys.stderr)
            register_embed_function(connection, encoder)
        result = connection.execute(sql)
        if result is None:
            raise ValueError("no statement to run (empty, or only a comment)")
        columns = [column[0] for column in result.description or []]
        return columns, result.fetchall()


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        # Four places for scores; a small non-zero value keeps its digits instead of printing 0.0000.
        return f"{value:.4g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return str(value).translate(_ESCAPES)


def _print_rows(columns: list[str], rows: list[tuple]) -> None:
    print("\t".join(columns))
    for row in rows:
        print("\t".join(_cell(value) for value in row))


def serve(warehouse_path: Path, host: str, port: int, max_text_chars: int) -> None:
    """Run the embedding API with uvicorn until interrupted; texts longer than ``max_text_chars`` are refused,
    as validation quarantines them."""
    # Imported here so that search and sql do not pay for loading the web stack.
    import uvicorn

    from st_assets.serve import create_app

    uvicorn.run(create_app(warehouse_path, max_text_chars=max_text_chars), host=host, port=port)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``st-assets``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="st-assets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    search_parser = commands.add_parser("search", help="semantic search over the embeddings table")
    search_parser.add_argument("text")
    search_parser.add_argument("-k", type=int, default=5)
    sql_parser = commands.add_parser("sql", help="read-only SQL, with embed(text) available")
    sql_parser.add_argument("statement")
    serve_parser = commands.add_parser("serve", help="the embedding API (FastAPI) on the warehouse")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=_port, default=8000)
    args = parser.parse_args(argv)
    try:
        settings = _settings()
    except ValueError as error:  # the home's settings.yaml: one line naming the file
        print(f"st-assets: {error}", file=sys.stderr)
        return 2
    if args.command == "serve":
        serve(settings.warehouse_path, args.host, args.port, settings.max_text_chars)
        return 0
    warehouse = Warehouse(
        settings.warehouse_path,
        on_lock_wait=lambda: print(
            "st-assets: another process is writing the warehouse; waiting for it", file=sys.stderr
        ),
    )
    try:
        if args.command == "search":
            _print_rows(["text_id", "text", "score"], search(warehouse, args.text, args.k))
        else:
            _print_rows(*run_sql(warehouse, args.statement))
    except (ValueError, FileNotFoundError, duckdb.Error) as error:
        print(f"st-assets: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left early (| head): no traceback, and nothing more to write at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
