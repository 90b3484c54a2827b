"""`python -m chapters`: a one-thread chapter runs beside the others in a child process, its output
shown in its place; --serial runs everything in this process; a stopped child leaves no partial
figure.

Chapter 8's miniature (the chapter that runs beside the others) takes minutes, so these tests let
chapter 3 (~3 s) play its part: `ONE_THREAD` names it, and chapter 5 runs meanwhile in this process.
"""

import pytest

import chapters.__main__ as job

CH3_SAYS = "error: cannot write figures to"  # chapter 3's one line when its plots folder is not one


@pytest.fixture
def ch3_beside(monkeypatch):
    """Chapter 3 is the one-thread chapter; the chapters run here are stubs that say whether it is
    running."""
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


def test_the_one_thread_chapter_runs_beside_the_next_and_its_output_comes_in_its_place(
    ch3_beside, tmp_path, monkeypatch, capsys
):
    started, ran_here = ch3_beside
    # the child meets a plots folder under a file and stops with its one line as soon as it has
    # imported (~3 s instead of chapter 3's whole run); the parent's own up-front check is skipped
    # so that it gets that far
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("DPO_PLOTS_DIR", str(tmp_path / "a_file" / "plots"))
    monkeypatch.setattr(job, "check_writable", lambda: None)
    assert job.main(["--only", "ch5_theory", "ch3_kl_optimum"]) == 1  # a chapter failed
    out = capsys.readouterr().out
    assert [child.name for child in started] == ["ch3_kl_optimum"]
    assert ran_here == [("ch5_theory", [True])]  # chapter 3 was running while chapter 5 ran here
    ch5_at, ch3_at = out.index("=== ch5_theory"), out.index("=== ch3_kl_optimum (ran beside")
    assert (
        ch5_at < ch3_at < out.index(CH3_SAYS) < out.index("| chapter |")
    )  # ch3's output in ch3's place
    assert "| ch5_theory | ok |" in out and "wall time:" in out
    assert (
        "| ch3_kl_optimum | FAILED | " in out
        and f"{CH3_SAYS} " in out.split("| ch3_kl_optimum | FAILED |")[1]
    )


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
