"""Edge-case probes: how stable a model's similarity is under casing, typos, negation, length, emoji and scripts."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

Encode = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class Expectation:
    """What a kind of probe should do: keep the pair similar (mean cosine >= threshold) or tell it apart
    (mean cosine <= threshold), and why."""

    similar: bool
    threshold: float
    why: str

    def met_by(self, mean_cosine: float) -> bool:
        """Whether a kind's mean cosine meets this expectation."""
        return mean_cosine >= self.threshold if self.similar else mean_cosine <= self.threshold

    @property
    def rule(self) -> str:
        return f"mean cosine {'>=' if self.similar else '<='} {self.threshold}"


# Thresholds were checked against all-MiniLM-L6-v2 with seed 0; its mean (min) cosine is noted beside
# each. For scale: MiniLM puts two unrelated requests from REQUESTS at about 0.23.
EXPECTATIONS: dict[str, Expectation] = {
    # MiniLM 1.000 (1.000): its tokenizer lower-cases, so only a cased model can fail this.
    "casing": Expectation(True, 0.8, "shouting or lower-casing a request does not change what it asks"),
    # MiniLM 0.938 (0.899)
    "punctuation": Expectation(True, 0.8, "dropped or repeated punctuation does not change the request"),
    # MiniLM 0.780 (0.618) with one slip per text; two slips drop it to about 0.66, so one it is.
    "typo": Expectation(True, 0.7, "one keyboard slip should not move a request far"),
    # MiniLM 0.897 (0.845; max 0.950; the log-in pair 0.858), so it fails: it puts a negated request as
    # close as surface edits (punctuation 0.938, emoji 0.934 on average), a known weakness of mean-pooled
    # encoders. The report should show that rather than hide it behind a lax bar.
    "negation": Expectation(
        False,
        0.85,
        "'I can log in' and 'I can't log in' ask for opposite things and must sit below surface edits",
    ),
    # MiniLM 0.620 (0.327, "fraud")
    "very_short": Expectation(True, 0.5, "a one- or two-word query should still land near the full request"),
    # MiniLM 0.423 (0.316). Boilerplate dilutes a mean-pooled embedding, so a high bar would fail every
    # such model; 0.35 still separates a kept request from one cut off by truncation (about 0.22).
    "very_long": Expectation(
        True, 0.35, "a request at the start of a message longer than the token limit still shows through"
    ),
    # MiniLM 0.934 (0.904)
    "emoji": Expectation(True, 0.8, "emoji add tone, not a different request"),
    # MiniLM 0.748 (0.550, Hangul): an English WordPiece vocabulary splits other scripts into rare pieces.
    "non_latin": Expectation(
        True, 0.7, "a name or place written in another script should not derail the rest of the request"
    ),
}

KINDS: tuple[str, ...] = tuple(EXPECTATIONS)


@dataclass(frozen=True)
class EdgeCaseProbe:
    """An original text and a variant of it; ``kind`` names the change and its expectation."""

    original: str
    variant: str
    kind: str

    @property
    def expectation(self) -> Expectation:
        return EXPECTATIONS[self.kind]


REQUESTS: tuple[str, ...] = (
    "I can't log in to my account",
    "How do I reset my password?",
    "My card was declined at the shop",
    "I was charged twice for the same purchase",
    "When will my refund arrive?",
    "Please close my account",
    "I forgot my PIN",
    "The app keeps crashing when I open it",
    "How long does a bank transfer take?",
    "Someone used my card without permission",
)

NEGATIONS: tuple[tuple[str, str], ...] = (
    ("I can log in to my account", "I can't log in to my account"),
    ("My card is working", "My card is not working"),
    ("The transfer went through", "The transfer did not go through"),
    ("I received my refund", "I have not received my refund"),
    ("I want to cancel my subscription", "I don't want to cancel my subscription"),
    ("The payment was approved", "The payment was not approved"),
    ("I recognise this transaction", "I don't recognise this transaction"),
    ("The password reset email arrived", "The password reset email never arrived"),
)

