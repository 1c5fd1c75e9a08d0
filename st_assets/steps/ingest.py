"""Read the files users drop into ``incoming/``: CSV, JSONL and Parquet, one row per data row, nothing lost."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import json
import os
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from st_assets.steps.formats import INPUT_COLUMNS, OPTIONAL_COLUMNS, PairFormat, detect_format

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".parquet")
# Names that mean "still being written" or "not for us": never read.
IN_PROGRESS_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")

RAW_ROW_COLUMNS = ("source_file", "row_number", "row_hash", "record", "parse_error")
# Keys a JSONL line may add to its file's columns: any format's input columns and the group column.
_INPUT_KEYS = frozenset({"group", *(column for columns in INPUT_COLUMNS.values() for column in columns)})


@dataclass(frozen=True)
class IncomingFile:
    """A file waiting in ``incoming/``: its name relative to that folder and its content hash.

    ``incoming_dir`` is the folder it was listed from; a file is only read while it lies directly inside it.
    """

    source_file: str
    path: Path
    content_hash: str
    size: int
    incoming_dir: Path


@dataclass
class ReadResult:
    """One incoming file read: its rows, or the reason the whole file was rejected."""

    source_file: str
    content_hash: str
    pair_format: PairFormat | None
    rows: pd.DataFrame
    rejected_reason: str | None = None
    notes: list[str] = field(default_factory=list)


# The content hash of a file that could not be read, followed by a hash of the error.
UNREADABLE_PREFIX = "unreadable-"


def file_content_hash(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# A file is only hashed again when its device, inode, size, mtime or ctime moved. One whose timestamps are
# this recent could still change without moving them on a filesystem with a coarse clock: not cached.
_RACY_NS = 2_000_000_000


# Each listed file's stat and hash; a listing drops the files of its folder that it no longer holds. Not a
# bounded cache: one smaller than the folder would be emptied by every listing in name order.
_listed_hashes: dict[Path, tuple[tuple[int, ...], str]] = {}


def listed_content_hash(path: Path, status: os.stat_result) -> str:
    """sha256 of the file ``status`` describes, reusing the hash of an earlier listing while its stat
    holds still: the sensor lists ``incoming/`` every tick, and rereading every byte is wasted work."""
    if time.time_ns() - max(status.st_mtime_ns, status.st_ctime_ns) < _RACY_NS:
        return file_content_hash(path)
    stat_key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    cached = _listed_hashes.get(path)
    if cached is not None and cached[0] == stat_key:
        return cached[1]
    content_hash = file_content_hash(path)
    _listed_hashes[path] = (stat_key, content_hash)
    return content_hash


def _forget_unlisted(folder: Path, listed: set[Path]) -> None:
    """Drop the cached hashes of files in ``folder`` that its latest listing did not hold."""
    for path in [path for path in _listed_hashes if path.parent == folder and path not in listed]:
        del _listed_hashes[path]


def _escaped_character(character: str) -> str:
    code = ord(character)
    if character == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as the file system decoded it
        return f"\\x{code - 0xDC00:02x}"
    if unicodedata.category(character) == "Cc":  # a control character: a terminal would act on it
        return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"
    return character


def file_display_name(name: str) -> str:
    """A file name as text that can be stored and printed: a byte that is not UTF-8 (an archive from
    another system) as ``\\xe9``, a control character as ``\\x1b`` or ``\\u009b``, and a backslash
    doubled, so that two files never share a name."""
    return "".join(_escaped_character(character) for character in os.fsdecode(name))


def is_candidate_name(name: str) -> bool:
    """False for dotfiles and names that mark a file still being written."""
    return not name.startswith(".") and not name.lower().endswith(IN_PROGRESS_SUFFIXES)


def list_incoming_files(incoming_dir: Path) -> list[IncomingFile]:
    """Regular files directly inside ``incoming_dir`` (nothing outside it), sorted by name; and its
    symbolic links, which are listed to be rejected (``read_incoming_file`` never follows one)."""
    if not incoming_dir.is_dir():
        return []
    root = incoming_dir.resolve()
    found = []
    for path in sorted(incoming_dir.iterdir()):
        if not is_candidate_name(path.name):
            continue
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError:
                continue  # removed since the folder was listed
            link_hash = UNREADABLE_PREFIX + hashlib.sha256(b"link to " + os.fsencode(target)).hexdigest()
            found.append(IncomingFile(file_display_name(path.name), path, link_hash, 0, incoming_dir))
            continue
        if not path.is_file():
            continue
        if path.resolve().parent != root:
            continue
        try:
            status = path.stat()
        except FileNotFoundError:
            continue  # removed since the folder was listed
        try:
            content_hash = listed_content_hash(path, status)
        except FileNotFoundError:
            continue
        except PermissionError as error:
            # Listed all the same, so that reading it records the file as rejected with this reason.
            content_hash = UNREADABLE_PREFIX + hashlib.sha256(str(error).encode()).hexdigest()
        found.append(
            IncomingFile(file_display_name(path.name), path, content_hash, status.st_size, incoming_dir)
        )
    _forget_unlisted(incoming_dir, {item.path for item in found})
    return found


def row_hash(record: dict[str, object]) -> str:
    """Stable hash of one row's content (keys sorted), independent of its file and position."""
    payload = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def read_incoming_file(
    incoming: IncomingFile, forced_format: PairFormat | None = None, max_bytes: int | None = None
) -> ReadResult:
    """Read one file into raw rows; an unreadable file, or one over ``max_bytes`` (a Parquet file's
    decoded size), comes back rejected with a reason.

    Raises ``FileChangedError`` only when the file's bytes changed since it was listed.

    A CSV is UTF-8, UTF-16 with a byte-order mark, or else in the encoding its name declares
    (``legacy.latin-1.csv``); JSONL and Parquet are UTF-8.
    """
    suffix = incoming.path.suffix.lower()
    empty = pd.DataFrame(columns=list(RAW_ROW_COLUMNS))
    try:
        _require_inside_incoming(incoming)
    except ValueError as error:
        # Refused before reading anything: a file outside incoming/ is not even hashed again.
        reason = f"{incoming.source_file}: {error}"
        return ReadResult(incoming.source_file, incoming.content_hash, None, empty, rejected_reason=reason)
    try:
        if suffix not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"unsupported file type {suffix or '(none)'!r}; expected one of {SUPPORTED_SUFFIXES}"
            )
        if incoming.size == 0:
            raise ValueError("file is empty")
        if max_bytes is not None and incoming.size > max_bytes:
            raise ValueError(
                _too_large(f"file is {incoming.size:,} bytes, over max_file_bytes ({max_bytes:,})")
            )
        if suffix == ".csv":
            table = _read_csv(incoming.path)
        elif suffix == ".jsonl":
            table = _read_jsonl(incoming.path)
        else:
            table = _read_parquet(incoming.path, max_bytes)
        pair_format, unread = _resolve_format(table.columns, forced_format)
        notes = [*table.notes, *unread]
        records = table.records
        if not records:
            raise ValueError("file has a header but no data rows")
    except (ValueError, UnicodeDecodeError, csv.Error, OSError) as error:
        _require_unchanged(incoming)
        reason = f"{incoming.source_file}: {error}"
        return ReadResult(incoming.source_file, incoming.content_hash, None, empty, rejected_reason=reason)
    _require_unchanged(incoming)
    rows = pd.DataFrame(
        {
            "source_file": incoming.source_file,
            "row_number": [number for number, _, _ in records],
            "row_hash": [row_hash(record) if error is None else None for _, record, error in records],
            "record": [json.dumps(record, ensure_ascii=False, default=str) for _, record, _ in records],
            "parse_error": [error for _, _, error in records],
        }
    )
    return ReadResult(incoming.source_file, incoming.content_hash, pair_format, rows, notes=notes)


