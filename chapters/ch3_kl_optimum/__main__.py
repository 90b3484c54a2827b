"""Chapter 3 (report §3.3, §4.1; eqs. (27)–(37)): the KL-constrained objective and its closed-form
optimum.

On a discrete response space every expectation over y is a finite sum, so each line of §4.1's
derivation can be evaluated at any policy π and compared with the line before it. Distributions and
rewards are tensors (..., Y) over the last axis; leading axes are prompts x (the report's mean over
x ~ D).

    python3 -m chapters.ch3_kl_optimum [--seed 0] [--responses 8]
"""

import argparse
import math

import numpy as np
import torch

from chapters.ch3_kl_optimum.optimum import (
    _random_problem,
    ascend_logits,
    kl_divergence,
    kl_objective,
    log_partition_function,
    objective_rewritings,
    optimal_policy,
    reward_from_policy,
    rlhf_token_rewards,
)
from chapters.common.figures import plt, save
from chapters.common.files import check_writable
from gpt.cli import nonnegative_int, run, summary


def _plot_policies(pi_ref, rewards, betas):
    y = np.arange(pi_ref.shape[-1])
    fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    ax_r.bar(y, rewards.numpy(), color="tab:green")
    ax_r.axhline(0, color="black", lw=0.6)
    ax_r.set(xlabel="response y", ylabel="reward r(x, y)", title="the reward", xticks=y)
    width = 0.8 / (len(betas) + 1)
    ax_p.bar(y - 0.4 + width / 2, pi_ref.numpy(), width, color="black", label="π_ref")
    colours = plt.cm.viridis(np.linspace(0.1, 0.9, len(betas)))
    for i, (beta, colour) in enumerate(zip(betas, colours)):
        pi_star = optimal_policy(pi_ref, rewards, beta)
        ax_p.bar(y - 0.4 + width * (i + 1.5), pi_star.numpy(), width, color=colour,
                 label=f"π*, β = {beta:g}")
    ax_p.set(xlabel="response y", ylabel="probability", xticks=y,
             title="eq. (36): π* = π_ref·exp(r/β)/Z — small β piles on argmax r, large β stays "
             "at π_ref")
    ax_p.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    save(fig, "ch3_optimal_policy_vs_beta")


def _plot_objective(pi_ref, rewards, betas, random_pis):
    pi_stars = torch.stack(
        [optimal_policy(pi_ref, rewards, float(b)) for b in betas]
    )  # (B, Y): one π* per β
    log_z = torch.stack([log_partition_function(pi_ref, rewards, float(b)) for b in betas])  # (B,)
    reward_star = (pi_stars * rewards).sum(-1)
    kl_star = kl_divergence(pi_stars, pi_ref)
    fig, (ax_j, ax_f) = plt.subplots(1, 2, figsize=(12, 4.5))
    best_random = torch.stack(
        [kl_objective(random_pis, pi_ref, rewards, float(b)).max() for b in betas]
    )
    ax_j.plot(betas, betas * log_z, "k-", lw=3, alpha=0.4, label="β·log Z(x)  (eq. (32))")
    ax_j.plot(
        betas,
        kl_objective(pi_stars, pi_ref, rewards, betas),
        "C3--",
        label="J(π*)  (eq. (27) at eq. (36))",
    )
    ax_j.plot(
        betas,
        best_random,
        "C0.",
        ms=4,
        label=f"best of {len(random_pis)} random π (falls off the axes for large β)",
    )
    ax_j.plot(
        betas, kl_objective(pi_ref, pi_ref, rewards, betas), "C2:", label="J(π_ref) = E_ref[r]"
    )
    top, bottom = float((betas * log_z).max()), float(kl_objective(pi_ref, pi_ref, rewards, 1.0))
    margin = 0.15 * (top - bottom)
    ax_j.set(
        xscale="log",
        xlabel="β",
        ylabel="J(π) = E_π[r] − β·KL(π‖π_ref)",
        ylim=(bottom - margin, top + margin),
        title="the objective along β: J(π*) = β·log Z(x) ≥ J(π)",
    )
    ax_j.legend(fontsize=8)
    ax_f.scatter(
        kl_divergence(random_pis, pi_ref),
        (random_pis * rewards).sum(-1),
        s=4,
        c="0.7",
        label=f"{len(random_pis)} random π",
    )
    sc = ax_f.scatter(
        kl_star, reward_star, c=np.log10(betas.numpy()), cmap="viridis", s=14, label="π* for each β"
    )
    fig.colorbar(sc, ax=ax_f, label="log10 β")
    ax_f.set(
        xlabel="KL(π‖π_ref)",
        ylabel="E_π[r]",
        title="reward vs KL: the π* family is the upper frontier",
    )
    ax_f.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save(fig, "ch3_objective_along_beta")


