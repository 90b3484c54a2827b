"""Online DPO on chapter 8's miniature, judged by Sentence-BERT, against offline DPO at one budget.

Both arms spend the same N labelled pairs on the same N training prompts (`labelled_pairs`):
- *offline*: the data set's own (chosen, rejected) pairs of those prompts, eq. (38) through chapter
  8's `train_dpo` (batches of B, AdamW, clip 1), for 1 epoch (N/B steps) or 2 (chapter 8's count);
- *online* (Guo et al. 2024, arXiv 2402.04792, at batch size B): N/B rounds; a round takes the next
  B prompts, samples two responses to each from the *current* policy (temperature 1, one batched
  KV-cache `gpt.generate` call on 2B left-padded rows), and the judge prefers the response whose
  SBERT embedding is closer (cosine) to the data set's chosen response (`closer_wins`); then one
  step of eq. (38) on those B pairs, reference = π_SFT frozen, each pair used once. A pair the judge
  cannot split (equal cosines: the two texts are the same) carries no preference: it is spent but
  left out of the step.
Evaluation is chapter 8's: one response per held-out test prompt at each temperature, an SBERT
win when it is closer to the chosen than to the rejected response (tie ½), a bootstrap interval,
the mean length in GPT-2 tokens; plus KL(π‖π_SFT) of whole responses, estimated on the
temperature-1 test samples (`sequence_kl`), and chapter 8's token-level KL and reward accuracy on
the validation pairs.
"""

import copy
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from chapters.ch8_instruction_dpo import data as pdata
from chapters.ch8_instruction_dpo import miniature
from chapters.ch8_instruction_dpo.data import Pair, length_grouped_batches
from chapters.ch8_instruction_dpo.dpo_step import (
    ReferenceCache,
    first_epoch_batches,
    sequence_logprobs,
)
from chapters.ch8_instruction_dpo.length_control import add_length_columns
from chapters.ch8_instruction_dpo.trainers import dpo_evaluate, dpo_step, train_dpo, train_sft
from chapters.ch8_instruction_dpo.win_rates import bootstrap_interval, sample_rows, score_runs
from chapters.common.rows import rows_batch
from gpt import get_tokenizer
from gpt.tokenizer import EOS_ID


@dataclass
class Settings:
    """One run of the comparison. The defaults are the main job's (about 3 minutes on one core);
    `FULL` is `--full-miniature`, `QUICK` the `--quick` smoke form (a tiny model, numbers mean
    nothing)."""

    budget: int = 256  # labelled pairs per arm (= prompts visited)
    batch_size: int = 8  # pairs per online round and per offline step (B)
    beta: float = 0.3  # eq. (38)'s β, both arms
    lr: float = 1e-4  # AdamW, both arms (chapter 8's miniature DPO lr)
    offline_epochs: tuple = (1, 2)  # offline passes over its N pairs: N/B steps each
    sample_temperature: float = 1.0  # online rollouts: the policy's own distribution
    base_epochs: int = 3  # the miniature's pretraining (chapter 8: 6)
    base_lr: float = 2e-3
    sft_epochs: int = 1
    sft_lr: float = 3e-4
    max_new_tokens: int = 64
    temperatures: tuple = (0.0, 1.0)  # evaluation; 1.0 also gives the KL samples
    eval_batch_size: int = 16
    n_boot: int = 1000
    max_length: int = 128
    seed: int = 0
    config: dict = field(default_factory=lambda: dict(miniature.CONFIG))
    limits: dict = None  # at most this many entries of each split (None: all)


FULL = Settings(budget=0, base_epochs=6, temperatures=(0.0, 0.5, 1.0))  # budget 0: every pair
QUICK = Settings(
    budget=16,
    lr=1e-3,
    base_epochs=1,
    max_new_tokens=16,
    temperatures=(1.0,),
    n_boot=200,
    config=dict(n_embd=32, n_layer=1, n_head=2, n_positions=192, dropout=0.0),
    limits={"train": 64, "validation": 8, "test": 16},
)


