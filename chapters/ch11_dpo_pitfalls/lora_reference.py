"""Chapter 11, LoRA and the reference: when the SFT model is itself a LoRA adapter, DPO's reference
must be the SFT model (base + SFT adapter), not the base with the adapter switched off.

DPO (report eq. (38)) measures every log-prob against π_ref = π_SFT; at the first step
π_θ = π_ref, so the loss is ln 2 and every margin 0. With LoRA the reference is usually not a second
model but the policy with an adapter switched off. That is π_SFT only when the SFT adapter is not
the one switched off. The ways of running LoRA DPO after LoRA SFT, and which trainer does which:

- `merged`: merge the SFT adapter into the base (`merged_model`, PEFT's `merge_and_unload`), put a
  new adapter on top (`adapter_policy`): adapter off = π_SFT, the right reference. TRL's
  `DPOTrainer` given that model and a `peft_config` (TRL 1.16 refuses a PEFT model together with a
  `peft_config`, asking to merge and unload first); LLaMA-Factory's `--create_new_adapter`. The
  chapter's way.
- `sft_adapter`: keep training the SFT adapter against a frozen copy of it: also right. TRL 1.16
  given the SFT adapter as a PEFT model and no `ref_model` (it copies the adapter to a frozen "ref"
  adapter); TRL up to 0.28 only when `ref_adapter_name` named such a copy.
- `adapter_off`: keep training the SFT adapter and switch it off for the reference: π_ref = the
  base, the pitfall. LLaMA-Factory with `--adapter_name_or_path` and no `--ref_model`
  (hiyouga/LlamaFactory#8459); TRL up to 0.28 given a PEFT model and no `ref_model`; TRL 1.16 with
  PEFT 0.17–0.19 and a LoRA on `target_parameters` (it warns).

`lora_reference_experiment` runs them (and full DPO from the merged SFT model) after a base model
and a LoRA SFT, with chapter 8's data, fast DPO step and reference cache; `main_section` prints the
claims beside the numbers and draws plots/ch11_lora_reference.png.
"""

import copy
import ctypes
import math
import re
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from chapters.ch4_dpo.loss import dpo_loss, implicit_reward
from chapters.ch8_instruction_dpo import data as pdata
from chapters.ch8_instruction_dpo import miniature
from chapters.ch8_instruction_dpo.dpo_step import (
    ReferenceCache,
    first_epoch_batches,
    sequence_logprobs,
)
from chapters.ch8_instruction_dpo.trainers import (
    dpo_evaluate,
    sft_evaluate,
    train_dpo,
    train_sft,
)
from chapters.ch8_instruction_dpo.win_rates import (
    bootstrap_interval,
    generate_runs,
    load_sbert,
    score_runs,
    win_scores,
)
from chapters.ch11_dpo_pitfalls.miniature_runs import generation_settings
from chapters.common.figures import plt, save
from chapters.common.rows import packed_pairs_batch
from chapters.common.runtime import one_thread
from gpt import GPT
from gpt.lora import ADAPTER_NAMES, DEFAULT_TARGETS, add_lora, lora_disabled, merge_lora

LN2_FLOAT32 = float(torch.tensor(math.log(2.0), dtype=torch.float32))  # 0.6931471824645996
SETUPS = {  # how DPO's policy and reference are made from the LoRA SFT model
    "merged": "LoRA DPO: merged SFT + new adapter, ref = adapter off = SFT",
    "sft_adapter": "LoRA DPO: SFT adapter trained on, ref = frozen SFT adapter",
    "adapter_off": "LoRA DPO: SFT adapter trained on, ref = adapter off = base (wrong)",
    "full": "full DPO from the merged SFT, ref = SFT",
}
# the default budget fits chapter 11's share of the main job (about 75 s of CPU, one thread);
# "large" trains the base as chapter 8 does, DPO for 2 epochs, and samples at two temperatures
BUDGETS = {
    "small": dict(base_epochs=3, sft_epochs=1, dpo_epochs=1, temperatures=(0.0,), n_boot=500),
    "large": dict(base_epochs=6, sft_epochs=1, dpo_epochs=2, temperatures=(0.0, 1.0), n_boot=1000),
}
# shared by both budgets; the learning rates: the lowest validation loss (SFT, DPO) on small grids
# at the small budget (LoRA SFT 1e-3, 3e-3, 1e-2; DPO full 1e-4, 3e-4, 1e-3; LoRA 3e-4, 1e-3, 3e-3);
# answers are generated as on chapter 8's miniature (`miniature_runs.generation_settings`)
SETTINGS = dict(
    max_length=128,
    batch_size=8,
    base_lr=2e-3,
    lora_sft_lr=3e-3,
    dpo_lr=3e-4,  # full DPO
    lora_dpo_lr=1e-3,
    rank=8,
    alpha=16,
)


