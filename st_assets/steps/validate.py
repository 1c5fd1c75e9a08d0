"""Row-level validation of labelled_pairs with Great Expectations suites, quarantining every failing row."""

from __future__ import annotations

import functools
import json
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from st_assets.steps.formats import CONTENT_COLUMNS, INPUT_COLUMNS, PAIR_COLUMNS, TEXT_COLUMNS, PairFormat
from st_assets.steps.split import normalise_text

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuite
    from great_expectations.core.batch_definition import BatchDefinition
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult

QUARANTINE_COLUMNS: tuple[str, ...] = (
    "source_file",
    "row_number",
    "format",
    "raw_row",
    "rule",
    "value",
    "reason",
)
RAW_ROW_COLUMNS: tuple[str, ...] = ("sentence1", "sentence2", "negative", "score", "label")
DUPLICATE_RULE = "duplicate_row"
CONFLICTING_LABEL_RULE = "conflicting_label"
UNKNOWN_FORMAT_RULE = "unknown_format"
_MAX_VALUE_CHARS = 200

# GX context, datasource and batch definition are shared process-wide and are not thread-safe.
_GX_LOCK = threading.Lock()


@dataclass(frozen=True)
class ValidationRules:
    """Limits applied to every text column.

    ``max_tokens`` bounds each text's length as ``count_tokens`` measures it (the caller passes the
    model tokenizer's count): longer texts would be silently truncated in training, so they are
    quarantined instead. ``count_tokens`` alone does nothing; ``max_tokens`` alone is an error.
    """

    min_chars: int = 1
    max_chars: int = 2000
    max_tokens: int | None = None
    count_tokens: Callable[[str], int] | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.count_tokens is None:
            # A limit nothing measures would pass every text while looking enforced.
            raise ValueError(f"max_tokens={self.max_tokens} needs count_tokens to measure texts with")


@dataclass(frozen=True)
class ExpectationSummary:
    """One expectation's outcome on one format's rows, for display."""

    format: str
    rule: str
    expectation_type: str
    success: bool
    unexpected_count: int
    element_count: int


@dataclass
class ValidationOutcome:
    """Rows split into valid and quarantined, with per-rule failure counts and per-expectation summaries."""

    valid_pairs: pd.DataFrame
    quarantined_rows: pd.DataFrame
    rule_failures: dict[str, int]
    suite_results: list[ExpectationSummary]


def _display_names(pair_format: PairFormat) -> dict[str, str]:
    """labelled_pairs column -> the column name the user wrote, so reasons speak the user's language."""
    names = dict(zip(TEXT_COLUMNS[pair_format], INPUT_COLUMNS[pair_format], strict=False))
    if pair_format is PairFormat.BINARY:
        names["score"] = "label"
    return names


