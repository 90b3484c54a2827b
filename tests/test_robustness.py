"""When the run itself goes wrong (issue 28): a divergence stops at its step in one line and leaves
the last finite checkpoint, which --resume takes up at a lower learning rate; a second run into a
folder that a run holds is refused; duplicated data is dropped before the split; chapter 8's paths
are judged before anything loads. (Token ids outside the vocabulary, and the command lines' one-line
errors: tests/test_bad_inputs.py.)
"""

import importlib
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
from chapters import CHAPTERS
from chapters.ch2_reward_model.reward_head import (
    RewardModel,
    count_task_pairs,
    train_reward_model,
)
from chapters.ch6_ppo.trainer import PPOConfig, PPOTrainer
from chapters.ch8_instruction_dpo import data as pdata
from chapters.ch8_instruction_dpo import scaled_run
from chapters.ch8_instruction_dpo.data import Pair
from chapters.ch8_instruction_dpo.miniature import pretrain_base
from chapters.ch8_instruction_dpo.trainers import train_dpo, train_sft
from chapters.training.checkpoints import load_training_checkpoint, lr_schedule
from chapters.training.distributed import Dist, wrap
from chapters.training.finetune import finetune, next_token_loss
from chapters.training.loop import Diverged, Run, train_epochs

REPO = Path(__file__).resolve().parent.parent
HUGE = 1e6  # a learning rate that takes any of these models to inf or nan in a step or two


# ---------------------------------------------------------------- divergence


def _line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and len(text) <= 400, text
    return text


def quadratic_loss(model, idx):
    """(w − 1)², float64: SGD at learning rate η maps w − 1 to (1 − 2η)(w − 1)."""
    x = torch.ones(len(idx), 1, dtype=torch.float64)
    loss = ((model(x) - 1) ** 2).mean()
    return loss, {"loss": loss.item()}


def train_quadratic(model, lr, checkpoint, resume=False, task="quadratic"):
    """6 SGD steps on `quadratic_loss` through the one training loop, a checkpoint after each.
    (Momentum 1e-300: plain SGD to the last bit, with a state for the checkpoint to hold.)"""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=1e-300)
    return train_epochs(
        wrap(model, Dist()),
        opt,
        lr_schedule(opt, 0, 6),
        loss_fn=quadratic_loss,
        batches=lambda epoch: [[0]] * 6,
        weight=len,
        epochs=1,
        dist=Dist(),
        run=Run(
            checkpoint=checkpoint, fingerprint={"lr": lr, "task": task}, resume=resume, every=1
        ),
        history=[],
        on_step=lambda history, epoch, metrics: history.append(metrics["loss"]),
        clip=None,
        desc="quadratic",
        progress=False,
        lr_flag="--lr",
    )


def weight_at(value):
    model = torch.nn.Linear(1, 1, bias=False).to(torch.float64)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_a_non_finite_loss_stops_before_its_update_and_resume_at_a_lower_lr_goes_on(
    tmp_path, capsys
):
    # lr 1e60: w − 1 grows ×(1 − 2e60) a step, so (w − 1)² overflows float64 at the step found
    # here by the same recursion in plain floats (the 4th), with every weight finite
    d, step = 1.0, 1
    while d * d != float("inf"):
        d, step = d * (1 - 2e60), step + 1
    checkpoint, model = tmp_path / "quadratic.pt", weight_at(2.0)
    with pytest.raises(Diverged) as err:
        train_quadratic(model, 1e60, checkpoint)
    assert model.weight.item() - 1 == pytest.approx(d, rel=1e-9)  # step's update never ran
    assert _line(err) == (
        f"quadratic diverged at batch {step} of 6 in epoch 1: loss inf, gradient norm "
        f"{2 * abs(model.weight.item() - 1):.4g}; stopped before the update, nothing saved after "
        f"it; lower --lr (now 1e+60) and run the same command again with --resume: it continues "
        f"from {checkpoint}"
    )
    # the weights of the update before gave the inf: the newest checkpoint is the one before them,
    # whose loss and gradient were seen finite
    state = load_training_checkpoint(checkpoint, {"lr": 1e60, "task": "quadratic"})
    assert state["position"] == {"epoch": 1, "batch": step - 2}
    assert len(state["history"]) == step - 2
    assert state["model"]["weight"].item() - 1 == pytest.approx(d / (1 - 2e60), rel=1e-9)
    capsys.readouterr()

    with pytest.raises(ValueError, match=r"written by another run \(task: 'quadratic' there"):
        train_quadratic(weight_at(2.0), 0.5, checkpoint, resume=True, task="other")  # lr alone
    # lr 0.5 sends w to 1 (here via 0: w − 1 rounds to w at 4e120), and there it stays
    resumed = weight_at(2.0)
    history = train_quadratic(resumed, 0.5, checkpoint, resume=True)
    assert (
        f"quadratic: resumed from {checkpoint} at epoch 1, batch {step - 1}, learning rate 0.5 "
        f"(the checkpoint's: 1e+60)" in capsys.readouterr().out
    )
    assert step == 4 and len(history) == 6 and history[-1] == 0.0 and resumed.weight.item() == 1.0