# ---------------------------------------------------------------- the models


def merged_model(model) -> GPT:
    """Hu et al. 2021, §4.1: the plain `GPT` whose weights are W + (alpha/rank) B A of `model`'s
    adapters: base + SFT adapter as one model (the SFT model DPO needs as reference).

    `model` is left as it was (its adapters unmerged); the copy holds no LoRA layers.
    """
    folded = merge_lora(copy.deepcopy(model))  # merge_lora refuses a model without adapters
    state = {k: v for k, v in folded.state_dict().items() if not k.endswith(ADAPTER_NAMES)}
    like = next(model.parameters())
    plain = GPT(model.config).to(device=like.device, dtype=like.dtype)
    plain.load_state_dict(state)
    return plain.requires_grad_(False).train(model.training)


def adapter_policy(sft_model, rank: int, alpha: float, targets=DEFAULT_TARGETS):
    """A copy of the (plain, merged) SFT model with a new adapter: only the adapter trains, and with
    it switched off (`gpt.lora.lora_disabled`) the model is the SFT model, bit for bit."""
    return add_lora(copy.deepcopy(sft_model), rank, alpha, targets)


@contextmanager
def as_reference(model, setup: str):
    """The reference DPO reads for `setup` (see `SETUPS`), given the policy `model` before training:
    adapters switched off for "merged" and "adapter_off", a frozen copy of it otherwise."""
    if setup in ("merged", "adapter_off"):
        with lora_disabled(model):
            yield model
    else:
        yield copy.deepcopy(model).requires_grad_(False)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- the first step and the loop


def first_step(policy, pairs, cache: ReferenceCache, beta: float, pad_id: int, idx=None):
    """Report eq. (38) at the step before any update, per pair: (losses (B,), margins (B,)), the
    margin being r̂(y_w) − r̂(y_l) = β·(log π/π_ref (y_w) − log π/π_ref (y_l)).

    Reads the same packed rows as the training step (`dpo_step`): for the right reference and a
    cache built in these batches, every margin is 0.0 and every loss float32's ln 2.
    """
    idx = list(range(len(pairs))) if idx is None else list(idx)
    batch = packed_pairs_batch([pairs[i] for i in idx], pad_id)
    ref_chosen, ref_rejected, _ = cache.get(idx)
    with torch.no_grad():
        logps, _ = sequence_logprobs(policy, batch)  # (2B,)
    B = len(idx)
    losses = dpo_loss(logps[:B], logps[B:], ref_chosen, ref_rejected, beta)
    margins = implicit_reward(logps[:B], ref_chosen, beta) - implicit_reward(
        logps[B:], ref_rejected, beta
    )
    return losses, margins


def train_preference(policy, train, cache: ReferenceCache, beta: float, **loop) -> list:
    """Report eq. (38) minimised in place on the parameters of `policy` that need a gradient (the
    adapters alone for a LoRA policy, every weight for a plain one), against the cached reference:
    chapter 8's `train_dpo` with `in_place`, no validation and AdamW's per-parameter loop (the
    section's numbers were measured with it). `loop`: train_dpo's epochs, lr, batch_size, seed,
    device, pad_id. Returns one row per step (chapter 8's metrics).
    """
    _, steps, _ = train_dpo(
        policy,
        train,
        None,
        {"train": cache},
        beta,
        in_place=True,
        fused=False,
        progress=False,
        lr_flag=None,
        **loop,
    )
    return steps