@functools.cache
def _batch_definition() -> BatchDefinition:
    """Build the ephemeral GX context once per process; importing GX alone takes seconds."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        # tqdm bars would otherwise flood the Dagster compute logs on every validation.
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(project_config=config, mode="ephemeral")
    asset = context.data_sources.add_pandas("st_assets").add_dataframe_asset("labelled_pairs")
    return asset.add_batch_definition_whole_dataframe("whole_dataframe")


def _token_count_column(column: str) -> str:
    return f"{column}_token_count"


def _normalised_column(column: str) -> str:
    return f"{column}_normalised"


_DISTINCT_TEXT_FORMATS = (PairFormat.TRIPLET, PairFormat.ANCHOR_POSITIVE)


@functools.cache
def _suite(
    pair_format: PairFormat, min_chars: int, max_chars: int, max_tokens: int | None
) -> ExpectationSuite:
    """The expectation suite for one format; each expectation's meta names its rule and column.

    Cached on the limits only, not on ``ValidationRules``, so a tokenizer passed in is never kept alive here.
    """
    import great_expectations as gx

    expectations: list[Any] = []
    text_columns = TEXT_COLUMNS[pair_format]
    for column in text_columns:
        expectations.append(
            gx.expectations.ExpectColumnValuesToNotBeNull(
                column=column, meta={"rule": f"{column}_not_null", "column": column}
            )
        )
    for column in text_columns:
        expectations.append(
            gx.expectations.ExpectColumnValueLengthsToBeBetween(
                column=column,
                min_value=min_chars,
                max_value=max_chars,
                meta={"rule": f"{column}_length", "column": column},
            )
        )
    if max_tokens is not None:
        # GX has no tokenizer-aware expectation; _run_suite adds a count column per text to bound instead.
        for column in text_columns:
            expectations.append(
                gx.expectations.ExpectColumnValuesToBeBetween(
                    column=_token_count_column(column),
                    max_value=max_tokens,
                    meta={"rule": f"{column}_tokens", "column": column},
                )
            )
    if pair_format in (PairFormat.SCORED, PairFormat.BINARY):
        expectations.append(
            gx.expectations.ExpectColumnValuesToNotBeNull(
                column="score", meta={"rule": "score_not_null", "column": "score"}
            )
        )
    if pair_format is PairFormat.SCORED:
        expectations.append(
            gx.expectations.ExpectColumnValuesToBeBetween(
                column="score",
                min_value=0.0,
                max_value=1.0,
                meta={"rule": "score_in_range", "column": "score"},
            )
        )
    if pair_format is PairFormat.BINARY:
        expectations.append(
            gx.expectations.ExpectColumnValuesToBeInSet(
                column="score", value_set=[0.0, 1.0], meta={"rule": "score_is_binary", "column": "score"}
            )
        )
    if pair_format in _DISTINCT_TEXT_FORMATS:
        expectations.append(
            gx.expectations.ExpectSelectColumnValuesToBeUniqueWithinRecord(
                # Compared as the split and an uncased tokenizer see them: "Reset" and "reset " are one text.
                column_list=[_normalised_column(column) for column in text_columns],
                # A missing text already fails its not_null rule; two NaNs are not "the same text".
                ignore_row_if="any_value_is_missing",
                meta={"rule": "texts_distinct", "column": ",".join(text_columns)},
            )
        )
    if pair_format is PairFormat.LABELLED_TEXTS:
        expectations.append(
            gx.expectations.ExpectColumnValuesToNotBeNull(
                column="label", meta={"rule": "label_not_null", "column": "label"}
            )
        )
        expectations.append(
            gx.expectations.ExpectColumnValuesToMatchRegex(
                column="label", regex=r"\S", meta={"rule": "label_not_blank", "column": "label"}
            )
        )
    return gx.ExpectationSuite(name=f"labelled_pairs_{pair_format.value}", expectations=expectations)


def _checked_columns(pair_format: PairFormat) -> list[str]:
    extra = {PairFormat.SCORED: ["score"], PairFormat.BINARY: ["score"], PairFormat.LABELLED_TEXTS: ["label"]}
    return [*TEXT_COLUMNS[pair_format], *extra.get(pair_format, [])]


def _run_suite(
    rows: pd.DataFrame, pair_format: PairFormat, rules: ValidationRules, result_format: str
) -> list[ExpectationValidationResult]:
    """Validate one format's rows; the frame's index is reset so unexpected_index_list holds positions."""
    # Only the checked columns: GX hashes the whole frame for batch markers, which dominates its cost.
    frame = rows.loc[:, _checked_columns(pair_format)].reset_index(drop=True)
    if rules.max_tokens is not None and rules.count_tokens is not None:
        for column in TEXT_COLUMNS[pair_format]:
            frame[_token_count_column(column)] = _token_counts(frame[column], rules.count_tokens)
    if pair_format in _DISTINCT_TEXT_FORMATS:
        for column in TEXT_COLUMNS[pair_format]:
            frame[_normalised_column(column)] = [
                None if _is_missing(text) else normalise_text(str(text)) for text in frame[column]
            ]
    suite = _suite(pair_format, rules.min_chars, rules.max_chars, rules.max_tokens)
    with _GX_LOCK:
        batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite, result_format={"result_format": result_format})
    # GX groups results by column, not suite order; suite order decides a row's first (reported) rule.
    order = {expectation.meta["rule"]: i for i, expectation in enumerate(suite.expectations)}
    results = sorted(result.results, key=lambda r: order[r.expectation_config.meta["rule"]])
    for expectation_result in results:
        info = expectation_result.exception_info or {}
        # GX reports a crashing expectation as a plain failure; surface it instead of quarantining nothing.
        if info.get("raised_exception"):
            rule = expectation_result.expectation_config.meta["rule"]
            raise RuntimeError(
                f"GX expectation {rule} for {pair_format} raised: {info.get('exception_message')}"
            )
    return results


def _token_counts(texts: pd.Series, count_tokens: Callable[[str], int]) -> pd.Series:
    """Tokens per text; NaN for a missing text, which its not_null rule reports instead."""
    counts = [math.nan if _is_missing(text) else float(count_tokens(str(text))) for text in texts]
    return pd.Series(counts, index=texts.index, dtype="float64")


def _summary(pair_format: PairFormat, expectation_result: ExpectationValidationResult) -> ExpectationSummary:
    config = expectation_result.expectation_config
    return ExpectationSummary(
        format=pair_format.value,
        rule=config.meta["rule"],
        expectation_type=config.type,
        success=bool(expectation_result.success),
        unexpected_count=int(expectation_result.result.get("unexpected_count") or 0),
        element_count=int(expectation_result.result.get("element_count") or 0),
    )


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _value_text(value: Any) -> str:
    """A cell as the user would have written it: '' for missing, '1' not '1.0' for whole floats."""
    if _is_missing(value):
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(float(value))
    text = str(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS] + "…"


def raw_row_json(row: Mapping[str, Any]) -> str:
    """The row's text, score and label columns as JSON, as ``pairs_quarantine.raw_row`` keeps them."""
    payload: dict[str, Any] = {}
    for column in RAW_ROW_COLUMNS:
        value = row[column]
        if _is_missing(value):
            payload[column] = None
        elif isinstance(value, float):
            payload[column] = float(value)
        else:
            payload[column] = str(value)
    return json.dumps(payload, ensure_ascii=False)