def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"python3 -m {__package__}", description=summary(__doc__))
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    parser.add_argument("--responses", type=int, default=8, help="number of responses Y, "
                        "2..50 (default 8)")
    args = parser.parse_args(argv)
    if not 2 <= args.responses <= 50:
        raise SystemExit(f"error: --responses must be between 2 and 50, got {args.responses}")
    check_writable()
    torch.set_printoptions(precision=4)
    g = torch.Generator().manual_seed(args.seed)
    beta = 0.5
    pi_ref, rewards = _random_problem(g, args.responses, prompts=4)
    pi = torch.softmax(
        torch.randn(pi_ref.shape, generator=g, dtype=torch.float64), -1
    )  # a random policy
    print(f"4 prompts × {args.responses} responses, float64, β = {beta}; π is a random policy")

    steps = objective_rewritings(pi, pi_ref, rewards, beta)
    j27 = kl_objective(pi, pi_ref, rewards, beta)
    print(f"eq. (29) = eq. (27):            max |Δ| = {(steps['(29)'] - j27).abs().max():.1e}")
    print(
        f"eq. (30) = −eq. (29)/β:         max |Δ| = "
        f"{(steps['(30)'] + steps['(29)'] / beta).abs().max():.1e}"
    )
    for a, b in [("(31)", "(30)"), ("(34)", "(31)"), ("(35)", "(34)")]:
        print(f"eq. {a} = eq. {b}:            max |Δ| = {(steps[a] - steps[b]).abs().max():.1e}")
    pi_star = optimal_policy(pi_ref, rewards, beta)
    log_z = log_partition_function(pi_ref, rewards, beta)
    z_by_hand = (pi_ref * torch.exp(rewards / beta)).sum(-1)
    print(
        f"eq. (32): log-sum-exp vs Σ π_ref·exp(r/β), max |Δ log Z| = "
        f"{(log_z - z_by_hand.log()).abs().max():.1e}"
    )
    print(
        f"eq. (33): π* ≥ 0: {bool((pi_star >= 0).all())}, max |Σ_y π* − 1| = "
        f"{(pi_star.sum(-1) - 1).abs().max():.1e}"
    )
    identity = -beta * kl_divergence(pi, pi_star) + beta * log_z
    print(
        f"eq. (35): J(π) = −β·KL(π‖π*) + β·log Z(x) at random π, max |Δ| = "
        f"{(j27 - identity).abs().max():.1e}"
    )

    j_star = kl_objective(pi_star, pi_ref, rewards, beta)
    print(f"eq. (36): J(π*) = β·log Z(x), max |Δ| = {(j_star - beta * log_z).abs().max():.1e}")
    randoms = torch.softmax(
        3 * torch.randn(10000, *pi_ref.shape, generator=g, dtype=torch.float64), -1
    )
    gap = (j_star - kl_objective(randoms, pi_ref, rewards, beta)).min()
    print(
        f"eq. (36): J(π*) − J(π) over 10000 random π, smallest gap = {gap:.3e} (> 0: π* wins every "
        f"time)"
    )
    pi_ascent = ascend_logits(pi_ref, rewards, beta)
    print(
        f"eq. (36): gradient ascent (L-BFGS) on free logits from uniform, max |π_θ − π*| = "
        f"{(pi_ascent - pi_star).abs().max():.1e}"
    )
    argmax = rewards.argmax(-1, keepdim=True)
    off = [
        1 - optimal_policy(pi_ref, rewards, b).gather(-1, argmax).min() for b in (1.0, 0.1, 0.01)
    ]
    print(
        "eq. (36): β → 0 piles π* on argmax_y r: mass left off it at β = 1, 0.1, 0.01: "
        + ", ".join(f"{o:.1e}" for o in off)
    )
    far = [(optimal_policy(pi_ref, rewards, b) - pi_ref).abs().max() for b in (1.0, 1e2, 1e4)]
    print(
        "eq. (36): β → ∞ returns π_ref: max |π* − π_ref| at β = 1, 1e2, 1e4: "
        + ", ".join(f"{d:.1e}" for d in far)
    )
    recovered = reward_from_policy(pi_star, pi_ref, beta)
    spread = (rewards - recovered).max(-1).values - (rewards - recovered).min(-1).values
    print(
        f"eq. (37): r − β·log π*/π_ref is constant over y (spread {spread.max():.1e}), "
        f"equal to β·log Z(x): max |Δ| = "
        f"{((rewards - recovered)[..., 0] - beta * log_z).abs().max():.1e}"
    )
    print(
        f"eq. (37) with β·log Z(x) added recovers r exactly: max |Δ| = "
        f"{(reward_from_policy(pi_star, pi_ref, beta, log_z) - rewards).abs().max():.1e}"
    )

    logps = torch.log(pi_star[:2])  # eq. (28) on two "sequences" of Y tokens: per-token log-probs
    mask = torch.ones_like(logps, dtype=torch.bool)
    mask[1, :2] = False  # left padding on the second row
    tokens = rlhf_token_rewards(rewards[:2, 0], logps, torch.log(pi_ref[:2]), mask, beta)
    seq = rewards[:2, 0] - beta * ((logps - torch.log(pi_ref[:2])) * mask).sum(-1)
    print(
        f"eq. (28): per-token rewards summed = r_φ − β·(log π − log π_ref), max |Δ| = "
        f"{(tokens.sum(-1) - seq).abs().max():.1e}"
    )

    betas = torch.logspace(-2, 2, 60, dtype=torch.float64)
    _plot_policies(pi_ref[0], rewards[0], [0.1, 0.3, 1.0, 3.0])
    _plot_objective(pi_ref[0], rewards[0], betas, randoms[:2000, 0])
    print(
        f"figures: π* for β ∈ {{0.1, 0.3, 1, 3}}; J along β over {len(betas)} values "
        f"(log10 β ∈ [{math.log10(betas[0]):.0f}, {math.log10(betas[-1]):.0f}])"
    )


if __name__ == "__main__":
    run(main)