# ---------------------------------------------------------------- measuring


@contextmanager
def peak_memory():
    """The rise of this process's peak resident memory inside the block, in MiB: {'mib': ...}.

    Torch's CPU tensors are not Python allocations, so tracemalloc does not see them; the kernel's
    high-water mark (VmHWM) does. Linux lets a process reset it (/proc/self/clear_refs, 5), and
    malloc_trim first hands freed heap back, so that what the block allocates shows. Elsewhere,
    getrusage's peak, which cannot be reset: a rise only when the block beats every earlier peak.
    """
    out = {"mib": None}
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status")

        def read(key):
            return int(re.search(rf"{key}:\s+(\d+)", status.read_text()).group(1)) / 1024

        start = read("VmRSS")
    except (OSError, AttributeError):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        def read(key):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    try:
        yield out
    finally:
        out["mib"] = read("VmHWM") - start


# ---------------------------------------------------------------- the miniature


def pretrain(data: dict, epochs: int, seed: int = 0, device="cpu"):
    """Chapter 8's stage 1, the base model, for `epochs` epochs (chapter 8: 6)."""
    base, _ = miniature.pretrain_base(
        data["vocab"].size,
        data["sft_pairs"]["train"],
        data["sft_pairs"]["validation"],
        epochs=epochs,
        lr=SETTINGS["base_lr"],
        batch_size=miniature.BASE_BATCH,
        seed=seed,
        device=device,
        eos_id=data["eos"],
    )
    return base.requires_grad_(False)


# ---------------------------------------------------------------- the experiment


