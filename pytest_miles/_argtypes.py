"""argparse types of the command line's numeric arguments: a bad value gets one line naming it and what
is accepted (argparse prints it with the option's name)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a whole number >= 1")
    return value


def tp_size(text: str) -> int:
    """argparse type of --sglang-tp: an integer from 1 to 1024 (a tensor-parallel size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; "
                                         "expected a tensor-parallel size 1..1024") from None
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"{value} is not accepted; expected a tensor-parallel size 1..1024")
    return value
