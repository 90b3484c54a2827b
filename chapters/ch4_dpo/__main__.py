"""Chapter 4 (report §4.2–§4.4; eqs. (38)–(41)): the DPO loss, its gradient, and the implicit
reward.

    python3 -m chapters.ch4_dpo          # every claim of §4.2–§4.4 beside the number that checks it

Run order: the loss, eq. (38), and its stable form, Plackett–Luce DPO, eqs. (39)–(40), the gradient,
eq. (41), in a table and in a tiny GPT-2, response log-probs done right next to the report authors'
three mistakes, and the central claim: DPO on preferences drawn from BT(r*) recovers π* =
π_ref·exp(r*/β)/Z (eq. (36)).
"""

import argparse
import itertools
import math

import numpy as np
import torch
from scipy.optimize import brentq
from tqdm import tqdm

from chapters.ch3_kl_optimum.optimum import optimal_policy
from chapters.ch4_dpo.loss import (
    dpo_gradient,
    dpo_loss,
    dpo_metrics,
    fit_tabular_dpo,
    logprob_by_prefixes,
    plackett_luce_dpo_loss,
    preference_counts,
    preference_probabilities,
    random_tiny_gpt2,
    response_logprobs,
    unshifted_logprobs,
)
from chapters.common.figures import plt, save
from chapters.common.files import check_writable
from chapters.common.rows import prompt_response_rows
from chapters.common.runtime import one_thread
from gpt.cli import nonnegative_int, positive_float, positive_int, run, summary


def _random_pairs(vocab: int, n: int, generator):
    """n (prompt, chosen, rejected) of random tokens, prompt 2–4 tokens and responses 1–5 (so rows
    need padding)."""

    def tokens(lo, hi):
        return torch.randint(
            1,
            vocab,
            (int(torch.randint(lo, hi + 1, (1,), generator=generator)),),
            generator=generator,
        )

    return [(tokens(2, 4), tokens(1, 5), tokens(1, 5)) for _ in range(n)]


def _loss_checks(beta):
    print("\n--- eq. (38): the DPO loss")
    lp = torch.tensor([-3.0, -7.5, -1.2], dtype=torch.float64)
    same = dpo_loss(lp, lp - 1, lp, lp - 1, beta)
    print(
        f"policy = reference: loss = {same.min():.12f}…{same.max():.12f} (ln 2 = "
        f"{math.log(2):.12f})"
    )
    z = torch.tensor([1e4, -1e4], requires_grad=True)
    loss = dpo_loss(z, torch.zeros(2), torch.zeros(2), torch.zeros(2), 1.0)
    loss.sum().backward()
    naive = -torch.log(torch.sigmoid(z.detach()))
    print(
        f"margins +1e4, −1e4: stable loss = {loss[0] + 0:.3g}, {loss[1]:.3g}; d loss/d margin = "
        f"{z.grad[0] + 0:.3g}, "
        f"{z.grad[1]:.3g}; naive −log σ(z) = {naive[0] + 0:.3g}, {naive[1]:.3g}"
    )

    print("\n--- eqs. (39)–(40): Plackett–Luce DPO")
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(4))
    pl = plackett_luce_dpo_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), beta)
    print(
        f"K = 2: max |PL-DPO (40) − DPO (38)| = "
        f"{(pl - dpo_loss(pc, pr, rc, rr, beta)).abs().max():.1e} (report: equal)"
    )
    K = 4
    pol, ref = (
        torch.randn(1, K, generator=g, dtype=torch.float64),
        torch.randn(1, K, generator=g, dtype=torch.float64),
    )
    total = sum(
        math.exp(-plackett_luce_dpo_loss(pol[:, list(t)], ref[:, list(t)], beta).item())
        for t in itertools.permutations(range(K))
    )
    print(
        f"K = {K}: Σ over all {math.factorial(K)} rankings of exp(−loss) = {total:.12f} "
        "(a distribution over rankings: 1)"
    )
    r = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    printed = sum(
        math.prod(r[t[k]].item() / sum(r[t[j]].item() for j in range(k, 3)) for k in range(3))
        for t in itertools.permutations(range(3))
        if t[0] == 1
    )
    print(
        f"erratum, eq. (39) as printed (r/Σr, no exp): P(y2 ranked first) = {printed:.3f} for r* = "
        f"{r.tolist()}, a negative 'probability'; with exp(r*) it is the PL model above"
    )

    print("\n--- §4.4: implicit reward and what a trainer logs")
    m = dpo_metrics(pc, pr, rc, rr, beta)
    print("  " + ", ".join(f"{k} = {v:.4f}" for k, v in m.items()))


