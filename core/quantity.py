"""Exact Kubernetes resource quantities.

Kubernetes serialises quantities as strings ("4Gi", "1500m", "1e3"); Cloud Hypervisor
speaks bytes. Parsing goes through ``Fraction`` so that no quantity is ever rounded by
floating point on its way into the kernel, and every caller gets integers it can compare
exactly. The grammar follows ``k8s.io/apimachinery/pkg/api/resource``.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction

__all__ = [
    "QuantityError",
    "format_bytes",
    "format_millicores",
    "parse_bytes",
    "parse_millicores",
    "parse_quantity",
]

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
# ASCII digits only: Python's \d (and int(), Fraction()) also take other scripts' digits.
_QUANTITY = re.compile(
    r"(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<bin>Ki|Mi|Gi|Ti|Pi|Ei)|[eE](?P<exp>[+-]?[0-9]+)|(?P<dec>[numkMGTPE]?))"
)
# The shapes nearly every object carries ("4Gi", "1500m", "2"): whole numbers with an
# optional suffix, worked out in integers (the hot paths parse them on every reconcile).
# Anything else takes the general path through Fraction; both give the same answers.
_WHOLE = re.compile(r"([0-9]{1,18})(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?")
_WHOLE_UNITS = {
    **_BINARY,
    **{suffix: int(unit) for suffix, unit in _DECIMAL.items() if unit.denominator == 1},
}
# Quantities beyond this are not resources anyone can allocate; refusing them keeps a
# hostile "1e999999999" from turning into a multi-megabyte integer.
_MAX_EXPONENT = 30


class QuantityError(ValueError):
    """A value that is not a valid Kubernetes quantity (or not a usable one)."""


def parse_quantity(value: object) -> Fraction:
    """Parse a quantity given as a JSON string or number into an exact Fraction."""
    if isinstance(value, str):
        return _parse_text(value)
    if isinstance(value, bool):
        raise QuantityError(f"expected a quantity, got a boolean {value!r}")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise QuantityError(f"expected a finite quantity, got {value!r}")
        return Fraction(value)
    raise QuantityError(f"expected a quantity string, got {type(value).__name__}")


def _parse_text(value: str) -> Fraction:
    text = value.strip()
    if len(text) > 64:
        raise QuantityError("quantity is too long")
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise QuantityError(f"{value!r} is not a quantity (examples: 4Gi, 512Mi, 1500m, 2)")
    number = Fraction(match["num"])
    if match["bin"]:
        return number * _BINARY[match["bin"]]
    if match["exp"] is not None:
        exponent = int(match["exp"])
        if abs(exponent) > _MAX_EXPONENT:
            raise QuantityError(f"{value!r} is out of range")
        return number * Fraction(10) ** exponent
    return number * _DECIMAL[match["dec"] or ""]


def parse_bytes(value: object) -> int:
    """A memory quantity as a whole number of bytes."""
    if type(value) is int:
        return value  # exactly what the Fraction round trip gives, without it
    if isinstance(value, str):
        return _bytes_text(value)
    return _whole_bytes(value, parse_quantity(value))


# The text paths are memoized: pure functions of an immutable string, and every pod
# version's quantities are parsed by each reader of it (the kernel's pod view, the
# kubelet) though pods carry few distinct ones (the simulation's sizes lie on a 2Mi
# grid: a few thousand). Bounded; an error is not cached.
@functools.lru_cache(maxsize=16384)
def _bytes_text(value: str) -> int:
    match = _WHOLE.fullmatch(value)
    if match is not None and match[2] != "m":
        return int(match[1]) * _WHOLE_UNITS[match[2] or ""]
    return _whole_bytes(value, _parse_text(value))


def _whole_bytes(value: object, amount: Fraction) -> int:
    if amount.denominator != 1:
        raise QuantityError(f"{value!r} is not a whole number of bytes")
    return int(amount)


def parse_millicores(value: object) -> int:
    """A CPU quantity in millicores; Kubernetes itself rounds sub-milli values up."""
    if type(value) is int:
        return value * 1000
    if isinstance(value, str):
        return _millicores_text(value)
    return _millicores(parse_quantity(value))


@functools.lru_cache(maxsize=16384)
def _millicores_text(value: str) -> int:
    match = _WHOLE.fullmatch(value)
    if match is not None:
        whole = int(match[1])
        return whole if match[2] == "m" else whole * 1000 * _WHOLE_UNITS[match[2] or ""]
    return _millicores(_parse_text(value))


def _millicores(quantity: Fraction) -> int:
    amount = quantity * 1000
    whole = amount.numerator // amount.denominator
    return whole if whole == amount else whole + 1


# Memoized (a pure function of an int): condition messages and pod specs format the
# same few sizes over and over. Bounded, and typed: 2.0 and True print otherwise than 2.
@functools.lru_cache(maxsize=16384, typed=True)
def format_bytes(n: int) -> str:
    """The canonical binary-suffix form Kubernetes would print for ``n`` bytes."""
    if n == 0:
        return "0"
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _BINARY[suffix]
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def format_millicores(m: int) -> str:
    return str(m // 1000) if m % 1000 == 0 else f"{m}m"
