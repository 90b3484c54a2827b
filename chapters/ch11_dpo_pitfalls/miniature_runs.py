"""Chapter 11 on chapter 8's miniature: DPO, DPOP, DPO + NLL and R-DPO from its SFT model, measured.

- `miniature_sft`: the SFT model of chapter 8's miniature (its data: chapter 8's
  `miniature.miniature_data`), reused from a run of chapter 8 (or of this chapter) when one is on
  disk with the same settings, else trained here as chapter 8 trains it;
- `Objective`: one loss of this chapter (eq. (38), DPOP, DPO + NLL, R-DPO) at a β and a weight;
  `objective_step`: chapter 8's fast packed step with that loss, in `trainers.dpo_step`'s signature;
- `train_objective`: chapter 8's DPO phase with that loss, a call of chapter 8's `train_dpo` (same
  loop, optimiser, batches, budget), reading `pair_readings` of fixed pairs as it goes;
- `greedy_responses`: greedy answers to the test prompts, as chapter 8 generates them, and whether
  each stopped (EOS) within the token budget;
- `miniature_experiment`: all of it at a budget (`BUDGETS`), with SBERT win rates and the time of
  each part.
"""

import contextlib
import io
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import gpt
from chapters.ch4_dpo.loss import dpo_loss, dpo_metrics
from chapters.ch8_instruction_dpo import data as pdata
from chapters.ch8_instruction_dpo import miniature
from chapters.ch8_instruction_dpo.dpo_step import (
    autocast,
    head_logprobs,
    sequence_logprobs,
    token_kl,
)
from chapters.ch8_instruction_dpo.length_control import add_length_columns
from chapters.ch8_instruction_dpo.reference_store import pairs_sha256
from chapters.ch8_instruction_dpo.scaled_run import Scale
from chapters.ch8_instruction_dpo.trainers import dpo_evaluate, train_dpo, train_sft
from chapters.ch8_instruction_dpo.win_rates import SBERT, load_sbert, score_runs
from chapters.ch11_dpo_pitfalls.length import r_dpo_loss
from chapters.ch11_dpo_pitfalls.losses import dpop_loss, rpo_loss
from chapters.ch11_dpo_pitfalls.pair_readings import end_distribution, pair_readings
from chapters.ch11_dpo_pitfalls.validation import check_beta, check_weight
from chapters.common.files import atomic_open
from chapters.common.rows import packed_pairs_batch
from chapters.training.checkpoints import save_gpt2
from gpt import generate
from gpt.generation import left_pad

REPO = Path(__file__).resolve().parents[2]
# chapter 8's --miniature settings (its __main__.DEFAULTS, third column; a test keeps them equal)
SETTINGS = dict(
    base_epochs=6,
    base_lr=2e-3,
    sft_epochs=1,
    sft_lr=3e-4,
    dpo_epochs=2,
    dpo_lr=1e-4,
    max_length=128,
    max_new_tokens=64,
    batch_size=8,
    eval_batch_size=16,
)
# where an SFT model of the miniature may already be: chapter 8's run folder, then this chapter's
SFT_FOLDERS = (REPO / "runs" / "ch8_miniature", REPO / "runs" / "ch11_miniature")
KINDS = {"dpo": "DPO", "dpop": "DPOP", "rpo": "DPO + NLL", "r-dpo": "R-DPO"}


# ---------------------------------------------------------------- data and the SFT model
def _loop(seed: int, device, pad_id: int) -> dict:
    """What chapter 8's SFT and DPO loops take alike on the miniature."""
    return dict(batch_size=SETTINGS["batch_size"], seed=seed, device=device, pad_id=pad_id)


def generation_settings(data: dict, device) -> dict:
    """How chapter 8's miniature generates answers to test prompts: its token budget and batch
    size, `device`, and the data's EOS and compact vocabulary (the tokenizer)."""
    return dict(
        max_new_tokens=SETTINGS["max_new_tokens"],
        batch_size=SETTINGS["eval_batch_size"],
        device=device,
        eos_id=data["eos"],
        tokenizer=data["vocab"],
    )