SHORT_FORMS: tuple[tuple[str, str], ...] = (
    ("I can't log in to my account", "login"),
    ("How do I reset my password?", "password"),
    ("My card was declined at the shop", "declined"),
    ("I was charged twice for the same purchase", "double charge"),
    ("When will my refund arrive?", "refund?"),
    ("Please close my account", "close account"),
    ("I forgot my PIN", "PIN"),
    ("Someone used my card without permission", "fraud"),
)

NON_LATIN: tuple[tuple[str, str], ...] = (
    ("Please send 50 euros to Wang Wei", "Please send 50 euros to 王伟"),
    ("My name is Dmitry and I can't log in", "My name is Дмитрий and I can't log in"),
    ("I paid the hotel in Athens with my card", "I paid the hotel in Αθήνα with my card"),
    ("Transfer money to Ahmed's account", "Transfer money to أحمد's account"),
    ("My card was declined in Tokyo", "My card was declined in 東京"),
    ("I moved to Kyiv and need to update my address", "I moved to Київ and need to update my address"),
    ("Refund the payment I made to Priya", "Refund the payment I made to प्रिया"),
    ("Send a transfer to Kim Min-jun", "Send a transfer to 김민준"),
)

EMOJI: tuple[str, ...] = ("😡", "🙏", "😱💳", "🤔", "😭😭😭", "👍", "🔒", "💸")

# Said before or after the request; long enough that the whole message passes 256 word pieces
# (MiniLM's limit), so the tail is cut off when encoding.
_PREAMBLE = (
    "Hello, I hope you are having a good day and thank you for taking the time to read my message. "
    "I have been a customer of your bank for many years and I have always been happy with the service. "
)
_POSTSCRIPT = (
    "I tried to find the answer in the help centre and in the frequently asked questions, and I also "
    "asked a friend who banks with you, but nobody could help. I would be grateful for a quick answer, "
    "as I am travelling next week and need everything to work before I leave. You can reach me by email "
    "or by phone at any time during the day. Thank you very much in advance for your help, and please "
    "let me know if you need any more details from me, such as my customer number, my address, the date "
    "of my last payment or anything else that would help you look into this. I have also attached a "
    "screenshot of the screen I see in the app, although I am not sure it will come through. Once again, "
    "thank you for your patience and for the good service over the years. Kind regards, and have a "
    "lovely rest of your week. "
)

_KEYBOARD_NEIGHBOURS = {
    "a": "qsz", "b": "vgn", "c": "xvd", "d": "sfe", "e": "wrd", "f": "dgr", "g": "fht", "h": "gjy",
    "i": "uok", "j": "hku", "k": "jli", "l": "kop", "m": "nj", "n": "bmh", "o": "ipl", "p": "ol",
    "q": "wa", "r": "etf", "s": "adw", "t": "ryg", "u": "yij", "v": "cbf", "w": "qes", "x": "zc",
    "y": "tuh", "z": "xa",
}  # fmt: skip


def _typo(word: str, rng: random.Random) -> str:
    """One keyboard slip in ``word``: swapped neighbours, a dropped, doubled or mistyped letter."""
    position = rng.randrange(len(word) - 1)
    slip = rng.choice(("swap", "drop", "double", "neighbour"))
    dropped = word[:position] + word[position + 1 :]
    if slip == "swap":
        slipped = word[:position] + word[position + 1] + word[position] + word[position + 2 :]
    elif slip == "drop":
        slipped = dropped
    elif slip == "double":
        slipped = word[: position + 1] + word[position:]
    else:
        letter = word[position].lower()
        slipped = (
            word[:position] + rng.choice(_KEYBOARD_NEIGHBOURS.get(letter, letter)) + word[position + 1 :]
        )
    # Swapping the two s of "pass", or a letter with no keyboard neighbours here, changes nothing.
    return slipped if slipped != word else dropped