def _gradient_checks(beta, seed):
    print("\n--- eq. (41): autograd of eq. (38) vs the closed form")
    g = torch.Generator().manual_seed(seed)
    X, Y = 3, 5
    theta = torch.randn(X, Y, generator=g, dtype=torch.float64, requires_grad=True)
    log_ref = torch.log_softmax(torch.randn(X, Y, generator=g, dtype=torch.float64), -1)
    x, w, l = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 3, 1, 4]), torch.tensor([2, 1, 0, 3])
    logp = torch.log_softmax(theta, -1)
    auto = torch.autograd.grad(
        dpo_loss(logp[x, w], logp[x, l], log_ref[x, w], log_ref[x, l], beta).mean(),
        theta,
        retain_graph=True,
    )[0]
    per_example = [
        torch.autograd.grad(logp[x[i], y[i]], theta, retain_graph=True)[0].flatten()
        for y in (w, l)
        for i in range(len(x))
    ]
    grads = torch.stack(per_example).reshape(
        2, len(x), -1
    )  # (2, B, X*Y): ∇ log π(y_w), ∇ log π(y_l)
    closed = dpo_gradient(
        grads[0], grads[1], logp[x, w], logp[x, l], log_ref[x, w], log_ref[x, l], beta
    )
    print(
        f"tabular policy (float64): max |autograd − eq. (41)| = "
        f"{(auto.flatten() - closed).abs().max():.1e}"
    )

    policy, ref = random_tiny_gpt2(seed), random_tiny_gpt2(seed + 1)
    params = [p for p in policy.parameters()]
    triples = _random_pairs(policy.config.vocab_size, 3, g)
    prompts = [t[0] for t in triples] * 2
    ids, attn, resp = prompt_response_rows(
        prompts, [t[1] for t in triples] + [t[2] for t in triples]
    )
    with torch.no_grad():
        ref_lp = response_logprobs(ref(ids, attn), ids, resp)  # (2B,)
    lp = response_logprobs(policy(ids, attn), ids, resp)  # (2B,)
    B = len(triples)
    auto = torch.autograd.grad(
        dpo_loss(lp[:B], lp[B:], ref_lp[:B], ref_lp[B:], beta).mean(), params, retain_graph=True
    )
    per_example = torch.stack(
        [
            torch.cat(
                [gi.flatten() for gi in torch.autograd.grad(lp[i], params, retain_graph=True)]
            )
            for i in range(2 * B)
        ]
    )  # (2B, P)
    closed = dpo_gradient(
        per_example[:B], per_example[B:], lp[:B], lp[B:], ref_lp[:B], ref_lp[B:], beta
    )
    auto = torch.cat([a.flatten() for a in auto])
    print(
        f"tiny GPT-2 ({auto.numel()} parameters, float32): max |autograd − eq. (41)| = "
        f"{(auto - closed).abs().max():.1e} (max |gradient| = {auto.abs().max():.1e})"
    )


