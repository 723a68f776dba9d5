"""Exact Kubernetes resource quantities.

Kubernetes serialises quantities as strings ("4Gi", "1500m", "1e3"); Cloud Hypervisor
speaks bytes. Parsing goes through ``Fraction`` so that no quantity is ever rounded by
floating point on its way into the kernel, and every caller gets integers it can compare
exactly. The grammar follows ``k8s.io/apimachinery/pkg/api/resource``.
"""

from __future__ import annotations

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
# Quantities beyond this are not resources anyone can allocate; refusing them keeps a
# hostile "1e999999999" from turning into a multi-megabyte integer.
_MAX_EXPONENT = 30


class QuantityError(ValueError):
    """A value that is not a valid Kubernetes quantity (or not a usable one)."""


def parse_quantity(value: object) -> Fraction:
    """Parse a quantity given as a JSON string or number into an exact Fraction."""
    if isinstance(value, bool):
        raise QuantityError(f"expected a quantity, got a boolean {value!r}")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise QuantityError(f"expected a finite quantity, got {value!r}")
        return Fraction(value)
    if not isinstance(value, str):
        raise QuantityError(f"expected a quantity string, got {type(value).__name__}")
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
    amount = parse_quantity(value)
    if amount.denominator != 1:
        raise QuantityError(f"{value!r} is not a whole number of bytes")
    return int(amount)


def parse_millicores(value: object) -> int:
    """A CPU quantity in millicores; Kubernetes itself rounds sub-milli values up."""
    amount = parse_quantity(value) * 1000
    whole = amount.numerator // amount.denominator
    return whole if whole == amount else whole + 1


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