def lora_reference_experiment(
    budget: str = "small", beta: float = 0.1, seed: int = 0, device="cpu", data=None, base=None
) -> dict:
    """LoRA SFT on the miniature's base, then DPO at one β four ways (`SETUPS`): LoRA on the merged
    SFT (adapter off = SFT), LoRA on the SFT adapter against the SFT model, the same against the
    base (the adapter switched off: the pitfall), and full DPO from the merged SFT.

    Returns {'rows': one row per model (SFT first), 'steps': {setup: step rows}, 'sft': SFT rows}.
    Each DPO row: the first step's loss, margin and accuracy against its own reference; validation
    loss, margin and accuracy against its own reference after training, and margin, token-level
    KL(π‖π_SFT) and KL(π‖π_base) on the same pairs; the SBERT win rate on the test prompts
    (generation closer to chosen than to rejected) and head to head against SFT's generation (closer
    to the chosen response, tie ½); time, peak memory and trainable parameters of DPO.
    `data`, `base`: the miniature's data (`miniature.miniature_data`'s keys) and a base model, if
    already made (else made here, the base trained for `budget`'s epochs).
    """
    cfg, s = BUDGETS[budget], SETTINGS
    with one_thread():  # small matrices: one thread is faster on shared cores, and repeatable
        started, cpu = time.perf_counter(), time.process_time()
        data = data or miniature.miniature_data(seed)
        eos, pairs = data["eos"], data["pairs"]
        if base is None:
            base = pretrain(data, cfg["base_epochs"], seed, device)
        # LoRA SFT: an adapter on the frozen base, dropout as in chapter 8's SFT
        torch.manual_seed(seed)
        sft_lora = add_lora(copy.deepcopy(base), s["rank"], s["alpha"])
        sft_rows = train_sft(
            sft_lora,
            data["sft_pairs"]["train"],
            data["sft_pairs"]["validation"],
            epochs=cfg["sft_epochs"],
            lr=s["lora_sft_lr"],
            batch_size=s["batch_size"],
            seed=seed,
            device=device,
            pad_id=eos,
            label="LoRA SFT",
        )
        # dropout off from here on, as chapter 8's DPO (the first step reads what the cache read)
        miniature.disable_dropout(sft_lora.eval()).requires_grad_(False)
        sft = miniature.disable_dropout(merged_model(sft_lora))  # base + SFT adapter, plain
        settings = dict(batch_size=s["batch_size"], device=device, pad_id=eos)
        sft_test = sft_evaluate(sft, data["sft_pairs"]["test"], **settings)
        print(f"LoRA SFT (merged): test loss {sft_test:.4f} nats/token")

        # the validation caches every model is judged against: π_SFT and π_base
        judge = {
            "sft": ReferenceCache(sft, pairs["validation"], eos, s["batch_size"]),
            "base": ReferenceCache(base, pairs["validation"], eos, s["batch_size"]),
        }
        sft_vs_base = dpo_evaluate(sft, pairs["validation"], judge["base"], beta, **settings)
        rows = [
            {
                "setup": "sft",
                "model": "LoRA SFT (merged)",
                "val_margin_sft": 0.0,
                "val_margin_base": sft_vs_base["rewards/margins"],
                "kl_sft": 0.0,
                "kl_base": sft_vs_base["kl"],
                "sft_test_loss": sft_test,
            }
        ]
        policies, steps = {}, {}
        for setup in SETUPS:
            torch.manual_seed(seed)
            if setup == "merged":
                policy = adapter_policy(sft, s["rank"], s["alpha"])
            elif setup == "full":
                policy = copy.deepcopy(sft).requires_grad_(True)
            else:  # the SFT adapter itself, trained on
                policy = copy.deepcopy(sft_lora)
                for name, p in policy.named_parameters():
                    p.requires_grad = name.endswith(ADAPTER_NAMES)
            trainable = trainable_parameters(policy)
            with as_reference(sft if setup == "full" else policy, setup) as reference:
                t0 = time.perf_counter()
                train_cache = ReferenceCache(
                    reference,
                    pairs["train"],
                    eos,
                    keep_hidden=False,
                    batches=first_epoch_batches(pairs["train"], s["batch_size"], seed),
                )
                cache_s = time.perf_counter() - t0
                own_cache = ReferenceCache(reference, pairs["validation"], eos, s["batch_size"])
            lr = s["dpo_lr"] if setup == "full" else s["lora_dpo_lr"]
            with peak_memory() as memory:
                t0, c0 = time.perf_counter(), time.process_time()
                step_rows = train_preference(
                    policy,
                    pairs["train"],
                    train_cache,
                    beta,
                    epochs=cfg["dpo_epochs"],
                    lr=lr,
                    seed=seed,
                    **settings,
                )
                train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
            policy.eval().requires_grad_(False)
            first = step_rows[0]
            own = dpo_evaluate(policy, pairs["validation"], own_cache, beta, **settings)
            vs_sft = dpo_evaluate(policy, pairs["validation"], judge["sft"], beta, **settings)
            vs_base = dpo_evaluate(policy, pairs["validation"], judge["base"], beta, **settings)
            rows.append(
                {
                    "setup": setup,
                    "model": SETUPS[setup],
                    "lr": lr,
                    "trainable": trainable,
                    "first_loss": first["loss"],
                    "first_margin": first["rewards/margins"],
                    "first_accuracy": first["rewards/accuracies"],
                    "val_loss": own["loss"],
                    "val_margin": own["rewards/margins"],
                    "val_accuracy": own["rewards/accuracies"],
                    "val_margin_sft": vs_sft["rewards/margins"],
                    "val_margin_base": vs_base["rewards/margins"],
                    "val_accuracy_sft": vs_sft["rewards/accuracies"],
                    "kl_sft": vs_sft["kl"],
                    "kl_base": vs_base["kl"],
                    "cache_s": cache_s,
                    "train_s": train_s,
                    "train_cpu_s": train_cpu,
                    "cpu_s_per_step": train_cpu / len(step_rows),
                    "peak_mib": memory["mib"],
                }
            )
            steps[setup], policies[setup] = step_rows, policy
            print(
                f"DPO {setup}: first loss {first['loss']:.7f}, validation margin "
                f"{own['rewards/margins']:.3f} (own reference), KL to SFT {vs_sft['kl']:.4f}, "
                f"{train_s:.1f} s ({train_cpu:.1f} s of CPU)"
            )
        win_rates(rows, policies, sft, data, cfg, seed, device)
        print(
            f"LoRA and the reference: {time.perf_counter() - started:.0f} s "
            f"({time.process_time() - cpu:.0f} s of CPU)"
        )
    return {"rows": rows, "steps": steps, "sft": sft_rows}


