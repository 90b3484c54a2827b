"""Run every chapter in the report's order and end with a summary table.

    python -m chapters                 # all chapters, default settings
    python -m chapters --quick         # each chapter's quick form, where it has one; hours-long chapters skipped
    python -m chapters --only ch4_dpo  # a subset
"""
import argparse
import importlib
import time
import traceback

from chapters import CHAPTERS, LONG_CHAPTERS, QUICK_CHAPTERS, ChapterSkipped
from chapters.plotting import check_writable
from gpt.cli import run


def run_chapter(name, quick):
    """One chapter's `main`: (status, note); Ctrl-C goes on up."""
    chapter_args = ["--quick"] if quick and name in QUICK_CHAPTERS else []
    print(f"\n=== {name} {' '.join(chapter_args)}".rstrip(), flush=True)
    try:
        importlib.import_module(f"chapters.{name}").main(chapter_args)
        return "ok", ""
    except ChapterSkipped as e:
        return "skipped", str(e)
    except SystemExit as e:  # a chapter's own one-line error
        return ("ok", "") if e.code in (None, 0) else ("FAILED", str(e.code).splitlines()[0])
    except Exception as e:  # keep going: one broken chapter should not hide the others
        traceback.print_exc()
        return "FAILED", f"{type(e).__name__}: {e}".splitlines()[0]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m chapters", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to the chapters that have it, "
                        "skip the hours-long ones that do not")
    parser.add_argument("--only", nargs="+", metavar="CHAPTER", choices=CHAPTERS, help="run only these chapters")
    args = parser.parse_args(argv)
    check_writable()  # an unwritable plots folder: one line now, not after the first chapter's work

    rows = []
    names = args.only or CHAPTERS
    for name in names:
        start = time.perf_counter()
        if args.quick and name in LONG_CHAPTERS and name not in QUICK_CHAPTERS:
            status, note = "skipped", f"--quick: {LONG_CHAPTERS[name]}"
            print(f"\n=== {name}\nskipped: {note}", flush=True)
        else:
            try:
                status, note = run_chapter(name, args.quick)
            except KeyboardInterrupt:
                raise KeyboardInterrupt(f"stopped by Ctrl-C in {name} ({len(rows)} of {len(names)} chapters done); "
                                        "files already written are whole") from None
        rows.append((name, status, time.perf_counter() - start, note))

    print("\n| chapter | status | seconds | note |\n|---|---|---:|---|")
    for name, status, seconds, note in rows:
        print(f"| {name} | {status} | {seconds:.1f} | {note} |")
    return 1 if any(status == "FAILED" for _, status, _, _ in rows) else 0


if __name__ == "__main__":
    run(main)
