"""Validation assets and checks: GX suites, row-level quarantine, leak-free split."""

import json
import math
from collections import Counter
from collections.abc import Callable
from functools import cache

import dagster as dg
import pandas as pd

from st_assets.defs.resources import (
    WAREHOUSE_POOL,
    WarehouseResource,
    markdown_table,
    settings_code_version,
    table_metadata,
)
from st_assets.settings import Settings
from st_assets.steps.drift import label_drift, length_drift
from st_assets.steps.ingest import file_display_name, list_incoming_files
from st_assets.steps.models import require_base_model
from st_assets.steps.split import BRIDGE, assign_split, bridge_sides, largest_group_rows, leaking_texts
from st_assets.steps.validate import (
    DUPLICATE_RULE,
    ValidationRules,
    check_validated_pairs,
    raw_row_json,
    validate_pairs,
)
from st_assets.store.warehouse import Replacement, fetch_scalar, replace_tables, table_row_count

UNREADABLE_ROW_RULE = "row_readable"
# A file blocks the run only with this many quarantined rows: one bad row in a file of three is
# quarantined, and the rest goes on.
MIN_QUARANTINED_TO_BLOCK = 5
FILE_REJECTED_RULE = "file_readable"
SPLIT_BRIDGE_RULE = "split_bridge"
# The setting behind each text-length rule (<column>_length, <column>_tokens).
_LENGTH_SETTINGS = {"_length": "max_text_chars", "_tokens": "max_text_tokens"}


def _unreadable_rows(labelled_pairs: pd.DataFrame, raw_records: dict[tuple[str, int], str]) -> pd.DataFrame:
    """Quarantine rows for rows that could not be parsed (broken JSON line, wrong field count, bad score).

    ``raw_records`` maps (source file, row number) to the row as ``raw_texts`` read it, kept in ``raw_row``.
    """
    broken = labelled_pairs[labelled_pairs["parse_error"].notna()]
    return pd.DataFrame(
        {
            "source_file": broken["source_file"],
            "row_number": broken["row_number"],
            "format": broken["format"],
            "raw_row": [
                json.dumps(
                    {
                        "record": json.loads(raw_records.get((file, int(number)), "null")),
                        "parse_error": error,
                    },
                    ensure_ascii=False,
                )
                for file, number, error in zip(
                    broken["source_file"], broken["row_number"], broken["parse_error"], strict=True
                )
            ],
            "rule": UNREADABLE_ROW_RULE,
            "value": broken["parse_error"],
            "reason": [f"{error} (rule {UNREADABLE_ROW_RULE})" for error in broken["parse_error"]],
        }
    )


def _bridging_rows(pairs_with_split: pd.DataFrame) -> pd.DataFrame:
    """Quarantine rows for rows that would join texts earlier rows hold on both sides of the split."""
    sides = bridge_sides(pairs_with_split)
    bridging = pairs_with_split.loc[list(sides)]
    reasons = [
        "joins "
        + " and ".join(f"{text!r} ({side})" for text, side in sides[label])
        + f", which earlier rows hold on both sides of the train/eval split; kept out so that neither side "
        f"moves (rule {SPLIT_BRIDGE_RULE})"
        for label in sides
    ]
    return pd.DataFrame(
        {
            "source_file": bridging["source_file"].to_numpy(),
            "row_number": bridging["row_number"].to_numpy(),
            "format": bridging["format"].to_numpy(),
            "raw_row": [raw_row_json(row) for row in bridging.to_dict("records")],
            "rule": SPLIT_BRIDGE_RULE,
            "value": bridging["sentence1"].to_numpy(),
            "reason": reasons,
        }
    )


def _rejected_files(files: pd.DataFrame) -> pd.DataFrame:
    """One quarantine row per file rejected whole, with ``row_number`` NULL."""
    return pd.DataFrame(
        {
            "source_file": files["source_file"],
            "row_number": pd.array([None] * len(files), dtype="Int64"),
            "format": files["format"],
            "raw_row": None,
            "rule": FILE_REJECTED_RULE,
            "value": None,
            "reason": [f"{reason} (rule {FILE_REJECTED_RULE})" for reason in files["reason"]],
        }
    )