Record = tuple[int, dict[str, object], str | None]


@dataclass
class _Table:
    """A file's columns as matched, its records, and notes on what of it is not read."""

    columns: list[str]
    records: list[Record]
    notes: list[str] = field(default_factory=list)


def _without_columns(table: _Table, unread: set[str], note: str) -> _Table:
    """``table`` without the columns in ``unread`` (which then match no format and are never stored)."""
    if not unread.intersection(table.columns):
        return table
    records = [
        (number, {key: value for key, value in record.items() if key not in unread}, error)
        for number, record, error in table.records
    ]
    columns = [column for column in table.columns if column not in unread]
    return _Table(columns, records, [*table.notes, note])


class FileChangedError(RuntimeError):
    """The file's bytes are no longer those listed (still being written, or replaced): read it next run."""


def _require_unchanged(incoming: IncomingFile) -> None:
    """Raise ``FileChangedError`` when the file's content hash differs from the one it was listed with.

    The rows read and the hash recorded must describe the same bytes; a file still being copied in
    changes between the two.
    """
    if incoming.content_hash.startswith(UNREADABLE_PREFIX):
        return
    try:
        unchanged = file_content_hash(incoming.path) == incoming.content_hash
    except FileNotFoundError:
        unchanged = False
    except OSError:
        return  # unreadable now: the read above has said why
    if not unchanged:
        raise FileChangedError(f"{incoming.source_file} changed while it was read; the next run reads it")


