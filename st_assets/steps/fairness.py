"""Bias probes for sentence encoders: SEAT/WEAT association tests and gender-swap counterfactual invariance."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from st_assets.steps.augment import DEFAULT_GROUPS, TermMap, load_term_map, swap_terms

Encode = Callable[[list[str]], np.ndarray]

PROBES_DIR = Path(__file__).resolve().parent.parent / "probes"

_SEAT_KEYS = ("targ1", "targ2", "attr1", "attr2")

# Partitions are scored in chunks so huge permutation counts never build one giant index matrix.
_CHUNK = 4096


class SeatFormatError(ValueError):
    """A SEAT JSONL file is malformed; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Category:
    """A named list of example sentences (one side of a SEAT target or attribute pair)."""

    name: str
    examples: tuple[str, ...]


@dataclass(frozen=True)
class AssociationTest:
    """A WEAT/SEAT test: do targets X lean to attributes A (and Y to B) more than chance?"""

    name: str
    targets_x: Category
    targets_y: Category
    attributes_a: Category
    attributes_b: Category


@dataclass(frozen=True)
class AssociationResult:
    """Effect size (Cohen's d style) and two-sided permutation p-value of one association test."""

    test: str
    effect_size: float
    p_value: float
    n_x: int
    n_y: int
    exact: bool


@dataclass(frozen=True)
class CounterfactualResult:
    """How similar each text's embedding stays when its gender terms and gendered names are swapped."""

    n_texts: int
    mean_cosine: float
    p05_cosine: float
    worst: list[tuple[str, str, float]]
    # Swaps left out because they changed the text only past the tokens a model reads.
    n_past_window: int = 0


# ---------------------------------------------------------------------------------------------------------
# Loading


def _parse_category(value: object, key: str, where: str) -> Category:
    if not isinstance(value, dict):
        raise SeatFormatError(f"{where}: {key!r} must be an object with 'category' and 'examples'")
    if "category" not in value:
        raise SeatFormatError(f"{where}: {key!r} is missing key 'category'")
    if "examples" not in value:
        raise SeatFormatError(f"{where}: {key!r} is missing key 'examples'")
    name, examples = value["category"], value["examples"]
    if not isinstance(name, str) or not name.strip():
        raise SeatFormatError(f"{where}: {key!r} 'category' must be a non-empty string")
    if not isinstance(examples, list):
        raise SeatFormatError(f"{where}: {key!r} 'examples' must be a list of strings")
    if not examples:
        raise SeatFormatError(f"{where}: {key!r} has an empty 'examples' list")
    for i, example in enumerate(examples):
        if not isinstance(example, str) or not example.strip():
            raise SeatFormatError(f"{where}: {key!r} example {i} must be a non-empty string, got {example!r}")
    return Category(name=name, examples=tuple(examples))


def _read_lines(path: Path) -> list[str]:
    """The file's lines as UTF-8 (a byte-order mark allowed); other encodings name the first bad line."""
    data = path.read_bytes()
    try:
        # Only "\n" ends a line (a trailing "\r" is JSON whitespace); U+2028 may sit inside a string.
        return data.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as exc:
        line_no = data[: exc.start].count(b"\n") + 1
        raise SeatFormatError(f"{path}, line {line_no}: not UTF-8 text ({exc.reason})") from exc


def user_test_paths(tests_dir: Path) -> list[Path]:
    """The ``*.jsonl`` files in ``tests_dir``, sorted; hidden files (editor locks, ``._`` forks) skipped."""
    if not tests_dir.is_dir():
        return []
    return sorted(p for p in tests_dir.glob("*.jsonl") if not p.name.startswith(".") and p.is_file())