def _explain(
    rule: str, row: Mapping[str, Any], pair_format: PairFormat, rules: ValidationRules
) -> tuple[str, str]:
    """(value, reason) for one rule a row failed."""
    names = _display_names(pair_format)
    if rule == "texts_distinct":
        columns = TEXT_COLUMNS[pair_format]
        for i, first in enumerate(columns):
            for second in columns[i + 1 :]:
                if (
                    not _is_missing(row[first])
                    and not _is_missing(row[second])
                    and normalise_text(str(row[first])) == normalise_text(str(row[second]))
                ):
                    return (
                        _value_text(row[first]),
                        f"{names[first]} and {names[second]} are the same text (rule {rule})",
                    )
        return "", f"texts are not distinct (rule {rule})"
    if rule.endswith("_not_null"):
        column = rule.removesuffix("_not_null")
        return "", f"{names.get(column, column)} is empty (rule {rule})"
    if rule.endswith("_length"):
        column = rule.removesuffix("_length")
        value = row[column]
        return (
            _value_text(value),
            f"{names.get(column, column)} has {len(str(value))} characters, "
            f"outside [{rules.min_chars}, {rules.max_chars}] (rule {rule})",
        )
    if rule.endswith("_tokens") and rules.count_tokens is not None:
        column = rule.removesuffix("_tokens")
        value = row[column]
        return (
            _value_text(value),
            f"{names.get(column, column)} has {rules.count_tokens(str(value))} tokens, "
            f"more than the limit of {rules.max_tokens} (rule {rule})",
        )
    if rule == "score_in_range":
        value = _value_text(row["score"])
        return (
            value,
            f"score {value} outside [0, 1]: the score read, divided by the file's score_scale (rule {rule})",
        )
    if rule == "score_is_binary":
        value = _value_text(row["score"])
        return value, f"{names['score']} {value} is not 0 or 1 (rule {rule})"
    if rule == "label_not_blank":
        return _value_text(row["label"]), f"label is blank (rule {rule})"
    return "", f"failed rule {rule}"


def _empty_quarantine() -> pd.DataFrame:
    return pd.DataFrame(
        {
            column: pd.Series(dtype="int64" if column == "row_number" else "str")
            for column in QUARANTINE_COLUMNS
        }
    )


def _require_columns(frame: pd.DataFrame) -> None:
    missing = [column for column in PAIR_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"labelled_pairs is missing columns {missing}")