def win_rates(rows, policies, sft, data, cfg, seed, device):
    """Add to `rows` (in place) each model's SBERT win rate on the test prompts at each temperature
    (chapter 8's: closer to chosen than to rejected, tie ½) and, for the DPO models, head to head
    against SFT's generation (closer to the chosen response than SFT's is)."""
    test = data["pairs"]["test"]
    gen = dict(seed=seed, **generation_settings(data, device))
    runs = generate_runs("sft", sft, test, cfg["temperatures"], **gen)
    for setup, policy in policies.items():
        runs += generate_runs(setup, policy, test, cfg["temperatures"], **gen)
    win_rows, generations = score_runs(
        runs,
        test,
        data["entries"],
        load_sbert("all-MiniLM-L6-v2", device),
        n_boot=cfg["n_boot"],
        seed=seed,
    )
    by_model = {r["setup"]: r for r in rows}
    sim = {}
    for g in generations:
        sim.setdefault((g["model"], g["temperature"]), []).append(g["sim_chosen"])
    for w in win_rows:
        t, row = w["temperature"], by_model[w["model"]]
        row[f"win_T{t:g}"], row[f"win_T{t:g}_ci"] = w["win_rate"], (w["ci_low"], w["ci_high"])
        if w["model"] != "sft":
            scores = win_scores(np.array(sim[(w["model"], t)]), np.array(sim[("sft", t)]))
            row[f"vs_sft_T{t:g}"] = float(scores.mean())
            row[f"vs_sft_T{t:g}_ci"] = bootstrap_interval(scores, cfg["n_boot"], seed)


# ---------------------------------------------------------------- the section of the chapter's run


def _f(x, spec):
    return "" if x is None else format(x, spec)


def table(rows) -> list:
    """The experiment's rows as Markdown lines: the first step, the validation split after DPO, the
    win rates on the test prompts at each temperature, and the cost of DPO."""
    temps = sorted({k[5:] for r in rows for k in r if k.startswith("win_T") and "ci" not in k})
    head = (
        "| model | trainable | first loss | first margin / acc. | val. margin (own ref) | "
        "val. margin vs SFT / vs base | KL(π‖π_SFT) | KL(π‖π_base) | "
        + " | ".join(f"win rate T={t} | vs SFT T={t}" for t in temps)
        + " | DPO CPU s (a step) | peak MiB |"
    )
    lines = [head, "|" + "---|" + "---:|" * (head.count("|") - 2)]
    for r in rows:
        wins = []
        for t in temps:
            w, (lo, hi) = r[f"win_T{t}"], r[f"win_T{t}_ci"]
            wins.append(f"{w:.3f} ({lo:.2f}–{hi:.2f})")
            if f"vs_sft_T{t}" in r:
                v, (lo, hi) = r[f"vs_sft_T{t}"], r[f"vs_sft_T{t}_ci"]
                wins.append(f"{v:.3f} ({lo:.2f}–{hi:.2f})")
            else:
                wins.append("")
        first = (
            f"{r['first_margin']:.4f} / {r['first_accuracy']:.2f}" if "first_margin" in r else ""
        )
        cost = f"{r['train_cpu_s']:.1f} ({r['cpu_s_per_step']:.3f})" if "train_s" in r else ""
        lines.append(
            f"| {r['model']} | {r.get('trainable', '')} | "
            f"{_f(r.get('first_loss'), '.7f')} | {first} | {_f(r.get('val_margin'), '.3f')} | "
            f"{r['val_margin_sft']:.3f} / {r['val_margin_base']:.3f} | {r['kl_sft']:.3f} | "
            f"{r['kl_base']:.3f} | "
            + " | ".join(wins)
            + f" | {cost} | {_f(r.get('peak_mib'), '.1f')} |"
        )
    return lines


