"""Reading incoming files: formats by columns, broken files rejected whole, broken lines alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from st_assets.steps import ingest
from st_assets.steps.formats import PairFormat, detect_format
from st_assets.steps.ingest import (
    FileChangedError,
    IncomingFile,
    ReadResult,
    file_content_hash,
    list_incoming_files,
    read_incoming_file,
)


def _read(path: Path, forced: PairFormat | None = None) -> ReadResult:
    (item,) = [f for f in list_incoming_files(path.parent) if f.source_file == path.name]
    return read_incoming_file(item, forced)


def test_formats_are_recognised_by_their_columns() -> None:
    assert detect_format(["sentence1", "sentence2", "score"]) is PairFormat.SCORED
    assert detect_format(["Sentence1", "sentence2", "label"]) is PairFormat.BINARY
    assert detect_format(["anchor", "positive", "negative"]) is PairFormat.TRIPLET
    assert detect_format(["positive", "anchor"]) is PairFormat.ANCHOR_POSITIVE
    assert detect_format(["text", "label"]) is PairFormat.LABELLED_TEXTS
    assert detect_format(["text"]) is PairFormat.UNLABELLED_TEXTS
    assert detect_format(["question", "answer"]) is None
    # The optional group column rides along with any format and never makes one on its own.
    assert detect_format(["sentence1", "sentence2", "score", "Group"]) is PairFormat.SCORED
    assert detect_format(["text", "label", "group"]) is PairFormat.LABELLED_TEXTS
    assert detect_format(["group"]) is None
    assert detect_format(["text", "group", "extra"]) is None


def test_csv_rows_keep_file_row_numbers_and_hashes(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text('sentence1,sentence2,score\n"a, b",c,0.5\nd,e,1\n')
    result = _read(path)
    assert result.rejected_reason is None
    assert result.pair_format is PairFormat.SCORED
    assert result.rows["row_number"].tolist() == [1, 2]
    assert json.loads(result.rows["record"][0]) == {"sentence1": "a, b", "sentence2": "c", "score": "0.5"}
    assert result.rows["row_hash"].nunique() == 2


def test_jsonl_and_parquet_are_read(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        '{"anchor": "x", "positive": "y"}\n\n{"anchor": "z", "positive": "w"}\n'
    )
    pd.DataFrame({"text": ["one", "two"], "label": ["l1", "l2"]}).to_parquet(tmp_path / "b.parquet")
    jsonl = _read(tmp_path / "a.jsonl")
    parquet = _read(tmp_path / "b.parquet")
    assert jsonl.pair_format is PairFormat.ANCHOR_POSITIVE
    assert jsonl.rows["row_number"].tolist() == [1, 3]
    assert parquet.pair_format is PairFormat.LABELLED_TEXTS
    assert len(parquet.rows) == 2


def test_a_broken_jsonl_line_loses_only_that_line(tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": broken\n{"text": "also fine", "label": "b"}\n')
    result = _read(path)
    assert result.rejected_reason is None
    errors = result.rows.set_index("row_number")["parse_error"]
    assert pd.isna(errors[1]) and pd.isna(errors[3])
    assert "invalid JSON" in errors[2]


def test_a_jsonl_line_with_half_an_emoji_loses_only_that_line(tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n{"text": "broken \\ud83d emoji", "label": "b"}\n')
    result = _read(path)
    errors = result.rows.set_index("row_number")["parse_error"]
    assert pd.isna(errors[1]) and "unpaired UTF-16 surrogate" in errors[2]
    assert "\\ud83d" in result.rows.set_index("row_number")["record"][2]  # the line as read is kept


def test_unreadable_files_are_rejected_whole_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "binary.csv").write_bytes(b"\x00\x01\x02text\n\xff\xfe")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    (tmp_path / "columns.csv").write_text("question,answer\nq,a\n")
    (tmp_path / "quoting.csv").write_text('text,label\n"unclosed,a\n')
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    reasons = {
        name: _read(tmp_path / name).rejected_reason
        for name in (
            "empty.csv",
            "binary.csv",
            "latin1.csv",
            "columns.csv",
            "quoting.csv",
            "notes.txt",
            "bad.parquet",
        )
    }
    assert "empty" in reasons["empty.csv"]
    assert all(reason and reason.startswith(name) for name, reason in reasons.items())
    assert "match no pair format" in reasons["columns.csv"]
    assert "unsupported file type" in reasons["notes.txt"]
    assert "utf-8" in reasons["latin1.csv"].lower()


def test_files_being_written_and_dotfiles_are_not_listed_and_links_are_listed_to_be_rejected(
    tmp_path: Path,
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "ready.csv").write_text("text\nhello\n")
    (incoming / "upload.csv.part").write_text("text\nhal")
    (incoming / ".hidden.csv").write_text("text\nx\n")
    (incoming / "archive").mkdir()
    outside = tmp_path / "secret.csv"
    outside.write_text("text\nsecret\n")
    (incoming / "link.csv").symlink_to(outside)
    (incoming / "inside_link.csv").symlink_to(incoming / "ready.csv")
    os.symlink(b"/srv/exports/caf\xe9.csv", os.path.join(os.fsencode(incoming), b"odd_link.csv"))
    listed = {item.source_file: item for item in list_incoming_files(incoming)}
    assert sorted(listed) == ["inside_link.csv", "link.csv", "odd_link.csv", "ready.csv"]
    for name in ("link.csv", "inside_link.csv", "odd_link.csv"):
        result = read_incoming_file(listed[name])
        assert result.rows.empty and "a symbolic link" in (result.rejected_reason or ""), name
        assert "copy the file itself into incoming/" in (result.rejected_reason or "")


def test_a_file_that_cannot_be_hashed_is_listed_as_unreadable_and_a_vanished_one_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("locked.csv", "gone.csv", "fine.csv"):
        (tmp_path / name).write_text("text\nhello\n")
    real_hash = ingest.file_content_hash

    def hash_or_fail(path: Path) -> str:
        if path.name == "locked.csv":
            raise PermissionError(13, "Permission denied", str(path))
        if path.name == "gone.csv":
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_hash(path)

    monkeypatch.setattr(ingest, "file_content_hash", hash_or_fail)
    listed = {item.source_file: item.content_hash for item in list_incoming_files(tmp_path)}
    assert sorted(listed) == ["fine.csv", "locked.csv"]
    assert listed["locked.csv"].startswith("unreadable-") and len(listed["fine.csv"]) == 64


@pytest.fixture
def hashed_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files ``list_incoming_files`` reads to hash, in order, from here on."""
    reads: list[str] = []
    real_hash = ingest.file_content_hash

    def counted_hash(hashed: Path) -> str:
        reads.append(hashed.name)
        return real_hash(hashed)

    monkeypatch.setattr(ingest, "file_content_hash", counted_hash)
    return reads


