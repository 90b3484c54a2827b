"""`python -m chapters`: a one-thread chapter runs beside the others in a child process, its output shown in its
place; --serial runs everything in this process; a stopped child leaves no partial figure.

Chapter 8's miniature (the chapter that runs beside the others) takes minutes, so these tests let chapter 3
(~3 s) play its part: `ONE_THREAD` names it, and chapter 5 runs meanwhile in this process.
"""
import pytest

import chapters.__main__ as job
from chapters import plotting

CH3_SAYS = "eq. (29) = eq. (27)"  # the first line of chapter 3's own output


@pytest.fixture
def ch3_beside(monkeypatch):
    """Chapter 3 is the one-thread chapter; the chapters run here are stubs that say whether it is running."""
    monkeypatch.setattr(job, "ONE_THREAD", "ch3_kl_optimum")
    monkeypatch.setattr(job, "available_cores", lambda: 2)
    started, ran_here = [], []
    original = job.Beside.__init__

    def init(self, name):
        original(self, name)
        started.append(self)

    def run_chapter(name, quick):
        print(f"\n=== {name}")
        ran_here.append((name, [child.proc.poll() is None for child in started]))
        return "ok", ""
    monkeypatch.setattr(job.Beside, "__init__", init)
    monkeypatch.setattr(job, "run_chapter", run_chapter)
    return started, ran_here


def test_the_one_thread_chapter_runs_beside_the_next_and_its_output_comes_in_its_place(ch3_beside, capsys):
    started, ran_here = ch3_beside
    assert job.main(["--only", "ch5_theory", "ch3_kl_optimum"]) == 0
    out = capsys.readouterr().out
    assert [child.name for child in started] == ["ch3_kl_optimum"]
    assert ran_here == [("ch5_theory", [True])]  # chapter 3 was running while chapter 5 ran here
    ch5_at, ch3_at = out.index("=== ch5_theory"), out.index("=== ch3_kl_optimum (ran beside")
    assert ch5_at < ch3_at < out.index(CH3_SAYS) < out.index("| chapter |")  # ch3's output in ch3's place
    assert "| ch3_kl_optimum | ok |" in out and "| ch5_theory | ok |" in out and "wall time:" in out
    assert (plotting.plots_path() / "ch3_optimal_policy_vs_beta.png").stat().st_size > 0  # the child's figure


def test_serial_runs_every_chapter_in_this_process(ch3_beside, capsys):
    started, ran_here = ch3_beside
    assert job.main(["--serial", "--only", "ch5_theory", "ch3_kl_optimum"]) == 0
    assert started == [] and [name for name, _ in ran_here] == ["ch5_theory", "ch3_kl_optimum"]


def test_a_stopped_child_leaves_only_whole_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_PLOTS_DIR", str(tmp_path))
    child = job.Beside("ch3_kl_optimum")
    child.stop()  # at once: mid-import or mid-work
    assert child.proc.returncode != 0
    for path in tmp_path.iterdir():
        assert path.suffix == ".png" and path.read_bytes().endswith(b"IEND\xaeB`\x82"), path.name