def figure(result, name="ch11_lora_reference"):
    """Left: DPO's loss per step for each setup (ln 2 dotted); middle: KL of each model to π_SFT and
    to π_base on the validation pairs; right: win rates at T = 0 with 95% intervals."""
    rows = {r["setup"]: r for r in result["rows"]}
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(17, 4.6))
    for k, (setup, steps) in enumerate(result["steps"].items()):
        loss = np.array([s["loss"] for s in steps])
        ax.plot(np.arange(1, len(loss) + 1), loss, color=f"C{k}", lw=0.6, alpha=0.35)
        smooth = np.convolve(loss, np.ones(10) / 10, mode="valid")
        ax.plot(np.arange(10, len(loss) + 1), smooth, color=f"C{k}", lw=1.8, label=setup)
        ax.plot([1], loss[:1], "o", color=f"C{k}")
    ax.axhline(math.log(2), color="k", ls=":", lw=1, label="ln 2")
    ax.set(xlabel="DPO step", ylabel="eq. (38) loss (thin: per step; thick: mean of 10)")
    ax.set_title("first step: ln 2 against the SFT model, lower against the base", fontsize=10)
    ax.legend(fontsize=8)
    order = list(rows)
    x = np.arange(len(order))
    bx.bar(x - 0.2, [rows[s]["kl_sft"] for s in order], 0.4, label="KL(π‖π_SFT)")
    bx.bar(x + 0.2, [rows[s]["kl_base"] for s in order], 0.4, label="KL(π‖π_base)")
    bx.set_xticks(x, order, rotation=20, fontsize=8)
    bx.set(ylabel="token-level KL, validation pairs [nats]")
    bx.set_title("after DPO: distance to the SFT model and to the base", fontsize=10)
    bx.legend(fontsize=8)
    for j, (key, label) in enumerate(
        (("win_T0", "win rate"), ("vs_sft_T0", "vs SFT head to head"))
    ):
        have = [s for s in order if key in rows[s]]
        pos = np.array([order.index(s) for s in have]) + (0.2 * j - 0.1)
        mid = np.array([rows[s][key] for s in have])
        ci = np.array([rows[s][f"{key}_ci"] for s in have]).T
        cx.errorbar(pos, mid, yerr=[mid - ci[0], ci[1] - mid], fmt="o", capsize=3, label=label)
    cx.axhline(0.5, color="k", ls=":", lw=1)
    cx.set_xticks(x, order, rotation=20, fontsize=8)
    cx.set(ylabel="SBERT win rate, test prompts, greedy (95% CI)")
    cx.set_title("win rate (closer to chosen than rejected) and against SFT", fontsize=10)
    cx.legend(fontsize=8)
    return save(fig, name)


