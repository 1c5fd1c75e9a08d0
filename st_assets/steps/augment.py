"""Counterfactual data augmentation (two-sided CDA): swap demographic terms from an editable term map.

The bundled map is ``st_assets/probes/counterfactual_terms.json``; a file of the same shape named
``counterfactual_terms.json`` in ``ST_ASSETS_HOME`` extends or overrides it. Swapping rules:

- Whole words only (unicode word boundaries): "history", "shepherd", "Hermann", "mankind" stay.
  A hyphen is a boundary ("father-in-law" -> "mother-in-law"). The map's ``keep`` compounds and
  fixed phrases are left whole ("man-made", "Burger King").
- Case follows the original: he/He/HE -> she/She/SHE. A lowercase term matches in any case; a
  term written with a capital (a name) matches only as written or in capitals, so "Bill" swaps
  and "bill" (an invoice) does not.
- Possessives come for free: "John's" -> "Amy's", "men's" -> "women's".
- "her"/"his" map to two words each. Rule: "her" -> "his" when the next word is noun-like, else
  "him"; "his" -> "her" when a word follows that is not a verb or conjunction, else "hers"; "hers" ->
  "his". Noun-like means the next token is a word outside a small list of function words and common
  verbs, so "her car" -> "his car", "to her." -> "to him.", "gave her a" -> "gave him a", "is his." ->
  "is hers.", "his only card" -> "her only card". In "his or her", "her/his" and "his and her" both
  words look past the pair ("his or her card" -> "her or his card"). It is a heuristic: "send her
  money" reads as possessive ("send his money").
- "a"/"an" before a swapped word is re-chosen by its first letter ("a young" -> "an old").

Names are paired within gender only; swapping names across ethnic groups is not a clean
counterfactual (a name also carries region, class and era), so the race probe's names are not
in the map.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from types import MappingProxyType

import pandas as pd

from st_assets.steps.formats import CONTENT_COLUMNS
from st_assets.steps.split import normalise_text

BUNDLED_TERM_MAP = Path(__file__).resolve().parent.parent / "probes" / "counterfactual_terms.json"

# The user's extension lives here under ST_ASSETS_HOME.
USER_TERM_MAP_NAME = "counterfactual_terms.json"

# Age is in the map but not swapped by default: "old" often means former or aged N ("my old card",
# "18 or older"), where a swap changes the meaning and so the label.
DEFAULT_GROUPS: tuple[str, ...] = ("gender", "gender_names")

# Columns of labelled_pairs that hold text (see formats.TEXT_COLUMNS).
TEXT_COLUMNS: tuple[str, ...] = ("sentence1", "sentence2", "negative")

# Words with two counterparts: (before a noun-like word, otherwise).
_DETERMINER_RULE: dict[str, tuple[str, str]] = {"her": ("his", "him"), "his": ("her", "hers")}

# Words after "his" that make it a pronoun ("his is bigger", "his and mine"). "his" is a determiner far
# more often than "her" is ("his back", "his only card", "his will"), so its list is short.
# fmt: off
_HIS_PRONOUN_NEXT = frozenset(
    ["is", "was", "are", "were", "and", "or", "but", "nor", "too", "as", "than", "not", "also", "alone", "if",
     "so", "yet", "then", "now"]
)
# fmt: on

# "his or her", "her and his", "his/her": both words take the rule from the word after the pair. Only a
# pair of the two different words counts: in "ask her and her husband" the first "her" is an object.
_COORDINATED_RE = re.compile(r"\s*(?:/|\s(?:or|and)\s)\s*(his|hers|her)\b", re.IGNORECASE)
_PAIRED_WITH = {"his": ("her", "hers"), "her": ("his",)}

# Words after "her"/"his" that signal a pronoun rather than a determiner ("told her that", "his is",
# "let her go"). Verbs that are also common nouns ("her work", "her call") are left out on purpose.
# fmt: off
_NOT_A_NOUN = frozenset(
    [
        "a", "an", "the", "and", "or", "but", "nor", "so", "yet", "if", "then", "than", "that", "this",
        "these", "those", "there", "here", "now", "today", "tonight", "to", "of", "in", "on", "at", "for",
        "with", "from", "by", "about", "as", "into", "onto", "over", "under", "up", "down", "out", "off",
        "away", "back", "again", "is", "was", "are", "were", "be", "been", "being", "am", "will", "would",
        "can", "could", "shall", "should", "may", "might", "must", "do", "does", "did", "has", "have", "had",
        "not", "no", "never", "too", "very", "also", "just", "only", "even", "still", "all", "some", "any",
        "every", "each", "both", "it", "its", "i", "me", "my", "we", "us", "our", "you", "your", "he", "him",
        "his", "she", "her", "hers", "they", "them", "their", "who", "whom", "whose", "which", "what", "where",
        "when", "why", "how", "because", "since", "until", "while", "after", "before", "through", "like",
        "please", "already", "ever", "either", "neither", "go", "know", "come", "see", "feel", "get", "say",
        "tell", "think", "make", "take", "give", "find", "understand", "receive", "send",
    ]
)
# fmt: on

_TERM_RE = re.compile(r"[^\W\d_]+")
_NEXT_WORD_RE = re.compile(r"\s+(\w+)")
_ARTICLE_RE = re.compile(r"(?<!\w)(an?)(\s+)$", re.IGNORECASE)
_VOWELS = frozenset("aeiou")


def _is_name(term: str) -> bool:
    return not term.islower()


def _match_case(template: str, word: str) -> str:
    if len(template) > 1 and template.isupper():
        return word.upper()
    if template[0].isupper():
        return word[0].upper() + word[1:]
    return word


@dataclass(frozen=True)
class _Swapper:
    """A term map compiled for one selection of groups."""

    common: Mapping[str, str]
    names: Mapping[str, tuple[str, str]]
    ambiguous: Mapping[str, tuple[str, str]]
    pattern: re.Pattern[str] | None

    @classmethod
    def compile(cls, pairs: Iterable[tuple[str, str]], keep: Iterable[str]) -> _Swapper:
        targets: dict[str, set[str]] = {}
        for a, b in pairs:
            targets.setdefault(a, set()).add(b)
            targets.setdefault(b, set()).add(a)
        common: dict[str, str] = {}
        names: dict[str, tuple[str, str]] = {}
        ambiguous: dict[str, tuple[str, str]] = {}
        for term, options in targets.items():
            if len(options) > 1:
                if options != set(_DETERMINER_RULE.get(term, ())):
                    raise ValueError(
                        f"{term!r} would swap to any of {sorted(options)}; only her/his have a rule to choose"
                    )
                ambiguous[term] = _DETERMINER_RULE[term]
            elif _is_name(term):
                (target,) = options
                names[term] = names[term.upper()] = (term, target)
            else:
                (common[term],) = options
        if not targets:
            return cls(common, names, ambiguous, None)
        terms = sorted({t.lower() for t in targets}, key=len, reverse=True)
        alternatives = [rf"(?P<term>\b(?:{'|'.join(map(re.escape, terms))})\b)"]
        if keep:
            kept = sorted(keep, key=len, reverse=True)
            # Listed first so a compound claims its span before its first word can match as a term.
            # Lookarounds, not \b: an entry may start or end with punctuation, as "(s)he" does.
            alternatives.insert(0, rf"(?P<keep>(?<!\w)(?:{'|'.join(map(re.escape, kept))})(?!\w))")
        return cls(common, names, ambiguous, re.compile("|".join(alternatives), re.IGNORECASE))

    def _replacement(self, text: str, match: re.Match[str]) -> tuple[str, str] | None:
        word = match.group(0)
        # A name written as a name wins over a common word with the same letters.
        if word in self.names:
            term, target = self.names[word]
            return term, _match_case(word, target)
        lower = word.lower()
        if lower in self.ambiguous:
            coordinated = _COORDINATED_RE.match(text, match.end())
            if coordinated and coordinated.group(1).lower() not in _PAIRED_WITH[lower]:
                coordinated = None
            following = _NEXT_WORD_RE.match(text, coordinated.end() if coordinated else match.end())
            function_words = _HIS_PRONOUN_NEXT if lower == "his" else _NOT_A_NOUN
            noun_like = following is not None and following.group(1).lower() not in function_words
            before_noun, otherwise = self.ambiguous[lower]
            return lower, _match_case(word, before_noun if noun_like else otherwise)
        if lower in self.common:
            return lower, _match_case(word, self.common[lower])
        return None  # a name's letters in lower case ("bill")

    def swap(self, text: str) -> tuple[str, list[str]]:
        if self.pattern is None:
            return text, []
        pieces: list[str] = []
        swapped: list[str] = []
        last = 0
        for match in self.pattern.finditer(text):
            if match.group("term") is None:
                continue
            found = self._replacement(text, match)
            if found is None:
                continue
            term, replacement = found
            between = text[last : match.start()]
            article = _ARTICLE_RE.search(between)
            word = match.group(0)
            if article and (word[0].lower() in _VOWELS) != (replacement[0].lower() in _VOWELS):
                new_article = "an" if replacement[0].lower() in _VOWELS else "a"
                # "A" alone does not tell title case from capitals: the word after it does ("A JOHN").
                shouting = article.group(1).isupper() and (len(word) > 1 and word.isupper())
                new_article = new_article.upper() if shouting else _match_case(article.group(1), new_article)
                between = between[: article.start()] + new_article + article.group(2)
            pieces += [between, replacement]
            swapped.append(term)
            last = match.end()
        pieces.append(text[last:])
        return "".join(pieces), swapped


@dataclass(frozen=True)
class TermMap:
    """Word pairs by group, each swapped both ways, and compounds or phrases that are never swapped."""

    pairs: Mapping[str, tuple[tuple[str, str], ...]]
    keep: frozenset[str] = frozenset()

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.pairs)

    @cached_property
    def _swappers(self) -> dict[tuple[str, ...], _Swapper]:
        # Compiled once per group selection: the fairness probe swaps every eval text.
        return {}

    def swapper(self, groups: Iterable[str] | None = None) -> _Swapper:
        """The compiled swapper for ``groups`` (all groups when None); unknown group names raise."""
        selected = self.groups if groups is None else tuple(dict.fromkeys(groups))
        if unknown := [g for g in selected if g not in self.pairs]:
            raise ValueError(f"unknown term group(s) {unknown}; the term map has {list(self.groups)}")
        if selected not in self._swappers:
            pairs = [pair for group in selected for pair in self.pairs[group]]
            self._swappers[selected] = _Swapper.compile(pairs, self.keep)
        return self._swappers[selected]


def swap_terms(text: str, term_map: TermMap, groups: Iterable[str] | None = None) -> tuple[str, list[str]]:
    """``text`` with every mapped term of ``groups`` (all when None) swapped, and the terms swapped in order.

    Terms are reported as they appear in the map (lowercase words, names as written).
    """
    return term_map.swapper(groups).swap(text)


# ---------------------------------------------------------------------------------------------------------
# Loading


def _parse_term_file(path: Path) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read term map ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text at byte {exc.start} ({exc.reason})") from exc
    except RecursionError as exc:
        raise ValueError(f"{path}: JSON nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'groups' and optionally 'keep'")
    if unknown := [key for key in data if key not in ("groups", "keep") and not key.startswith("_")]:
        raise ValueError(f"{path}: unknown key(s) {unknown}; expected 'groups', 'keep' or '_'-prefixed notes")
    groups = data.get("groups", {})
    if not isinstance(groups, dict):
        raise ValueError(f"{path}: 'groups' must be an object of group name -> list of [a, b] pairs")
    parsed: dict[str, list[tuple[str, str]]] = {}
    for name, pairs in groups.items():
        if not isinstance(pairs, list):
            raise ValueError(f"{path}: group {name!r} must be a list of [a, b] pairs, got {pairs!r}")
        parsed[name] = []
        for i, pair in enumerate(pairs):
            where = f"{path}: group {name!r} pair {i}"
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise ValueError(f"{where}: expected a list of two words, got {pair!r}")
            # Texts are stored in NFC, so terms are compared in it too (an editor may save "fiancé" decomposed).
            a, b = pair = [unicodedata.normalize("NFC", term) for term in pair]
            if bad := [t for t in pair if not _TERM_RE.fullmatch(t)]:
                raise ValueError(
                    f"{where}: terms must be single words of letters, got {bad[0]!r} (words that need "
                    "combining marks, as in Devanagari or Thai, cannot be swapped)"
                )
            if a.lower() == b.lower():
                raise ValueError(f"{where}: a word cannot swap with itself, got {pair!r}")
            if _is_name(a) != _is_name(b):
                raise ValueError(f"{where}: {pair!r} mixes a capitalised name with a lowercase word")
            parsed[name].append((a, b))
    keep = data.get("keep", [])
    if not isinstance(keep, list) or not all(isinstance(k, str) and k.strip() for k in keep):
        raise ValueError(f"{path}: 'keep' must be a list of non-empty strings, got {keep!r}")
    return parsed, [unicodedata.normalize("NFC", k.strip().lower()) for k in keep]


def _term_map(pairs: dict[str, list[tuple[str, str]]], keep: Iterable[str], where: Path) -> TermMap:
    frozen = MappingProxyType({name: tuple(dict.fromkeys(p)) for name, p in pairs.items()})
    term_map = TermMap(pairs=frozen, keep=frozenset(keep))
    try:
        term_map.swapper()  # compiling all groups together finds a word with two counterparts
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return term_map


@cache
def _bundled_term_map() -> TermMap:
    # Cached so that thin callers (the fairness probe) share one compiled map.
    return _term_map(*_parse_term_file(BUNDLED_TERM_MAP), BUNDLED_TERM_MAP)


def load_term_map(user_file: Path | None = None) -> TermMap:
    """The bundled term map, merged with ``user_file`` (same JSON shape) when given.

    User groups are added; a user pair replaces every bundled pair that shares one of its words, and
    ``keep`` compounds are added. A malformed user file raises ``ValueError`` naming the file and problem.
    """
    bundled = _bundled_term_map()
    if user_file is None:
        return bundled
    user_file = Path(user_file)
    user_pairs, user_keep = _parse_term_file(user_file)
    overridden = {term for pairs in user_pairs.values() for pair in pairs for term in pair}
    merged = {
        name: [pair for pair in pairs if not overridden & set(pair)] for name, pairs in bundled.pairs.items()
    }
    for name, pairs in user_pairs.items():
        merged.setdefault(name, []).extend(pairs)
    return _term_map(merged, bundled.keep | set(user_keep), user_file)


def user_term_map_file(home: Path) -> Path | None:
    """``<home>/counterfactual_terms.json`` when the user has written one."""
    path = Path(home) / USER_TERM_MAP_NAME
    return path if path.is_file() else None


def load_swapped_groups(home: Path, groups: Iterable[str]) -> TermMap:
    """The term map of ``home`` (bundled plus the user's file), checked for swapping ``groups``.

    Raises ``ValueError`` for a group the map lacks, and for a group of the user's file that ``groups``
    leaves out: its pairs (and any bundled pair they replaced) would silently not be swapped.
    """
    user_file = user_term_map_file(home)
    term_map = load_term_map(user_file)
    selected = list(groups)
    term_map.swapper(selected)  # unknown names raise, naming the groups there are
    if user_file is not None:
        user_groups, _ = _parse_term_file(user_file)
        if unused := [name for name in user_groups if name not in selected]:
            raise ValueError(
                f"{user_file}: group(s) {unused} are not in counterfactual_groups {selected}; "
                "add them there, or remove them from the file"
            )
    return term_map


# ---------------------------------------------------------------------------------------------------------
# Augmentation


@dataclass(frozen=True)
class AugmentResult:
    """The training rows with their counterfactual copies appended, and what was added."""

    rows: pd.DataFrame
    added_rows: int
    terms_swapped: dict[str, int]
    # Each swapped text of a copy, mapped to the text it was swapped from: training keeps a row and its
    # copy apart as negatives of each other (they mean the same, so pushing them apart undoes CDA).
    original_of_text: dict[str, str]
    # Copies dropped because one of their texts is a held-out (eval) text.
    held_out_skipped: int = 0


def _content_key(row: Mapping[str, object]) -> tuple[object, ...]:
    return tuple(None if pd.isna(value) else value for value in row.values())


def counterfactual_augment(
    train_pairs: pd.DataFrame,
    term_map: TermMap,
    groups: Iterable[str] = DEFAULT_GROUPS,
    held_out_texts: Collection[str] = (),
) -> AugmentResult:
    """Append, for each row mentioning a mapped term, a copy with every text column swapped.

    Requirements:
        ``labelled_pairs`` columns (``sentence1``, and ``sentence2``/``negative`` where the format has them).
    Relations:
        The copy keeps score, label, format, ``source_file`` and ``row_number`` (lineage); its ``row_hash``
        is the original's plus ``":cda"``. A row whose swap changes nothing, whose copy equals a row
        already present, or whose copy holds one of ``held_out_texts`` (the eval split's, which training
        must not see) adds nothing. The swap rules are deterministic (nothing is sampled), so the
        same rows always give the same copies; training shuffles the rows.
    """
    swapper = term_map.swapper(groups)
    text_columns = [c for c in TEXT_COLUMNS if c in train_pairs.columns]
    content_columns = [c for c in CONTENT_COLUMNS if c in train_pairs.columns]
    seen = {_content_key(row) for row in train_pairs[content_columns].to_dict("records")}

    # Compared as the split compares texts: a copy differing from an eval text only in case is that text.
    held_out = {normalise_text(text) for text in held_out_texts}
    positions: list[int] = []
    swapped_columns: dict[str, list[object]] = {c: [] for c in text_columns}
    terms_swapped: Counter[str] = Counter()
    original_of_text: dict[str, str] = {}
    held_out_skipped = 0
    for position, row in enumerate(train_pairs[content_columns].to_dict("records")):
        row_terms: list[str] = []
        originals: dict[str, str] = {}
        for column in text_columns:
            if isinstance(row[column], str):
                original = row[column]
                row[column], terms = swapper.swap(original)
                row_terms += terms
                if row[column] != original:
                    originals[row[column]] = original
        key = _content_key(row)
        if not row_terms or key in seen:
            continue
        if held_out & {normalise_text(text) for text in originals}:
            held_out_skipped += 1
            continue
        seen.add(key)
        positions.append(position)
        for column in text_columns:
            swapped_columns[column].append(row[column])
        terms_swapped.update(row_terms)
        original_of_text.update(originals)

    added = train_pairs.iloc[positions].copy()
    for column, values in swapped_columns.items():
        added[column] = values
    if "row_hash" in added.columns:
        added["row_hash"] = added["row_hash"].astype(str) + ":cda"
    rows = pd.concat([train_pairs, added], ignore_index=True) if positions else train_pairs.copy()
    return AugmentResult(
        rows=rows,
        added_rows=len(positions),
        terms_swapped=dict(sorted(terms_swapped.items())),
        original_of_text=original_of_text,
        held_out_skipped=held_out_skipped,
    )
