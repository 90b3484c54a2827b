"""Chapter 8 at scale: N processes (DDP, FSDP2) against one, micro-batches against one large batch,
a stopped and resumed run against one never stopped, refused checkpoints and caches, the schedule,
saved models.

Models: gpt.GPTConfig.tiny(), the DPO loss of chapters.ch4_dpo against a frozen reference; float64
wherever two computations must agree to rounding (so a tolerance of 1e-9 has six orders of magnitude
of room over float64's reassociation error), float32 where they must agree exactly.
"""

import math
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import gpt
from chapters.ch4_dpo.loss import dpo_loss, response_logprobs
from chapters.ch8_instruction_dpo import reference_store
from chapters.ch8_instruction_dpo.data import Pair, length_grouped_batches
from chapters.ch8_instruction_dpo.dpo_step import ReferenceCache
from chapters.common.rows import pair_rows
from chapters.training import checkpoints as train_state
from chapters.training import distributed
from chapters.training.loop import Run, _step, train_epochs

BETA, LR, BATCH, EPOCHS = 0.5, 1e-2, 4, 2


def tiny_pairs(n=13, seed=0, vocab=64):
    """n pairs of random tokens: prompts 2–5 tokens, responses 1–6, so every batch needs padding."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return torch.randint(
            1, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g
        ).tolist()

    return [Pair(i, draw(2, 5), draw(1, 6), draw(1, 6)) for i in range(n)]


def tiny_models(dtype=torch.float64, seed=0):
    """(policy, frozen reference): the same tiny GPT-2 start, as chapter 8's DPO starts π_θ = π_ref
    = π_SFT."""
    torch.manual_seed(seed)
    reference = gpt.GPT(gpt.GPTConfig.tiny()).to(dtype).eval().requires_grad_(False)
    torch.manual_seed(seed + 1)
    policy = gpt.GPT(gpt.GPTConfig.tiny()).to(dtype)
    with (
        torch.no_grad()
    ):  # the policy a little away from the reference, so the first loss is not exactly ln 2
        for p, q in zip(policy.parameters(), reference.parameters()):
            p.copy_(q + 0.05 * (p - q))
    return policy, reference


def dpo_objective(pairs, reference):
    """loss_fn(model, idx) -> (mean of ch4's eq. (38) over pairs[idx], metrics), the reference live
    and frozen."""

    def loss_fn(model, idx):
        ids, att, resp = pair_rows([pairs[i] for i in idx], 0)
        B = len(idx)
        logps = response_logprobs(model(ids, att), ids, resp)
        with torch.no_grad():
            ref = response_logprobs(reference(ids, att), ids, resp)
        loss = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], BETA).mean()
        return loss, {"loss": loss.item()}

    return loss_fn


def train(
    pairs,
    policy,
    reference,
    d,
    *,
    fsdp=False,
    grad_accum=1,
    run=None,
    stop=None,
    on_step=None,
    epochs=EPOCHS,
    schedule=("constant", 0),
):
    """Chapter 8's DPO loop on the tiny model: per-step losses, and the trained engine."""
    engine = distributed.wrap(policy, d, fsdp=fsdp)
    opt = torch.optim.AdamW(distributed.unwrapped(engine).parameters(), lr=LR, weight_decay=0.0)
    n_batches = math.ceil(len(pairs) / BATCH)
    sched = train_state.lr_schedule(opt, schedule[1], epochs * n_batches, schedule[0])

    def log(history, epoch, m):
        history["loss"].append(m["loss"])
        if on_step is not None:
            on_step(history)

    history = train_epochs(
        engine,
        opt,
        sched,
        loss_fn=dpo_objective(pairs, reference),
        dist=d,
        epochs=epochs,
        grad_accum=grad_accum,
        run=run,
        stop=stop,
        batches=lambda e: length_grouped_batches([p.packed_length for p in pairs], BATCH, e),
        weight=len,
        history={"loss": []},
        on_step=log,
        desc="DPO",
    )
    return history["loss"], engine


# ---------------------------------------------------------------- two processes against one


def _worker(rank, world, port, out, pairs):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    d = distributed.init("cpu")
    results = {}
    for name, fsdp, k in (("ddp", False, 2), ("fsdp", True, 1)):
        policy, reference = tiny_models()
        losses, engine = train(pairs, policy, reference, d, fsdp=fsdp, grad_accum=k)
        state, _ = train_state.full_state(distributed.unwrapped(engine))  # collective under FSDP
        results[name] = (losses, state)
    policy, reference = (
        tiny_models()
    )  # one global batch of 5 pairs: 3 and 2 a rank, 2 micro-batches each
    engine = distributed.wrap(policy, d)
    _step(engine, dpo_objective(pairs, reference), list(range(5)), len, d, grad_accum=2)
    results["grad"] = [p.grad.clone() for p in policy.parameters()]
    cache = reference_store.cached_reference(
        os.path.join(out, "ref.safetensors"),
        reference,
        pairs,
        0,
        batch_size=3,
        fingerprint={"test": 1},
        dist=d,
        verbose=False,
    )
    results["cache"] = cache.get(list(range(len(pairs))))
    from chapters.ch8_instruction_dpo.scaled_run import Scale

    results["pipeline"] = _pipeline(
        tiny_pairs(10), Scale(dist=d, fsdp=True, folder=Path(out) / "run")
    )[:3]
    if d.main:
        torch.save(results, os.path.join(out, "results.pt"))
    distributed.close(d)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """2 gloo processes over loopback: a DDP run (K = 2 micro-batches a rank), an FSDP2 run, a
    cache. Forked, not spawned: a spawned child imports torch, transformers and this module again
    (~5-10 s of the suite on 2 cores). No process group exists before the fork, and each child runs
    torch on one thread (as chapter 7's forked sweep workers do), so it never enters the thread pool
    the parent may have used."""
    out = tmp_path_factory.mktemp("two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pairs = tiny_pairs()
    mp.start_processes(
        _worker, args=(2, port, str(out), pairs), nprocs=2, join=True, start_method="fork"
    )
    return pairs, torch.load(out / "results.pt", weights_only=False)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_give_the_per_step_losses_and_final_weights_of_one(
    two_processes, engine, one_thread
):
    # 13 pairs in batches of 4 (last batch 1 pair: under DDP with K = 2 one rank runs only weight-0
    # micro-batches). The runs differ only in the order of float64 sums (per-rank forwards, the
    # gradient all-reduce). Measured: losses within 4e-16, weights within 1.2e-13 after 8 AdamW
    # steps. The bounds 1e-12 and 1e-10 are tight because AdamW hides a wrong gradient scale (a
    # missing × N moves weights only through eps = 1e-8: ~1e-7 here; weighting the last batch's
    # micro-batches alike moved the weights 3e-3 but the losses only 7e-9).
    pairs, results = two_processes
    losses_1, engine_1 = train(pairs, *tiny_models(), distributed.Dist())
    state_1 = engine_1.model.state_dict()
    losses_2, state_2 = results[engine]
    assert len(losses_2) == len(losses_1) == EPOCHS * math.ceil(len(pairs) / BATCH)
    assert max(abs(a - b) for a, b in zip(losses_1, losses_2)) < 1e-12
    assert losses_1[0] != losses_1[-1]  # it trained
    assert set(state_2) == set(state_1)
    assert max((state_1[k] - state_2[k]).abs().max().item() for k in state_1) < 1e-10


def test_two_ranks_with_two_micro_batches_each_give_the_gradient_of_the_whole_batch(two_processes):
    pairs, results = (
        two_processes  # float64: ch4's eq. (38) mean over all 5 pairs in one forward, by autograd
    )
    policy, reference = tiny_models()
    loss, _ = dpo_objective(pairs, reference)(policy, list(range(5)))
    direct = torch.autograd.grad(loss, list(policy.parameters()))
    assert max((g - h).abs().max().item() for g, h in zip(direct, results["grad"])) < 1e-12


def test_ch8_trainers_under_fsdp_on_two_ranks_log_the_rows_of_one_process(
    two_processes, tmp_path, one_thread
):
    # float32: SFT and DPO rows (losses, rewards, accuracies, token-level KL) within 1e-5 (measured
    # 1.4e-6). A KL weighted by pairs instead of tokens moved a row by 1.5e-2; unequal eval forwards
    # per rank stopped FSDP2.
    from chapters.ch8_instruction_dpo.scaled_run import Scale

    one = _pipeline(tiny_pairs(10), Scale(folder=tmp_path))
    for rows_1, rows_2 in zip(one[:3], two_processes[1]["pipeline"]):
        assert len(rows_1) == len(rows_2)
        assert (
            max(
                abs(a[k] - b[k])
                for a, b in zip(rows_1, rows_2)
                for k in a
                if isinstance(a[k], float)
            )
            < 1e-5
        )


def test_reference_cache_built_on_two_ranks_equals_the_one_built_in_one_process(two_processes):
    pairs, results = two_processes
    _, reference = tiny_models()
    whole = ReferenceCache(reference, pairs, 0, 3).get(list(range(len(pairs))))
    for a, b in zip(whole, results["cache"]):
        assert (
            a.shape == b.shape and (a - b).abs().max().item() < 1e-12
        )  # float64, other batches' padding


# ---------------------------------------------------------------- micro-batches


def test_shards_and_micro_batches_cover_each_pair_of_the_batch_exactly_once():
    idx = list(range(11))
    for world in (1, 2, 3):
        for k in (1, 2, 4):
            parts = [
                m
                for r in range(world)
                for m in distributed.micro_batches(distributed.shard(idx, r, world), k)
            ]
            assert sorted(i for m in parts for i in m) == idx and len(parts) == world * k


def test_k_accumulated_micro_batches_give_the_gradient_of_one_k_times_larger_batch(one_thread):
    # float64; the 7 pairs run as K = 3 micro-batches of 2, 3 and 2 pairs, against one forward of
    # all 7 computed directly from ch4's eq. (38) mean. Only summation order differs: |Δ| ≤ 1e-12
    # (values ~1e-2) leaves 1e4 of room.
    pairs = tiny_pairs(7)
    policy, reference = tiny_models()
    loss_fn = dpo_objective(pairs, reference)
    loss, _ = loss_fn(policy, list(range(7)))
    direct = torch.autograd.grad(loss, list(policy.parameters()))
    engine = distributed.wrap(policy, distributed.Dist())
    metrics = _step(engine, loss_fn, list(range(7)), len, distributed.Dist(), grad_accum=3)
    assert abs(metrics["loss"] - loss.item()) < 1e-12
    worst = max((g - p.grad).abs().max().item() for g, p in zip(direct, policy.parameters()))
    assert worst < 1e-12 and max(g.abs().max().item() for g in direct) > 1e-4


# ---------------------------------------------------------------- stop, checkpoint, resume


def test_sigterm_mid_epoch_then_resume_gives_exactly_the_uninterrupted_loss_sequence(
    tmp_path, one_thread
):
    # float32 on one thread: the same operations in the same order, so the sequences must be equal,
    # not close.
    pairs = tiny_pairs()
    setting = dict(grad_accum=2, schedule=("cosine", 3))
    whole, engine = train(pairs, *tiny_models(torch.float32), distributed.Dist(), **setting)
    ckpt = tmp_path / "dpo.pt"
    run = Run(checkpoint=ckpt, fingerprint={"beta": BETA, "lr": LR}, resume=True)

    def sigterm_at_step_2(history):  # a real signal, through StopRequest's handler
        if len(history["loss"]) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with (
        train_state.StopRequest() as stop,
        pytest.raises(
            KeyboardInterrupt,
            match=r"SIGTERM after batch 2 of 4 "
            r"in epoch 1.*--resume",
        ),
    ):
        train(
            pairs,
            *tiny_models(torch.float32),
            distributed.Dist(),
            run=run,
            stop=stop,
            on_step=sigterm_at_step_2,
            **setting,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dpo.pt"
    ]  # written whole, no temporary file left
    fresh = tiny_models(torch.float32, seed=7)[
        0
    ]  # other weights: the checkpoint must replace them all
    resumed, engine_2 = train(
        pairs, fresh, tiny_models(torch.float32)[1], distributed.Dist(), run=run, **setting
    )
    assert resumed == whole
    assert all(
        torch.equal(a, b)
        for a, b in zip(engine.model.state_dict().values(), engine_2.model.state_dict().values())
    )


def test_cut_foreign_or_other_runs_checkpoints_are_refused_with_one_line(tmp_path, one_thread):
    pairs = tiny_pairs(4)
    run = Run(checkpoint=tmp_path / "good.pt", fingerprint={"lr": LR})
    train(pairs, *tiny_models(torch.float32), distributed.Dist(), run=run, epochs=1)
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    (tmp_path / "noise.pt").write_bytes(os.urandom(1000))
    for name, fingerprint, why in (
        ("cut.pt", {"lr": LR}, "incomplete or not a training checkpoint"),
        ("noise.pt", {"lr": LR}, "incomplete or not a training checkpoint"),
        ("foreign.pt", {"lr": LR}, "not a training checkpoint of this version"),
        ("good.pt", {"lr": 2 * LR}, "written by another run \\(lr: 0.01 there, 0.02 here\\)"),
    ):
        with pytest.raises(ValueError, match=why) as err:
            train_state.load_training_checkpoint(tmp_path / name, fingerprint)
        assert "\n" not in str(err.value) and "--resume" in str(err.value)
    assert train_state.load_training_checkpoint(tmp_path / "good.pt", {"lr": LR})["position"] == {
        "epoch": 2,
        "batch": 0,
    }


def test_rng_states_come_back(one_thread):
    import random

    import numpy as np

    state = train_state.rng_state()
    draws = (torch.rand(3), random.random(), np.random.rand())
    train_state.set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


# ------------------------------------------------------------- schedule, flags, saved models, cache


def test_learning_rate_warms_up_linearly_then_stays_or_decays_as_written():
    # warm-up 2 of 6 updates: factors (s + 1) / 3, then 1 / (6 − s) / 4 / ½(1 + cos(π (s − 2) / 4)),
    # by hand
    expect = {
        "constant": [1 / 3, 2 / 3, 1, 1, 1, 1],
        "linear": [1 / 3, 2 / 3, 1, 3 / 4, 1 / 2, 1 / 4],
        "cosine": [1 / 3, 2 / 3, 1, (1 + 2**-0.5) / 2, 1 / 2, (1 - 2**-0.5) / 2],
    }
    for decay, factors in expect.items():
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
        sched, seen = train_state.lr_schedule(opt, 2, 6, decay), []
        for _ in range(6):
            seen.append(opt.param_groups[0]["lr"] / 0.5)
            opt.step()
            sched.step()
        assert max(abs(a - b) for a, b in zip(seen, factors)) < 1e-15, decay
    with pytest.raises(ValueError, match="unknown learning-rate decay 'step'"):
        train_state.lr_factor(0, 0, 1, "step")


def test_fsdp_without_torchrun_is_refused_with_one_line(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match=r"--fsdp .* torchrun --standalone --nproc_per_node N"):
        distributed.init("cpu", fsdp=True)
    assert distributed.init("cpu") == distributed.Dist()  # plain python -m: N = 1


def test_saved_model_loads_with_load_gpt2_and_gives_the_same_logits(tmp_path):
    model = tiny_models(torch.float32)[0].eval()
    folder = train_state.save_gpt2(model.state_dict(), model.config, tmp_path / "policy")
    loaded = gpt.load_gpt2(folder)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert loaded.config == model.config and sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_reference_cache_on_disk_is_reused_refused_when_stale_and_rebuilt_on_request(
    tmp_path, monkeypatch
):
    pairs = tiny_pairs(6)
    _, reference = tiny_models(torch.float32)
    path = tmp_path / "ref.safetensors"

    def fp(ref):
        return reference_store.reference_fingerprint(ref, pairs, max_length=64, batch_size=4)

    built = reference_store.cached_reference(
        path, reference, pairs, 0, batch_size=4, fingerprint=fp(reference)
    )
    fresh = ReferenceCache(reference, pairs, 0, 4).get([4, 0, 2])
    with monkeypatch.context() as m:  # the second call must read the file, not build
        m.setattr(ReferenceCache, "__init__", lambda *a, **k: pytest.fail("built again"))
        reused = reference_store.cached_reference(
            path, reference, pairs, 0, batch_size=4, fingerprint=fp(reference)
        )
    for a, b, c in zip(fresh, built.get([4, 0, 2]), reused.get([4, 0, 2])):
        assert torch.equal(a, b) and torch.equal(a, c)
    other = tiny_models(torch.float32, seed=3)[1]  # another SFT model: another reference
    with pytest.raises(
        ValueError,
        match=r"reference cache .* is stale \(reference_sha256: .*--rebuild-reference-cache",
    ):
        reference_store.cached_reference(path, other, pairs, 0, batch_size=4, fingerprint=fp(other))
    with pytest.raises(
        ValueError, match=r"stale \(n_pairs: 6 there, 5 here; pairs_sha256: '[0-9a-f]{12}…' there"
    ):
        reference_store.cached_reference(
            path,
            reference,
            pairs[:5],
            0,
            batch_size=4,
            fingerprint=reference_store.reference_fingerprint(
                reference, pairs[:5], max_length=64, batch_size=4
            ),
        )
    rebuilt = reference_store.cached_reference(
        path, other, pairs, 0, batch_size=4, fingerprint=fp(other), rebuild=True
    )
    assert torch.equal(rebuilt.get([1])[0], ReferenceCache(other, pairs, 0, 4).get([1])[0])
    assert reference_store.cached_reference(
        path, other, pairs, 0, batch_size=4, fingerprint=fp(other)
    )
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="incomplete or not a reference cache"):
        reference_store.cached_reference(path, other, pairs, 0, batch_size=4, fingerprint=fp(other))


# ----------------------------------------------------------- chapter 8's trainers with a run folder


def _pipeline(pairs, scale, stop_at_dpo_step=None):
    """train_sft then train_dpo (chapter 8's fast step, the reference cache through the disk), as
    ch8 runs them."""
    from chapters.ch8_instruction_dpo.trainers import dpo_step, train_dpo, train_sft

    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig.tiny())
    loop = dict(batch_size=4, seed=0, device="cpu", pad_id=0, scale=scale)
    sft_rows = train_sft(model, pairs, pairs[:3], epochs=2, lr=1e-2, **loop)
    model.eval().requires_grad_(False)
    caches = scale.reference_caches(model, {"train": pairs, "validation": pairs[:3]}, 0, 4, 64)
    calls = []

    def step(*a):  # ch8's step; a SIGTERM after the given training step
        out = dpo_step(*a)
        calls.append(torch.is_grad_enabled())
        if sum(calls) == stop_at_dpo_step and calls[-1]:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    policy, steps, epochs = train_dpo(
        model, pairs, pairs[:3], caches, 0.5, epochs=2, lr=1e-2, step=step, **loop
    )
    return sft_rows, steps, epochs, policy