def test_a_listed_file_is_read_again_only_when_its_stat_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashed_files: list[str]
) -> None:
    path = tmp_path / "texts.csv"
    path.write_text("text\nhello\n")
    reads = hashed_files
    # Written just now: a coarse filesystem clock could hide a second write, so it is read every time.
    list_incoming_files(tmp_path)
    list_incoming_files(tmp_path)
    assert reads == ["texts.csv", "texts.csv"]
    monkeypatch.setattr(ingest, "_RACY_NS", 0)  # as if written long ago
    listed_hashes = [list_incoming_files(tmp_path)[0].content_hash for _ in range(3)]
    assert len(reads) == 3 and len(set(listed_hashes)) == 1
    # Same size, and the old mtime put back (cp -p, rsync -t): the ctime still moves, so it is read again.
    old = path.stat()
    path.write_text("text\nworld\n")
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    (relisted,) = list_incoming_files(tmp_path)
    assert len(reads) == 4 and relisted.content_hash == file_content_hash(path) != listed_hashes[0]


def test_a_folder_of_thousands_of_files_is_hashed_once_and_forgets_files_taken_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashed_files: list[str]
) -> None:
    for index in range(5_000):
        (tmp_path / f"batch_{index:05d}.csv").write_text(f"text\nquestion {index}\n")
    reads = hashed_files
    monkeypatch.setattr(ingest, "_RACY_NS", 0)  # as if written long ago
    list_incoming_files(tmp_path)
    list_incoming_files(tmp_path)
    assert len(reads) == 5_000
    (tmp_path / "batch_00000.csv").unlink()
    list_incoming_files(tmp_path)
    assert len(reads) == 5_000 and tmp_path / "batch_00000.csv" not in ingest._listed_hashes