def with_typos(text: str, rng: random.Random, typos: int = 1) -> str:
    """``text`` with ``typos`` slips in distinct words of four or more letters (seeded by ``rng``)."""
    words = text.split(" ")
    candidates = [i for i, word in enumerate(words) if len(word) >= 4 and word.isalpha()]
    for i in rng.sample(candidates, min(typos, len(candidates))):
        words[i] = _typo(words[i], rng)
    return " ".join(words)


def edge_case_probes(seed: int = 0) -> list[EdgeCaseProbe]:
    """The bundled probes, in ``KINDS`` order; only the typos depend on ``seed``."""
    rng = random.Random(seed)
    probes = []
    # One variant per request, alternating, keeps the probe set small enough to encode in seconds on a CPU.
    for i, request in enumerate(REQUESTS):
        probes.append(EdgeCaseProbe(request, request.upper() if i % 2 == 0 else request.lower(), "casing"))
    for i, request in enumerate(REQUESTS):
        # Stripped, then re-punctuated, so a request with no punctuation still gets a real variant.
        stripped = re.sub(r"[^\w\s]", "", request)
        probes.append(EdgeCaseProbe(request, stripped + ("..." if i % 2 == 0 else "?!!"), "punctuation"))
    for request in REQUESTS:
        probes += [EdgeCaseProbe(request, with_typos(request, rng), "typo") for _ in range(2)]
    probes += [EdgeCaseProbe(positive, negative, "negation") for positive, negative in NEGATIONS]
    probes += [EdgeCaseProbe(request, short, "very_short") for request, short in SHORT_FORMS]
    probes += [EdgeCaseProbe(r, f"{_PREAMBLE}{r}. {_POSTSCRIPT * 2}", "very_long") for r in REQUESTS]
    for request, emoji in zip(REQUESTS, EMOJI, strict=False):
        probes.append(EdgeCaseProbe(request, f"{request} {emoji}", "emoji"))
    probes += [EdgeCaseProbe(latin, other, "non_latin") for latin, other in NON_LATIN]
    return probes


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0.0, 1.0, norms)


def probe_cosines(probes: list[EdgeCaseProbe], encode: Encode) -> np.ndarray:
    """Cosine between each probe's original and variant, encoding each distinct text once."""
    texts = list(dict.fromkeys(text for probe in probes for text in (probe.original, probe.variant)))
    vectors = dict(zip(texts, _unit_rows(np.asarray(encode(texts), dtype=np.float64)), strict=True))
    return np.array([float(vectors[probe.original] @ vectors[probe.variant]) for probe in probes])


def edge_case_report(encode: Encode, seed: int = 0) -> pd.DataFrame:
    """One row per kind (in ``KINDS`` order): n, mean, min and max cosine, the expectation, whether the
    mean meets it, and the worst pair to read (lowest cosine; highest for negation)."""
    probes = edge_case_probes(seed)
    cosines = probe_cosines(probes, encode)
    rows = []
    for kind in KINDS:
        chosen = [i for i, probe in enumerate(probes) if probe.kind == kind]
        kind_cosines = cosines[chosen]
        expectation = EXPECTATIONS[kind]
        # The worst case is the least similar pair for a stability kind, the most similar for negation.
        worst_at = np.argmin(kind_cosines) if expectation.similar else np.argmax(kind_cosines)
        worst = probes[chosen[int(worst_at)]]
        rows.append(
            {
                "kind": kind,
                "n": len(chosen),
                "mean_cosine": float(kind_cosines.mean()),
                "min_cosine": float(kind_cosines.min()),
                "max_cosine": float(kind_cosines.max()),
                "expectation": expectation.rule,
                "why": expectation.why,
                "passed": expectation.met_by(float(kind_cosines.mean())),
                "worst_original": worst.original,
                "worst_variant": worst.variant,
            }
        )
    return pd.DataFrame(rows)