def test_a_weight_past_floats_range_is_never_checkpointed(tmp_path):
    class Overflowing(torch.optim.SGD):
        def step(self, closure=None):  # a finite step that leaves a weight at inf
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))

    def train(batches):
        model = weight_at(2.0)
        return train_epochs(
            wrap(model, Dist()),
            Overflowing(model.parameters(), lr=0.1, momentum=1e-300),
            None,
            loss_fn=quadratic_loss,
            batches=lambda epoch: [[0]] * batches,
            weight=len,
            epochs=1,
            dist=Dist(),
            run=Run(checkpoint=tmp_path / "q.pt", fingerprint={}, every=1),
            history=[],
            desc="q",
            progress=False,
        )

    # a checkpoint due after step 1 waits for step 2's loss, which is inf: never written
    with pytest.raises(Diverged, match=r"^q diverged at batch 2 of 3 in epoch 1: loss inf"):
        train(3)
    assert not (tmp_path / "q.pt").exists()
    # the last epoch's checkpoint has no step after it: its weights are checked themselves
    with pytest.raises(Diverged, match=r"^q diverged: a weight is not finite after step 1 of "):
        train(1)
    assert not (tmp_path / "q.pt").exists()


def tiny_pairs(n=8, vocab=64):
    g = torch.Generator().manual_seed(0)

    def draw(lo, hi):
        size = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(1, vocab, (size,), generator=g).tolist()

    return [Pair(i, draw(2, 5), draw(1, 6), draw(1, 6)) for i in range(n)]


def test_chapter_8s_phases_name_their_own_learning_rate_flag(one_thread):
    pairs, loop = tiny_pairs(), dict(batch_size=4, seed=0, device="cpu", pad_id=0)
    torch.manual_seed(0)
    with pytest.raises(Diverged) as err:
        train_sft(gpt.GPT(gpt.GPTConfig.tiny()), pairs, pairs[:3], epochs=2, lr=HUGE, **loop)
    assert _line(err).startswith("SFT diverged at batch ") and _line(err).endswith(
        "; lower --sft-lr (now 1e+06) and run again"
    )
    sft = gpt.GPT(gpt.GPTConfig.tiny()).eval().requires_grad_(False)
    caches = scaled_run.Scale().reference_caches(
        sft, {"train": pairs, "validation": pairs[:3]}, 0, 4, 64, seed=0
    )
    with pytest.raises(Diverged, match=r"^DPO β=0\.5 diverged at batch .*--dpo-lr \(now 1e\+06\)"):
        train_dpo(sft, pairs, pairs[:3], caches, 0.5, epochs=2, lr=HUGE, **loop)
    config = dict(n_positions=32, n_embd=16, n_layer=1, n_head=2)
    with pytest.raises(Diverged, match=r"^base diverged at batch .*--base-lr \(now 1e\+06\)"):
        pretrain_base(
            64,
            pairs,
            pairs[:3],
            epochs=2,
            lr=HUGE,
            batch_size=4,
            seed=0,
            device="cpu",
            eos_id=0,
            config=config,
        )


def test_finetune_reward_model_and_ppo_stop_on_a_non_finite_step(one_thread):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig.tiny(vocab_size=16, n_positions=16))
    ids = torch.randint(16, (32, 8), generator=g)
    with pytest.raises(Diverged, match=r"^SFT diverged at batch .* the learning rate \(now 1e\+06"):
        finetune(model, next_token_loss, {"ids": ids}, 20, 8, HUGE, g, desc="SFT", progress=False)

    pairs, _, _ = count_task_pairs(32, generator=g)
    rm = RewardModel(gpt.GPT(gpt.GPTConfig.tiny(vocab_size=16, n_positions=16)))
    with pytest.raises(Diverged) as err:
        train_reward_model(rm, pairs, steps=20, batch_size=8, lr=HUGE, generator=g, progress=False)
    assert _line(err).startswith("the reward model diverged at step ") and _line(err).endswith(
        "lower train_reward_model's lr (now 1e+06)"
    )

    policy = gpt.GPT(gpt.GPTConfig.tiny(vocab_size=16, n_positions=16))
    config = PPOConfig(lr=HUGE, batch_size=8, minibatch_size=4, epochs=4, response_length=4)
    score = lambda ids, attention, response: ids.float().mean(-1)  # noqa: E731
    trainer = PPOTrainer(policy, gpt.GPT(policy.config), score, [[1, 2]], config)
    with pytest.raises(Diverged, match=r"^PPO diverged at iteration \d+, update \d+: .*PPOConfig"):
        trainer.train(5, progress=False)


# ---------------------------------------------------------------- one run per output folder

