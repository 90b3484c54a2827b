"""Chapter 7 (report §6.1, the DPO paper's Fig. 1 left): the reward–KL frontier in miniature, with
the exact optimum.

The paper asks which method buys the most reward for a given KL(π‖π_ref). Here the task is small
enough to enumerate: 8 tokens (2 positive, 2 negative, 4 neutral), prompts of 2 tokens, responses of
5 tokens, so each of 16 prompts (of the 64 possible) has 8^5 = 32,768 responses and every
expectation is an exact sum. That lets us draw what the paper could not: the frontier of π*_β =
π_ref·exp(r*/β)/Z (eq. (36)), which no policy can cross. The task, its exact evaluation, the
frontier and the settings are `chapters.ch7_frontier.task`; the reward model and PPO runs on it are
`chapters.ch7_frontier.rlhf`; `chapters.ch7_frontier.sweeps` trains the independent runs side by
side. This chapter holds the methods' losses, Best-of-N's exact distribution, and the experiment.

    python3 -m chapters.ch7_frontier               # the full sweep, its runs side by side on the
    cores available
    python3 -m chapters.ch7_frontier --workers 1   # the same numbers, one run after another
    python3 -m chapters.ch7_frontier --quick       # a short form of the same run (under a minute)
"""

import argparse
import csv
import itertools
import math
import time
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from chapters.ch3_kl_optimum.optimum import optimal_policy
from chapters.ch7_frontier.methods import best_of_n_logprobs, dpo_batch_loss, unlikelihood_loss
from chapters.ch7_frontier.rlhf import learn_reward_model, score_all
from chapters.ch7_frontier.sweeps import Sweep, SweepPool, reward_model_state, sampled_rows
from chapters.ch7_frontier.task import (
    FULL,
    QUICK,
    RESPONSE_LEN,
    all_responses,
    efficiency,
    exact_frontier,
    exact_reward_and_kl,
    frontier_reward,
    preferred_ft_loss,
    process_logprobs,
    reference_and_pairs,
    true_reward,
)
from chapters.common.figures import plt, save
from chapters.common.files import atomic_open, check_writable, plots_dir
from chapters.common.runtime import available_cores, one_thread
from gpt.cli import nonnegative_int, positive_int, run, summary

COLUMNS = [
    "method",
    "setting",
    "step",
    "reward",
    "kl",
    "kl_per_token",
    "kl_per_token_se",
    "kl_log_ratio",
    "kl_log_ratio_se",
    "gap",
    "efficiency",
]


def best_of_n_row(method: str, n: int, scores, logp_ref, rewards) -> dict:
    """A table row for best-of-n picked by `scores` (r* or the reward model), exact by enumeration;
    the sampled-KL columns are empty (nothing is sampled)."""
    reward, kl = exact_reward_and_kl(best_of_n_logprobs(logp_ref, scores, n), logp_ref, rewards)
    sampled = ("kl_per_token", "kl_per_token_se", "kl_log_ratio", "kl_log_ratio_se")
    row = dict(method=method, setting=f"N={n}", step=0, reward=reward, kl=kl)
    return row | dict.fromkeys(sampled, math.nan)