# ------------------------------------------------------------------------------- the data
def prepare(entries, settings: Settings) -> dict:
    """Chapter 8's miniature data: the compact vocabulary, the seeded split, SFT pairs (every pair
    that fits) and preference pairs (chosen ≠ rejected) per split, as token ids."""
    gpt2 = get_tokenizer()
    split = pdata.split(entries, settings.seed)
    vocab = miniature.CompactVocab(gpt2, miniature.training_texts(entries, split["train"]), EOS_ID)
    if settings.limits:
        split = {k: v[: settings.limits[k]] for k, v in split.items()}
    sft = {
        k: pdata.tokenize(entries, v, vocab, vocab.eos, settings.max_length)
        for k, v in split.items()
    }
    pairs = {k: [p for p in v if pdata.has_preference(entries[p.index])] for k, v in sft.items()}
    return dict(entries=entries, gpt2=gpt2, vocab=vocab, sft_pairs=sft, pairs=pairs)


def labelled_pairs(train_pairs, budget: int, seed: int) -> list:
    """The N training pairs both arms spend: the first `budget` of a seeded shuffle (0: all).

    Offline trains on their (chosen, rejected); online visits their prompts in this order and its
    judge reads their chosen responses. So the arms differ only in who wrote and who labelled."""
    n = len(train_pairs)
    if not (isinstance(budget, int) and 0 <= budget <= n):
        raise ValueError(
            f"budget must be 0 (all) or 1..{n} labelled pairs (the training split's preference "
            f"pairs), got {budget!r}"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [train_pairs[i] for i in order[: budget or n]]


def rounds_of(n: int, batch_size: int) -> list:
    """Index lists [0..B), [B..2B), ...: the online rounds, and the offline epoch's step count."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


# ------------------------------------------------------------------------------- the judge
def closer_wins(ref: np.ndarray, a: np.ndarray, b: np.ndarray):
    """Guo et al.'s AI labeller, here SBERT: y_a ≻ y_b when cos(e_a, e_ref) > cos(e_b, e_ref).

    ref, a, b: (n, d) embeddings (any norm). Returns (a_wins (n,) bool, tie (n,) bool, cos_a,
    cos_b)."""

    def cos(u, v):
        return (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))

    cos_a, cos_b = cos(a, ref), cos(b, ref)  # (n,) each
    return cos_a > cos_b, cos_a == cos_b, cos_a, cos_b


def sbert_judge(sbert):
    """judge(references, texts_a, texts_b) -> `closer_wins` of their SBERT embeddings, the
    references being the data set's chosen responses. One `encode` call per round."""

    def judge(references, texts_a, texts_b):
        n = len(references)
        emb = sbert.encode(
            list(references) + list(texts_a) + list(texts_b),
            normalize_embeddings=True,
            convert_to_numpy=True,
            batch_size=64,
        )  # (3n, d)
        a_wins, tie, cos_a, cos_b = closer_wins(emb[:n], emb[n : 2 * n], emb[2 * n :])
        identical = np.array([x == y for x, y in zip(texts_a, texts_b)])
        return a_wins & ~identical, tie | identical, cos_a, cos_b

    return judge


# ------------------------------------------------------------------------------- sampling
def cut_at_eos(tokens: list, eos_id: int) -> list:
    """A generated row up to and including its first EOS (all of it if there is none)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def sample_tokens(model, prompts, temperature, *, max_new_tokens, eos_id, generator, device):
    """One response per prompt (token lists, through EOS) from one batched KV-cache `generate`
    call on the left-padded prompts (chapter 8's `sample_rows`); `temperature` 0 is greedy."""
    rows = sample_rows(
        model,
        prompts,
        temperature,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        generator=generator,
        device=device,
    )
    return [cut_at_eos(row, eos_id) for row in rows]


def decode(vocab, tokens, eos_id: int) -> str:
    """A response as chapter 8 decodes it: up to EOS, UNK dropped, stripped."""
    return vocab.decode([t for t in tokens if t != eos_id]).strip()


def responses(model, pairs, temperature, *, batch_size, seed, **kw) -> list:
    """Chapter 8's evaluation sampling (`win_rates.generate_responses`), keeping the tokens: the
    prompts in batches sorted by length, one generator seeded per temperature."""
    device = kw["device"]
    generator = torch.Generator(device=device).manual_seed(seed + round(1000 * temperature))
    out = [None] * len(pairs)
    for idx in length_grouped_batches([len(p.prompt) for p in pairs], batch_size, 0, shuffle=False):
        prompts = [pairs[i].prompt for i in idx]
        rows = sample_tokens(model, prompts, temperature, generator=generator, **kw)
        for i, row in zip(idx, rows):
            out[i] = row
    return out


def sequence_kl(policy, sft, prompts, samples, pad_id: int, batch_size: int = 16):
    """KL(π‖π_SFT) of whole responses, by Monte Carlo: the mean over y ~ π (temperature 1) of
    log π(y|x) − log π_SFT(y|x) (sums over the response tokens, through EOS where a sample has one).
    Returns (mean, s.e., the per-sample values)."""
    values = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            batch = rows_batch(prompts[s : s + batch_size], samples[s : s + batch_size], pad_id)
            batch = batch.to(policy.lm_head.weight.device)
            mine, _ = sequence_logprobs(policy, batch)  # (b,)
            ref, _ = sequence_logprobs(sft, batch)  # (b,)
            values += (mine - ref).tolist()
    v = np.asarray(values)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0, v


# ------------------------------------------------------------------------------- the arms
class Clock:
    """Seconds spent per named part."""

    def __init__(self):
        self.seconds = {}

    def add(self, part: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - since
        return now


def run_online(sft, pairs, entries, judge, vocab, settings: Settings, clock: Clock, device="cpu"):
    """Online DPO from π_SFT on the prompts of `pairs` (module docstring). Returns the policy and
    one row per round: pairs judged, ties, the samples' mean length and SBERT cosine to the chosen
    response, and eq. (38)'s loss, reward accuracy and token-level KL on the round's pairs."""
    policy = copy.deepcopy(sft).requires_grad_(True)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    eos, rows = vocab.eos, []
    for k, idx in enumerate(rounds_of(len(pairs), settings.batch_size)):
        t = time.perf_counter()
        prompts = [pairs[i].prompt for i in idx]
        policy.eval()
        both = sample_tokens(
            policy,
            [p for p in prompts for _ in (0, 1)],  # each prompt twice: rows 2j, 2j + 1
            settings.sample_temperature,
            max_new_tokens=settings.max_new_tokens,
            eos_id=eos,
            generator=generator,
            device=device,
        )
        a, b = both[0::2], both[1::2]
        t = clock.add("online: sampling", t)
        a_wins, tie, cos_a, cos_b = judge(
            [entries[pairs[i].index]["chosen"] for i in idx],
            [decode(vocab, y, eos) for y in a],
            [decode(vocab, y, eos) for y in b],
        )
        t = clock.add("online: judging", t)
        new = [
            Pair(pairs[i].index, prompts[j], *((a[j], b[j]) if a_wins[j] else (b[j], a[j])))
            for j, i in enumerate(idx)
            if not tie[j]
        ]
        row = {
            "round": k + 1,
            "pairs": len(idx),
            "indices": [pairs[i].index for i in idx],  # the data set's entries judged
            "ties": int(tie.sum()),
            "sample_length": float(np.mean([len(y) for y in a + b])),
            "cosine": float(np.mean(np.concatenate([cos_a, cos_b]))),
        }
        if new:
            step_idx = list(range(len(new)))
            cache = ReferenceCache(sft, new, eos, batches=[step_idx])  # π_SFT, same packing
            t = clock.add("online: reference log-probs", t)
            policy.train()
            loss, metrics = dpo_step(policy, new, step_idx, cache, settings.beta, device, eos)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            row.update(metrics)
            clock.add("online: DPO steps", t)
        rows.append(row)
    return policy.eval().requires_grad_(False), rows


def run_offline(sft, pairs, val_cache, val_pairs, epochs, eos, settings: Settings, device="cpu"):
    """Chapter 8's `train_dpo` on the data set's pairs `pairs` for `epochs` (pad = `eos`): the
    policy and its per-step rows."""
    bs, seed = settings.batch_size, settings.seed
    train_cache = ReferenceCache(sft, pairs, eos, bs, batches=first_epoch_batches(pairs, bs, seed))
    policy, steps, _ = train_dpo(
        sft,
        pairs,
        val_pairs,
        {"train": train_cache, "validation": val_cache},
        settings.beta,
        epochs=epochs,
        lr=settings.lr,
        batch_size=bs,
        seed=seed,
        device=device,
        pad_id=eos,
    )
    return policy.requires_grad_(False), steps


# ------------------------------------------------------------------------------- evaluation
def evaluate(models: dict, sft, data: dict, sbert, settings: Settings, clock: Clock, device="cpu"):
    """Chapter 8's evaluation of every model on the test pairs, plus KL to SFT.

    Returns chapter 8's win-rate rows (model, temperature, win_rate, ci_low, ci_high, mean_length,
    lc_win_rate, ...) with `sequence_kl` and its s.e. (at temperature 1, else NaN) and `cos_chosen`
    (the mean SBERT cosine to the chosen response: the online judge's score), and the per-prompt
    generations of `win_rates.score_runs`.
    """
    test, entries, vocab = data["pairs"]["test"], data["entries"], data["vocab"]
    eos = vocab.eos
    kw = dict(max_new_tokens=settings.max_new_tokens, eos_id=eos, device=device)
    runs, kls = [], {}
    for name, model in models.items():
        for temp in settings.temperatures:
            t = time.perf_counter()
            tokens = responses(
                model, test, temp, batch_size=settings.eval_batch_size, seed=settings.seed, **kw
            )
            t = clock.add("evaluation: sampling", t)
            runs.append((name, temp, [decode(vocab, y, eos) for y in tokens]))
            if temp == 1.0:
                kls[name] = sequence_kl(model, sft, [p.prompt for p in test], tokens, eos)
                clock.add("evaluation: KL", t)
    t = time.perf_counter()
    rows, generations = score_runs(
        runs, test, entries, sbert, n_boot=settings.n_boot, seed=settings.seed
    )
    rows = add_length_columns(rows, generations, entries, lambda s: len(data["gpt2"].encode(s)))
    for r in rows:
        kl = kls.get(r["model"]) if r["temperature"] == 1.0 else None
        r["sequence_kl"], r["sequence_kl_se"] = kl[:2] if kl else (float("nan"), float("nan"))
        r["cos_chosen"] = float(
            np.mean(
                [
                    g["sim_chosen"]
                    for g in generations
                    if g["model"] == r["model"] and g["temperature"] == r["temperature"]
                ]
            )
        )
    clock.add("evaluation: SBERT scoring", t)
    return rows, generations


def paired_differences(generations, a: str, b: str, settings: Settings, key="score") -> dict:
    """Model a − model b on the same test prompts, per temperature, of each prompt's `key` (the
    win score, or "sim_chosen": the SBERT cosine to the chosen response): (mean, bootstrap 95%
    interval over prompts)."""
    out = {}
    for temp in settings.temperatures:

        def values(name):
            gens = [g for g in generations if g["model"] == name and g["temperature"] == temp]
            return np.array([g[key] for g in sorted(gens, key=lambda g: g["index"])])

        d = values(a) - values(b)
        out[temp] = (float(d.mean()), *bootstrap_interval(d, settings.n_boot, settings.seed))
    return out


# ------------------------------------------------------------------------------- the run
def build_sft(data: dict, settings: Settings, clock: Clock, device="cpu"):
    """Chapter 8's miniature up to SFT: the base model pretrained here, then SFT on (prompt,
    chosen); dropout off, frozen. Returns the SFT model."""
    t = time.perf_counter()
    vocab, sft_pairs = data["vocab"], data["sft_pairs"]
    base, _ = miniature.pretrain_base(
        vocab.size, sft_pairs["train"], sft_pairs["validation"], epochs=settings.base_epochs,
        lr=settings.base_lr, batch_size=miniature.BASE_BATCH, seed=settings.seed, device=device,
        eos_id=vocab.eos, config=settings.config,
    )
    t = clock.add("base model", t)
    torch.manual_seed(settings.seed)
    train_sft(base, sft_pairs["train"], sft_pairs["validation"], epochs=settings.sft_epochs,
              lr=settings.sft_lr, batch_size=8, seed=settings.seed, device=device, pad_id=vocab.eos)
    clock.add("SFT", t)
    return miniature.disable_dropout(base.eval()).requires_grad_(False)


def compare_on_miniature(entries, sbert, settings: Settings = None, device="cpu") -> dict:
    """The whole comparison: SFT, the two arms at one budget, chapter 8's evaluation. Returns
    {"settings", "sizes", "budget", "online_rows", "offline_steps", "validation", "win_rows",
    "generations", "differences" (per key: "score" the win, "sim_chosen" the judge's cosine),
    "seconds"}."""
    settings = settings or Settings()
    clock = Clock()
    t = time.perf_counter()
    data = prepare(entries, settings)
    chosen = labelled_pairs(data["pairs"]["train"], settings.budget, settings.seed)
    clock.add("data", t)
    sft = build_sft(data, settings, clock, device)
    t = time.perf_counter()
    eos, val = data["vocab"].eos, data["pairs"]["validation"]
    val_cache = ReferenceCache(sft, val, eos, settings.batch_size)
    models = {"SFT": sft}
    offline_steps = {}
    in_split_order = sorted(chosen, key=lambda p: p.index)  # all pairs: chapter 8's DPO exactly
    for epochs in settings.offline_epochs:
        name = f"offline {epochs} ep."
        models[name], offline_steps[name] = run_offline(
            sft, in_split_order, val_cache, val, epochs, eos, settings, device
        )
    t = clock.add("offline: DPO (cache, steps, validation)", t)
    judge = sbert_judge(sbert)
    models["online"], online_rows = run_online(
        sft, chosen, data["entries"], judge, data["vocab"], settings, clock, device
    )
    t = time.perf_counter()
    validation = {
        name: dpo_evaluate(
            m,
            val,
            val_cache,
            settings.beta,
            batch_size=settings.batch_size,
            device=device,
            pad_id=eos,
        )
        for name, m in models.items()
    }
    clock.add("evaluation: validation pairs", t)
    win_rows, generations = evaluate(models, sft, data, sbert, settings, clock, device)
    first = f"offline {settings.offline_epochs[0]} ep."
    pairs_compared = [("online", first), ("online", "SFT"), (first, "SFT")]
    differences = {
        key: {
            f"{a} − {b}": paired_differences(generations, a, b, settings, key)
            for a, b in pairs_compared
        }
        for key in ("score", "sim_chosen")
    }
    return dict(
        settings=settings,
        sizes={k: len(v) for k, v in data["pairs"].items()},
        budget=len(chosen),
        online_rows=online_rows,
        offline_steps=offline_steps,
        validation=validation,
        win_rows=win_rows,
        generations=generations,
        differences=differences,
        seconds=clock.seconds,
    )