def _require_inside_incoming(incoming: IncomingFile) -> None:
    """Refuse a link, and a file that does not lie directly inside its incoming folder (``..``, absolute
    names)."""
    if incoming.path.is_symlink():
        raise ValueError(
            f"a symbolic link (to {os.readlink(incoming.path)!r}): links are not followed, so that nothing "
            "outside incoming/ is ever read; copy the file itself into incoming/"
        )
    root = incoming.incoming_dir.resolve()
    resolved = incoming.path.resolve()
    if resolved.parent != root:
        raise ValueError(f"path {str(incoming.path)!r} resolves to {str(resolved)!r}, outside {str(root)!r}")
    # source_file is what the warehouse records as the file's name, so it must be that plain name.
    if incoming.source_file != file_display_name(incoming.path.name):
        raise ValueError(
            f"source_file {incoming.source_file!r} is not the file's name {incoming.path.name!r}"
        )


def declared_encoding(file_name: str) -> str | None:
    """The text encoding a CSV's name declares (``legacy.latin-1.csv`` -> ``latin-1``), or None.

    Only the last dotted part before ``.csv`` counts, and only when Python knows it as a text encoding:
    ``sales.2024.csv`` declares nothing.
    """
    stem = Path(file_name).stem
    if "." not in stem:
        return None
    name = stem.rsplit(".", 1)[1]
    try:
        # One byte, not none: Python skips the codec lookup for empty input. Decoding rejects unknown
        # names and bytes-to-bytes codecs (base64, zlib) alike.
        b"a".decode(name, errors="ignore")
    except LookupError:
        return None
    return name


def _c1_bytes_as_latin1(error: UnicodeError) -> tuple[str, int]:
    """Decoding error handler: the bytes Windows-1252 leaves undefined keep their latin-1 meaning."""
    assert isinstance(error, UnicodeDecodeError)
    return error.object[error.start : error.end].decode("latin-1"), error.end


_WINDOWS_1252_LENIENT = "st_assets.windows-1252"
codecs.register_error(_WINDOWS_1252_LENIENT, _c1_bytes_as_latin1)


def _line_of_byte(data: bytes, offset: int) -> int:
    """The 1-based line of the file that byte ``offset`` lies on."""
    return data.count(b"\n", 0, offset) + 1


def _decode_csv(data: bytes, file_name: str) -> str:
    """A CSV's text: UTF-8 when the bytes are UTF-8, else the encoding the file name declares.

    Valid UTF-8 wins over a declared encoding, so ``faq.cyrillic.csv`` written in UTF-8 is not read
    as ISO-8859-5; a file that is neither is rejected with the byte that fails.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = _line_of_byte(data, error.start)
        utf8_problem = f"not valid utf-8: {error.reason} at byte {error.start} (line {line})"
    else:
        if "\x00" not in text:
            return text
        utf8_problem = _nul_bytes_problem(data)
    declared = declared_encoding(file_name)
    if declared is None and data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        declared = "utf-16"  # what spreadsheets write as "Unicode text": the byte-order mark says so
    if declared is None:
        if b"\x00" in data:
            raise ValueError(_nul_bytes_problem(data))
        raise ValueError(
            f"{utf8_problem}; if the file uses another encoding, name it <name>.<encoding>.csv "
            f"(e.g. export.cp1252.csv)"
        )
    errors = "strict"
    if codecs.lookup(declared).name == "iso8859-1":
        # Read as Windows-1252, as browsers read a page labelled latin-1 (WHATWG Encoding): a Windows
        # "ANSI" export holds curly quotes, dashes and the euro sign in bytes 0x80-0x9F, which latin-1
        # reads as invisible control characters that cleaning then deletes.
        declared, errors = "cp1252", _WINDOWS_1252_LENIENT
    # Otherwise strictly: a file not in its declared encoding is rejected rather than read as mojibake.
    try:
        text = data.decode(declared, errors)
    except UnicodeDecodeError as error:
        raise ValueError(f"not valid {declared}: {error.reason} at byte {error.start}") from error
    # Checked after decoding: UTF-16 text is full of NUL bytes, decoded text never is.
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise ValueError(f"file contains NUL bytes (binary data?), first on line {line}")
    return text.removeprefix("\ufeff")


def _nul_bytes_problem(data: bytes) -> str:
    line = _line_of_byte(data, data.index(b"\x00"))
    return f"file contains NUL bytes (binary data?), first on line {line}"


def _resolve_format(columns: list[str], forced_format: PairFormat | None) -> tuple[PairFormat, list[str]]:
    """The file's format, and a note naming the columns a configured format leaves unread."""
    if forced_format is not None:
        missing = set(INPUT_COLUMNS[forced_format]) - set(columns)
        if missing:
            raise ValueError(f"configured format {forced_format.value} needs columns {sorted(missing)}")
        read = {*INPUT_COLUMNS[forced_format], *OPTIONAL_COLUMNS}
        if unread := [column for column in columns if column not in read]:
            return forced_format, [f"columns {unread} are not read under pair_format {forced_format.value}"]
        return forced_format, []
    detected = detect_format(columns)
    if detected is None:
        expected = "; ".join(",".join(cols) for cols in INPUT_COLUMNS.values())
        raise ValueError(f"columns {columns} match no pair format; expected one of: {expected}")
    return detected, []