def test_forced_format_needs_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("sentence1,sentence2,label,extra\na,b,1,x\n")
    assert _read(path).rejected_reason is not None
    forced = _read(path, PairFormat.BINARY)
    assert forced.rejected_reason is None and forced.pair_format is PairFormat.BINARY
    assert "needs columns" in _read(path, PairFormat.TRIPLET).rejected_reason


def test_a_csv_named_with_an_encoding_is_decoded_with_it(tmp_path: Path) -> None:
    (tmp_path / "legacy.latin-1.csv").write_bytes("text,label\ncafé crème,drinks\n".encode("latin-1"))
    (tmp_path / "office.cp1252.csv").write_bytes("text\n“quoted” \u2013 dash €\n".encode("cp1252"))
    (tmp_path / "wide.utf-16.csv").write_bytes("text\nnaïve\n".encode("utf-16"))
    latin = _read(tmp_path / "legacy.latin-1.csv")
    assert latin.rejected_reason is None and latin.source_file == "legacy.latin-1.csv"
    assert json.loads(latin.rows["record"][0]) == {"text": "café crème", "label": "drinks"}
    assert json.loads(_read(tmp_path / "office.cp1252.csv").rows["record"][0]) == {
        "text": "“quoted” \u2013 dash €"
    }
    assert json.loads(_read(tmp_path / "wide.utf-16.csv").rows["record"][0]) == {"text": "naïve"}


def test_a_csv_not_in_its_declared_encoding_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "office.cp1252.csv").write_bytes(b"text\nundefined \x81 byte\n")
    reason = _read(tmp_path / "office.cp1252.csv").rejected_reason
    assert reason is not None and reason.startswith("office.cp1252.csv: not valid cp1252")


@pytest.mark.parametrize("name", ["sales.2024.csv", "pairs.v2.csv", "notes.klingon.csv", "notes.base64.csv"])
def test_a_dotted_name_that_is_no_encoding_reads_as_utf8(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("text\ncafé crème\n", encoding="utf-8")
    read = _read(tmp_path / name)
    assert read.rejected_reason is None
    assert json.loads(read.rows["record"][0]) == {"text": "café crème"}


RUSSIAN = "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440"  # "hello world" in Cyrillic


def test_utf8_wins_over_an_encoding_the_name_happens_to_spell(tmp_path: Path) -> None:
    (tmp_path / "faq.cyrillic.csv").write_text(f"text\n{RUSSIAN}\n", encoding="utf-8")
    (tmp_path / "menu.latin.csv").write_text("text\ncafé\n", encoding="utf-8")
    (tmp_path / "old.cyrillic.csv").write_bytes(f"text\n{RUSSIAN}\n".encode("iso8859_5"))
    assert json.loads(_read(tmp_path / "faq.cyrillic.csv").rows["record"][0]) == {"text": RUSSIAN}
    assert json.loads(_read(tmp_path / "menu.latin.csv").rows["record"][0]) == {"text": "café"}
    assert json.loads(_read(tmp_path / "old.cyrillic.csv").rows["record"][0]) == {"text": RUSSIAN}


def test_a_non_utf8_csv_whose_name_declares_no_encoding_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "pairs.v2.csv").write_bytes("text\ncafé\n".encode("latin-1"))
    reason = _read(tmp_path / "pairs.v2.csv").rejected_reason
    assert reason is not None and reason.startswith("pairs.v2.csv: not valid utf-8")
    assert "export.cp1252.csv" in reason and "(line 2)" in reason


def test_an_undeclared_non_utf8_csv_is_told_how_to_declare_its_encoding(tmp_path: Path) -> None:
    (tmp_path / "latin1.csv").write_bytes("text\ncafé\n".encode("latin-1"))
    reason = _read(tmp_path / "latin1.csv").rejected_reason
    assert reason is not None and "not valid utf-8" in reason and "export.cp1252.csv" in reason


def _incoming_file(path: Path, incoming: Path, source_file: str | None = None) -> IncomingFile:
    return IncomingFile(
        source_file or path.name, path, file_content_hash(path), path.stat().st_size, incoming
    )


