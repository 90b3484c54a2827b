"""Run-time helpers every chapter may use: one torch thread for tiny models, the cores this process
may use, and `ChapterSkipped`, a chapter's one-line 'this machine lacks what I need'."""

import os
from contextlib import contextmanager

import torch

from gpt.cli import Unavailable


class ChapterSkipped(Unavailable):
    """Raised by a chapter's `main` when this machine lacks what it needs; the message is one line
    saying what to do."""


@contextmanager
def one_thread():
    """Run torch on one thread inside the block, then restore the setting.

    The chapters' models are tiny: a second thread only adds synchronisation (measured 10-30x slower
    on a busy 2-core machine), and one thread also makes float sums repeatable whatever the core
    count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
