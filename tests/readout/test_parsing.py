import math
import re

import pytest
from hypothesis import assume, given, strategies as st

from workbench.readout.parsing import STATUSES, ParsedAnswer, answer_is_final, parse_answer, parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,250.50", 1250.5),
        ("1,000,000", 1_000_000),
        ("12.5%", 12.5),
        ("about 3k", 3000),
        ("3K dollars", 3000),
        ("$2.5 million", 2.5e6),
        ("1.2 thousand", 1200),
        ("2 billion", 2e9),
        ("2.5M", 2.5e6),
        ("4mn", 4e6),
        ("7bn", 7e9),
        ("5 Million", 5e6),
        ("-5", -5),
        ("-$5", -5),
        ("$-1,235", -1235),
        ("\u22123.5", -3.5),
        ("+7", 7),
        (".5", 0.5),
        ("USD 300", 300),
        ("1.25 USD", 1.25),
        ("1 250", 1),
        ("1,2", 1),
        ("1,0000", 1),
        ("1234,567", 1234),
        ("1,000.25 or 2,000", 1000.25),
        ("I suggest $15,000.", 15000),
        ("Answer: 5.", 5),
        ("between 10-20 hours", 10),
        ("COVID-19 era", 19),
        ("5km away", 5),
        ("3 k", 3000),
        ("3 m", 3),
        ("5 thousands", 5),
        ("5k.", 5000),
        ("3k5", 3),
        ("$1,250.50 (negotiable)\n", 1250.5),
        ("0", 0),
        ("007", 7),
    ],
)
def test_explicit_values(text: str, expected: float) -> None:
    parsed = parse_number(text)
    assert parsed.status == "ok"
    assert parsed.value == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        ("no idea", "no_number"),
        ("information", "no_number"),
        ("NaN", "not_finite"),
        ("inf", "not_finite"),
        ("Infinity dollars", "not_finite"),
        ("9" * 400, "not_finite"),
        ("1" + "0" * 305 + " billion", "not_finite"),
    ],
)
def test_statuses_without_value(text: str, status: str) -> None:
    assert parse_number(text) == ParsedAnswer(None, status)


def test_first_token_wins() -> None:
    assert parse_number("5 or inf").value == 5
    assert parse_number("inf or 5").status == "not_finite"


@given(st.text())
def test_never_raises(text: str) -> None:
    parsed = parse_number(text)
    assert parsed.status in STATUSES
    assert (parsed.value is not None) == (parsed.status == "ok")
    if parsed.value is not None:
        assert math.isfinite(parsed.value)


finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


@given(finite)
def test_round_trip_two_decimals(x: float) -> None:
    assert parse_number(f"{x:,.2f}").value == pytest.approx(round(x, 2), abs=1e-9)


@given(finite)
def test_round_trip_dollars(x: float) -> None:
    assert parse_number(f"${x:,.0f}").value == pytest.approx(round(x), abs=1e-9)


@given(finite)
def test_round_trip_percent(x: float) -> None:
    text = f"{x}%"
    assume("e" not in text)
    assert parse_number(text).value == pytest.approx(x, rel=1e-12, abs=0)


@given(st.text(alphabet=st.characters(exclude_categories=["Nd"])))
def test_no_digits_means_no_number(text: str) -> None:
    assume(text.strip())
    assume(not re.search(r"\b(nan|inf)", text, re.IGNORECASE | re.ASCII))
    assert parse_number(text) == ParsedAnswer(None, "no_number")


# ----------------------------------------------------------------------------------------------- parse_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12", 12), (" 12", 12), ("12 dollars", 12), ("1,250.50", 1250.5), ("5k", 5000), ("5 k", 5000),
        ("5K.", 5000), ("5km", 5), ("5 thousand", 5000), ("2.5 million", 2.5e6), ("5 thousands", 5),
        ("12.5%", 12.5), ("10-20 hours", 10), ("3m", 3e6), ("3 m", 3),
    ],
)
def test_parse_answer_reads_the_number_that_starts_the_reply(text: str, expected: float) -> None:
    assert parse_answer(text).value == pytest.approx(expected)
    assert parse_answer(text).value == parse_number(text).value  # both parsers agree where the number leads


@pytest.mark.parametrize("text", ["about 500", "$500", "  500", "-5", ".5", "no idea", "twelve"])
def test_parse_answer_needs_the_number_first(text: str) -> None:
    assert parse_answer(text).value is None


EXTENSIONS = st.text(alphabet="0123456789.,kKmMbnthousandilo %$-\n", max_size=12)


@given(st.text(alphabet="0123456789.,kKmMbnthousandilo %$-\n", max_size=14), EXTENSIONS)
def test_a_final_answer_no_longer_changes(text: str, extension: str) -> None:
    """generate stops a row once answer_is_final: no continuation may change the parsed answer after that."""
    if answer_is_final(text):
        assert parse_answer(text + extension).value == parse_answer(text).value


@pytest.mark.parametrize("text", ["", " ", "5", "5.", "1,00", "5 ", "5 th", "5k", "5 m", "5 thousand"])
def test_open_answers_are_not_final(text: str) -> None:
    assert not answer_is_final(text)


@pytest.mark.parametrize("text", ["a", "$", "5 dollars", "5km", "5k ", "5.5x", "5%", "12\nI"])
def test_decided_answers_are_final(text: str) -> None:
    assert answer_is_final(text)