def test_a_file_outside_the_incoming_folder_is_refused(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    secret = tmp_path / "secret.csv"
    secret.write_text("text\nsecret\n")
    (incoming / "link.csv").symlink_to(secret)
    (incoming / "fine.csv").write_text("text\nhello\n")
    attempts = {
        "absolute": _incoming_file(secret, incoming),
        "dot_dot": _incoming_file(incoming / ".." / "secret.csv", incoming, "../secret.csv"),
        "link": _incoming_file(incoming / "link.csv", incoming),
    }
    for attempt, item in attempts.items():
        result = read_incoming_file(item)
        assert result.rejected_reason is not None, attempt
        assert ("outside" in result.rejected_reason) and result.rows.empty, attempt
    renamed = read_incoming_file(_incoming_file(incoming / "fine.csv", incoming, "other.csv"))
    assert renamed.rejected_reason is not None and "is not the file's name" in renamed.rejected_reason
    assert read_incoming_file(_incoming_file(incoming / "fine.csv", incoming)).rejected_reason is None


def test_a_jsonl_string_holding_unicode_line_separators_stays_one_row(tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl"
    text = "first\u2028second\u2029third\x85fourth"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\r\n" + '{"text": "next"}\n')
    result = _read(path)
    assert result.rows["row_number"].tolist() == [1, 2]
    assert result.rows["parse_error"].isna().all()
    assert json.loads(result.rows["record"][0]) == {"text": text}


def test_broken_csv_quoting_names_the_line_and_binary_junk_says_so(tmp_path: Path) -> None:
    (tmp_path / "quoting.csv").write_text('text,label\nfine,a\nalso fine,b\nbad,"b"x\n')
    (tmp_path / "junk.csv").write_bytes(bytes(range(256)) * 4)
    assert _read(tmp_path / "quoting.csv").rejected_reason == (
        "quoting.csv: broken CSV quoting in the record that starts on line 4: ',' expected after '\"'"
    )
    # A quote never closed swallows the rest of the file: the message names where it opened.
    (tmp_path / "open_quote.csv").write_text('text,label\nfine,a\n"never closed,b\n' + "more,c\n" * 50)
    reason = _read(tmp_path / "open_quote.csv").rejected_reason
    assert reason is not None and "record that starts on line 3" in reason
    assert "NUL bytes" in _read(tmp_path / "junk.csv").rejected_reason
    (tmp_path / "one_nul.csv").write_bytes(b"text,label\nfine,a\nbad\x00,b\n")
    reason = _read(tmp_path / "one_nul.csv").rejected_reason
    assert reason is not None and reason.endswith("NUL bytes (binary data?), first on line 3")
    # STS-B as distributed: tab-separated, no header, a quote in a sentence further down.
    (tmp_path / "sts-train.csv").write_text(
        "main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane is taking off.\tAn air plane, taking off.\n"
        'main-captions\tMSRvid\t2012test\t0004\t3.800\tA man "plays" a flute.\tA man plays the flute.\n'
    )
    assert _read(tmp_path / "sts-train.csv").rejected_reason == (
        "sts-train.csv: the first line is tab-separated: a .csv file is read comma-separated, with a header "
        "row naming the columns (save it as CSV, or convert it to JSONL or Parquet)"
    )


def test_a_file_changed_since_it_was_listed_is_left_for_the_next_run(tmp_path: Path) -> None:
    path = tmp_path / "texts.csv"
    path.write_text("text,label\nmy card is late,card_arrival\n")
    (listed,) = list_incoming_files(tmp_path)
    # Still being copied in: more rows land between the listing (and its hash) and the read.
    with path.open("a") as handle:
        handle.write("where is my card,card_arrival\n")
    with pytest.raises(FileChangedError, match=r"texts\.csv changed while it was read"):
        read_incoming_file(listed)
    path.write_text('text,label\n"unclosed,card_arrival\n')  # a broken copy is not rejected either
    with pytest.raises(FileChangedError):
        read_incoming_file(listed)
    (relisted,) = list_incoming_files(tmp_path)
    assert read_incoming_file(relisted).rejected_reason is not None


def test_jsonl_lines_too_deep_or_too_long_for_python_lose_only_themselves(tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl"
    deep = '{"text": ' + "[" * 5000 + "]" * 5000 + ', "label": "b"}'
    huge_number = '{"text": "count", "label": ' + "9" * 5000 + "}"
    path.write_text('{"text": "fine", "label": "a"}\n' + deep + "\n" + huge_number + "\n")
    result = _read(path)
    assert result.rejected_reason is None
    errors = result.rows.set_index("row_number")["parse_error"]
    assert pd.isna(errors[1])
    assert "RecursionError" in errors[2] and "unreadable JSON" in errors[3]


def test_a_jsonl_file_takes_its_columns_from_every_line(tmp_path: Path) -> None:
    # A writer that leaves out null keys: the first line alone would make this unlabelled texts.
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "no label yet"}\n{"text": "reset my password", "label": "password"}\n')
    result = _read(path)
    assert result.pair_format is PairFormat.LABELLED_TEXTS
    assert json.loads(result.rows["record"][1]) == {"text": "reset my password", "label": "password"}


def test_columns_that_share_a_name_reject_the_file_or_the_line(tmp_path: Path) -> None:
    (tmp_path / "twice.csv").write_text("Text,text,label\na,b,l\n")
    pd.DataFrame([["a", "b"]], columns=["text", "Text "]).to_parquet(tmp_path / "twice.parquet")
    for name in ("twice.csv", "twice.parquet"):
        assert "columns ['text'] appear more than once" in _read(tmp_path / name).rejected_reason
    (tmp_path / "twice.jsonl").write_text('{"text": "a", "label": "l"}\n{"Text": "a", "text": "b"}\n')
    errors = _read(tmp_path / "twice.jsonl").rows.set_index("row_number")["parse_error"]
    assert pd.isna(errors[1]) and "appear more than once" in errors[2]


def test_a_csv_field_longer_than_the_csv_module_default_is_read(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text('text,label\n"' + "x" * 200_000 + '",a\nhello,b\n')
    result = _read(path)
    assert result.rejected_reason is None
    assert len(json.loads(result.rows["record"][0])["text"]) == 200_000


def test_a_utf16_csv_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("text,label\ncafé,a\n".encode("utf-16"))
    result = _read(path)
    assert result.rejected_reason is None
    assert json.loads(result.rows["record"][0]) == {"text": "café", "label": "a"}


def test_parquet_binary_columns_are_read_as_text_and_bad_bytes_quarantined(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array([b"hello world", b"\xff\xfe bad"], pa.binary()), "label": ["a", "b"]})
    pq.write_table(table, tmp_path / "spark.parquet")
    result = _read(tmp_path / "spark.parquet")
    assert json.loads(result.rows["record"][0]) == {"text": "hello world", "label": "a"}
    assert pd.isna(result.rows["parse_error"][0])
    assert "not UTF-8 text" in result.rows["parse_error"][1]


def test_parquet_dates_outside_pythons_range_are_read_as_text(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    exported_at = pa.array([2**62, 0], pa.timestamp("ms"))  # the first far past year 9999
    table = pa.table(
        {"text": ["reset my password", "hello"], "label": ["pw", "hi"], "exported_at": exported_at}
    )
    pq.write_table(table, tmp_path / "export.parquet")
    # Its extra column matches no format, and the file is rejected for that, not left to crash the run.
    assert "match no pair format" in (_read(tmp_path / "export.parquet").rejected_reason or "")
    result = _read(tmp_path / "export.parquet", PairFormat.LABELLED_TEXTS)
    assert result.rejected_reason is None and len(result.rows) == 2
    assert "column 'exported_at' holds dates or times outside Python's range: read as text" in result.notes


def test_a_stray_key_on_one_jsonl_line_does_not_reject_the_file(tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl"
    path.write_text(
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "y", "note": "typo"}\n{"text": "c", "label": "z"}\n'
    )
    result = _read(path)
    assert result.rejected_reason is None and result.pair_format is PairFormat.LABELLED_TEXTS
    assert len(result.rows) == 3


def test_blank_header_names_do_not_collide(tmp_path: Path) -> None:
    path = tmp_path / "sheet.csv"
    path.write_text("text,label,,\nhello,a,,\n")
    result = _read(path, PairFormat.LABELLED_TEXTS)
    assert result.rejected_reason is None and len(result.rows) == 1


def test_unnamed_and_pandas_index_columns_are_left_unread(tmp_path: Path) -> None:
    frame = pd.DataFrame({"text": ["hello", "bye"], "label": ["a", "b"]}, index=[7, 3])
    frame.to_csv(tmp_path / "indexed.csv")  # header ",text,label"
    (tmp_path / "sheet.csv").write_text("text,label,,\nhello,a,,\nbye,b,,\n")
    frame.to_parquet(tmp_path / "indexed.parquet")  # the index as a column "__index_level_0__"
    for name in ("indexed.csv", "sheet.csv", "indexed.parquet"):
        result = _read(tmp_path / name)
        assert result.rejected_reason is None and result.pair_format is PairFormat.LABELLED_TEXTS, name
        assert [json.loads(record) for record in result.rows["record"]] == [
            {"text": "hello", "label": "a"},
            {"text": "bye", "label": "b"},
        ]
        assert result.notes and "not read" in result.notes[0]
    # The same rows from another export hash alike, so a second copy is a repeat, not new data.
    assert _read(tmp_path / "indexed.csv").rows["row_hash"].tolist() == (
        _read(tmp_path / "sheet.csv").rows["row_hash"].tolist()
    )


def test_a_configured_format_notes_the_columns_it_leaves_unread(tmp_path: Path) -> None:
    path = tmp_path / "triplets.csv"
    path.write_text("anchor,positive,negative\nq,a,n\n")
    result = _read(path, PairFormat.ANCHOR_POSITIVE)
    assert result.pair_format is PairFormat.ANCHOR_POSITIVE
    assert result.notes == ["columns ['negative'] are not read under pair_format anchor_positive"]


def test_a_jsonl_file_takes_every_key_of_its_first_line_whatever_their_order(tmp_path: Path) -> None:
    # As a CSV header "id,text,label" would be: an unknown column on the first line is not dropped.
    (tmp_path / "id_first.jsonl").write_text('{"id": 1, "text": "a", "label": "x"}\n')
    (tmp_path / "id_last.jsonl").write_text('{"text": "a", "label": "x", "id": 1}\n')
    assert _read(tmp_path / "id_first.jsonl").rejected_reason.startswith(
        "id_first.jsonl: columns ['id', 'text', 'label'] match no pair format"
    )
    assert _read(tmp_path / "id_last.jsonl").rejected_reason.startswith(
        "id_last.jsonl: columns ['text', 'label', 'id'] match no pair format"
    )


def test_a_jsonl_line_that_adds_an_input_column_is_named(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"t{number}"}) for number in range(1, 5)] + ['{"text": "t5", "label": "x"}']
    (tmp_path / "texts.jsonl").write_text("\n".join(lines) + "\n")
    result = _read(tmp_path / "texts.jsonl")
    assert result.pair_format is PairFormat.LABELLED_TEXTS
    assert result.notes == ["column(s) ['label'] first appear on line 5"]


def test_a_jsonl_line_that_is_not_utf8_loses_only_that_line(tmp_path: Path) -> None:
    (tmp_path / "texts.jsonl").write_bytes(
        b'{"text": "fine"}\n' + '{"text": "café"}\n'.encode("latin-1") + b'{"text": "also fine"}\n'
    )
    result = _read(tmp_path / "texts.jsonl")
    assert result.rejected_reason is None and len(result.rows) == 3
    assert result.rows["parse_error"].notna().tolist() == [False, True, False]
    assert result.rows["parse_error"][1].startswith("not valid utf-8")
    assert result.rows["row_number"].tolist() == [1, 2, 3]


def test_a_repeated_header_row_is_not_a_data_row(tmp_path: Path) -> None:
    (tmp_path / "joined.csv").write_text("text,label\nhello,a\nText, Label\nbye,b\n")
    result = _read(tmp_path / "joined.csv")
    assert result.rows["parse_error"].tolist()[1] == "repeats the header row (two files joined into one?)"
    assert pd.isna(result.rows["parse_error"][0]) and pd.isna(result.rows["parse_error"][2])


def test_a_row_with_the_wrong_field_count_is_kept_as_the_file_wrote_it(tmp_path: Path) -> None:
    (tmp_path / "pairs.csv").write_text('text,label\n"Hello, world",greet,extra\n')
    result = _read(tmp_path / "pairs.csv")
    assert json.loads(result.rows["record"][0]) == {"line": '"Hello, world",greet,extra'}
    assert result.rows["parse_error"][0] == "expected 2 fields, found 3"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("text;label\nhello;a\n", "the first line is semicolon-separated"),
        ("sep=;\ntext;label\nhello;a\n", "the first line is a spreadsheet's separator hint 'sep=;'"),
    ],
)
def test_spreadsheet_csv_dialects_are_named(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "excel.csv").write_text(content)
    reason = _read(tmp_path / "excel.csv").rejected_reason
    assert reason is not None and reason.startswith(f"excel.csv: {expected}")


