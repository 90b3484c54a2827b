"""Command-line plumbing: argparse types that refuse out-of-range values, and `run` for `if __name__
== "__main__"`.

Every command line (gpt.generation, gpt.download, each chapter, the benchmarks) uses these, so a bad
value is one argparse line (exit 2) before any work starts, and Ctrl-C or a user error is one line,
never a traceback.
"""

import argparse
import math
import os
import sys


class Unavailable(Exception):
    """What this machine lacks (weights, network); `run` reports it as one line `skipped: ...`."""


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked(kind, name, ok, rule):
    """An argparse type: `kind(text)`, refused with one line unless `ok(value)`."""

    def parse(text: str):
        value = _number(kind, text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value:g}")
        return value

    parse.__name__ = name
    return parse


positive_int = _checked(int, "positive_int", lambda v: v >= 1, "at least 1")  # counts, sizes, steps
nonnegative_int = _checked(int, "nonnegative_int", lambda v: v >= 0, "0 or more")
positive_float = _checked(float, "positive_float", lambda v: v > 0, "> 0")  # β, learning rates
nonnegative_float = _checked(
    float, "nonnegative_float", lambda v: v >= 0, ">= 0"
)  # temperatures: 0 is greedy
probability = _checked(
    float, "probability", lambda v: 0 < v <= 1, "in (0, 1]"
)  # top-p: the share of mass kept


def summary(doc: str) -> str:
    """A module docstring's first paragraph on one line: its command's --help description."""
    return " ".join(doc.split("\n\n")[0].split())


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run(main, argv=None):
    """Call `main(argv)` and exit with one line instead of a traceback for what the user can fix.

    Ctrl-C: `interrupted: ...`, exit 130 at once (a `KeyboardInterrupt("how to resume")` raised by
    `main` supplies the text; files are closed as the exception unwinds, atexit hooks do not run).
    ValueError: `error: ...`, exit 2. OSError (a file or folder that cannot be read or written):
    `error: ...`, exit 1. Unavailable: `skipped: ...`, exit 1. Anything else is a bug and keeps its
    traceback.
    """
    try:
        code = main(argv)
    except KeyboardInterrupt as err:
        why = _first_line(err) if err.args else "stopped by Ctrl-C; files already written are whole"
        print(f"interrupted: {why}", file=sys.stderr)
        # exit now: an interrupt that lands inside exec() (scipy runs some at import) makes CPython
        # flag it as unhandled, and the interpreter would then kill itself with SIGINT instead of
        # exiting 130
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
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