def reconcile_files(
    labelled_pairs: pd.DataFrame, valid: pd.DataFrame, quarantined: pd.DataFrame
) -> pd.DataFrame:
    """Per file: rows read, valid rows, quarantined rows; ``balanced`` is rows read == valid + quarantined."""
    read = labelled_pairs.groupby("source_file").size().rename("rows_read")
    kept = valid.groupby("source_file").size().rename("valid")
    rejected = (
        quarantined[quarantined["row_number"].notna()].groupby("source_file").size().rename("quarantined")
    )
    table = pd.concat([read, kept, rejected], axis=1).fillna(0).astype(int).reset_index(names="source_file")
    table["balanced"] = table["rows_read"] == table["valid"] + table["quarantined"]
    return table


def base_model_token_counter(base_model: str) -> Callable[[str], int]:
    """Token count of a text under the base model's tokenizer, special tokens included. The tokenizer
    (and transformers, which imports torch) loads on the first count, not as the definitions load."""

    @cache
    def tokenizer() -> Callable[[str], dict]:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(require_base_model(base_model))

    return lambda text: len(tokenizer()(text)["input_ids"])


def build_validation_assets(
    settings: Settings,
) -> tuple[list[dg.AssetsDefinition], list[dg.AssetChecksDefinition]]:
    """``validated_pairs`` and its blocking checks."""
    rules = ValidationRules(
        max_chars=settings.max_text_chars,
        max_tokens=settings.max_text_tokens,
        count_tokens=base_model_token_counter(settings.base_model) if settings.max_text_tokens else None,
    )

    @dg.asset(
        deps=["labelled_pairs"],
        group_name="validation",
        kinds={"duckdb", "pandas"},
        pool=WAREHOUSE_POOL,
        code_version=settings_code_version(
            "4",
            settings,
            # The token limit counts with the base model's tokenizer.
            {"eval_fraction", "seed", "max_text_chars", "max_text_tokens"}
            | ({"base_model"} if settings.max_text_tokens is not None else set()),
        ),
        owners=["team:ml-platform"],
        description=(
            "Rows that pass the format's Great Expectations suite, split train/eval by a stable hash so no "
            "text is on both sides (a triplet's negative aside: it is a distractor, often another row's "
            "positive). Failing rows go to pairs_quarantine with the rule and reason; a file "
            "rejected whole has one quarantine row with a NULL row_number."
        ),
    )
    def validated_pairs(
        context: dg.AssetExecutionContext, st_assets_warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        with st_assets_warehouse.connect() as connection:
            labelled = connection.execute(
                "SELECT * FROM labelled_pairs ORDER BY source_file, row_number"
            ).df()
            # With the rejected versions saved over files read before, whose earlier rows stay.
            rejected_files = connection.execute(
                "SELECT source_file, format, reason FROM ingested_files "
                "WHERE status = 'rejected' OR (status = 'ingested' AND reason IS NOT NULL)"
            ).df()
            raw_records = {
                (file, number): record
                for file, number, record in connection.execute(
                    "SELECT r.source_file, r.row_number, r.record FROM raw_texts r "
                    "JOIN labelled_pairs l USING (source_file, row_number) WHERE l.parse_error IS NOT NULL"
                ).fetchall()
            }
        readable = labelled[labelled["parse_error"].isna()].drop(columns="parse_error")
        outcome = validate_pairs(readable, rules)
        quarantined = pd.concat(
            [
                frame
                for frame in (
                    _rejected_files(rejected_files),
                    _unreadable_rows(labelled, raw_records),
                    outcome.quarantined_rows,
                )
                if len(frame)
            ]
            or [outcome.quarantined_rows],
            ignore_index=True,
        )
        split_pairs = assign_split(outcome.valid_pairs, settings.eval_fraction, settings.seed)
        bridges = split_pairs["split"] == BRIDGE
        if bridges.any():
            quarantined = pd.concat([quarantined, _bridging_rows(split_pairs)], ignore_index=True)
            split_pairs = split_pairs[~bridges]
        reconciliation = reconcile_files(labelled, split_pairs, quarantined)
        unbalanced = reconciliation[~reconciliation["balanced"]]
        if len(unbalanced):
            raise RuntimeError(
                f"rows lost between labelled and validated pairs: {unbalanced.to_dict('records')}"
            )
        with st_assets_warehouse.connect() as connection:
            replace_tables(
                connection,
                [Replacement("validated_pairs", split_pairs), Replacement("pairs_quarantine", quarantined)],
            )
            metadata = table_metadata(connection, "validated_pairs")
        rule_counts = Counter(quarantined["rule"])
        context.log.info(
            f"{len(split_pairs)} valid rows, {len(quarantined)} quarantined: {dict(rule_counts)}"
        )
        return dg.MaterializeResult(
            metadata={
                **metadata,
                "train_rows": int((split_pairs["split"] == "train").sum()),
                "eval_rows": int((split_pairs["split"] == "eval").sum()),
                "quarantined_rows": len(quarantined),
                "quarantine_by_rule": dg.MetadataValue.json(dict(rule_counts)),
                # Files whose rows do not add up first: the table shows the first rows only.
                "files": dg.MetadataValue.md(
                    markdown_table(reconciliation.sort_values("balanced", kind="stable").to_dict("records"))
                ),
            }
        )

    @dg.asset_check(
        asset=validated_pairs,
        blocking=True,
        description=(
            "Re-runs the Great Expectations suites on the validated rows, and fails when more than "
            f"{settings.max_quarantine_rate:.0%} of the rows of a file in incoming/ (and at least "
            f"{MIN_QUARANTINED_TO_BLOCK}) are quarantined for a reason other than repeating a row or bridging the split, or fewer than {settings.min_train_rows} train rows "
            "remain, or no eval rows. A file taken out of incoming/ no longer counts; its rows stay recorded."
        ),
    )
    def validation_suite(
        context: dg.AssetCheckExecutionContext, st_assets_warehouse: WarehouseResource
    ) -> dg.AssetCheckResult:
        with st_assets_warehouse.connect(read_only=True) as connection:
            valid = connection.execute("SELECT * EXCLUDE (split) FROM validated_pairs").df()
            train_rows = fetch_scalar(
                connection, "SELECT count(*) FROM validated_pairs WHERE split = 'train'"
            )
            read_rows = table_row_count(connection, "labelled_pairs")
            quarantined = connection.execute(
                "SELECT rule, count(*) AS n, any_value(reason) AS example FROM pairs_quarantine "
                "WHERE row_number IS NOT NULL GROUP BY rule ORDER BY n DESC"
            ).df()
            by_file = connection.execute(
                "SELECT l.source_file, count(*) AS rows, count(q.row_number) AS quarantined, "
                "min(q.row_number) AS example_row, arg_min(q.reason, q.row_number) AS example, "
                "arg_min(q.rule, q.row_number) AS example_rule "
                "FROM labelled_pairs l LEFT JOIN (SELECT DISTINCT ON (source_file, row_number) * "
                "FROM pairs_quarantine WHERE row_number IS NOT NULL AND rule NOT IN (?, ?)) q "
                "USING (source_file, row_number) GROUP BY l.source_file ORDER BY l.source_file",
                # Repeats and bridges are not bad rows: a renamed copy, a cumulative export or hard
                # negatives over texts already split must not block.
                [DUPLICATE_RULE, SPLIT_BRIDGE_RULE],
            ).df()
        summaries = check_validated_pairs(valid, rules)
        failed_expectations = [s for s in summaries if not s.success]
        quarantine_rate = quarantined["n"].sum() / read_rows if read_rows else 0.0
        present = (
            {file_display_name(path.name) for path in settings.incoming_dir.iterdir()}
            if settings.incoming_dir.is_dir()
            else set()
        )
        by_file["rate"] = by_file["quarantined"] / by_file["rows"]
        over = by_file[
            by_file["source_file"].isin(present)
            & (by_file["rate"] > settings.max_quarantine_rate)
            & (by_file["quarantined"] >= MIN_QUARANTINED_TO_BLOCK)
        ]
        problems = []
        if failed_expectations:
            problems.append(f"{len(failed_expectations)} expectations fail on validated rows")
        for row in over.itertuples():
            limit = next(
                (name for suffix, name in _LENGTH_SETTINGS.items() if str(row.example_rule).endswith(suffix)),
                None,
            )
            problems.append(
                f"{row.source_file}: {row.quarantined} of {row.rows} rows quarantined ({row.rate:.0%}, more "
                f"than {settings.max_quarantine_rate:.0%}), e.g. row {int(row.example_row)}: {row.example}; "
                "fix the file or take it out of incoming/"
                + (f" (or, for texts over the limit, raise {limit} in settings.yaml)" if limit else "")
            )
        eval_rows = len(valid) - train_rows
        no_eval = len(valid) > 0 and not eval_rows
        linked = ""
        if train_rows < settings.min_train_rows or no_eval:
            # Rows that share a text stay on one side: one group holding most rows can leave a side empty.
            largest = largest_group_rows(valid)
            if largest > len(valid) / 2:
                linked = (
                    f": {largest} of the {len(valid)} valid rows are linked by shared texts into one group, "
                    "and a group stays on one side of the split"
                )
        if train_rows < settings.min_train_rows:
            empty = (
                ""
                if list_incoming_files(settings.incoming_dir)
                else f" (no data file in {settings.incoming_dir})"
            )
            problems.append(
                f"only {train_rows} train rows{empty}; training needs at least {settings.min_train_rows}{linked}"
            )
        if no_eval:
            problems.append(f"no eval rows to score a challenger on{linked}")
        if problems:
            # The command line shows a failed check's name only: the reason goes to the run's log too.
            context.log.error("validation_suite failed: " + "; ".join(problems))
        return dg.AssetCheckResult(
            passed=not problems,
            description="; ".join(problems) or "all expectations pass; quarantine within bounds",
            metadata={
                "quarantine_rate": float(quarantine_rate),
                "largest_file_quarantine_rate": float(by_file["rate"].max()) if len(by_file) else 0.0,
                "train_rows": int(train_rows),
                "expectations": dg.MetadataValue.md(
                    markdown_table(
                        [
                            {
                                "format": s.format,
                                "rule": s.rule,
                                "success": s.success,
                                "unexpected": s.unexpected_count,
                                "rows": s.element_count,
                            }
                            for s in summaries
                        ]
                    )
                ),
                "quarantine_by_rule": dg.MetadataValue.md(markdown_table(quarantined.to_dict("records"))),
            },
        )

    @dg.asset_check(
        asset=validated_pairs,
        blocking=True,
        description=(
            "No normalised text (sentence1, sentence2; a triplet's negative aside) appears in both the train "
            "and the eval split."
        ),
    )
    def split_is_leak_free(
        context: dg.AssetCheckExecutionContext, st_assets_warehouse: WarehouseResource
    ) -> dg.AssetCheckResult:
        with st_assets_warehouse.connect(read_only=True) as connection:
            pairs = connection.execute("SELECT * FROM validated_pairs").df()
        leaks = leaking_texts(pairs)
        if leaks:
            context.log.error(
                f"split_is_leak_free failed: {len(leaks)} texts on both sides, e.g. {leaks[:3]}"
            )
        return dg.AssetCheckResult(
            passed=not leaks,
            description=(
                f"{len(leaks)} normalised texts are in both the train and the eval split, e.g. {leaks[:3]}"
                if leaks
                else "no text is in both the train and the eval split"
            ),
            metadata={"leaking_texts": len(leaks), "examples": dg.MetadataValue.json(leaks[:5])},
        )

    @dg.asset_check(
        asset=validated_pairs,
        description=(
            "WARN when the newest batch's label or length distribution differs sharply from the rows that "
            "arrived before it (labels: Jensen-Shannon distance with a chi-square test; lengths: Kolmogorov-Smirnov)."
        ),
    )
    def batch_distribution_stable(st_assets_warehouse: WarehouseResource) -> dg.AssetCheckResult:
        with st_assets_warehouse.connect(read_only=True) as connection:
            pairs = connection.execute("SELECT sentence1, label, arrived_at FROM validated_pairs").df()
        newest = pairs["arrived_at"] == pairs["arrived_at"].max()
        batch, history = pairs[newest], pairs[~newest]
        lengths = length_drift(history["sentence1"].tolist(), batch["sentence1"].tolist())
        labels = label_drift(history["label"].dropna().tolist(), batch["label"].dropna().tolist())
        tests = (("labels", labels), ("lengths", lengths))
        drifted = [name for name, result in tests if result.drifted]
        # A test without a statistic compared nothing: a pass must not read as "looks like history".
        not_compared = [
            f"{name} not compared: {result.detail}" for name, result in tests if math.isnan(result.statistic)
        ]
        if drifted:
            description = f"newest batch differs in {', '.join(drifted)}"
        elif len(not_compared) == len(tests):
            description = "; ".join(not_compared)
        else:
            description = "; ".join(["newest batch looks like history", *not_compared])
        return dg.AssetCheckResult(
            passed=not drifted,
            severity=dg.AssetCheckSeverity.WARN,
            description=description,
            metadata={
                "batch_rows": len(batch),
                "history_rows": len(history),
                "label_js_distance": float(labels.statistic),
                "length_ks_statistic": float(lengths.statistic),
                "labels": labels.detail,
                "lengths": lengths.detail,
            },
        )

    return [validated_pairs], [validation_suite, split_is_leak_free, batch_distribution_stable]
