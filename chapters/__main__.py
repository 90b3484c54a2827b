"""Run every chapter in the report's order and end with a summary table.

    python -m chapters                 # all chapters, default settings
    python -m chapters --quick         # each chapter's quick form, where it has one
    python -m chapters --only ch4_dpo  # a subset
"""
import argparse
import importlib
import time
import traceback

from chapters import CHAPTERS, QUICK_CHAPTERS, ChapterSkipped


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m chapters", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to the chapters that have it")
    parser.add_argument("--only", nargs="+", metavar="CHAPTER", choices=CHAPTERS, help="run only these chapters")
    args = parser.parse_args(argv)

    rows = []
    for name in args.only or CHAPTERS:
        try:
            module = importlib.import_module(f"chapters.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"chapters.{name}":
                raise
            rows.append((name, "not written", 0.0, "this chapter is not in the code yet"))
            continue
        chapter_args = ["--quick"] if args.quick and name in QUICK_CHAPTERS else []
        print(f"\n=== {name} {' '.join(chapter_args)}".rstrip(), flush=True)
        start = time.perf_counter()
        try:
            module.main(chapter_args)
            status, note = "ok", ""
        except ChapterSkipped as e:
            status, note = "skipped", str(e)
        except Exception as e:  # keep going: one broken chapter should not hide the others
            traceback.print_exc()
            status, note = "FAILED", f"{type(e).__name__}: {e}".splitlines()[0]
        rows.append((name, status, time.perf_counter() - start, note))

    print("\n| chapter | status | seconds | note |\n|---|---|---:|---|")
    for name, status, seconds, note in rows:
        print(f"| {name} | {status} | {seconds:.1f} | {note} |")
    return 1 if any(status == "FAILED" for _, status, _, _ in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