# What the first line of a .csv says when it is not comma-separated.
_SEPARATORS = {"\t": "tab-separated", ";": "semicolon-separated"}


def _read_csv(path: Path) -> _Table:
    """A CSV's rows. Row N is the N-th record after the header: blank lines count as records, and a
    quoted text that spans lines is one record."""
    text = _decode_csv(path.read_bytes(), path.name)
    # No field is longer than the file: one long text is a row for max_text_chars to quarantine,
    # not a reason to reject the whole file at the csv module's 128 KiB default.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    record_start = 1
    try:
        header: list[str] | None = []
        while header == []:  # blank lines above the header
            header = next(reader, None)
        if not header:
            raise ValueError("file has no header row")
        # The header's line, as the reader counts lines (a lone carriage return ends one too).
        first_line = next(itertools.islice(io.StringIO(text, newline=""), reader.line_num - 1, None))
        first_line = first_line.rstrip("\r\n")
        if first_line.lower().startswith("sep="):
            raise ValueError(
                f"the first line is a spreadsheet's separator hint {first_line!r}: remove it, and save the "
                "file comma-separated with a header row naming the columns"
            )
        for separator, name in _SEPARATORS.items():
            if first_line.count(separator) > first_line.count(","):
                raise ValueError(
                    f"the first line is {name}: a .csv file is read comma-separated, with a header row "
                    "naming the columns (save it as CSV, or convert it to JSONL or Parquet)"
                )
        columns = _column_names(header)
        records: list[Record] = []
        number = 0
        while True:
            record_start = reader.line_num + 1
            values = next(reader, None)
            if values is None:
                break
            number += 1
            if not values:
                continue
            if len(values) != len(columns):
                error = f"expected {len(columns)} fields, found {len(values)}"
                records.append((number, {"line": _csv_line(values)}, error))
            elif [value.strip().lower() for value in values] == columns:
                error = "repeats the header row (two files joined into one?)"
                records.append((number, {"line": _csv_line(values)}, error))
            else:
                records.append((number, dict(zip(columns, values, strict=True)), None))
    except csv.Error as error:
        # One broken quote shifts every later field, so no row after it can be trusted: reject the file.
        raise ValueError(
            f"broken CSV quoting in the record that starts on line {record_start}: {error}"
        ) from error
    # A spreadsheet's trailing commas and the row index pandas writes by default have no column name.
    return _without_columns(_Table(columns, records), {""}, "unnamed columns are not read")


def _csv_line(values: list[str]) -> str:
    """A record's fields written back as one CSV line, quoted as a file would hold them."""
    line = io.StringIO()
    csv.writer(line, lineterminator="").writerow(values)
    return line.getvalue()


def _column_names(names: list[str]) -> list[str]:
    """Column names as matched (trimmed, lower case); two that become one name reject the file."""
    columns = [str(name).strip().lower() for name in names]
    # Blank names (a spreadsheet's trailing commas) match no column, so they cannot collide with one.
    repeated = sorted({column for column in columns if column and columns.count(column) > 1})
    if repeated:
        raise ValueError(f"columns {repeated} appear more than once (names compare trimmed, in lower case)")
    return columns


