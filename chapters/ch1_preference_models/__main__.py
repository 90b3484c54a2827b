"""Chapter 1 (report §2.1, §3.1, §3.2; eqs. (6)–(16)): Plackett–Luce and Bradley–Terry, Christiano's
loss.

Rankings are index tensors, most preferred first: `ranking[..., t]` is τ(t + 1), an index into the
last axis of `rewards` (or `p`). Every function is batched over leading axes (prompts), which
broadcast.

    python3 -m chapters.ch1_preference_models
"""

import argparse
import itertools
import math

import numpy as np
import torch
from scipy import stats

from chapters.ch1_preference_models.probabilities import (
    bradley_terry,
    bt_from_plackett_luce_steps,
    christiano_loss,
    christiano_predictor,
    plackett_eq10_steps,
    plackett_luce,
    plackett_probabilities,
    plackett_remaining,
    plackett_sequential,
    preference_database,
    sample_rankings,
)
from chapters.common.figures import plt, save
from chapters.common.files import check_writable
from gpt.cli import nonnegative_int, run, summary

# ---------------------------------------------------------------- the script


def _pl_frequency_check(rewards, num_samples, generator):
    """Sample rankings, count each of the K! orders; return (rankings, counts, exact probs,
    chi-square result)."""
    K = len(rewards)
    perms = torch.tensor(list(itertools.permutations(range(K))))  # (K!, K)
    samples = sample_rankings(rewards, num_samples, generator)  # (num_samples, K)
    code = (samples * K ** torch.arange(K - 1, -1, -1)).sum(-1)  # one integer per ranking
    perm_code = (perms * K ** torch.arange(K - 1, -1, -1)).sum(-1)
    counts = (code[:, None] == perm_code[None, :]).sum(0).numpy()  # (K!,)
    exact = plackett_luce(rewards, perms).numpy()  # (K!,)
    return perms, counts, exact, stats.chisquare(counts, exact * num_samples)