def plot(rows, front_r, front_kl, ref_reward, dpo_logp, opt_logp, dpo_beta, kl_to_opt, name: str):
    """Fig. 1 left in miniature (exact frontier, each method's points) and DPO's log π against log
    π*_β."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    top_kl = max(r["kl"] for r in rows) * 1.1
    order = np.argsort(front_kl)
    keep = order[
        : np.searchsorted(front_kl[order], top_kl) + 1
    ]  # up to the first frontier point past top_kl
    ax.plot(front_kl[keep], front_r[keep], "k-", lw=2, label="exact frontier π*_β, eq. (36)")
    ax.set_xlim(-0.03 * top_kl, top_kl)
    styles = {
        "DPO": ("C0", "o"),
        "PPO": ("C1", "s"),
        "PPO-GT": ("C2", "D"),
        "Unlikelihood": ("C3", "v"),
        "Preferred-FT": ("C4", "^"),
        "Best-of-N": ("C5", "*"),
        "Best-of-N (RM)": ("C7", "P"),
    }
    for method, (color, marker) in styles.items():
        pts = [r for r in rows if r["method"] == method]
        if pts:
            ax.scatter(
                [r["kl"] for r in pts],
                [r["reward"] for r in pts],
                c=color,
                marker=marker,
                s=36,
                alpha=0.85,
                label=method,
                zorder=3,
            )
    ax.axhline(ref_reward, color="grey", ls=":", lw=1, label="π_ref")
    ax.set_xlabel("KL(π ‖ π_ref), nats per response (exact, by enumeration)")
    ax.set_ylabel("E[r*(x, y)] (exact)")
    ax.set_title("Reward vs KL: no method can cross the exact frontier")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)

    hb = ax2.hexbin(
        opt_logp.flatten().numpy(),
        dpo_logp.flatten().numpy(),
        gridsize=60,
        bins="log",
        mincnt=1,
        cmap="viridis",
    )
    lo = max(min(float(opt_logp.min()), float(dpo_logp.min())) - 0.5, -40.0)
    ax2.plot([lo, 0], [lo, 0], "r--", lw=1, label="log π = log π*_β")
    ax2.set_xlim(lo, 0.5)
    ax2.set_ylim(lo, 0.5)
    ax2.set_xlabel(f"log π*_β(y|x), β = {dpo_beta} (exact optimum)")
    ax2.set_ylabel(f"log π_DPO(y|x), β = {dpo_beta} (trained)")
    ax2.set_title(
        f"DPO's learned policy against the optimum it targets\nKL(π_DPO ‖ π*_β) = {kl_to_opt:.3f} "
        f"nats"
    )
    fig.colorbar(hb, ax=ax2, label="responses (all prompts), log count")
    ax2.legend(loc="upper left")
    return save(fig, name)


def write_table(rows, name: str) -> str:
    """The results table as plots/<name>.csv (or under $DPO_PLOTS_DIR); returns its path."""
    path = plots_dir() / f"{name}.csv"
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    print(f"table: {path}")
    return str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"python3 -m {__package__}", description=summary(__doc__))
    parser.add_argument(
        "--quick", action="store_true", help="a short form of the same run (under a minute)"
    )
    parser.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed for every random draw (default 0)"
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=available_cores(),
        help="processes training the sweeps side by side (default: the cores available, here "
        f"{available_cores()}); the numbers do not depend on it",
    )
    args = parser.parse_args(argv)
    check_writable()
    with one_thread():  # these models are so small that a second thread only adds waiting
        return _run(args)


def _run(args):
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    start = reference_and_pairs(
        cfg, args.seed
    )  # π_ref by SFT on the process, then the pairs (stdout below)
    prompts, rewards, ref, logp_ref, data = (
        start[k] for k in ("prompts", "rewards", "ref", "logp_ref", "data")
    )
    gen = start["generator"]
    responses = all_responses()
    print(
        f"task: {len(prompts)} prompts x {len(responses)} responses of {RESPONSE_LEN} tokens, "
        f"r* from {rewards.min():.0f} to {rewards.max():.0f}"
    )

    print("\n1. the reference: a tiny GPT-2 fitted (SFT) to the known process")
    logp_proc = process_logprobs(prompts, responses)
    print(
        f"   enumeration: max |Σ_y π_ref(y|x) − 1| = {(logp_ref.exp().sum(-1) - 1).abs().max():.1e}"
    )
    print(
        f"   KL(process ‖ π_ref) = {(logp_proc.exp() * (logp_proc - logp_ref)).sum(-1).mean():.4f} "
        f"nats "
        f"(process entropy {-(logp_proc.exp() * logp_proc).sum(-1).mean():.3f} nats per response)"
    )
    ref_reward, _ = exact_reward_and_kl(logp_ref, logp_ref, rewards)
    print(
        f"   E_ref[r*] = {ref_reward:.3f}; E_process[r*] = "
        f"{(logp_proc.exp() * rewards).sum(-1).mean():.3f}; "
        f"max_y r* averaged over prompts = {rewards.max(-1).values.mean():.3f}"
    )

    print("\n2. the exact frontier, eq. (36): π*_β = π_ref·exp(r*/β)/Z for each β, by enumeration")
    front_r, front_kl = exact_frontier(logp_ref, rewards, cfg["frontier"])
    front_r, front_kl = (
        np.append(front_r, ref_reward),
        np.append(front_kl, 0.0),
    )  # β → ∞: π*_β → π_ref
    for beta in (
        cfg["frontier"][0],
        *sorted(set(cfg["dpo_betas"]) | set(cfg["ppo_betas"])),
        cfg["frontier"][-1],
    ):
        (r,), (kl,) = exact_frontier(logp_ref, rewards, [beta])
        print(f"   π*_β, β = {beta:7.3f}: E[r*] = {r:6.3f}, KL = {kl:6.3f}")
    print(
        f"   monotone in β (reward and KL both fall as β grows): "
        f"{bool(np.all(np.diff(front_r) <= 1e-9) and np.all(np.diff(front_kl) <= 1e-9))}"
    )

    print(
        "\n3. preference data, as in the paper: 4 samples of π_ref per prompt draw, all 6 pairs, "
        "labels ~ BT(r*)"
    )
    gap = true_reward(data["prompt"], data["chosen"]) - true_reward(
        data["prompt"], data["rejected"]
    )
    print(
        f"   {len(gap)} pairs; chosen better / tied / worse by r*: {(gap > 0).float().mean():.2f} "
        f"/ {(gap == 0).float().mean():.2f} / {(gap < 0).float().mean():.2f}"
    )

    print("\n4. the methods, each a sweep; every checkpoint evaluated exactly")
    rows, panel = [], {}
    offline = [
        Sweep("DPO", f"beta={b}", args.seed, partial(dpo_batch_loss, beta=b), keep_logp=True)
        for b in cfg["dpo_betas"]
    ]
    offline += [
        Sweep("Preferred-FT", f"seed={s}", args.seed + s, preferred_ft_loss)
        for s in cfg["pft_seeds"]
    ]
    offline += [
        Sweep("Unlikelihood", f"alpha={a}", args.seed, partial(unlikelihood_loss, alpha=a))
        for a in cfg["ul_alphas"]
    ]
    with_r_star = [Sweep("PPO-GT", f"beta={b}", args.seed, beta=b) for b in cfg["ppo_betas"]]
    shared = dict(cfg=cfg, ref=ref, data=data, prompts=prompts, logp_ref=logp_ref, rewards=rewards)
    with SweepPool(
        shared, args.workers
    ) as pool:  # independent sweeps, side by side; sampled KLs in order, here
        offline_results, with_r_star_results = pool.run(offline), pool.run(with_r_star)
        for sweep, results in tqdm(
            zip(offline, offline_results), total=len(offline), desc="offline sweeps", leave=False
        ):
            rows += sampled_rows(sweep, results, ref, prompts, cfg["kl_samples"], gen)
            if sweep.keep_logp:
                panel[float(sweep.setting.split("=")[1])] = torch.from_numpy(results[-1].logp)
        for n in cfg["best_of"]:
            rows.append(best_of_n_row("Best-of-N", n, rewards, logp_ref, rewards))
            kl = rows[-1]["kl"]
            print(
                f"   Best-of-{n}: exact KL = {kl:.3f} ≤ log N − (N−1)/N = "
                f"{math.log(n) - (n - 1) / n:.3f} (equal when no two responses tie)"
            )

        print(
            "\n   the reward model: ch2's RewardModel on a copy of π_ref, fitted to the same pairs "
            "(eq. (26))"
        )
        rm = learn_reward_model(ref, data, cfg["rm_steps"], gen)
        with_rm = [
            Sweep("PPO", f"beta={b}", args.seed, beta=b, rm_state=reward_model_state(rm))
            for b in cfg["ppo_betas"]
        ]
        with_rm_results = pool.run(with_rm)
        rm_scores = score_all(rm, prompts, responses)  # (P, Y)
        centred = lambda v: (v - v.mean(-1, keepdim=True)).flatten().numpy()  # noqa: E731  (r_φ is free up to f(x))
        print(
            f"   pair accuracy {rm.train_accuracy:.3f} (r* itself: "
            f"{((gap > 0) + 0.5 * (gap == 0)).double().mean():.3f}); "
            f"corr(r_φ, r*) over all responses, centred per prompt: "
            f"{np.corrcoef(centred(rm_scores), centred(rewards))[0, 1]:.3f}"
        )
        for n in cfg["best_of"]:
            rows.append(best_of_n_row("Best-of-N (RM)", n, rm_scores, logp_ref, rewards))
        for sweep, results in tqdm(
            zip(with_rm + with_r_star, itertools.chain(with_rm_results, with_r_star_results)),
            total=len(with_rm) + len(with_r_star),
            desc="PPO sweeps",
            leave=False,
        ):
            rows += sampled_rows(sweep, results, ref, prompts, cfg["kl_samples"], gen)

    # gap ≥ 0 for every policy; efficiency: the share of the frontier's gain over π_ref at this KL
    for r in rows:
        r["gap"] = frontier_reward(r["kl"], front_r, front_kl) - r["reward"]
        r["efficiency"] = efficiency(r["reward"], r["kl"], front_r, front_kl, ref_reward)
    sampled = [r for r in rows if not math.isnan(r["kl_per_token"])]
    z_tok = [
        abs(r["kl_per_token"] - r["kl"]) / r["kl_per_token_se"]
        for r in sampled
        if r["kl_per_token_se"] > 0
    ]
    z_ratio = [
        abs(r["kl_log_ratio"] - r["kl"]) / r["kl_log_ratio_se"]
        for r in sampled
        if r["kl_log_ratio_se"] > 0
    ]
    print(
        "\n5. the sampled KL estimates against the exact KL (|estimate − exact| / standard error, "
        "median):"
    )
    print(
        f"   paper's Σ_t per-token KL: {np.median(z_tok):.2f}, mean SE "
        f"{np.mean([r['kl_per_token_se'] for r in sampled]):.4f}; "
        f"log π/π_ref: {np.median(z_ratio):.2f}, mean SE "
        f"{np.mean([r['kl_log_ratio_se'] for r in sampled]):.4f}"
    )

    print(
        "\n6. results (gap = frontier reward at the same KL − reward; ≥ 0 for every valid policy)"
    )
    print(
        f"   {'method':<16}{'setting':<12}{'step':>5}{'E[r*]':>9}{'KL':>8}{'KL/tok (MC)':>14}"
        f"{'gap':>8}{'effic.':>8}"
    )
    for r in rows:
        mc = (
            ""
            if math.isnan(r["kl_per_token"])
            else f"{r['kl_per_token']:.3f}±{r['kl_per_token_se']:.3f}"
        )
        print(
            f"   {r['method']:<16}{r['setting']:<12}{r['step']:>5}"
            f"{r['reward']:>9.3f}{r['kl']:>8.3f}{mc:>14}{r['gap']:>8.3f}{r['efficiency']:>8.2f}"
        )
    # float error in the enumerated sums is far below 1e-9
    above = [r for r in rows if r["gap"] < -1e-9]
    verdict = (
        "none" if not above else f"{len(above)} points above it, which no policy can be: a bug"
    )
    print(
        f"   highest point above the frontier: {-min(r['gap'] for r in rows):.1e} (≤ 0 up to float "
        f"error: {verdict})"
    )
    print(
        "\n   closeness to the frontier, per method: mean gap, mean efficiency "
        "(reward gain over π_ref / the frontier's gain at the same KL), largest KL reached"
    )
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        summary[method] = dict(
            mean_gap=float(np.mean([r["gap"] for r in pts])),
            mean_efficiency=float(np.nanmean([r["efficiency"] for r in pts])),
            max_kl=max(r["kl"] for r in pts),
            max_reward=max(r["reward"] for r in pts),
        )
        s = summary[method]
        print(
            f"   {method:<16} mean gap {s['mean_gap']:.3f}, mean efficiency "
            f"{s['mean_efficiency']:.2f}, "
            f"KL up to {s['max_kl']:.2f}, E[r*] up to {s['max_reward']:.2f} ({len(pts)} points)"
        )
    best = max(summary, key=lambda m: summary[m]["mean_efficiency"])
    print(f"   closest to the frontier (highest mean efficiency): {best}")

    dpo_beta = sorted(panel)[len(panel) // 2]
    opt_logp = optimal_policy(logp_ref.exp(), rewards, dpo_beta).log()
    dpo_logp = panel[dpo_beta]
    kl_to_opt = (dpo_logp.exp() * (dpo_logp - opt_logp)).sum(-1).mean().item()
    corr = np.corrcoef(opt_logp.flatten().numpy(), dpo_logp.flatten().numpy())[0, 1]
    print(
        f"\n7. DPO (β = {dpo_beta}, last checkpoint) against π*_β: KL(π_DPO ‖ π*_β) = "
        f"{kl_to_opt:.3f} nats, corr(log π_DPO, log π*_β) = {corr:.3f}"
    )
    name = (
        "ch7_frontier_quick" if args.quick else "ch7_frontier"
    )  # --quick never overwrites the committed results
    plot(rows, front_r, front_kl, ref_reward, dpo_logp, opt_logp, dpo_beta, kl_to_opt, name)
    write_table(rows, name)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    return dict(
        rows=rows,
        summary=summary,
        frontier=(front_r, front_kl),
        betas=np.append(cfg["frontier"], np.inf),
        logp_ref=logp_ref,
        rewards=rewards,
        prompts=prompts,
    )


if __name__ == "__main__":
    run(main)
