"""Numbers in model text: one definition shared by the sampled and the exact read-out.

`parse_answer` reads the answer that *starts* a continuation (the prompt ends with an answer prefix such as
"$", so the number must come first, after at most one space): this is what both read-outs measure, and the
exact tree (workbench.readout.engine) enumerates exactly the continuations it accepts. `parse_number` finds the first
number anywhere in free text (the 2024 audit's parser), used for imported answers and to count how often a
sampled answer writes its number later ("about 500").

Rules: a number is ASCII digits with an optional decimal part (".5" is allowed in free text only); commas
count as thousands separators only when they group exactly three digits ("1,2" is 1); a space ends a number
("1 250" is 1). A multiplier may follow: k, mn, bn directly attached or after one space ("5 k"), m directly
attached only ("5 m" may mean minutes or metres), or thousand/million/billion after optional whitespace; a
multiplier counts only where its word ends ("5km" is 5, "5k." is 5000, "5 thousands" is 5). In free text a
minus sign directly before the number (or before "$") is kept unless it follows a letter or digit
("COVID-19" is 19, "10-20" is 10). Words "nan", "inf", "infinity" and numbers too large for a float give
status "not_finite".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

STATUSES = ("ok", "empty", "no_number", "not_finite")

_MULTIPLIERS = {
    "k": 1e3,
    "thousand": 1e3,
    "m": 1e6,
    "mn": 1e6,
    "million": 1e6,
    "bn": 1e9,
    "billion": 1e9,
}

_MULTIPLIER = r"(?:(?P<suffix> ?(?:k|mn|bn)|m)\b|\s*(?P<word>thousand|million|billion)\b)?"
_TOKEN = re.compile(
    r"(?P<nonfinite>\b(?:nan|inf(?:inity)?)\b)"
    r"|(?:(?<![\w.])(?P<sign>[-+\u2212])\$?)?"
    r"(?P<number>\d{1,3}(?:,\d{3}(?!\d))+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)" + _MULTIPLIER,
    re.IGNORECASE | re.ASCII,
)
_ANSWER = re.compile(
    r"^ ?(?P<number>\d{1,3}(?:,\d{3}(?!\d))+(?:\.\d+)?|\d+(?:\.\d+)?)" + _MULTIPLIER,
    re.IGNORECASE | re.ASCII,
)
_SCALE_WORDS = ("thousand", "million", "billion")
_SUFFIXES = ("k", "mn", "bn")


@dataclass(frozen=True)
class ParsedAnswer:
    """A parsed answer: `value` is None unless `status` is "ok"."""

    value: float | None
    status: str


def parse_number(text: str) -> ParsedAnswer:
    """Return the first number in `text`, with multipliers applied; never raises."""
    if not text.strip():
        return ParsedAnswer(None, "empty")
    match = _TOKEN.search(text)
    if match is None:
        return ParsedAnswer(None, "no_number")
    if match["nonfinite"]:
        return ParsedAnswer(None, "not_finite")
    return _value(match, negative=match["sign"] in ("-", "\u2212"))


def _value(match: re.Match, negative: bool = False) -> ParsedAnswer:
    value = float(match["number"].replace(",", ""))
    multiplier = match["suffix"] or match["word"]
    if multiplier:
        value *= _MULTIPLIERS[multiplier.strip().lower()]
    if negative:
        value = -value
    if not math.isfinite(value):
        return ParsedAnswer(None, "not_finite")
    return ParsedAnswer(value, "ok")


def parse_answer(text: str) -> ParsedAnswer:
    """The number that starts `text` (after at most one space), with its multiplier; never raises."""
    if not text.strip():
        return ParsedAnswer(None, "empty")
    match = _ANSWER.match(text)
    return ParsedAnswer(None, "no_number") if match is None else _value(match)


def answer_is_final(text: str) -> bool:
    """True when no continuation of `text` can change `parse_answer(text)` (generation may stop there)."""
    match = _ANSWER.match(text)
    if match is None:
        return text not in ("", " ")
    rest = text[match.end():]
    if match["suffix"] or match["word"] or rest == "":
        return rest != ""  # a multiplier's word end was checked against a real character
    if rest[0] in "0123456789.,":
        return re.fullmatch(r"[0-9.,]*", rest) is None  # "1,00" may still become "1,000"
    stripped = rest.lstrip().lower()
    if not stripped:
        return False
    spaces = len(rest) - len(rest.lstrip())
    candidates = list(_SCALE_WORDS) + (list(_SUFFIXES) if spaces <= 1 else []) + (["m"] if spaces == 0 else [])
    return not any(word.startswith(stripped) for word in candidates)