def _fingerprint(data: dict, seed: int) -> dict:
    """What an SFT model on disk must have been trained with to be reused here."""
    return {
        "model": "miniature",
        "seed": seed,
        "max_length": SETTINGS["max_length"],
        "batch_size": SETTINGS["batch_size"],
        "pairs_sha256": pairs_sha256(data["sft_pairs"]["train"]),
        "base": {"epochs": SETTINGS["base_epochs"], "lr": SETTINGS["base_lr"]},
        "sft": {"epochs": SETTINGS["sft_epochs"], "lr": SETTINGS["sft_lr"]},
    }


def _saved_fingerprint(folder: Path):
    """The settings a finished run in `folder` trained its SFT model with, in `_fingerprint`'s
    form (chapter 8's history.json files, or this chapter's), else None."""
    try:
        sft = json.loads((folder / "models" / "sft" / "history.json").read_text())["fingerprint"]
        if "base" in sft:  # written by `miniature_sft`
            return sft
        base = json.loads((folder / "models" / "base" / "history.json").read_text())
        base = base["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None
    plain = sft.get("mistakes_on", "") == "" and sft.get("warmup_steps", 0) == 0
    plain = plain and sft.get("lr_schedule", "constant") == "constant"
    if not plain or sft.get("loss") != "chapters.ch8_instruction_dpo.trainers.sft_loss":
        return None
    return {
        "model": sft.get("model"),
        "seed": sft.get("seed"),
        "max_length": sft.get("max_length"),
        "batch_size": sft.get("batch_size"),
        "pairs_sha256": sft.get("pairs_sha256"),
        "base": {"epochs": base.get("epochs"), "lr": base.get("lr")},
        "sft": {"epochs": sft.get("epochs"), "lr": sft.get("lr")},
    }


def miniature_sft(data: dict, seed: int = 0, device="cpu"):
    """The miniature's SFT model (eval mode, dropout off, frozen) and where it came from.

    Reused from `SFT_FOLDERS`' models/sft/ when a finished run there used these settings (chapter
    8's main run leaves one in runs/ch8_miniature/); else chapter 8's stages 1–2 run here (base
    model, then SFT, with its settings, seeded as it seeds them) and the model is saved to
    runs/ch11_miniature/models/sft/ for the next run.
    """
    wanted = _fingerprint(data, seed)
    for folder in SFT_FOLDERS:
        if _saved_fingerprint(folder) == wanted:
            model = gpt.load_gpt2(folder / "models" / "sft").to(device)
            return model.eval().requires_grad_(False), f"reused from {folder / 'models' / 'sft'}/"
    sft_pairs, eos = data["sft_pairs"], data["eos"]
    model, _ = miniature.pretrain_base(
        data["vocab"].size,
        sft_pairs["train"],
        sft_pairs["validation"],
        epochs=SETTINGS["base_epochs"],
        lr=SETTINGS["base_lr"],
        batch_size=miniature.BASE_BATCH,
        seed=seed,
        device=device,
        eos_id=eos,
    )
    torch.manual_seed(seed)
    history = train_sft(
        model,
        sft_pairs["train"],
        sft_pairs["validation"],
        epochs=SETTINGS["sft_epochs"],
        lr=SETTINGS["sft_lr"],
        **_loop(seed, device, eos),
    )
    miniature.disable_dropout(model.eval()).requires_grad_(False)
    folder = save_gpt2(model.state_dict(), model.config, SFT_FOLDERS[-1] / "models" / "sft")
    with atomic_open(folder / "history.json") as f:
        json.dump({"fingerprint": wanted, "history": history}, f)
    return model, f"trained here (base model and SFT, as chapter 8), saved to {folder}/"


# ---------------------------------------------------------------- the losses and the loop
@dataclass(frozen=True)
class Objective:
    """One loss of chapter 11 on eq. (38)'s log-probs: kind "dpo" (eq. (38)), "dpop" (λ = weight),
    "rpo" (DPO + NLL, α = weight) or "r-dpo" (α = weight, per token), at β. With `without_eos`
    the log-probs sum over each response but its final EOS (policy and reference alike): the loss
    then exerts no force on end-of-text where the responses stop."""

    kind: str
    beta: float
    weight: float = 0.0
    without_eos: bool = False  # leave each response's last token, EOS, out of log π and log π_ref

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")
        check_beta(self.beta)
        check_weight("weight", self.weight, f"{KINDS[self.kind]}'s weight")
        if self.kind == "dpo" and self.weight != 0:
            raise ValueError("kind 'dpo' (eq. (38)) takes no weight; leave weight at 0")

    @property
    def label(self) -> str:
        name = {"dpo": "β", "dpop": "λ", "rpo": "α", "r-dpo": "α"}[self.kind]
        value = self.beta if self.kind == "dpo" else self.weight
        return f"{KINDS[self.kind]} {name} = {value:g}" + (", no EOS" if self.without_eos else "")

    def losses(self, chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len):
        """Per-pair losses; lengths |y| in tokens (EOS included)."""
        args = (chosen, rejected, ref_chosen, ref_rejected)
        if self.kind == "dpop":
            return dpop_loss(*args, self.beta, self.weight)
        if self.kind == "rpo":
            return rpo_loss(*args, chosen_len, self.beta, self.weight)
        if self.kind == "r-dpo":
            return r_dpo_loss(*args, chosen_len, rejected_len, self.beta, self.weight)
        return dpo_loss(*args, self.beta)


def objective_step(objective: Objective):
    """Chapter 8's fast DPO step (`trainers.dpo_step`'s signature and metrics) with `objective`'s
    loss: the packed pairs' log-probs against the cached reference; metrics are eq. (38)'s
    (`dpo_metrics`, so "loss" is eq. (38)'s whatever the objective), the token-level KL to the
    reference, and "objective", the mean of the loss trained on. The `beta` argument is ignored:
    the objective's β counts."""

    def step(policy, pairs, idx, cache, beta, device, pad_id):
        batch = packed_pairs_batch([pairs[i] for i in idx], pad_id).to(device)
        ref_chosen, ref_rejected, ref_hidden = cache.get(idx)
        ref_chosen, ref_rejected = ref_chosen.to(device), ref_rejected.to(device)
        with autocast(device):
            logps, logp = sequence_logprobs(policy, batch)  # (2B,), (N, V)
        B = len(idx)
        if objective.without_eos:  # the plan's last entry of each response predicts its EOS
            ends = torch.bincount(batch.seq, minlength=2 * B).cumsum(0) - 1  # (2B,)
            last = batch.targets[ends, None]  # (2B, 1)
            logps = logps - logp[ends].gather(-1, last).squeeze(-1)
            with torch.no_grad(), autocast(device):
                ref_logp = head_logprobs(ref_hidden[ends].to(device), cache.head_weight)
            ref_last = ref_logp.gather(-1, last).squeeze(-1)  # (2B,)
            ref_chosen, ref_rejected = ref_chosen - ref_last[:B], ref_rejected - ref_last[B:]
        lengths = torch.tensor(
            [[len(pairs[i].chosen) for i in idx], [len(pairs[i].rejected) for i in idx]],
            dtype=logps.dtype,
            device=logps.device,
        )  # (2, B)
        losses = objective.losses(
            logps[:B], logps[B:], ref_chosen, ref_rejected, lengths[0], lengths[1]
        )  # (B,)
        with torch.no_grad():
            metrics = dpo_metrics(logps[:B], logps[B:], ref_chosen, ref_rejected, objective.beta)
            if ref_hidden is not None:
                with autocast(device):
                    ref_logp = head_logprobs(ref_hidden.to(device), cache.head_weight)
                metrics["kl"] = token_kl(logp, ref_logp).mean().item()
            metrics["objective"] = losses.mean().item()
        return losses.mean(), metrics

    return step


def tracked_pairs(pairs, n: int, seed: int) -> list:
    """A fixed, seeded draw of n of `pairs` (all of them if fewer), in their order."""
    keep = sorted(random.Random(seed).sample(range(len(pairs)), min(n, len(pairs))))
    return [pairs[i] for i in keep]


def train_objective(sft, train, caches, objective: Objective, *, eos_id, tracked, every, **loop):
    """Chapter 8's DPO phase with `objective`'s loss: `trainers.train_dpo` (π_θ from a copy of
    `sft`, the frozen reference whose log-probs `caches["train"]` holds; AdamW, weight decay 0,
    constant lr, clip 1, `dpo_batches`' seeded batches) with `objective_step` for its step and no
    validation. With kind "dpo" it is chapter 8's run step for step. `loop`: train_dpo's epochs,
    lr, batch_size, seed, device, pad_id.

    tracked: {name: pairs}; their `pair_readings` (log π(y_w), log π(y_l), end-of-text) are read
    before the first step, every `every` steps and after the last. Returns (policy in eval mode,
    history with "steps" (each step's metrics) and "track" ([{"step", name: readings}])).
    """
    track = []

    def read(policy, steps):
        readings = {
            name: pair_readings(policy, ps, loop["pad_id"], eos_id, device=loop["device"])
            for name, ps in tracked.items()
        }
        track.append({"step": len(steps), **readings})

    def watch(policy, steps):
        if len(steps) % every == 0:  # before the first step too
            read(policy, steps)

    policy, steps, _ = train_dpo(
        sft,
        train,
        None,
        caches,
        objective.beta,
        step=objective_step(objective),
        watch=watch,
        label=objective.label,
        progress=False,
        lr_flag=None,
        **loop,
    )
    if track[-1]["step"] != len(steps):
        read(policy, steps)  # the end, when `every` does not divide the step count
    return policy.requires_grad_(False), {"steps": steps, "track": track}


# ---------------------------------------------------------------- generation
def greedy_responses(
    model, pairs, *, max_new_tokens: int, batch_size: int, device, eos_id: int, tokenizer
):
    """Greedy answers to the prompts of `pairs`, decoded up to EOS and stripped, exactly as
    chapter 8's `win_rates.generate_responses` at temperature 0; and for each whether it stopped
    (an EOS within `max_new_tokens`). Returns (texts, stopped)."""
    texts, stopped = [None] * len(pairs), [None] * len(pairs)
    for idx in pdata.length_grouped_batches(
        [len(p.prompt) for p in pairs], batch_size, 0, shuffle=False
    ):
        ids, mask = left_pad([pairs[i].prompt for i in idx], eos_id)
        with torch.no_grad(), autocast(device):
            new = generate(
                model,
                ids.to(device),
                max_new_tokens,
                temperature=0.0,
                eos_id=eos_id,
                attention_mask=mask.to(device),
            )[:, ids.shape[1] :]  # (B, new)
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            stopped[i] = eos_id in tokens
            texts[i] = tokenizer.decode(tokens[: tokens.index(eos_id)] if stopped[i] else tokens)
            texts[i] = texts[i].strip()
    return texts, stopped


# ---------------------------------------------------------------- the experiment
# The default budget fits the main job (chapter 8's SFT model reused): DPO at β = 0.1, where
# chapter 8's answers grew most, the same with EOS left out of the log-probs, and each fix once
# (R-DPO at two α); the full one adds chapter 8's other β values and a second weight for each fix.
# DPOP's λ = 50 and DPO + NLL's α = 1 are the papers' (Pal et al.; Pang et al., TRL's
# rpo_alpha = 1).
BUDGETS = {
    "default": dict(
        betas=(0.1,),
        beta=0.1,
        fixes=(("dpop", 50.0), ("rpo", 1.0), ("r-dpo", 0.05), ("r-dpo", 0.2)),
    ),
    "full": dict(
        betas=(0.1, 0.3, 0.7, 1.0),
        beta=0.1,
        fixes=(
            ("dpop", 5.0),
            ("dpop", 50.0),
            ("rpo", 0.1),
            ("rpo", 1.0),
            ("r-dpo", 0.01),
            ("r-dpo", 0.05),
            ("r-dpo", 0.2),
        ),
    ),
}
TRACK = dict(pairs=64, every=20)  # training pairs read along the way (with all validation pairs)


def _timed(times: dict, part: str, started: float) -> float:
    now = time.perf_counter()
    times[part] = times.get(part, 0.0) + now - started
    return now


def miniature_experiment(budget: str = "default", seed: int = 0, device="cpu", data=None) -> dict:
    """Chapter 8's miniature from its SFT model: DPO at `BUDGETS[budget]`'s β values and the fixes
    at its β, each with chapter 8's DPO budget, measured.

    Returns data, the SFT model's source, `sft` readings per split (`pair_readings` with hidden
    states), `sft_end` (`end_distribution`), one dict per run in `runs` (objective, history,
    validation metrics, readings per split, end distribution (DPO's runs only), greedy texts and
    stops), `win_rows`
    (SBERT win rates at T = 0, with mean length and the length-controlled rate, SFT first) and
    `times` (seconds per part).
    """
    plan, s, times = BUDGETS[budget], SETTINGS, {}
    start = time.perf_counter()
    data = data or miniature.miniature_data(seed, max_length=SETTINGS["max_length"])
    sft, source = miniature_sft(data, seed, device)
    start = _timed(times, "data and SFT model", start)
    pairs, eos = data["pairs"], data["eos"]
    splits = ("train", "validation")
    caches = Scale().reference_caches(
        sft, {k: pairs[k] for k in splits}, eos, s["batch_size"], s["max_length"], seed=seed
    )  # the train cache in DPO's first-epoch batches: the first step reads ln 2 exactly
    tracked = {"train": tracked_pairs(pairs["train"], TRACK["pairs"], seed)}
    tracked["validation"] = pairs["validation"]
    sft_readings = {
        k: pair_readings(sft, pairs[k], eos, eos, device=device, hidden=True) for k in splits
    }
    sft_end = end_distribution(sft, pairs["train"], eos, device=device)
    generation = generation_settings(data, device)
    sft_texts, sft_stopped = greedy_responses(sft, pairs["test"], **generation)
    start = _timed(times, "reference cache, SFT readings and answers", start)
    objectives = [Objective("dpo", b) for b in plan["betas"]]
    objectives.append(Objective("dpo", plan["beta"], without_eos=True))
    objectives += [Objective(kind, plan["beta"], w) for kind, w in plan["fixes"]]
    runs = []
    for objective in objectives:
        policy, history = train_objective(
            sft,
            pairs["train"],
            caches,
            objective,
            eos_id=eos,
            tracked=tracked,
            every=TRACK["every"],
            epochs=s["dpo_epochs"],
            lr=s["dpo_lr"],
            **_loop(seed, device, eos),
        )
        start = _timed(times, f"train {objective.label}", start)
        validation = dpo_evaluate(
            policy,
            pairs["validation"],
            caches["validation"],
            objective.beta,
            batch_size=s["batch_size"],
            device=device,
            pad_id=eos,
            step=objective_step(objective),
        )
        readings = {k: pair_readings(policy, pairs[k], eos, eos, device=device) for k in splits}
        end = (
            end_distribution(policy, pairs["train"], eos, device=device)
            if objective.kind == "dpo"
            else None
        )
        texts, stopped = greedy_responses(policy, pairs["test"], **generation)
        start = _timed(times, f"measure {objective.label}", start)
        runs.append(
            dict(
                objective=objective,
                history=history,
                validation=validation,
                readings=readings,
                end=end,
                texts=texts,
                stopped=stopped,
            )
        )
    sbert = load_sbert(SBERT, device)
    with contextlib.redirect_stdout(io.StringIO()):  # its per-run lines: the tables hold them
        win_rows, generations = score_runs(
            [("SFT", 0.0, sft_texts)] + [(r["objective"].label, 0.0, r["texts"]) for r in runs],
            pairs["test"],
            data["entries"],
            sbert,
            n_boot=1000,
            seed=seed,
        )
    win_rows = add_length_columns(
        win_rows, generations, data["entries"], lambda text: len(data["gpt2"].encode(text))
    )
    _timed(times, "SBERT win rates", start)
    return dict(
        data=data,
        source=source,
        sft=sft_readings,
        sft_end=sft_end,
        sft_stopped=sft_stopped,
        runs=runs,
        win_rows=win_rows,
        times=times,
        beta=plan["beta"],
    )