def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"python3 -m {__package__}", description=summary(__doc__))
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    parser.add_argument("--samples", type=int, default=40_000,
                        help="rankings sampled for the chi-square test")
    args = parser.parse_args(argv)
    if args.samples < 100:
        raise SystemExit(
            "error: --samples must be at least 100 for a chi-square test; pass a larger number"
        )
    check_writable()
    gen = torch.Generator().manual_seed(args.seed)
    f64 = torch.float64

    print("§3.1 Plackett's model with choice probabilities p (eqs. (6)–(8))")
    p = torch.rand(5, generator=gen, dtype=f64)
    p = p / p.sum()
    i, j, k = 2, 0, 4
    eq6 = p[i] * p[j] / (1 - p[i]) * p[k] / (1 - p[i] - p[j])
    top3 = plackett_sequential(p, [i, j, k])
    marginal = sum(
        plackett_remaining(p, [i, j, k, *rest]) for rest in itertools.permutations([1, 3])
    )
    print(
        f"  eq. (6), r = 5, top-3 order (3,1,5): by hand {eq6:.6f}, eq. (7) {top3:.6f}, "
        f"sum of eq. (8) over the 2 completions {marginal:.6f}"
    )
    perms = torch.tensor(list(itertools.permutations(range(5))))
    d78 = (plackett_sequential(p, perms) - plackett_remaining(p, perms)).abs().max()
    print(f"  eq. (7) = eq. (8) on all 120 rankings: max |Δ| = {d78:.1e}")

    print("§3.1 Plackett–Luce with scores (eqs. (9)–(11))")
    beta = torch.randn(5, generator=gen, dtype=f64)
    lines = plackett_eq10_steps(beta, perms)
    print(
        "  eq. (10), its three lines on all 120 rankings: max |line1 − line3| = "
        f"{(lines[0] - lines[2]).abs().max():.1e}, max |line2 − line3| = "
        f"{(lines[1] - lines[2]).abs().max():.1e}"
    )
    by_eq8 = plackett_remaining(plackett_probabilities(beta), perms)
    print(
        f"  eq. (11) = eq. (8) with p from eq. (9): max |Δ| = "
        f"{(plackett_luce(beta, perms) - by_eq8).abs().max():.1e}"
    )
    for K in range(1, 7):
        r = torch.randn(3, K, generator=gen, dtype=f64)  # 3 prompts
        allp = torch.tensor(list(itertools.permutations(range(K))))  # (K!, K)
        total = plackett_luce(r[:, None, :], allp[None]).sum(-1)  # (3,)
        print(
            f"  K = {K}: Σ of eq. (11) over all {math.factorial(K):3d} rankings, 3 prompts: max |Σ "
            f"− 1| = {(total - 1).abs().max():.1e}"
        )
    f = torch.randn(3, 1, generator=gen, dtype=f64) * 10
    r = torch.randn(3, 5, generator=gen, dtype=f64)
    shift = (plackett_luce(r + f, perms[:, None]) - plackett_luce(r, perms[:, None])).abs().max()
    print(
        f"  adding f(x) (|f| up to {f.abs().max():.0f}) to every reward of a prompt: max |Δ p*(τ)| "
        f"= {shift:.1e}"
    )
    big = torch.tensor([1000.0, 999.0, 990.0], dtype=f64)
    print(
        f"  stability: rewards (1000, 999, 990), τ = (1,2,3): eq. (10) literally = "
        f"{plackett_eq10_steps(big, [0, 1, 2])[2]:.4f} (e^1000 overflows), log form gives "
        f"{plackett_luce(big, [0, 1, 2]):.6f}; by hand 1/(1 + e^−1 + e^−10) · 1/(1 + e^−9) = "
        f"{1 / (1 + math.exp(-1) + math.exp(-10)) / (1 + math.exp(-9)):.6f}"
    )

    rewards = torch.tensor([1.2, 0.6, 0.0, -0.8], dtype=f64)
    perms4, counts, exact, chi = _pl_frequency_check(rewards, args.samples, gen)
    print(
        f"  Gumbel-trick sampler, K = 4, rewards {rewards.tolist()}, {args.samples} rankings: "
        f"chi-square vs eq. (11) = {chi.statistic:.1f} on 23 d.o.f., p = {chi.pvalue:.3f}"
    )
    wrong = stats.chisquare(
        counts, plackett_luce(rewards[[1, 0, 2, 3]], perms4).numpy() * args.samples
    )
    print(
        f"  the same draws vs eq. (11) with the rewards of y1 and y2 swapped: chi-square = "
        f"{wrong.statistic:.0f}, p = {wrong.pvalue:.1e} (the test can tell)"
    )

    print("§3.2 Bradley–Terry = Plackett–Luce at K = 2 (eqs. (12)–(16))")
    r1, r2 = torch.tensor(0.7, dtype=f64), torch.tensor(-0.4, dtype=f64)
    steps = bt_from_plackett_luce_steps(r1, r2)
    print(
        f"  r1 = 0.7, r2 = −0.4: eq. (13) = {steps['(13)']:.6f}, eq. (14) = {steps['(14)']:.6f}, "
        f"eq. (12) = {steps['(12)']:.6f}, eq. (16) bradley_terry = {bradley_terry(r1, r2):.6f}, "
        f"eq. (11) with K = 2 = {plackett_luce(torch.stack([r1, r2]), [0, 1]):.6f}"
    )

    print("§2.1 Christiano et al.: predictor and cross-entropy loss over (τ1, τ2, μ)")
    seg1 = torch.tensor(
        [[0.5, 0.5], [0.2, 0.0], [1.0, -1.0], [0.3, 0.3]], dtype=f64
    )  # r̂ per step, k = 2
    seg2 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [2.0, 2.0]], dtype=f64)
    judged = ["1", "tie", "2", "incomparable"]
    s1, s2, mu = preference_database(seg1, seg2, judged)
    P = christiano_predictor(s1, s2)
    print(
        f"  judgements {judged}: the incomparable pair is dropped, D keeps {len(mu)} triples, μ = "
        f"{mu.tolist()}"
    )
    print(
        f"  P̂(1 ≻ 2) = {[round(x, 4) for x in P.tolist()]} (segment sums {s1.sum(-1).tolist()} vs "
        f"{s2.sum(-1).tolist()})"
    )
    hand = (
        -math.log(1 / (1 + math.exp(-1.0)))
        - 0.5 * math.log(1 / (1 + math.exp(-0.2)))
        - 0.5 * math.log(1 / (1 + math.exp(0.2)))
        - math.log(0.5)
    )
    print(
        f"  loss = {christiano_loss(s1, s2, mu):.6f}; by hand −log σ(1) − ½log σ(0.2) − ½log "
        f"σ(−0.2) − log ½ = {hand:.6f}"
    )
    for name, sign in [
        ("the report's expression as printed, Σ μ log P̂", -1.0),
        ("with the minus sign restored", 1.0),
    ]:
        r1 = s1.clone().requires_grad_(True)  # learn the per-step rewards of segment 1
        opt = torch.optim.SGD([r1], lr=0.1)
        for _ in range(100):
            opt.zero_grad()
            (sign * christiano_loss(r1, s2, mu)).backward()
            opt.step()
        print(
            f"  minimise {name}: after 100 SGD steps P̂(winner) of the clear-winner triple goes "
            f"{P[0]:.3f} → {christiano_predictor(r1, s2)[0]:.3f}"
        )

    # figures
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    gap = np.linspace(-6, 6, 241)
    ax = axes[0]
    ax.plot(gap, 1 / (1 + np.exp(-gap)), color="k", lw=2, label="σ(r1 − r2)  (eq. (23), chapter 2)")
    for base, marker in [(-3.0, "o"), (0.0, "s"), (5.0, "^")]:
        g = np.linspace(-6, 6, 13)
        pts = bradley_terry(torch.tensor(base + g), torch.tensor(base))
        ax.plot(
            g, pts.numpy(), marker, ms=6, fillstyle="none", label=f"eq. (16) with r2 = {base:+.0f}"
        )
    ax.set(
        xlabel="reward gap r*(x, y1) − r*(x, y2)",
        ylabel="p*(y1 ≻ y2 | x)",
        title="Bradley–Terry depends only on the reward gap",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1]
    for label, m in [
        ("clear winner: μ = (1, 0)", (1.0, 0.0)),
        ("tie: μ = (½, ½)", (0.5, 0.5)),
        ("clear winner: μ = (0, 1)", (0.0, 1.0)),
    ]:
        t = torch.tensor(gap)[:, None]
        loss = [
            christiano_loss(
                t[n : n + 1], torch.zeros(1, 1, dtype=f64), torch.tensor([m], dtype=f64)
            ).item()
            for n in range(len(gap))
        ]
        ax.plot(gap, loss, lw=2, label=label)
    ax.set(
        xlabel="Σ r̂(segment 1) − Σ r̂(segment 2)",
        ylabel="loss for one triple (nats)",
        title="Christiano et al.'s loss (§2.1, sign restored)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "ch1_bradley_terry_and_loss")

    order = np.argsort(-exact)
    fig, ax = plt.subplots(figsize=(11, 4))
    x = np.arange(len(exact))
    ax.bar(x - 0.2, exact[order], width=0.4, label="eq. (11), exact")
    ax.bar(
        x + 0.2,
        counts[order] / args.samples,
        width=0.4,
        label=f"Gumbel-trick sampler, {args.samples} draws",
    )
    ax.set_xticks(
        x, ["".join(str(int(v) + 1) for v in perms4[n]) for n in order], rotation=90, fontsize=8
    )
    ax.set(
        xlabel="ranking τ (y indices, most preferred first)",
        ylabel="probability",
        title=f"Plackett–Luce, K = 4, rewards {rewards.tolist()}: chi-square p = {chi.pvalue:.2f}",
    )
    ax.legend()
    save(fig, "ch1_plackett_luce_frequencies")


if __name__ == "__main__":
    run(main)
