"""Parse the first number out of free model text ("$1,250.50", "about 3k", "$2.5 million", "12.5%").

Rules: a number is ASCII digits with an optional decimal part (".5" is allowed); commas count as
thousands separators only when they group exactly three digits ("1,2" is 1); a space ends a number
("1 250" is 1). A minus sign directly before the number (or before "$") is kept unless it follows a
letter or digit ("COVID-19" is 19, "10-20" is 10). A multiplier may follow: k, m/mn, bn directly
attached, or thousand/million/billion after optional whitespace. Words "nan", "inf", "infinity" and
numbers too large for a float give status "not_finite".
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

_TOKEN = re.compile(
    r"(?P<nonfinite>\b(?:nan|inf(?:inity)?)\b)"
    r"|(?:(?<![\w.])(?P<sign>[-+\u2212])\$?)?"
    r"(?P<number>\d{1,3}(?:,\d{3}(?!\d))+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:(?P<suffix>k|mn|m|bn)\b|\s*(?P<word>thousand|million|billion)\b)?",
    re.IGNORECASE | re.ASCII,
)


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
    value = float(match["number"].replace(",", ""))
    multiplier = match["suffix"] or match["word"]
    if multiplier:
        value *= _MULTIPLIERS[multiplier.lower()]
    if match["sign"] in ("-", "\u2212"):
        value = -value
    if not math.isfinite(value):
        return ParsedAnswer(None, "not_finite")
    return ParsedAnswer(value, "ok")
