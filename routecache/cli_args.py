"""argparse types shared by the command-line verbs: a bad number is a usage error, exit 2."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of `low` or more."""
    return integer_between(low)


def integer_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high` (None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"not an integer: {text}") from error
        if value < low or (high is not None and value > high):
            bounds = f"{low} or more" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"{text}: must be {bounds}")
        return value

    return parse


positive_int = at_least(1)
# What numpy's and sklearn's random_state take: another seed failed only after the minutes of
# embedding every prompt.
random_seed = integer_between(0, 2**32 - 1)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from error


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1 (a hold-out share, where both sides
    need rows; a confidence; a rate)."""
    value = _number(text)
    if not 0.0 < value < 1.0:  # False for NaN too
        raise argparse.ArgumentTypeError(f"{text}: must lie strictly between 0 and 1")
    return value


def number_between(low: float, high: float, *, above_low: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number from low (or, `above_low`, above it) to high."""

    def parse(text: str) -> float:
        value = _number(text)
        fits = low < value if above_low else low <= value
        if not math.isfinite(value) or not fits or value > high:
            if math.isinf(low) and math.isinf(high):
                bounds = "finite"
            elif math.isinf(high):
                bounds = f"above {low:g} (finite)" if above_low else f"{low:g} or more (finite)"
            elif above_low:
                bounds = f"above {low:g} and at most {high:g}"
            else:
                bounds = f"from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"{text}: must be {bounds}")
        return value

    return parse


# Above 0 and finite: a regularisation strength, a timeout in seconds.
positive_number = number_between(0, math.inf, above_low=True)


def listed(one: Callable[[str], float]) -> Callable[[str], list[float]]:
    """An argparse type: one or more values of `one`, separated by commas."""

    def parse(text: str) -> list[float]:
        values = [one(part) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text!r}")
        return values

    return parse


# False-hit budgets: 0 and 1 are no budget at all (nothing served, anything served).
fractions = listed(fraction)
