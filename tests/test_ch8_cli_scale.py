"""Chapter 8's command line through the scale machinery (chapters.ch8_instruction_dpo.scaled_run):
`torchrun` with 2 processes against `python -m` with 1, a run stopped by SIGTERM during DPO and then
`--resume`d against one never stopped, a fresh run over an older run's files, and the one line a
stale cache gets under --resume. (Bad flag combinations without torchrun:
tests/test_bad_inputs.py's ch8 rows.)

Every run is --smoke with tiny settings: 16 training pairs, SFT 1 epoch, DPO 2 epochs of 2 batches
at one β, greedy decoding of 4 tokens, the real SBERT. The 2-process run starts first, in the
background (one thread a rank), while the 1-process runs go on here.
"""

import csv
import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chapters.ch8_instruction_dpo.__main__ as ch8
import gpt
from chapters.ch8_instruction_dpo import authors_setup as au
from chapters.ch8_instruction_dpo import data as pdata
from chapters.ch8_instruction_dpo.trainers import dpo_step

pytestmark = pytest.mark.skipif(
    not pdata.CACHE.is_file(), reason=f"data set not at {pdata.CACHE} (CI copies it there)"
)
REPO = Path(__file__).resolve().parent.parent
SMOKE = [
    "--smoke",
    "--betas",
    "0.5",
    "--temperatures",
    "0",
    "--n-boot",
    "20",
    "--max-new-tokens",
    "4",
]
TABLES = (
    "sft_epochs.csv",
    "dpo_steps.csv",
    "dpo_epochs.csv",
    "win_rates.csv",
    "win_rates.md",
    "generations.jsonl",
    "examples.md",
)
# measured 45–55 s on 2 shared cores (load 5); a hung rendezvous or collective fails instead
TORCHRUN_SECONDS = 240

# What each rank of the torchrun run writes under the watched folder, seen by
# tests/test_bad_inputs.py's audit hook, then the chapter's module run as `-m` would run it.
RANK_WRITES = r"""
import os, runpy, sys
from pathlib import Path
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tests"))
import test_bad_inputs as watch
watch.WATCHED = [Path(os.environ["WATCH_ROOT"])]
sys.addaudithook(watch._audit)
sys.argv = ["chapters.ch8_instruction_dpo", *sys.argv[1:]]
try:
    runpy.run_module("chapters.ch8_instruction_dpo", run_name="__main__", alter_sys=True)
finally:
    with open(os.environ["WRITES_LOG"] + "." + os.environ["RANK"], "w") as f:
        f.write("\n".join(watch._WRITES))
"""


def files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def rows(path: Path) -> list:
    return list(csv.DictReader(open(path)))


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    """`torchrun --standalone --nproc_per_node 2 -m chapters.ch8_instruction_dpo --smoke ...`,
    started now."""
    tmp = tmp_path_factory.mktemp("torchrun")
    (tmp / "rank_writes.py").write_text(RANK_WRITES)
    root = tmp / "watched"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "WATCH_ROOT": str(root),
        "WRITES_LOG": str(tmp / "writes"),
        "DPO_PLOTS_DIR": str(root / "plots"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONUNBUFFERED": "1",
    }  # loopback only
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(tmp / "rank_writes.py"),
        *SMOKE,
        "--out",
        str(root / "out"),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    yield proc, tmp, root
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def one(torchrun, tmp_path_factory):
    """The same command in this process: `python -m chapters.ch8_instruction_dpo --smoke ...`, N =
    1.
    """
    tmp = tmp_path_factory.mktemp("one")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_PLOTS_DIR", str(tmp / "plots"))
        ch8.main([*SMOKE, "--out", str(tmp / "out")])
    return tmp


