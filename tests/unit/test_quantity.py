"""Kubernetes quantities in, exact integers out; anything else is a QuantityError."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.constants import GiB, KiB, MiB
from core.quantity import (
    QuantityError,
    format_bytes,
    format_millicores,
    parse_bytes,
    parse_millicores,
    parse_quantity,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4Gi", 4 * GiB),
        ("512Mi", 512 * MiB),
        ("1.5Gi", 3 * GiB // 2),
        (".5Mi", MiB // 2),
        ("1Ki", KiB),
        ("1Ti", 1 << 40),
        ("1Pi", 1 << 50),
        ("1Ei", 1 << 60),
        ("2", 2),
        ("+2", 2),
        ("5.", 5),
        ("1k", 1000),
        ("1M", 10**6),
        ("1G", 10**9),
        ("1T", 10**12),
        ("1P", 10**15),
        ("1E", 10**18),  # exa, not an exponent
        ("1e3", 1000),
        ("1E3", 1000),
        ("1e+3", 1000),
        ("1.5e3", 1500),
        ("4294967296", 4 * GiB),
        ("268435456000", 250 * GiB),  # the seed's infeasible request
        ("  4Gi  ", 4 * GiB),
        (2, 2),
        (4 * GiB, 4 * GiB),
        (2.0, 2),
    ],
)
def test_valid_byte_quantities(text: object, value: int) -> None:
    assert parse_bytes(text) == value
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    ("text", "millicores"),
    [
        ("1", 1000),
        ("12", 12000),
        ("1500m", 1500),
        ("0.5", 500),
        ("1.25", 1250),
        ("1e-3", 1),
        ("100n", 1),  # below a millicore rounds up, as Kubernetes does
        ("1u", 1),
        ("1.0001", 1001),
        (0.25, 250),
        (3, 3000),
    ],
)
def test_cpu_quantities_in_millicores(text: object, millicores: int) -> None:
    assert parse_millicores(text) == millicores


@pytest.mark.parametrize(
    ("text", "fraction"),
    [("1500m", Fraction(3, 2)), ("1e-3", Fraction(1, 1000)), ("-1Ki", -1024), ("0", 0)],
)
def test_parse_quantity_is_exact(text: str, fraction: Fraction) -> None:
    assert parse_quantity(text) == fraction


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "Gi",
        "4GiB",
        "4 Gi",
        "4gi",
        "4KI",
        "1K",
        "0x10",
        "NaN",
        "inf",
        "Infinity",
        "1e",
        "e3",
        "1e3Ki",
        "1..5",
        "--1",
        "1_000",
        "\u0664Gi",  # ARABIC-INDIC DIGIT FOUR
        "\uff14Gi",  # FULLWIDTH DIGIT FOUR
        "4Gi\x00",
        "1e31",
        "1e-31",
        "1e999999999",
        "9" * 65,
        "1" + " " * 70 + "Gi",
        True,
        False,
        None,
        [],
        {},
        ["4Gi"],
        {"size": "4Gi"},
        float("nan"),
        float("inf"),
        float("-inf"),
        b"4Gi",
    ],
    ids=repr,
)
def test_hostile_inputs_are_quantity_errors(value: object) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(value)
    with pytest.raises(QuantityError):
        parse_bytes(value)
    with pytest.raises(QuantityError):
        parse_millicores(value)


@pytest.mark.parametrize("value", ["1500m", "0.5", "1e-3", "100n", 1.5, "1.5"])
def test_bytes_must_be_whole(value: object) -> None:
    with pytest.raises(QuantityError, match="whole number of bytes"):
        parse_bytes(value)


def test_errors_name_the_value() -> None:
    with pytest.raises(QuantityError, match="'4GiB' is not a quantity"):
        parse_bytes("4GiB")
    with pytest.raises(QuantityError, match="out of range"):
        parse_bytes("1e999")
    assert issubclass(QuantityError, ValueError)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (1, "1"),
        (1023, "1023"),
        (KiB, "1Ki"),
        (3 * KiB, "3Ki"),
        (MiB + KiB, "1025Ki"),
        (256 * MiB, "256Mi"),
        (4 * GiB, "4Gi"),
        (4 * GiB + 256 * MiB, "4352Mi"),
        (1 << 60, "1Ei"),
        (3 << 60, "3Ei"),
    ],
)
def test_format_bytes_is_the_canonical_binary_form(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(("m", "text"), [(0, "0"), (1000, "1"), (12000, "12"), (1500, "1500m")])
def test_format_millicores(m: int, text: str) -> None:
    assert format_millicores(m) == text


@given(st.integers(min_value=0, max_value=1 << 64))
def test_bytes_round_trip(n: int) -> None:
    assert parse_bytes(format_bytes(n)) == n


@given(st.integers(min_value=0, max_value=10**12))
def test_millicores_round_trip(m: int) -> None:
    assert parse_millicores(format_millicores(m)) == m


@given(st.text(max_size=80))
def test_any_text_parses_or_is_a_quantity_error(text: str) -> None:
    try:
        value = parse_quantity(text)
    except QuantityError:
        return
    assert isinstance(value, Fraction)
    assert text.strip().isascii()


@given(
    st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "k", "M", "G", "Ki", "Mi", "Gi"]),
)
def test_decimal_text_parses_exactly(number: object, suffix: str) -> None:
    scale = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": KiB, "Mi": MiB, "Gi": GiB}
    assert parse_quantity(f"{number}{suffix}") == Fraction(str(number)) * scale[suffix]


_SUFFIXES = ["", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u"]


def _general(parse: object, text: str) -> object:
    """What the exact Fraction path answers for ``text`` (or the error it raises)."""
    try:
        amount = parse_quantity(text)
    except QuantityError as exc:
        return type(exc)
    if parse is parse_bytes:
        return int(amount) if amount.denominator == 1 else QuantityError
    scaled = amount * 1000
    whole = scaled.numerator // scaled.denominator
    return whole if whole == scaled else whole + 1


def _answer(parse: object, text: str) -> object:
    try:
        return parse(text)  # type: ignore[operator]
    except QuantityError as exc:
        return type(exc)


@given(
    st.one_of(
        st.integers(min_value=0, max_value=10**20).map(str),
        st.from_regex(r"[0-9]{1,20}(\.[0-9]{0,3})?", fullmatch=True),
        st.text(alphabet="0123456789 .-+e", max_size=22),
    ),
    st.sampled_from(_SUFFIXES),
    st.sampled_from([parse_bytes, parse_millicores]),
)
def test_the_whole_number_fast_path_agrees_with_the_exact_path(
    number: str, suffix: str, parse: object
) -> None:
    text = number + suffix
    assert _answer(parse, text) == _general(parse, text)
