"""Chapter 5 (report §5.1, §5.2): the implicit reward loses nothing, and DPO needs no baseline.

§5.1's results are statements about every reward, prompt and response. The numbers here check them
on random finite problems in float64: a number can refute a claim or catch a slip in the algebra (it
does catch one, in Lemma 2's proof), but it cannot prove the claim for all problems — that is what
the report's proofs are for. Each docstring says which part a number checks.

    python3 -m chapters.ch5_theory [--seed 0] [--samples 20000]
"""

import argparse

import numpy as np
import torch

from chapters.ch1_preference_models.probabilities import bradley_terry
from chapters.ch3_kl_optimum.optimum import log_partition_function, optimal_policy
from chapters.ch5_theory.baselines import (
    dpg_baseline,
    dpg_weights,
    dpo_gradient_samples,
    expected_gradient,
    gradient_variance,
    min_variance_baseline,
    rl_baseline,
    score_function_samples,
    total_variance,
)
from chapters.ch5_theory.equivalence import (
    are_equivalent,
    equivalent_reward,
    implied_policy,
    lemma2_proof_steps,
    project_reward,
    ranking_distribution,
)
from chapters.common.figures import plt, save
from chapters.common.files import check_writable
from gpt.cli import nonnegative_int, run

# --------------------------------------------------------------------------------------- the script


def _plot_classes(pi_ref, rewards, beta, offsets):
    y = np.arange(pi_ref.shape[-1])
    projection = project_reward(rewards, pi_ref, beta)
    shifts = torch.linspace(-1.0, 1.0, 201, dtype=torch.float64)
    mass = torch.stack([implied_policy(projection + c, pi_ref, beta).sum() for c in shifts])
    fig, (ax_r, ax_p, ax_m) = plt.subplots(1, 3, figsize=(15, 4.3))
    ax_p.bar(y, pi_ref.numpy(), 0.5, color="0.85", label="π_ref")
    colours = plt.cm.coolwarm(np.linspace(0, 1, len(offsets)))
    for k, (c, colour) in enumerate(zip(offsets, colours)):
        member = rewards + c
        ax_r.plot(y, member.numpy(), "o-", color=colour, lw=1, ms=3, label=f"r + {c:g}")
        ax_p.scatter(y, optimal_policy(pi_ref, member, beta).numpy(), s=160 - 25 * k,
                     facecolors="none", edgecolors=colour, label=f"π* of r + {c:g}")
    ax_r.plot(y, projection.numpy(), "k-", lw=3, alpha=0.6, label="projection r − β·log Z")
    ax_r.set(xlabel="response y", ylabel="reward", xticks=y,
             title="Definition 1: one class; Theorem 1: one projection")
    # room for the legend
    ax_r.set_ylim(bottom=float(min(projection.min(), rewards.min() + min(offsets))) - 3.0)
    ax_r.legend(fontsize=7, ncol=3, loc="lower center")
    ax_p.set(xlabel="response y", ylabel="probability", xticks=y,
             title="Lemma 2: every member gives the same π* (concentric circles)")
    ax_p.legend(fontsize=7, ncol=2)
    ax_m.plot(shifts.numpy(), mass.numpy(), "C0-", label="Σ_y π_ref·exp((r_proj + c)/β)")
    ax_m.axhline(1, color="k", lw=0.8, ls="--", label="a distribution needs mass 1")
    ax_m.axvline(0, color="C3", lw=0.8, label="c = 0: the projection")
    ax_m.set(xlabel="c, added to the projection (f(x) = c)", ylabel="mass of π = π_ref·exp(r/β)",
             yscale="log", title="Proposition 1: only c = 0 is β·log π/π_ref")
    ax_m.legend(fontsize=8)
    fig.suptitle(f"§5.1 on one prompt, β = {beta:g}")
    fig.tight_layout()
    save(fig, "ch5_equivalence_classes")


