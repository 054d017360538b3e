"""argparse value types the analysis and benchmark tools share: a value no run could use is refused when the command
is read (argparse's usage line and exit code 2), not minutes later as a traceback or a silently empty result.

Imports no torch: `python -m dist_mnist.gpucheck` runs where torch is not installed. Also how a setting is shown
back in a line (on_off), in the words the on/off flags take.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole_number_at_least(least: int) -> Callable[[str], int]:
    """A whole number of at least `least` (a count of steps, rounds, rows or a batch size)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
        return value

    return parse


def whole_numbers(text: str) -> list[int]:
    """Comma-separated whole numbers of at least 1 (batch sizes, process counts)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 1,2, not {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"each number must be at least 1: {text!r}")
    return values


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0 (NaN is refused too; inf made a timed loop that never ends)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text}")
    return value


def on_off(value: object) -> str:
    """A setting as a person reads it in a line: True/False as on/off, anything else as it is."""
    return ("on" if value else "off") if isinstance(value, bool) else str(value)
