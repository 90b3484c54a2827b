"""Chapter 10 on chapter 7's miniature: each DPO variant fine-tuned from π_ref on the same pairs
with the same budget, every checkpoint placed on the exact reward–KL frontier by enumeration
(`chapters.ch7_frontier.task`).
"""

import csv

import numpy as np
import torch
from tqdm import tqdm

from chapters.ch7_frontier.sweeps import Sweep, SweepPool
from chapters.ch7_frontier.task import RESPONSE_LEN, logprob
from chapters.ch10_dpo_family.optima import Frontier
from chapters.common.figures import plt, save
from chapters.common.files import atomic_open, plots_dir


def add_mismatched(data: dict, ref, generator: torch.Generator) -> dict:
    """KTO's reference-point rows: each row's prompt with a response of a random other row (chosen
    or rejected).

    As TRL's KTO builds them (completions shifted within a batch), here fixed once; adds
    "mismatched" and its reference log-probs "ref_mismatched" to `data` and returns it.
    """
    pool = torch.cat([data["chosen"], data["rejected"]])  # (2N, RESPONSE_LEN)
    data["mismatched"] = pool[torch.randint(len(pool), (len(data["prompt"]),), generator=generator)]
    with torch.no_grad():
        data["ref_mismatched"] = logprob(ref, data["prompt"], data["mismatched"])
    return data


def pair_logprobs(policy, batch: dict, mismatched: bool = False):
    """log π(y_w|x), log π(y_l|x) (and log π(y'|x) of the mismatched rows), summed over tokens, in
    one forward pass."""
    keys = ("chosen", "rejected", "mismatched") if mismatched else ("chosen", "rejected")
    n = len(batch["prompt"])
    logps = logprob(
        policy, batch["prompt"].repeat(len(keys), 1), torch.cat([batch[k] for k in keys])
    )  # (kn,)
    return logps.split(n)


def per_token(logps):
    """Per-token mean log-probs: every response here has RESPONSE_LEN tokens."""
    return logps / RESPONSE_LEN


def family_batch_loss(
    kind: str, losses: dict, policy, batch: dict, beta: float, **kw
) -> torch.Tensor:
    """The batch mean of `kind`'s loss for a GPT-2 policy on chapter 7's pairs (reference log-probs
    precomputed).

    losses: chapter 10's formulas, {"preference": preference_loss, "orpo": orpo_loss, "kto":
    kto_loss, "reference_point": kto_reference_point}. kind: a `preference_loss` kind (SimPO on
    per-token means), "orpo" (β is its λ), or "kto" (each pair split into a desirable y_w and an
    undesirable y_l; z₀ from the batch's mismatched rows).
    """
    pc, pr, *mismatched = pair_logprobs(policy, batch, mismatched=kind == "kto")
    if kind == "simpo":
        return losses["preference"](
            "simpo", per_token(pc), per_token(pr), 0.0, 0.0, beta, **kw
        ).mean()
    if kind == "orpo":
        return losses["orpo"](per_token(pc), per_token(pr), beta).mean()
    if kind == "kto":
        z0 = losses["reference_point"](mismatched[0], batch["ref_mismatched"])
        return torch.cat(
            [
                losses["kto"](pc, batch["ref_chosen"], True, beta, z0),
                losses["kto"](pr, batch["ref_rejected"], False, beta, z0),
            ]
        ).mean()
    return losses["preference"](
        kind, pc, pr, batch["ref_chosen"], batch["ref_rejected"], beta, **kw
    ).mean()


def train_and_place(setup: dict, runs, cfg: dict, seed: int, workers: int = 1) -> tuple:
    """Fine-tune a copy of π_ref with each run's loss and evaluate every checkpoint exactly, one row
    per checkpoint.

    runs: [(variant, setting, loss_fn(policy, batch))]. Every run starts from the same π_ref with
    the same minibatch seed, so variants differ only in their loss. Row: variant, setting, step,
    reward, kl, efficiency. The runs are independent: `chapters.ch7_frontier.sweeps` shares them out
    over `workers` forked processes, which changes no number. Returns (rows in the order of `runs`,
    the exact frontier over cfg["frontier"]).
    """
    front = Frontier(setup["logp_ref"], setup["rewards"], cfg["frontier"])
    sweeps = [Sweep(variant, setting, seed, loss_fn) for variant, setting, loss_fn in runs]
    shared = dict(
        cfg=cfg, **{k: setup[k] for k in ("ref", "data", "prompts", "logp_ref", "rewards")}
    )
    with SweepPool(shared, workers) as pool:
        per_run = list(tqdm(pool.run(sweeps), total=len(sweeps), desc="runs", leave=False))
    rows = [
        dict(variant=sweep.method, setting=sweep.setting, step=c.step, reward=c.reward, kl=c.kl,
             efficiency=front.efficiency(c.reward, c.kl))
        for sweep, checkpoints in zip(sweeps, per_run)
        for c in checkpoints
    ]
    return rows, front


def write_rows(rows, name: str):
    """The miniature's rows as plots/<name>.csv (or under $DPO_PLOTS_DIR), written whole or not at
    all.
    """
    path = plots_dir() / f"{name}.csv"
    with atomic_open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(
            {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows
        )
    print(f"table: {path}")


def frontier_figure(rows, front: Frontier, name: str):
    """Every variant's checkpoints on the exact frontier (plots/<name>.png): colour = variant,
    marker = setting (β)."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.4))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    markers = dict(zip(settings, "os^Dv"))
    last = max(r["step"] for r in rows)
    order = np.argsort(front.kls)
    top_kl = max(r["kl"] for r in rows) * 1.05
    for ax, top in zip(axes, (top_kl, 1.6)):
        keep = order[: np.searchsorted(front.kls[order], top) + 1]
        ax.plot(
            front.kls[keep], front.rewards[keep], "k-", lw=2, label="exact frontier π*_β (eq. (36))"
        )
        for k, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
            for r in (r for r in rows if r["variant"] == variant):
                ax.scatter(
                    r["kl"],
                    r["reward"],
                    color=f"C{k}",
                    marker=markers[r["setting"]],
                    s=46 if r["step"] == last else 14,
                    alpha=1.0 if r["step"] == last else 0.45,
                    label=variant
                    if ax is axes[0] and r["step"] == last and r["setting"] == settings[0]
                    else None,
                    zorder=3,
                )
        ax.axhline(front.ref_reward, color="grey", ls=":", lw=1, label="π_ref")
        ax.set(
            xlim=(-0.02 * top, top),
            xlabel="KL(π ‖ π_ref), nats per response (exact)",
            ylabel="E[r*(x, y)] (exact)",
        )
        ax.grid(alpha=0.3)
    top_visible = max((r["reward"] for r in rows if r["kl"] <= 1.6), default=front.ref_reward)
    axes[1].set_ylim(front.ref_reward - 0.2, top_visible + 0.4)
    for setting, m in markers.items():
        axes[1].scatter([], [], color="grey", marker=m, s=46, label=setting)
    axes[0].set_title(
        f"the DPO family on chapter 7's miniature (large: step {last}; small: earlier)"
    )
    axes[1].set_title("the same, KL ≤ 1.6 (marker: β; ORPO's λ)")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].legend(fontsize=8, loc="lower right")
    save(fig, name)