def _duplicate_of(rows: pd.DataFrame) -> pd.Series:
    """For each later copy of an identical row, the index label of its first copy: the earliest to
    arrive, then in (file, row) order. A new file that repeats old rows never displaces them."""
    order = [column for column in ("arrived_at", "source_file", "row_number") if column in rows.columns]
    ordered = rows.sort_values(order, kind="stable", na_position="last")
    keys = [ordered[column] for column in CONTENT_COLUMNS]
    first = (
        ordered.index.to_series(index=ordered.index)
        .groupby(keys, dropna=False, sort=False)
        .transform("first")
    )
    return first[first != first.index.to_series(index=first.index)]


def _conflicting_label_of(rows: pd.DataFrame) -> pd.Series:
    """For each labelled text whose text an earlier row gave another label, that earlier row's index label.

    The earliest-arrived label stands; a text under two labels would be its own negative in training.
    """
    texts = rows[rows["format"] == PairFormat.LABELLED_TEXTS.value]
    order = [column for column in ("arrived_at", "source_file", "row_number") if column in texts.columns]
    ordered = texts.sort_values(order, kind="stable", na_position="last")
    # Texts compared as the split compares them: "Card lost" and "card lost" are one text.
    same_text = ordered["sentence1"].map(normalise_text)
    first = ordered.index.to_series(index=ordered.index).groupby(same_text, sort=False).transform("first")
    first_label = ordered.loc[first.to_numpy(), "label"].to_numpy()
    return first[ordered["label"].to_numpy() != first_label]


def _quarantine_record(row: Mapping[str, Any], rule: str, value: str, reason: str) -> dict[str, Any]:
    return {
        "source_file": str(row["source_file"]),
        "row_number": int(row["row_number"]),
        "format": _value_text(row["format"]),
        "raw_row": raw_row_json(row),
        "rule": rule,
        "value": value,
        "reason": reason,
    }