def _plot_variance(curves, offsets, offset_rows, samples):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (title, grid, exact, measured_b, measured, marks) in zip(axes[:2], curves):
        ax.plot(grid.numpy(), exact.numpy(), "k-", lw=1, label="exact (enumeration)")
        ax.plot(measured_b.numpy(), measured.numpy(), "C0o", ms=5,
                label=f"measured ({samples} draws each)")
        for (name, b), colour in zip(marks.items(), ["C3", "C2", "C1"]):
            ax.axvline(float(b), color=colour, ls="--", lw=1,
                       label=name if b == 0 else f"{name} = {float(b):.3g}")
        ax.set(xlabel="baseline B", ylabel="tr Cov of one gradient draw", yscale="log", title=title)
        ax.legend(fontsize=7)
    ax = axes[2]
    for (label, values), style in zip(offset_rows.items(), ["C3o-", "C2s-", "C0^-"]):
        ax.plot(offsets, values, style, ms=4, label=label)
    ax.plot(
        [], [], " ", label="(DPO's gradient is of another loss:\n compare how flat, not how high)"
    )
    ax.set(xlabel="offset c added to every reward (Definition 1: same class)",
           ylabel="measured tr Cov", yscale="log",
           title="DPO needs no baseline: its variance ignores c")
    ax.legend(fontsize=7)
    fig.suptitle(
        "§5.2: no baseline B moves the gradient's mean; a good B cuts its variance (B_RL is not "
        "always good)"
    )
    fig.tight_layout()
    save(fig, "ch5_baseline_variance")


def _section_51(g, beta):
    pi_ref = torch.softmax(
        torch.randn(4, 5, generator=g, dtype=torch.float64), -1
    )  # 4 prompts, K = 5
    rewards = 2 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    fs = 5 * torch.randn(200, 4, generator=g, dtype=torch.float64)  # 200 random f(x)
    members = equivalent_reward(rewards, fs)  # (200, 4, 5)
    print("§5.1 — 4 prompts × 5 responses, 200 random f(x), float64, β =", beta)
    print(
        f"Definition 1: r + f(x) is equivalent to r for all 200 f: "
        f"{bool(are_equivalent(members, rewards).all())}"
    )
    _, p = ranking_distribution(rewards)
    _, p_members = ranking_distribution(members)
    print(
        f"Lemma 1: PL over all 120 rankings, max |p_(r+f) − p_r| = "
        f"{(p_members - p).abs().max():.1e}"
    )
    bt = bradley_terry(members[..., 0], members[..., 1]) - bradley_terry(
        rewards[..., 0], rewards[..., 1]
    )
    print(f"Lemma 1 (BT, K = 2): max |Δ p(y1 ≻ y2)| = {bt.abs().max():.1e}")
    bump = torch.zeros_like(rewards)
    bump[:, 0] = 1.0  # r + g(x, y) with g depending on y: not in the class
    _, p_bumped = ranking_distribution(rewards + bump)
    print(
        f"  contrast: raising one response's reward by 1 moves p by up to "
        f"{(p_bumped - p).abs().max():.3f}"
    )
    steps = lemma2_proof_steps(pi_ref, rewards, fs, beta)
    pi_shifted, pi_r = steps["π_r'"], steps["π_r"]
    print(f"Lemma 2: max |π_(r+f) − π_r| = {(pi_shifted - pi_r).abs().max():.1e}")
    ratio = (
        steps["as printed"] / steps["numerator"]
    ).log()  # (200, 4, 5): log of the printed / correct numerator
    print(
        f"Lemma 2's proof: π_ref·exp((r + f)/β) = π_ref·exp(r/β)·exp(f/β), max rel. Δ = "
        f"{((steps['factored'] - steps['numerator']) / steps['numerator']).abs().max():.1e}; the "
        f"printed "
        f"exp(r/β + f) is off by a factor up to e^{ratio.abs().max():.1f}, yet normalises to the "
        f"same π: max |Δ| = {(steps['π as printed'] - steps['π_r']).abs().max():.1e}"
    )
    projection = project_reward(rewards, pi_ref, beta)
    log_ratio = beta * (optimal_policy(pi_ref, rewards, beta).log() - pi_ref.log())
    print(
        f"Theorem 1: r − β·log Z(x) is in r's class: "
        f"{bool(are_equivalent(projection, rewards).all())}; "
        f"= β·log π_r/π_ref, max |Δ| = {(projection - log_ratio).abs().max():.1e}; the whole class "
        f"maps to it: max |f(r + f(x)) − f(r)| = "
        f"{(project_reward(members, pi_ref, beta) - projection).abs().max():.1e}"
    )
    mass = implied_policy(members, pi_ref, beta).sum(-1)  # (200, 4)
    print(
        f"Proposition 1: mass of π_ref·exp((r + f)/β) is 1 for f = the projection: "
        f"|mass − 1| = {(implied_policy(projection, pi_ref, beta).sum(-1) - 1).abs().max():.1e}; "
        f"for the 200 random members it ranges over [{mass.min():.2g}, {mass.max():.2g}]"
    )
    a, b = (
        torch.softmax(torch.randn(1000, 4, 5, generator=g, dtype=torch.float64), -1)
        for _ in range(2)
    )
    spread = beta * (a.log() - b.log())
    spread = spread.max(-1).values - spread.min(-1).values
    print(
        f"Proposition 1: 1000 pairs of distinct π, π': β·log π/π_ref − β·log π'/π_ref varies over "
        f"y by at least {spread.min():.2e} (never a class)"
    )
    _plot_classes(pi_ref[0], rewards[0], beta, [-2.0, -1.0, 0.0, 1.0, 2.0, 4.0])