HOLDER = """
import sys, time
from chapters.ch8_instruction_dpo.scaled_run import Scale
scale = Scale()
scale.hold(sys.argv[1])
print("holding", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_held_folder_is_refused_until_the_holder_dies_even_by_kill_9(
    tmp_path,
):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(ValueError) as err:
            scaled_run.Scale().hold(folder)
        assert _line(err) == (
            f"--out {folder} is in use by another run (pid {holder.pid}); two runs in one folder "
            "would mix their files: wait for it to end, or pass another --out"
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    scale = scaled_run.Scale()
    scale.hold(folder)  # the kernel let go with the process
    assert (folder / scaled_run.LOCK).read_text() == f"{os.getpid()}\n"
    scale.close()
    scaled_run.Scale().hold(folder)  # and `close` lets go too


# ---------------------------------------------------------------- data integrity


def test_repeated_entries_are_dropped_before_the_split_so_no_test_pair_is_in_train(
    tmp_path, capsys
):
    unique = [
        {"instruction": f"Say {i}.", "input": "", "output": "", "chosen": f"{i}", "rejected": "no"}
        for i in range(30)
    ]
    same = {**unique[0], "rejected": unique[0]["chosen"]}  # chosen == rejected: kept, as before
    repeated = [e for _ in range(20) for e in unique] + [same]
    (tmp_path / "data.json").write_text(json.dumps(repeated))
    entries = pdata.load(tmp_path / "data.json")
    assert capsys.readouterr().out == (
        f"data: dropped 570 exact duplicate entries of 601 in {tmp_path / 'data.json'} (same "
        "instruction, input, chosen and rejected), before the split, so that no pair sits in two "
        "splits; 31 left\n"
    )
    assert entries == unique + [same]
    split = pdata.split(entries)
    texts = {k: {json.dumps(entries[i], sort_keys=True) for i in v} for k, v in split.items()}
    assert not texts["test"] & texts["train"] and not texts["validation"] & texts["train"]


def test_entries_that_share_a_prompt_land_in_one_split():
    # 40 prompts, each answered 3 ways (different chosen/rejected): a row split would scatter them
    entries = [
        {"instruction": f"Say {i}.", "input": "", "chosen": f"{i}{k}", "rejected": f"no{k}"}
        for i in range(40)
        for k in range(3)
    ]
    split = pdata.split(entries)
    homes = {}
    for name, indices in split.items():
        for i in indices:
            homes.setdefault(pdata.prompt_key(entries[i]), set()).add(name)
    assert all(len(h) == 1 for h in homes.values()) and len(homes) == 40
    assert sorted(i for v in split.values() for i in v) == list(range(120))  # every row, once


def test_the_real_data_set_has_no_duplicate_and_no_prompt_in_two_splits():
    if not pdata.CACHE.is_file():
        pytest.skip("data set missing")
    raw = json.loads(pdata.CACHE.read_text())
    assert pdata.load() == raw and len(raw) == 1100  # nothing dropped
    split, row_split = pdata.split(raw), pdata.split(ch8.distinct_prompts(1100))
    prompts = {k: {pdata.prompt_key(raw[i]) for i in v} for k, v in split.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    # the row split put 8 answers to a training prompt in validation (2) and test (6): they move
    moved = {k: sorted(set(split[k]) - set(row_split[k])) for k in split}
    assert moved["train"] == [119, 193, 223, 281, 429, 695, 829, 975]
    assert moved["validation"] == moved["test"] == []
    assert [len(split[k]) for k in ("train", "validation", "test")] == [943, 53, 104]


# ---------------------------------------------------------------- paths first


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_chapter_refuses_a_negative_seed_naming_the_flag(chapter, capsys):
    main = importlib.import_module(f"chapters.{chapter}.__main__").main
    with pytest.raises(SystemExit) as exit_:
        main(["--seed", "-5"])
    assert exit_.value.code == 2  # argparse, before anything loads
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: argument --seed: must be 0 or more, got -5"
    )



def test_chapter_8_judges_its_paths_before_loading_anything(monkeypatch, capsys):
    def loaded(*args, **kwargs):
        raise AssertionError("loaded before the paths were judged")

    monkeypatch.setattr(ch8, "load_model", loaded)
    monkeypatch.setattr(pdata, "load", loaded)
    monkeypatch.setattr(scaled_run, "start", loaded)
    if Path("/proc/self/mounts").is_file():
        with pytest.raises(PermissionError, match=r"^--out: cannot write tables to /proc/nope/run"):
            ch8.main(["--smoke", "--out", "/proc/nope/run"])
    with pytest.raises(ValueError, match=r"^--checkpoint /no/such/ckpt: no such file or folder$"):
        ch8.main(["--checkpoint", "/no/such/ckpt"])
    with pytest.raises(ValueError, match=r"^--data: no data file at /no/such\.json; "):
        ch8.main(["--smoke", "--data", "/no/such.json"])
    with pytest.raises(SystemExit):
        ch8.main(["--smoke", "--seed", "-5"])
    assert "argument --seed: must be 0 or more, got -5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ch8.main(["--help"])
    assert "(default 0 = never: only at epoch ends and on a stop)" in " ".join(
        capsys.readouterr().out.split()
    )
