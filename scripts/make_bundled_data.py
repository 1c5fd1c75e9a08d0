"""Write the bundled demo corpus: a seeded, intent-stratified sample of Banking77 as labelled texts, and
a second, disjoint sample of new rows to drop into incoming/ to watch the sensor retrain.

Usage: python scripts/make_bundled_data.py ../shared/data/banking77/train.csv data/incoming/banking77_support.csv data/examples/banking77_new_rows.csv
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

PER_INTENT = 39
# Up to 4 more texts of each intent: about 300 rows, more than the 200 new training rows that retrain.
NEW_PER_INTENT = 4
SEED = 7


def main(source: Path, target: Path, new_rows_target: Path) -> None:
    queries = pd.read_csv(source).rename(columns={"category": "label"})
    queries = queries.drop_duplicates("text")
    shuffled = queries.sample(frac=1.0, random_state=SEED)
    rank = shuffled.groupby("label").cumcount()
    for rows, path in (
        (shuffled[rank < PER_INTENT], target),
        (shuffled[(rank >= PER_INTENT) & (rank < PER_INTENT + NEW_PER_INTENT)], new_rows_target),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        rows[["text", "label"]].to_csv(path, index=False)
        print(f"wrote {len(rows)} texts over {rows['label'].nunique()} intents to {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
