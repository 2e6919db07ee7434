"""argparse types for bounded numbers: a value out of bounds is argparse's one `error:` line and exit 2."""

import argparse
from collections.abc import Callable


def number_in(kind: Callable[[str], int | float], low: float, high: float | None = None) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` in [low, high], else argparse's one `error:` line and exit 2."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not low <= value <= (high if high is not None else value):  # also refuses nan
            wanted = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"{text} is not allowed: must be {wanted}")
        return value

    return parse


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    return number_in(int, low, high)  # type: ignore[return-value]
