"""Write the bundled demo corpus: a seeded, intent-stratified sample of Banking77 as labelled texts.

Usage: python scripts/make_bundled_data.py ../shared/data/banking77/train.csv data/incoming/banking77_support.csv
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

PER_INTENT = 39
SEED = 7


def main(source: Path, target: Path) -> None:
    queries = pd.read_csv(source).rename(columns={"category": "label"})
    queries = queries.drop_duplicates("text")
    shuffled = queries.sample(frac=1.0, random_state=SEED)
    sample = shuffled[shuffled.groupby("label").cumcount() < PER_INTENT]
    target.parent.mkdir(parents=True, exist_ok=True)
    sample[["text", "label"]].to_csv(target, index=False)
    print(f"wrote {len(sample)} texts over {sample['label'].nunique()} intents to {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