def _read_jsonl(path: Path) -> _Table:
    """A JSONL file's rows; row N is line N. A line that is not UTF-8 is quarantined, not the file."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    records: list[Record] = []
    columns: list[str] = []
    notes: list[str] = []
    # Only "\n" ends a line: splitlines() would also split inside strings at U+2028, U+0085 and the like.
    for number, line_bytes in enumerate(data.split(b"\n"), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as error:
            line = line_bytes.decode("utf-8", "backslashreplace")
            records.append((number, {"line": line}, f"not valid utf-8: {error.reason} at byte {error.start}"))
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            records.append((number, {"line": line}, f"invalid JSON: {error.msg}"))
            continue
        except (ValueError, RecursionError) as error:  # integers over 4,300 digits, nesting too deep
            records.append((number, {"line": line}, f"unreadable JSON: {type(error).__name__}: {error}"))
            continue
        if not isinstance(value, dict):
            records.append((number, {"line": line}, "line is not a JSON object"))
            continue
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            # JSON can escape half an emoji ("\ud83d"); no text model can read it.
            records.append((number, {"line": line}, "a string holds an unpaired UTF-16 surrogate"))
            continue
        try:
            keys = _column_names(list(value))
        except ValueError as error:
            records.append((number, {"line": line}, str(error)))
            continue
        record = dict(zip(keys, value.values(), strict=True))
        # The first line's keys, then every input column a later line adds: a writer that leaves out
        # null keys must not make the first line decide the format and silently drop later labels,
        # while a stray key of one line (a note) must not make the file match no format.
        if not columns:
            columns.extend(keys)
        elif added := [key for key in keys if key in _INPUT_KEYS and key not in columns]:
            columns.extend(added)
            notes.append(f"column(s) {added} first appear on line {number}")
        records.append((number, record, None))
    if not columns:
        raise ValueError("no line is a valid JSON object")
    return _Table(columns, records, notes)


# Rows decoded before their size is checked against max_file_bytes.
_PARQUET_BATCH_ROWS = 1_000


def _too_large(what: str) -> str:
    return f"{what}: split it into smaller files"


def _plain(schema: pa.Schema) -> pa.Schema:
    """``schema`` with dictionary-encoded columns (pandas categoricals) as their plain value types."""
    return pa.schema(
        [
            field.with_type(field.type.value_type) if pa.types.is_dictionary(field.type) else field
            for field in schema
        ],
        metadata=schema.metadata,
    )


def _read_parquet(path: Path, max_bytes: int | None = None) -> _Table:
    batches = []
    decoded = 0
    try:
        # Through a handle: pyarrow cannot open a path whose name is not UTF-8.
        with path.open("rb") as handle:
            parquet = pq.ParquetFile(handle)
            schema = _plain(parquet.schema_arrow)
            # Batch by batch, each decoded in full: compressed or dictionary-encoded, a small file may
            # hold many times its size.
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                batch = batch.cast(schema)
                decoded += batch.nbytes
                if max_bytes is not None and decoded > max_bytes:
                    break
                batches.append(batch)
            table = pa.Table.from_batches(batches, schema=schema)
    except Exception as error:  # pyarrow raises several unrelated types for corrupt files
        raise ValueError(f"not a readable Parquet file: {error}") from error
    if max_bytes is not None and decoded > max_bytes:
        raise ValueError(_too_large(f"file decodes to more than max_file_bytes ({max_bytes:,})"))
    columns = _column_names(table.column_names)
    records: list[Record] = []
    notes: list[str] = []
    values_by_column = []
    for name, column in zip(columns, table.columns, strict=True):
        try:
            values_by_column.append(column.to_pylist())
        except (OverflowError, ValueError):
            # A date or time Python cannot hold (year 10000 or later, before year 1, a date32 of 2**31
            # days): Arrow still writes it as text, and no pair column is a date.
            try:
                values_by_column.append(column.cast(pa.string()).to_pylist())
            except pa.ArrowException as error:
                raise ValueError(f"column {name!r} holds values that cannot be read: {error}") from error
            notes.append(f"column {name!r} holds dates or times outside Python's range: read as text")
    # By position, not by name: blank column names may repeat.
    values_by_row = zip(*values_by_column, strict=True)
    for number, values in enumerate(values_by_row, start=1):
        record = dict(zip(columns, values, strict=True))
        error = None
        for key, value in record.items():
            if isinstance(value, bytes):
                # Binary columns (older Spark and Hive writers) hold text as bytes without saying so.
                try:
                    record[key] = value.decode("utf-8")
                except UnicodeDecodeError as decode_error:
                    record[key] = value.hex()
                    error = f"column {key!r} holds bytes that are not UTF-8 text: {decode_error.reason}"
        records.append((number, record, error))
    # pandas stores a frame's index as a column of its own (``__index_level_0__``) unless told not to.
    index_columns = (table.schema.pandas_metadata or {}).get("index_columns", [])
    unread = {"", *(str(name).strip().lower() for name in index_columns if isinstance(name, str))}
    return _without_columns(
        _Table(columns, records, notes), unread, "unnamed and pandas index columns are not read"
    )