def test_ch8_trainers_save_each_phase_and_a_sigterm_then_resume_gives_the_same_rows(
    tmp_path, one_thread, capsys
):
    from chapters.ch8_instruction_dpo.scaled_run import Scale

    pairs = tiny_pairs(10)
    whole = _pipeline(pairs, Scale(folder=tmp_path / "whole", fingerprint={"run": 1}))
    with pytest.raises(
        KeyboardInterrupt, match="SIGTERM after batch 1 of 3 in epoch 2 of DPO β=0.5"
    ):
        _pipeline(pairs, Scale(folder=tmp_path / "cut", fingerprint={"run": 1}), stop_at_dpo_step=4)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == [
        "dpo_beta_0.5.pt"
    ]
    capsys.readouterr()
    resumed = _pipeline(pairs, Scale(folder=tmp_path / "cut", fingerprint={"run": 1}, resume=True))
    assert "SFT: finished by an earlier run" in capsys.readouterr().out
    assert resumed[:3] == whole[:3]  # SFT rows, DPO step rows, DPO epoch rows: equal, not close
    assert all(
        torch.equal(a, b)
        for a, b in zip(whole[3].state_dict().values(), resumed[3].state_dict().values())
    )
    assert not any(
        (tmp_path / "cut" / "checkpoints").iterdir()
    )  # a finished phase's checkpoint goes
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.equal(
            gpt.load_gpt2(tmp_path / "cut" / "models" / "dpo_beta_0.5")(ids), resumed[3](ids)
        )
    with pytest.raises(
        ValueError, match=r"models/sft was trained with other settings \(run: 1 there, 2 here\)"
    ):
        _pipeline(pairs, Scale(folder=tmp_path / "cut", fingerprint={"run": 2}, resume=True))


def test_resume_without_a_run_and_too_small_a_batch_are_one_line_each(tmp_path):
    from types import SimpleNamespace

    from chapters.ch8_instruction_dpo.scaled_run import start

    args = SimpleNamespace(
        out=tmp_path,
        resume=True,
        device="cpu",
        fsdp=False,
        batch_size=2,
        grad_accum=4,
        tag="t",
        seed=0,
        max_length=8,
        warmup_steps=0,
        lr_schedule="constant",
        save_every=0,
        rebuild_reference_cache=False,
    )
    with pytest.raises(
        ValueError, match=r"--resume: nothing to resume in .* \(no checkpoints/ or models/ there\)"
    ):
        start(args)
    args.resume = False
    with pytest.raises(
        ValueError, match=r"--batch-size 2 is fewer pairs than the 1 process\(es\) × --grad-accum 4"
    ):
        start(args)