def main_section(
    budget: str = "small",
    seed: int = 0,
    beta: float = 0.1,
    quick: bool = False,
    name: str = "ch11_lora_reference",
    data=None,
):
    """Chapter 11's LoRA section: run `lora_reference_experiment`, print each claim beside the
    number that checks it and the table, draw plots/<name>.png. `quick`: one line instead (the
    section trains a model: about 75 s of CPU). `data`: the miniature's data, if already loaded
    (the keys of `miniature.miniature_data`). Returns the experiment's result (None when skipped).
    """
    print(
        "\n--- 6. LoRA and the reference: after LoRA SFT, DPO's reference must be the SFT model "
        "(base + SFT adapter), not the base with the adapter off"
    )
    if quick:
        print("--quick: skipped (it trains chapter 8's miniature: about 75 s); run without --quick")
        return None
    s = SETTINGS
    print(
        f"chapter 8's miniature, base {BUDGETS[budget]['base_epochs']} epochs; LoRA rank "
        f"{s['rank']}, alpha {s['alpha']} on attn.c_attn, attn.c_proj; LoRA SFT 1 epoch lr "
        f"{s['lora_sft_lr']:g}; DPO β = {beta:g}, {BUDGETS[budget]['dpo_epochs']} epoch(s), "
        f"lr {s['lora_dpo_lr']:g} (LoRA) / {s['dpo_lr']:g} (full)"
    )
    try:
        data = data or miniature.miniature_data(seed)
    except (pdata.DownloadError, ValueError, OSError) as e:  # this section only is skipped
        print(f"skipped: chapter 8's data set is not at hand ({str(e).strip().splitlines()[0]})")
        return None
    result = lora_reference_experiment(budget, beta=beta, seed=seed, data=data)
    rows = {r["setup"]: r for r in result["rows"]}
    print(
        f"\nclaim: against π_ref = π_SFT the first step has π_θ = π_ref: loss ln 2 = "
        f"{LN2_FLOAT32:.7f} (float32), every margin 0, accuracy 0"
    )
    for setup in ("merged", "sft_adapter", "full"):
        r = rows[setup]
        print(
            f"  {setup:>12}: first loss {r['first_loss']:.7f} (= ln 2: "
            f"{r['first_loss'] == LN2_FLOAT32}), mean margin {r['first_margin']:.1e}, "
            f"accuracy {r['first_accuracy']:.2f}"
        )
    r = rows["adapter_off"]
    print(
        "claim: with the SFT adapter switched off the reference is the base; the SFT's own "
        "log-ratio log π_SFT/π_base counts as reward from the first step"
    )
    print(
        f"  adapter_off: first loss {r['first_loss']:.7f} "
        f"(ln 2 − {LN2_FLOAT32 - r['first_loss']:.4f}), mean margin {r['first_margin']:.4f}, "
        f"accuracy {r['first_accuracy']:.2f} at step 1"
    )
    sft_margin = rows["sft"]["val_margin_base"]
    print(
        "claim: so the margin it logs is the margin learned against π_SFT plus the SFT model's own "
        "margin against the base (β·Δ log π_SFT/π_base), exactly; validation pairs after DPO:"
    )
    print(
        f"  adapter_off: logged {r['val_margin']:.4f} = {r['val_margin_sft']:.4f} (against "
        f"π_SFT) + {sft_margin:.4f} (SFT against base): sum {r['val_margin_sft'] + sft_margin:.4f};"
        f" logged accuracy {r['val_accuracy']:.3f}, against π_SFT {r['val_accuracy_sft']:.3f}"
    )
    right, wrong = rows["sft_adapter"], rows["adapter_off"]
    print(
        "measured after DPO, the same adapter and steps, only the reference differs "
        "(right: frozen SFT adapter; wrong: adapter off), validation pairs:"
    )
    for key, what in (
        ("val_margin_sft", "margin against π_SFT"),
        ("kl_sft", "KL(π‖π_SFT) [nats/token]"),
        ("kl_base", "KL(π‖π_base) [nats/token]"),
        ("vs_sft_T0", "SBERT win rate against SFT, greedy"),
    ):
        print(f"  {what:>36}: right {right[key]:.4f}, wrong {wrong[key]:.4f}")
    lora, full = rows["merged"], rows["full"]
    print(
        f"LoRA DPO (merged + new adapter) against full DPO: trainable {lora['trainable']:,} vs "
        f"{full['trainable']:,}; {lora['cpu_s_per_step']:.3f} vs {full['cpu_s_per_step']:.3f} s of "
        f"CPU a step; "
        f"peak memory rise {lora['peak_mib']:.1f} vs {full['peak_mib']:.1f} MiB; validation margin "
        f"{lora['val_margin']:.3f} vs {full['val_margin']:.3f}, KL to SFT {lora['kl_sft']:.3f} vs "
        f"{full['kl_sft']:.3f}, win rate vs SFT {lora['vs_sft_T0']:.3f} vs {full['vs_sft_T0']:.3f}"
    )
    print()
    print("\n".join(table(result["rows"])))
    figure(result, name)
    return result