def _sigterm_at_dpo_step(n):
    """au.make_dpo_step that sends this process SIGTERM inside the n-th DPO training step (the
    fingerprint names the step function: functools.wraps keeps dpo_step's name, so --resume takes
    the checkpoint up).
    """
    calls = []

    @functools.wraps(dpo_step)
    def step(*args):
        calls.append(torch.is_grad_enabled())  # evaluation runs without gradients
        if calls[-1] and sum(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return dpo_step(*args)

    return lambda setup, reference: step


def test_sigterm_during_dpo_then_resume_gives_the_uninterrupted_run_over_an_older_runs_files(
    one, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    monkeypatch.setenv("DPO_PLOTS_DIR", str(tmp_path / "plots"))
    # an older run's leftovers: a cache that is no cache, a foreign checkpoint, a finished phase of
    # other settings
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "dpo_beta_0.5.pt").write_bytes(b"not a checkpoint")
    (out / "reference_train.safetensors").write_bytes(b"not a cache")
    (out / "models" / "dpo_beta_0.5").mkdir(parents=True)
    (out / "models" / "dpo_beta_0.5" / "history.json").write_text(
        json.dumps({"fingerprint": {"lr": 1}, "history": {}})
    )
    with monkeypatch.context() as m:
        m.setattr(au, "make_dpo_step", _sigterm_at_dpo_step(3))  # epoch 2, batch 1 of 2
        with pytest.raises(
            KeyboardInterrupt,
            match=r"^SIGTERM after batch 1 of 2 in epoch 2 of DPO β=0.5: "
            r"checkpoint .*dpo_beta_0.5.pt; run the same command again with --resume",
        ):
            ch8.main([*SMOKE, "--out", str(out)])
    said = capsys.readouterr().out
    assert (
        "fresh run in" in said
        and "reference_train.safetensors is incomplete or not a reference cache" in said
    )
    assert (
        files(out / "checkpoints") == ["dpo_beta_0.5.pt"] and not (out / "dpo_steps.csv").exists()
    )
    assert (out / "models" / "sft" / "history.json").is_file()
    ch8.main([*SMOKE, "--out", str(out), "--resume"])
    said = capsys.readouterr().out
    assert "SFT: finished by an earlier run" in said and "DPO β=0.5: resumed from" in said
    for name in TABLES:  # equal, not close: one process, the same operations in the same order
        assert (out / name).read_bytes() == (one / "out" / name).read_bytes(), name
    assert files(out / "checkpoints") == []  # a finished phase's checkpoint goes
    ids = torch.randint(0, 50257, (2, 7))
    for phase in ("sft", "dpo_beta_0.5"):
        with torch.no_grad():
            assert torch.equal(
                gpt.load_gpt2(out / "models" / phase)(ids),
                gpt.load_gpt2(one / "out" / "models" / phase)(ids),
            )

    # --resume over a cache that no longer matches: one line naming the flag; with the flag, rebuilt
    (out / "reference_validation.safetensors").write_bytes(
        (out / "reference_train.safetensors").read_bytes()
    )
    with pytest.raises(
        ValueError,
        match=r"reference_validation.safetensors is stale \(.*\); pass "
        r"--rebuild-reference-cache",
    ) as err:
        ch8.main([*SMOKE, "--out", str(out), "--resume"])
    assert "\n" not in str(err.value)  # (rebuilt on request: tests/test_ch8_scale.py)


def test_torchrun_with_two_processes_gives_the_tables_of_one_and_only_rank_0_writes(torchrun, one):
    proc, tmp, root = torchrun
    try:
        output, _ = proc.communicate(timeout=TORCHRUN_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"torchrun still running after {TORCHRUN_SECONDS} s")
    assert proc.returncode == 0, output[-3000:]
    assert (
        "torchrun: 2 processes (gloo), DDP" in output and output.count("tables: ") == 1
    )  # rank 0 prints, once
    out_1, out_2 = one / "out", root / "out"
    assert files(out_2) == files(
        out_1
    )  # the same tables, models and reference caches; no per-rank part left
    assert files(root / "plots") == files(one / "plots")
    writes = {r: (tmp / f"writes.{r}").read_text() for r in (0, 1)}
    assert (
        writes[1] == "" and str(out_2 / "dpo_steps.csv") in writes[0]
    )  # the hook saw rank 0 write
    # float32; the runs differ only in how each batch is split over the ranks (each rank pads its
    # own rows, DDP sums the gradients in another order), so by rounding. A reward is β × a
    # difference of sequence log-probs that are sums over tens of response tokens of ≈ −10.8 each (a
    # random model over 50 257 tokens): up to ~1e3, whose float32 rounding is up to ~1e3 × 6e-8 ≈
    # 6e-5; hence 1e-4 (measured: 5e-7 on SFT rows, 4e-6 on DPO rows). A gradient of the wrong pairs
    # shows at the scale of one step's change of the loss, ~3e-2 here. (AdamW hides a pure
    # gradient-scale error; tests/test_ch8_scale.py checks the scale to 1e-12 in float64.)
    for name in ("sft_epochs.csv", "dpo_steps.csv", "dpo_epochs.csv"):
        a, b = rows(out_1 / name), rows(out_2 / name)
        assert len(a) == len(b) and [list(r) for r in a] == [list(r) for r in b], name
        numeric = [k for k in a[0] if k != "split"]
        assert [r.get("split") for r in a] == [r.get("split") for r in b], name
        worst = max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b) for k in numeric)
        print(f"{name}: 2 vs 1 process, max |Δ| {worst:.2e}")
        assert worst < 1e-4, (name, worst)
    steps = [float(r["loss"]) for r in rows(out_1 / "dpo_steps.csv")]
    assert len(steps) == 4 and steps[0] != steps[-1]  # it trained
    # the same greedy texts, so the same SBERT scores: win rates equal, not close
    for name in ("win_rates.csv", "generations.jsonl"):
        assert (out_1 / name).read_text() == (out_2 / name).read_text(), name
    for phase in ("sft", "dpo_beta_0.5"):  # the saved models agree as the rows do
        ids = torch.randint(0, 50257, (1, 9))
        with torch.no_grad():
            a, b = (
                gpt.load_gpt2(out_1 / "models" / phase)(ids),
                gpt.load_gpt2(out_2 / "models" / phase)(ids),
            )
        assert (a - b).abs().max().item() < 1e-4, phase


@pytest.mark.parametrize("mode", ["--ladder", "--authors-setup"])
def test_ladder_and_authors_setup_under_torchrun_are_refused_with_one_line(
    mode, tmp_path, monkeypatch
):
    monkeypatch.setenv(
        "RANK", "0"
    )  # what torchrun sets: the refusal comes before any process group
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(
        ValueError,
        match=rf"^{mode} runs in one process and saves no models, checkpoints or reference "
        rf"cache .*; leave out torchrun and --save-every, or run without {mode}$",
    ) as e:
        ch8.main([*SMOKE, mode, "--save-every", "2", "--out", str(tmp_path / "out")])
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