def _authors_code_checks(beta, seed):
    print("\n--- response log-probs on a tiny GPT-2, and the report authors' code")
    g = torch.Generator().manual_seed(seed)
    policy, ref = random_tiny_gpt2(seed), random_tiny_gpt2(seed + 1)
    triples = _random_pairs(policy.config.vocab_size, 4, g)
    B = len(triples)
    prompts = [t[0] for t in triples] * 2
    responses = [t[1] for t in triples] + [t[2] for t in triples]
    ids, attn, resp = prompt_response_rows(prompts, responses)
    prompt_only = attn * ~resp  # the authors' attention mask: zero on the response
    everything = torch.ones_like(resp)
    everything[:, 0] = False  # every token that has a predictor: prompt, response and padding
    with torch.no_grad():
        by_prefix = torch.stack(
            [logprob_by_prefixes(policy, p, r) for p, r in zip(prompts, responses)]
        )
        variants = {}
        for name, model in (("policy", policy), ("ref", ref)):
            logits, hidden = model(ids, attn), model(ids, prompt_only)
            variants[name] = {
                "correct (shifted, response only, summed)": response_logprobs(logits, ids, resp),
                "unshifted": unshifted_logprobs(logits, ids, resp),
                "response hidden from attention": response_logprobs(hidden, ids, resp),
                "prompt and padding inside": response_logprobs(logits, ids, everything),
                "per-token mean": response_logprobs(logits, ids, resp, per_token_mean=True),
                "all four (the authors' code)": unshifted_logprobs(
                    hidden, ids, torch.ones_like(resp)
                )
                / ids.shape[1],
            }
    lengths = [len(r) for r in responses]
    print(
        f"{B} pairs, responses of {min(lengths)}–{max(lengths)} tokens, right-padded to "
        f"{ids.shape[1]}"
    )
    print(f"{'log-prob computed as':42s} {'max |Δ| vs token-by-token':>26s} {'DPO loss (38)':>14s}")
    for name in variants["policy"]:
        lp, rl = variants["policy"][name], variants["ref"][name]
        loss = dpo_loss(lp[:B], lp[B:], rl[:B], rl[B:], beta).mean()
        print(f"{name:42s} {(lp - by_prefix).abs().max():26.2e} {loss:14.4f}")
    same = {
        name: dpo_loss(v[:B], v[B:], v[:B], v[B:], beta).mean().item()
        for name, v in variants["policy"].items()
    }
    print(
        f"first step (policy = reference): loss = "
        f"{min(same.values()):.6f}…{max(same.values()):.6f} for every variant "
        f"(ln 2 = {math.log(2):.6f}): the first-step check cannot see these mistakes"
    )