def test_blank_lines_above_the_header_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "pairs.csv").write_text("\n\ntext,label\nhello,a\n")
    result = _read(tmp_path / "pairs.csv")
    assert result.rejected_reason is None and result.pair_format is PairFormat.LABELLED_TEXTS
    assert len(result.rows) == 1


def test_a_csv_declared_latin1_is_read_as_windows_1252(tmp_path: Path) -> None:
    text = "text\nit\u2019s \u201curgent\u201d \u2013 \u20ac5 fee\n"
    (tmp_path / "export.latin-1.csv").write_bytes(text.encode("cp1252"))
    # 0x81 is not a Windows-1252 character: it keeps its latin-1 meaning rather than failing the file.
    (tmp_path / "odd.latin-1.csv").write_bytes(b"text\nab\x81c\n")
    assert json.loads(_read(tmp_path / "export.latin-1.csv").rows["record"][0]) == {
        "text": "it\u2019s \u201curgent\u201d \u2013 \u20ac5 fee"
    }
    assert json.loads(_read(tmp_path / "odd.latin-1.csv").rows["record"][0]) == {"text": "ab\x81c"}


def test_file_names_are_stored_one_to_one_and_without_control_characters(tmp_path: Path) -> None:
    folder = os.fsencode(tmp_path)
    names = {
        b"caf\xe9.csv": "caf\\xe9.csv",  # a byte that is not UTF-8
        b"caf\\xe9.csv": "caf\\\\xe9.csv",  # the same characters, typed: another file, another name
        b"title\x1b]0;x\x07.csv": "title\\x1b]0;x\\x07.csv",  # a terminal escape sequence
        b"line\nbreak.csv": "line\\x0abreak.csv",
        "csi\u009b.csv".encode(): "csi\\u009b.csv",  # C1's control sequence introducer, valid UTF-8
        "café.csv".encode(): "café.csv",
    }
    for name in names:
        with open(os.path.join(folder, name), "w") as handle:
            handle.write("text,label\nhello,a\n")
    with open(os.path.join(folder, b"caf\xe9.parquet"), "wb") as handle:
        pd.DataFrame({"text": ["hello"], "label": ["a"]}).to_parquet(handle)
    names[b"caf\xe9.parquet"] = "caf\\xe9.parquet"
    listed = list_incoming_files(tmp_path)
    assert sorted(item.source_file for item in listed) == sorted(names.values())
    assert all(read_incoming_file(item).rejected_reason is None for item in listed)