def _section_52(g, beta, samples):
    print(
        f"\n§5.2 — one prompt, 6 responses, π_θ a perturbed π_ref, β = {beta}, {samples} "
        f"single-draw gradients per estimate"
    )
    pi_ref = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    theta = torch.log(pi_ref) + 0.5 * torch.randn(
        6, generator=g, dtype=torch.float64
    )  # a policy part-way from π_ref
    rewards = torch.randn(6, generator=g, dtype=torch.float64) + 1.0
    autograd = torch.func.grad(lambda t: (torch.softmax(t, -1) * rewards).sum())(
        theta
    )  # ∇_θ E_π[r]
    b_rl, b_min = rl_baseline(theta, rewards), min_variance_baseline(theta, rewards)
    bias = max(
        (expected_gradient(theta, rewards, b) - autograd).abs().max()
        for b in (0.0, b_rl, b_min, 10.0, -7.0)
    )
    print(
        f"RL: E[(r − B)∇log π] (enumeration) vs ∇E_π[r] (autograd), B ∈ {{0, B_RL, B*, 10, −7}}: "
        f"max |Δ| = {bias:.1e}"
    )
    rl_grid = torch.linspace(-1.0, 5.0, 61, dtype=torch.float64)
    rl_points = torch.linspace(-1.0, 5.0, 7, dtype=torch.float64)
    rl_measured = torch.stack(
        [total_variance(score_function_samples(theta, rewards, b, samples, g)) for b in rl_points]
    )
    for name, b in [("B = 0", 0.0), ("B_RL = E_π[r]", b_rl), ("B* (min-variance)", b_min)]:
        measured = total_variance(score_function_samples(theta, rewards, b, samples, g))
        print(
            f"RL variance, {name:18s}: exact {gradient_variance(theta, rewards, b):.4f}, measured "
            f"{measured:.4f}"
        )

    energy = pi_ref * torch.exp(rewards / beta)  # the EBM P(y) whose normalisation is π* (eq. (33))
    weights, b_dpg = dpg_weights(theta, energy), dpg_baseline(energy)
    mc = weights[torch.multinomial(torch.softmax(theta, -1), samples, True, generator=g)].mean()
    print(
        f"DPG: B = E_π[P/π] = Σ_y P(y) = Z(x): enumeration "
        f"{(torch.softmax(theta, -1) * weights).sum():.6f}, "
        f"Σ P {b_dpg:.6f}, exp(log Z) {log_partition_function(pi_ref, rewards, beta).exp():.6f}, "
        f"Monte Carlo {mc:.6f}"
    )
    dpg_autograd = torch.func.grad(lambda t: (energy * torch.log_softmax(t, -1)).sum())(
        theta
    )  # ∇ Σ P log π_θ
    dpg_bias = max(
        (expected_gradient(theta, weights, b) - dpg_autograd).abs().max() for b in (0.0, b_dpg)
    )
    pull = (
        (b_dpg * (optimal_policy(pi_ref, rewards, beta) - torch.softmax(theta, -1)) - dpg_autograd)
        .abs()
        .max()
    )
    print(
        f"DPG: E[(P/π − B)∇log π] vs ∇Σ P·log π_θ (autograd), B ∈ {{0, Σ P}}: max |Δ| = "
        f"{dpg_bias:.1e}; it equals Z·(π* − π_θ): max |Δ| = {pull:.1e}"
    )
    for name, b in [("B = 0", 0.0), ("B = Σ P", b_dpg)]:
        measured = total_variance(score_function_samples(theta, weights, b, samples, g))
        print(
            f"DPG variance, {name:8s}: exact {gradient_variance(theta, weights, b):.4f}, measured "
            f"{measured:.4f}"
        )
    dpg_grid = torch.linspace(0.0, 3 * float(b_dpg), 61, dtype=torch.float64)
    dpg_points = torch.linspace(0.0, 3 * float(b_dpg), 7, dtype=torch.float64)
    dpg_measured = torch.stack(
        [total_variance(score_function_samples(theta, weights, b, samples, g)) for b in dpg_points]
    )

    offsets = [0.0, 1.0, 2.0, 5.0, 10.0, 20.0]
    rows = {"RL, no baseline": [], "RL, B_RL": [], "DPO (eq. (38)), no baseline": []}
    seed = int(
        torch.randint(0, 2**31, (1,), generator=g)
    )  # the same draws for every estimator and every c
    dpo_grads = []
    for c in offsets:
        shifted = rewards + c
        rows["RL, no baseline"].append(
            float(
                total_variance(
                    score_function_samples(
                        theta, shifted, 0.0, samples, torch.Generator().manual_seed(seed)
                    )
                )
            )
        )
        rows["RL, B_RL"].append(
            float(
                total_variance(
                    score_function_samples(
                        theta,
                        shifted,
                        rl_baseline(theta, shifted),
                        samples,
                        torch.Generator().manual_seed(seed),
                    )
                )
            )
        )
        dpo_grads.append(
            dpo_gradient_samples(
                theta, pi_ref, shifted, beta, samples, torch.Generator().manual_seed(seed)
            )
        )
        rows["DPO (eq. (38)), no baseline"].append(float(total_variance(dpo_grads[-1])))
    print("reward offset c (r + c is in r's class):   " + "  ".join(f"{c:>8g}" for c in offsets))
    for label, values in rows.items():
        print(f"  measured variance, {label:27s}" + "  ".join(f"{v:8.4f}" for v in values))
    print(
        f"DPO: the same draws at every c give the same labels and per-example gradients: max |Δ| = "
        f"{max((d - dpo_grads[0]).abs().max() for d in dpo_grads):.1e}"
    )
    dpo = dpo_gradient_samples(theta, pi_ref, rewards, beta, 4, torch.Generator().manual_seed(1))
    print(
        f"DPO: each per-example gradient is −β·σ(·)·(e_w − e_l): rows sum to "
        f"{dpo.sum(-1).abs().max():.1e}, "
        "the −π_θ of both scores cancels — the pair is its own baseline"
    )
    curves = [
        (
            "RL (REINFORCE): E[(r − B)·∇log π_θ]",
            rl_grid,
            torch.stack([gradient_variance(theta, rewards, b) for b in rl_grid]),
            rl_points,
            rl_measured,
            {"B = 0": 0.0, "B_RL = E_π[r]": b_rl, "B* (min-variance)": b_min},
        ),
        (
            "DPG: E[(P/π_θ − B)·∇log π_θ]",
            dpg_grid,
            torch.stack([gradient_variance(theta, weights, b) for b in dpg_grid]),
            dpg_points,
            dpg_measured,
            {
                "B = 0": 0.0,
                "B = Σ P = Z(x)": b_dpg,
                "B* (min-variance)": min_variance_baseline(theta, weights),
            },
        ),
    ]
    _plot_variance(curves, offsets, rows, samples)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m chapters.ch5_theory",
        description="Report §5.1 and §5.2 checked on random finite problems.",
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    parser.add_argument("--samples", type=int, default=20000, help="gradient draws per variance "
                        "estimate (default 20000)")
    args = parser.parse_args(argv)
    if args.samples < 100:
        raise SystemExit(
            f"error: --samples must be at least 100 to measure a variance, got {args.samples}"
        )
    check_writable()
    g = torch.Generator().manual_seed(args.seed)
    _section_51(g, beta=0.5)
    _section_52(g, beta=1.0, samples=args.samples)


if __name__ == "__main__":
    run(main)