def _central_claim(beta, seed, sizes, repeats):
    print("\n--- §4.2 + eq. (36): DPO on BT(r*) preferences recovers π* = π_ref·exp(r*/β)/Z")
    g = torch.Generator().manual_seed(seed)
    X, Y = 4, 6
    pi_ref = torch.softmax(0.5 * torch.randn(X, Y, generator=g, dtype=torch.float64), -1)
    r_star = torch.randn(X, Y, generator=g, dtype=torch.float64)
    pi_star = optimal_policy(pi_ref, r_star, beta)
    probs = preference_probabilities(pi_ref, r_star)
    print(
        f"{X} prompts × {Y} responses, β = {beta}, r* ~ N(0, 1); "
        f"max |π_ref − π*| = {(pi_ref - pi_star).abs().max():.3f}"
    )
    print(
        "data: x uniform, y1 ≠ y2 ~ π_ref, label from BT(r*); loss: mean eq. (38) over the N rows, "
        "minimised by Newton"
    )
    pop = fit_tabular_dpo(pi_ref, probs, beta)
    pop_err = (pop - pi_star).abs().max().item()
    print(
        f"infinite data (expected loss): max |π_θ − π*| = {pop_err:.1e} (report: DPO's optimum is "
        f"π*)"
    )
    errors = np.zeros((len(sizes), repeats))
    fits = {}
    for i, n in enumerate(tqdm(sizes, desc="data set sizes", leave=False)):
        for j in range(repeats):
            fit = fit_tabular_dpo(
                pi_ref, preference_counts(probs, n, seed=seed * 10_000 + 100 * i + j), beta
            )
            errors[i, j] = (fit - pi_star).abs().max().item()
            fits.setdefault(n, fit)
    print(
        f"{'N pairs':>12s} "
        f"{'max |π_θ − π*| (median, worst of ' + str(repeats) + ' data sets)':>50s}"
    )
    for n, med, worst in zip(sizes, np.median(errors, 1), errors.max(1)):
        print(f"{n:12,d} {med:35.4f} {worst:10.4f}{'   ≤ 0.01' if worst <= 0.01 else ''}")
    reached = [n for n, e in zip(sizes, errors.max(1)) if e <= 0.01]
    print(
        f"max |π_θ − π*| ≤ 0.01 in all {repeats} data sets from N = {reached[0]:,} pairs on"
        if reached
        else "max |π_θ − π*| ≤ 0.01 not reached at these sizes"
    )

    lengths = torch.arange(1, Y + 1, dtype=torch.float64)
    biased = fit_tabular_dpo(pi_ref, probs, beta, lengths=lengths)
    # its closed form: β·log(π/π_ref)(y)/|y| = r*(y) + c(x), so π = π_ref·exp(|y|(r* + c)/β), c
    # making Σ_y π = 1
    c = [
        brentq(
            lambda c: (pi_ref[i] * torch.exp(lengths * (r_star[i] + c) / beta)).sum().item() - 1,
            -50,
            50,
        )
        for i in range(X)
    ]
    predicted = pi_ref * torch.exp(
        lengths * (r_star + torch.tensor(c, dtype=torch.float64)[:, None]) / beta
    )
    print(
        f"per-token mean instead of sum (|y| = {lengths.int().tolist()} tokens), infinite data: "
        f"max |π_θ − π*| = "
        f"{(biased - pi_star).abs().max():.3f}; it is π_ref·exp(|y|(r* + c)/β) instead: max |Δ| = "
        f"{(biased - predicted).abs().max():.1e}"
    )

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    n_arr = np.array(sizes, dtype=float)
    for j in range(repeats):
        ax.scatter(
            n_arr,
            errors[:, j],
            s=10,
            color="tab:blue",
            alpha=0.3,
            label="one data set" if j == 0 else None,
        )
    med = np.median(errors, 1)
    ax.plot(n_arr, med, "o-", color="tab:blue", label=f"median of {repeats} data sets")
    ax.plot(
        n_arr, med[-1] * np.sqrt(n_arr[-1] / n_arr), ":", color="gray", label=r"slope $1/\sqrt{N}$"
    )
    ax.axhline(0.01, color="tab:red", ls="--", label="0.01")
    ax.plot([], [], " ", label=f"infinite data (expected loss): {pop_err:.0e}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="N preference pairs drawn from BT(r*)",
        ylabel=r"max$_{x,y}$ $|\pi_\theta(y|x) - \pi^*(y|x)|$",
        title="DPO's minimiser approaches π* as data grows",
    )
    ax.legend(fontsize=8, loc="lower left")
    x0, width, idx = 0, 0.2, np.arange(Y)
    small, large = sizes[2], sizes[-1]
    bars = [
        (pi_ref, r"$\pi_{ref}$ (DPO's start)"),
        (pi_star, r"$\pi^* = \pi_{ref}\,e^{r^*/\beta}/Z$"),
        (fits[small], f"DPO, N = {small:,}"),
        (fits[large], f"DPO, N = {large:,}"),
    ]
    for k, (p, label) in enumerate(bars):
        bx.bar(idx + (k - 1.5) * width, p[x0].numpy(), width, label=label)
    bx.set(
        xticks=idx,
        xticklabels=[f"y{i}\nr*={r_star[x0, i]:.2f}" for i in idx],
        ylabel=r"$\pi(y|x_0)$",
        title=f"prompt x0, β = {beta}: first data set of each N",
    )
    bx.legend(fontsize=8)
    save(fig, "ch4_dpo_recovers_optimal_policy")


def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"python3 -m {__package__}", description=summary(__doc__))
    parser.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed for every random draw (default 0)"
    )
    parser.add_argument(
        "--beta", type=positive_float, default=0.5, help="DPO's β, > 0 (default 0.5)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=20, help="data sets drawn per size N (default 20)"
    )
    args = parser.parse_args(argv)
    check_writable()  # an unwritable plots folder: one line now, not after the run
    with one_thread():  # every tensor here is tiny: on a shared CPU extra threads only add overhead
        torch.manual_seed(args.seed)
        _loss_checks(args.beta)
        _gradient_checks(args.beta, args.seed)
        _authors_code_checks(args.beta, args.seed)
        _central_claim(
            args.beta, args.seed, [int(10 ** (k / 2)) for k in range(4, 15)], args.repeats
        )


if __name__ == "__main__":
    run(main)