def test_a_file_over_max_file_bytes_is_rejected_before_it_is_read(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "big.csv").write_text("text,label\n" + "hello there,a\n" * 100)
    # 1,000 repeats of one long text compress to a small file that holds much more.
    repeated = pa.table({"text": ["x" * 1000] * 1000, "label": ["a"] * 1000})
    pq.write_table(repeated, tmp_path / "packed.parquet", compression="zstd")
    packed_size = (tmp_path / "packed.parquet").stat().st_size
    assert packed_size < 100_000
    listed = {item.source_file: item for item in list_incoming_files(tmp_path)}
    csv_result = read_incoming_file(listed["big.csv"], max_bytes=1_000)
    assert csv_result.rows.empty
    assert csv_result.rejected_reason == (
        "big.csv: file is 1,411 bytes, over max_file_bytes (1,000): split it into smaller files"
    )
    parquet_result = read_incoming_file(listed["packed.parquet"], max_bytes=100_000)
    assert parquet_result.rows.empty and "file decodes to more than max_file_bytes (100,000): split it" in (
        parquet_result.rejected_reason or ""
    )
    assert len(read_incoming_file(listed["packed.parquet"], max_bytes=10_000_000).rows) == 1000
    # A pandas categorical is stored once per value: what counts is the size of every row's value.
    categorical = pd.DataFrame(
        {"text": pd.Categorical(["y" * 1000] * 1000), "label": pd.Categorical(["a"] * 1000)}
    )
    categorical.to_parquet(tmp_path / "categorical.parquet")
    (item,) = [item for item in list_incoming_files(tmp_path) if item.source_file == "categorical.parquet"]
    assert "file decodes to more than max_file_bytes (100,000)" in (
        read_incoming_file(item, max_bytes=100_000).rejected_reason or ""
    )
    assert json.loads(read_incoming_file(item, max_bytes=10_000_000).rows["record"][0])["label"] == "a"
