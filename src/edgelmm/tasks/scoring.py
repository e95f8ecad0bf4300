"""Scorers: pure functions from a model's output and a reference to a score in [0, 1].

They are kept apart from the tasks so that every task (and every user's task) scores the same
way and the rules can be unit-tested without a model.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = frozenset({"a", "an", "the"})
# A capital letter that stands alone: "B", "(B)", "B.", "answer: B" — but not the "A" of "At".
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, drop articles, collapse whitespace.

    Punctuation becomes a space rather than vanishing so that "top-left" and "top left" agree;
    articles go because a model saying "a circle" for "circle" knows the answer (SQuAD / VQA
    practice).
    """
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(output: str, reference: str) -> float:
    """1.0 when output and reference are equal after `normalize_answer`."""
    return float(normalize_answer(output) == normalize_answer(reference))


def extract_choice(output: str, letters: Iterable[str]) -> str | None:
    """The first option letter a model's output names, or None.

    A lone capital that is one of `letters` counts ("B", "(B) red", "The answer is B."); a
    reply that is just one letter counts in either case ("b"). Other capitals, such as the "I"
    of "I think", are skipped because they are not options.
    """
    valid = {letter.upper() for letter in letters}
    bare = _PUNCTUATION.sub("", output).strip()
    if len(bare) == 1 and bare.upper() in valid:
        return bare.upper()
    for match in _LONE_CAPITAL.finditer(output):
        if match.group(1) in valid:
            return match.group(1)
    return None


def choice_accuracy(output: str, answer: str, letters: Iterable[str]) -> float:
    """1.0 when the first option letter in the output is the answer letter."""
    return float(extract_choice(output, letters) == answer.upper())