def validate_pairs(labelled_pairs: pd.DataFrame, rules: ValidationRules) -> ValidationOutcome:
    """Run each format's suite, quarantine failing rows (once, all rules named), then exact duplicates.

    ``rule_failures`` counts, per rule, every row that failed it, so a row failing two rules counts twice.
    """
    if labelled_pairs.empty:
        valid = (
            labelled_pairs.copy() if len(labelled_pairs.columns) else pd.DataFrame(columns=list(PAIR_COLUMNS))
        )
        return ValidationOutcome(valid, _empty_quarantine(), {}, [])
    _require_columns(labelled_pairs)
    # Positions, not the caller's index, identify rows: that index may be anything, even non-unique.
    frame = labelled_pairs.reset_index(drop=True)

    known = {pair_format.value: pair_format for pair_format in PairFormat}
    failed: dict[int, list[str]] = {}
    summaries: list[ExpectationSummary] = []
    validated: list[PairFormat] = []
    for format_value, rows in frame.groupby("format", sort=True, dropna=False):
        pair_format = known.get(format_value)
        if pair_format is None:
            for position in rows.index:
                failed[position] = [UNKNOWN_FORMAT_RULE]
            continue
        validated.append(pair_format)
        for expectation_result in _run_suite(rows, pair_format, rules, "COMPLETE"):
            summaries.append(_summary(pair_format, expectation_result))
            rule = expectation_result.expectation_config.meta["rule"]
            for position in expectation_result.result.get("unexpected_index_list") or []:
                failed.setdefault(int(rows.index[position]), []).append(rule)

    remaining = frame.drop(index=list(failed))
    duplicate_of = _duplicate_of(remaining)
    conflict_of = _conflicting_label_of(remaining.drop(index=duplicate_of.index))
    for pair_format in validated:
        of_format = remaining["format"] == pair_format.value
        count = int(of_format.loc[duplicate_of.index].sum())
        summaries.append(
            ExpectationSummary(
                pair_format.value,
                DUPLICATE_RULE,
                "pandas_duplicated_keep_first",
                count == 0,
                count,
                int(of_format.sum()),
            )
        )
        if pair_format is PairFormat.LABELLED_TEXTS:
            summaries.append(_conflict_summary(len(conflict_of), int(of_format.sum())))

    # Plain dicts: Series access per cell is ~100x slower and thousands of rows may fail.
    involved = {
        *failed,
        *duplicate_of.index,
        *duplicate_of.tolist(),
        *conflict_of.index,
        *conflict_of.tolist(),
    }
    rows_by_position = frame.loc[sorted(involved)].to_dict("index")
    records: list[dict[str, Any]] = []
    rule_failures: Counter[str] = Counter()
    for position, failed_rules in failed.items():
        row = rows_by_position[position]
        rule_failures.update(failed_rules)
        pair_format = known.get(row["format"])
        if pair_format is None:
            value = _value_text(row["format"])
            explained = [(value, f"format {value!r} is not a known pair format (rule {UNKNOWN_FORMAT_RULE})")]
        else:
            explained = [_explain(rule, row, pair_format, rules) for rule in failed_rules]
        reason = "; ".join(text for _, text in explained)
        records.append(_quarantine_record(row, failed_rules[0], explained[0][0], reason))
    for position, first_position in duplicate_of.items():
        row = rows_by_position[position]
        first = rows_by_position[first_position]
        rule_failures[DUPLICATE_RULE] += 1
        kept_at = f"{first['source_file']} row {int(first['row_number'])}"
        # The first copy's own fate is its own row's: a later rule (a label conflict, a split bridge) may
        # quarantine it too.
        reason = f"duplicate of {kept_at}, its first copy (rule {DUPLICATE_RULE})"
        records.append(_quarantine_record(row, DUPLICATE_RULE, _value_text(row["sentence1"]), reason))
    for position, first_position in conflict_of.items():
        row = rows_by_position[position]
        first = rows_by_position[first_position]
        rule_failures[CONFLICTING_LABEL_RULE] += 1
        reason = (
            f"label {_value_text(row['label'])!r}, but {first['source_file']} row {int(first['row_number'])} "
            f"labelled the same text {_value_text(first['label'])!r} first (rule {CONFLICTING_LABEL_RULE})"
        )
        records.append(_quarantine_record(row, CONFLICTING_LABEL_RULE, _value_text(row["label"]), reason))

    quarantined = _empty_quarantine()
    if records:
        quarantined = (
            pd.DataFrame.from_records(records, columns=list(QUARANTINE_COLUMNS))
            .sort_values(["source_file", "row_number"], kind="stable")
            .reset_index(drop=True)
        )
    kept = remaining.index.difference(duplicate_of.index).difference(conflict_of.index)
    valid = labelled_pairs.iloc[kept.to_numpy()]
    return ValidationOutcome(valid, quarantined, dict(rule_failures), summaries)


def check_validated_pairs(valid_pairs: pd.DataFrame, rules: ValidationRules) -> list[ExpectationSummary]:
    """Re-run every format's suite and the duplicate check on rows that already passed; all should succeed."""
    if valid_pairs.empty:
        return []
    _require_columns(valid_pairs)
    frame = valid_pairs.reset_index(drop=True)
    known = {pair_format.value: pair_format for pair_format in PairFormat}
    duplicates = _duplicate_of(frame)
    conflicts = _conflicting_label_of(frame)
    summaries: list[ExpectationSummary] = []
    for format_value, rows in frame.groupby("format", sort=True, dropna=False):
        pair_format = known.get(format_value)
        if pair_format is None:
            summaries.append(
                ExpectationSummary(
                    str(format_value), UNKNOWN_FORMAT_RULE, "known_format", False, len(rows), len(rows)
                )
            )
            continue
        summaries.extend(
            _summary(pair_format, result) for result in _run_suite(rows, pair_format, rules, "BASIC")
        )
        count = int(rows.index.isin(duplicates.index).sum())
        summaries.append(
            ExpectationSummary(
                pair_format.value,
                DUPLICATE_RULE,
                "pandas_duplicated_keep_first",
                count == 0,
                count,
                len(rows),
            )
        )
        if pair_format is PairFormat.LABELLED_TEXTS:
            summaries.append(_conflict_summary(len(conflicts), len(rows)))
    return summaries


def _conflict_summary(conflicts: int, rows: int) -> ExpectationSummary:
    return ExpectationSummary(
        PairFormat.LABELLED_TEXTS.value,
        CONFLICTING_LABEL_RULE,
        "pandas_one_label_per_text",
        conflicts == 0,
        conflicts,
        rows,
    )