def load_association_tests(paths: Iterable[Path]) -> list[AssociationTest]:
    """Read SEAT JSONL files; each line is one test named after the file stem (``<stem>_<n>`` for line n>1).

    Raises ``SeatFormatError`` (a ``ValueError``) naming file and line for malformed content or a
    duplicate test name.
    """
    tests: list[AssociationTest] = []
    seen: dict[str, Path] = {}
    for path in paths:
        path = Path(path)
        n_in_file = 0
        for line_no, line in enumerate(_read_lines(path), start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SeatFormatError(f"{where}: invalid JSON ({exc.msg})") from exc
            except RecursionError as exc:
                raise SeatFormatError(f"{where}: JSON nested too deeply") from exc
            if not isinstance(record, dict):
                raise SeatFormatError(f"{where}: expected a JSON object with keys {', '.join(_SEAT_KEYS)}")
            missing = [k for k in _SEAT_KEYS if k not in record]
            if missing:
                raise SeatFormatError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")
            x, y, a, b = (_parse_category(record[k], k, where) for k in _SEAT_KEYS)
            n_in_file += 1
            name = path.stem if n_in_file == 1 else f"{path.stem}_{n_in_file}"
            if name in seen:
                raise SeatFormatError(f"{where}: test name {name!r} already used by {seen[name]}")
            seen[name] = path
            tests.append(AssociationTest(name, x, y, a, b))
        if n_in_file == 0:
            raise SeatFormatError(f"{path}, line 1: file contains no tests")
    return tests


def bundled_test_paths() -> list[Path]:
    """The SEAT JSONL files shipped in ``st_assets/probes/``, sorted by name."""
    return sorted(PROBES_DIR.glob("*.jsonl"))


# ---------------------------------------------------------------------------------------------------------
# Association tests


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    # A zero vector has no direction; leaving it zero makes its cosine 0 rather than NaN.
    return matrix / np.where(norms == 0.0, 1.0, norms)


def _encode_unique(texts: Sequence[str], encode: Encode) -> dict[str, np.ndarray]:
    unique = list(dict.fromkeys(texts))
    vectors = np.asarray(encode(unique), dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(unique):
        raise ValueError(f"encode returned shape {vectors.shape}; expected ({len(unique)}, dim)")
    return dict(zip(unique, _unit_rows(vectors), strict=True))


def association_scores(targets: np.ndarray, attributes_a: np.ndarray, attributes_b: np.ndarray) -> np.ndarray:
    """s(w, A, B) = mean_a cos(w, a) - mean_b cos(w, b) for each row w of ``targets`` (rows unit-norm)."""
    return (targets @ attributes_a.T).mean(axis=1) - (targets @ attributes_b.T).mean(axis=1)


def _count_as_extreme(s: np.ndarray, subsets: np.ndarray, threshold: float) -> int:
    """Partitions whose statistic sum s(X_i) - sum s(Y_i) = 2 * sum s(X_i) - sum s is at least ``threshold``
    in absolute value."""
    return int((np.abs(2.0 * s[subsets].sum(axis=1) - s.sum()) >= threshold).sum())


def run_association_test(
    test: AssociationTest, encode: Encode, *, permutations: int = 10_000, seed: int = 0
) -> AssociationResult:
    """Effect size d and two-sided p-value of ``test``, exact when C(|X|+|Y|, |X|) <= ``permutations``.

    The p-value counts partitions (X_i, Y_i) of X u Y with |sum s(X_i) - sum s(Y_i)| >= |the observed
    value|: two-sided, as the gate weighs |d|, so a strong association either way reads as one. Sampled
    p-values are (count + 1) / (permutations + 1). ``effect_size`` is NaN when all s(w) are equal.
    """
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    cats = (test.targets_x, test.targets_y, test.attributes_a, test.attributes_b)
    vectors = _encode_unique([t for c in cats for t in c.examples], encode)
    x, y, a, b = (np.stack([vectors[t] for t in c.examples]) for c in cats)

    s = association_scores(np.vstack([x, y]), a, b)
    n_x, n_y = len(x), len(y)
    s_x, s_y = s[:n_x], s[n_x:]

    std = float(np.std(s, ddof=1))
    effect = float((s_x.mean() - s_y.mean()) / std) if std > 0 else math.nan

    # The tolerance keeps partitions that tie the observed one up to summation-order rounding.
    threshold = abs(2.0 * float(s_x.sum()) - float(s.sum())) - 1e-12 * max(1.0, float(np.abs(s).sum()))
    n = n_x + n_y
    n_partitions = math.comb(n, n_x)
    if n_partitions <= permutations:
        count = 0
        combos = itertools.combinations(range(n), n_x)
        while chunk := list(itertools.islice(combos, _CHUNK)):
            count += _count_as_extreme(s, np.array(chunk, dtype=np.intp).reshape(len(chunk), n_x), threshold)
        p_value = count / n_partitions
        exact = True
    else:
        rng = np.random.default_rng(seed)
        count, done = 0, 0
        while done < permutations:
            size = min(_CHUNK, permutations - done)
            order = rng.permuted(np.tile(np.arange(n), (size, 1)), axis=1)
            count += _count_as_extreme(s, order[:, :n_x], threshold)
            done += size
        p_value = (count + 1) / (permutations + 1)
        exact = False
    return AssociationResult(test.name, effect, p_value, n_x, n_y, exact)


# ---------------------------------------------------------------------------------------------------------
# Counterfactual gender swaps


def swap_gender_terms(
    text: str, term_map: TermMap | None = None, groups: Iterable[str] = DEFAULT_GROUPS
) -> str:
    """``text`` with the terms of ``groups`` (gender terms and gendered names) swapped by the term map.

    The rules (whole words, case, possessives, the her/his choice) live in ``st_assets.steps.augment``,
    so the probe measures the very swaps that ``augment: counterfactual`` trains on.
    """
    return swap_terms(text, load_term_map() if term_map is None else term_map, groups=groups)[0]


# Texts the invariance probe scores at most: enough for a stable mean, bounded in encoding time.
INVARIANCE_MAX_TEXTS = 2000


def counterfactual_invariance(
    texts: list[str],
    encode: Encode,
    *,
    n_worst: int = 10,
    term_map: TermMap | None = None,
    groups: Iterable[str] = DEFAULT_GROUPS,
    max_texts: int = INVARIANCE_MAX_TEXTS,
    read_differently: Callable[[str, str], bool] | None = None,
) -> CounterfactualResult:
    """Cosine between each text and its gender-swapped version, over texts the swap changes.

    Of more than ``max_texts`` such texts, a sample in hash order is scored: stable from run to run, and
    unlike a prefix in alphabetical order, not tilted towards "He ..." over "She ...".
    ``term_map`` defaults to the bundled one; pass ``load_term_map(user_file)`` to use the user's terms.
    ``worst`` lists up to ``n_worst`` (text, swapped, cosine) with the lowest cosine first. With no changed
    texts, ``n_texts`` is 0 and both cosines are NaN. ``read_differently(text, swapped)`` False leaves a
    swap out (counted in ``n_past_window``): one made past the tokens a model reads would score 1.0.
    """
    changed = [(t, swapped) for t in texts if (swapped := swap_gender_terms(t, term_map, groups)) != t]
    visible = [pair for pair in changed if read_differently is None or read_differently(*pair)]
    n_past_window = len(changed) - len(visible)
    pairs = sorted(visible, key=lambda pair: hashlib.sha256(pair[0].encode("utf-8")).digest())[:max_texts]
    if not pairs:
        return CounterfactualResult(0, math.nan, math.nan, [], n_past_window)
    vectors = _encode_unique([t for pair in pairs for t in pair], encode)
    cosines = np.array([float(vectors[t] @ vectors[s]) for t, s in pairs])
    order = np.argsort(cosines, kind="stable")[:n_worst]
    worst = [(pairs[i][0], pairs[i][1], float(cosines[i])) for i in order]
    return CounterfactualResult(
        n_texts=len(pairs),
        mean_cosine=float(cosines.mean()),
        p05_cosine=float(np.percentile(cosines, 5)),
        worst=worst,
        n_past_window=n_past_window,
    )
