"""Run every chapter in the report's order and end with a summary table.

    python -m chapters                 # all chapters, default settings
    python -m chapters --quick         # each chapter's quick form where it has one; hours-long
                                       # chapters skipped
    python -m chapters --only ch4_dpo  # a subset
    python -m chapters --serial        # every chapter in this process, one after another

Chapter 8's miniature trains on one torch thread from start to end (`chapters.common.one_thread`:
tiny models), so on a machine with two or more cores it runs beside the others, in a child process
started first, and its output is shown in its place in the order (its progress bars are left out:
they would be minutes old). Its numbers are the same either way: a chapter's results do not depend
on what else runs (chapters 7 and 10 give the same numbers for any worker count, chapter 8 runs on
one thread).
"""

import argparse
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from chapters import CHAPTERS, LONG_CHAPTERS, QUICK_CHAPTERS
from chapters.ch8_instruction_dpo.miniature import weights_cached
from chapters.common.files import check_writable
from chapters.common.runtime import ChapterSkipped, available_cores
from gpt.cli import run, summary

ONE_THREAD = (
    "ch8_instruction_dpo"  # on one thread whenever it runs the miniature (no GPT-2 weights cached)
)


def run_chapter(name, quick):
    """One chapter's `main`: (status, note); Ctrl-C goes on up."""
    chapter_args = ["--quick"] if quick and name in QUICK_CHAPTERS else []
    print(f"\n=== {name} {' '.join(chapter_args)}".rstrip(), flush=True)
    try:
        importlib.import_module(f"chapters.{name}.__main__").main(chapter_args)
        return "ok", ""
    except ChapterSkipped as e:
        return "skipped", str(e)
    except SystemExit as e:  # a chapter's own one-line error
        return ("ok", "") if e.code in (None, 0) else ("FAILED", str(e.code).splitlines()[0])
    except Exception as e:  # keep going: one broken chapter should not hide the others
        traceback.print_exc()
        return "FAILED", f"{type(e).__name__}: {e}".splitlines()[0]


class Beside:
    """A chapter running as `python -m chapters.<name>` in a child process, its output kept in a
    temporary file."""

    def __init__(self, name):
        self.name, self.started = name, time.perf_counter()
        self.log = tempfile.TemporaryFile("w+")
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"chapters.{name}"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def finish(self):
        """Wait for the child, show its output here; (status, note, seconds it ran)."""
        print(
            f"\n=== {self.name} (ran beside the chapters above, in a child process; its output:)",
            flush=True,
        )
        code = self.proc.wait()
        seconds = time.perf_counter() - self.started
        self.log.seek(0)
        text = self.log.read()
        print(text, end="", flush=True)
        last = (text.strip().splitlines() or [""])[-1]
        if code == 0:
            return "ok", "", seconds
        if last.startswith("skipped: "):
            return "skipped", last[len("skipped: ") :], seconds
        return "FAILED", last, seconds

    def stop(self):
        """Ctrl-C or an error here: the child is stopped too (SIGTERM: chapter 8 writes a checkpoint
        and exits; its files are written whole or not at all), then waited for."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def runs_beside(names, args) -> list:
    """The chapters to start in a child process now: chapter 8 when it will run the miniature on one
    thread, other chapters are to run meanwhile, and this machine has a core to spare."""
    if (
        args.serial
        or args.quick
        or ONE_THREAD not in names
        or len(names) < 2
        or available_cores() < 2
    ):
        return []
    return [] if weights_cached("gpt2-medium") else [ONE_THREAD]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m chapters", description=summary(__doc__))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="pass --quick to the chapters that have it, skip the hours-long ones that do not",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="CHAPTER", choices=CHAPTERS, help="run only these chapters"
    )
    parser.add_argument(
        "--serial",
        action="store_true",
        help="run every chapter in this process, one after another "
        "(default: chapter 8's one-thread miniature runs beside the others when there are 2+ "
        "cores)",
    )
    args = parser.parse_args(argv)
    check_writable()  # an unwritable plots folder: one line now, not after the first chapter's work

    rows, started = [], time.perf_counter()
    names = args.only or CHAPTERS
    beside = {name: Beside(name) for name in runs_beside(names, args)}
    try:
        for name in names:
            start = time.perf_counter()
            if args.quick and name in LONG_CHAPTERS and name not in QUICK_CHAPTERS:
                status, note = "skipped", f"--quick: {LONG_CHAPTERS[name]}"
                print(f"\n=== {name}\nskipped: {note}", flush=True)
            elif name in beside:
                status, note, seconds = beside.pop(name).finish()
                rows.append((name, status, seconds, note or "beside the others"))
                continue
            else:
                try:
                    status, note = run_chapter(name, args.quick)
                except KeyboardInterrupt:
                    also = f"; {', '.join(beside)} beside it stopped too" if beside else ""
                    raise KeyboardInterrupt(
                        f"stopped by Ctrl-C in {name} ({len(rows)} of {len(names)} chapters "
                        f"done{also}); files already written are whole"
                    ) from None
            rows.append((name, status, time.perf_counter() - start, note))
    finally:
        for child in beside.values():
            child.stop()

    print("\n| chapter | status | seconds | note |\n|---|---|---:|---|")
    for name, status, seconds, note in rows:
        print(f"| {name} | {status} | {seconds:.1f} | {note} |")
    print(f"\nwall time: {time.perf_counter() - started:.0f} s")
    return 1 if any(status == "FAILED" for _, status, _, _ in rows) else 0


if __name__ == "__main__":
    run(main)
