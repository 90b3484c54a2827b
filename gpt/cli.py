"""Command-line plumbing: argparse types that refuse out-of-range values, and `run` for `if __name__ == "__main__"`.

Every command line (gpt.generation, gpt.download, each chapter, the benchmarks) uses these, so a bad value
is one argparse line (exit 2) before any work starts, and Ctrl-C or a user error is one line, never a traceback.
"""
import argparse
import math
import sys


class Unavailable(Exception):
    """What this machine lacks (weights, network); `run` reports it as one line `skipped: ...`."""


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, steps)."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (β, learning rates)."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (temperatures: 0 is greedy)."""
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (top-p: the share of probability mass kept)."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run(main, argv=None):
    """Call `main(argv)` and exit with one line instead of a traceback for what the user can fix.

    Ctrl-C: `interrupted: ...`, exit 130 (a `KeyboardInterrupt("how to resume")` raised by `main` supplies the
    text). ValueError: `error: ...`, exit 2. OSError (a file or folder that cannot be read or written): `error: ...`,
    exit 1. Unavailable: `skipped: ...`, exit 1. Anything else is a bug and keeps its traceback.
    """
    try:
        code = main(argv)
    except KeyboardInterrupt as err:
        print(f"interrupted: {_first_line(err) if err.args else 'stopped by Ctrl-C; files already written are whole'}",
              file=sys.stderr)
        code = 130
    except Unavailable as err:
        print(f"skipped: {_first_line(err)}", file=sys.stderr)
        code = 1
    except ValueError as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        code = 2
    except OSError as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        code = 1
    raise SystemExit(code if isinstance(code, int) else 0)
