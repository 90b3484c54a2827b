"""Chapter 11 (beyond the report, from eqs. (36), (38), (41)): where DPO goes wrong in practice,
derived and checked exactly in float64 — the chosen log-prob falling while the loss falls, the two
fixes (DPOP, DPO + NLL), gradient asymmetry and "loss 0.693, accuracy 0", and length (R-DPO).

Likelihood displacement on a softmax policy with shared features: the first-order change of
log π(y_w) against the real step as η → 0, a descent path where both fall, and random pairs. The
fixes: the smallest λ (DPOP) and α (DPO + NLL) that stop it, and what each costs in margin.
Gradient asymmetry: ∂L/∂π against autograd, and why the first step reads ln 2 and accuracy 0.
Length: R-DPO's optimum against Newton on its population loss, and α = γ undoing a length bias γ.
Section 5, on chapter 8's miniature (a GPT-2 trained here): how many pairs end DPO with a lower
log π(y_w), CHES against that fall, the fixes' margin, KL, length and win rate, and end-of-text
where the responses stop, the cause of DPO's longer answers.

    python3 -m chapters.ch11_dpo_pitfalls                   # every claim beside its number (~2 min)
    python3 -m chapters.ch11_dpo_pitfalls --full-miniature  # section 5 at four β, two weights a fix
    python3 -m chapters.ch11_dpo_pitfalls --quick           # seconds; no section 5; *_quick figures
"""

import argparse
import math
import time

import numpy as np
import torch

from chapters.ch3_kl_optimum import kl_divergence, optimal_policy
from chapters.ch4_dpo import dpo_loss
from chapters.ch8_instruction_dpo import data as pdata
from chapters.ch8_instruction_dpo.miniature import miniature_data
from chapters.ch11_dpo_pitfalls.displacement import (
    FeaturePair,
    descent_path,
    displacement_example,
    gradient_step,
    predicted_chosen_change,
    realised_chosen_change,
    smallest_fix,
)
from chapters.ch11_dpo_pitfalls.figures import displacement_figure, length_figure
from chapters.ch11_dpo_pitfalls.gradients import probability_gradients, step_readings
from chapters.ch11_dpo_pitfalls.length import fit_r_dpo, r_dpo_optimal_policy
from chapters.ch11_dpo_pitfalls.lora_reference import main_section as lora_reference_section
from chapters.ch11_dpo_pitfalls.losses import dpo_logprob_gradients
from chapters.ch11_dpo_pitfalls.miniature_figures import (
    miniature_displacement_figure,
    miniature_length_figure,
)
from chapters.ch11_dpo_pitfalls.miniature_runs import (
    SETTINGS,
    Objective,
    miniature_experiment,
)
from chapters.ch11_dpo_pitfalls.pair_readings import displacement_summary, spearman
from chapters.common.files import check_writable
from chapters.common.runtime import one_thread
from gpt.cli import nonnegative_int, run, summary

F64 = dict(dtype=torch.float64)
LN2 = math.log(2.0)
FULL = dict(steps=300, random_pairs=2000, tabular_steps=2000, prompts=16, alphas=61)
QUICK = dict(steps=100, random_pairs=300, tabular_steps=300, prompts=4, alphas=13)


def _section(title):
    print(f"\n--- {title}")


def _margin(path, pair):
    """h = log π/π_ref (y_w) − log π/π_ref (y_l) along a descent path, (steps + 1,)."""
    ref = pair.ref_logps
    return (path["chosen"] - ref[pair.chosen]) - (path["rejected"] - ref[pair.rejected])


# --------------------------------------------------------------------------- 1. displacement
def _displacement_section(beta, steps, random_pairs, seed):
    pair, theta0 = displacement_example()
    w, l = pair.chosen, pair.rejected
    _section(
        "1. likelihood displacement: one step on eq. (38) changes log π(y_w) by "
        "η·β·σ(−z)·⟨g_w, g_w − g_l⟩ to first order"
    )
    g = pair.scores(theta0)  # (Y, d): ∇_θ log π(y) = φ_y − E_π[φ]
    gw_gw, gw_gl = float(g[w] @ g[w]), float(g[w] @ g[l])
    print(
        f"softmax policy π = softmax(Φθ) over {pair.features.shape[0]} responses, features "
        f"φ_w = {pair.features[w].tolist()}, φ_l = {pair.features[l].tolist()}, from θ = 0 "
        f"(π = π_ref, z = 0), β = {beta:g}"
    )
    print(
        f"‖g_w‖² = {gw_gw:.4f} < ⟨g_w, g_l⟩ = {gw_gl:.4f}: ⟨g_w, g_w − g_l⟩ = "
        f"{gw_gw - gw_gl:.4f} < 0, so DPO's step must lower log π(y_w)"
    )
    print(
        f"{'η':>8s} {'predicted Δlog π(y_w)':>22s} {'by hand η·β·σ(0)·⟨g_w, g_w−g_l⟩':>32s} "
        f"{'real step':>14s} {'predicted/real':>15s} {'|ratio − 1|/η':>14s} {'Δ loss':>11s}"
    )
    for lr in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        predicted = predicted_chosen_change(pair, theta0, beta, lr).item()
        by_hand = lr * beta * 0.5 * (gw_gw - gw_gl)
        real, d_loss = realised_chosen_change(pair, theta0, beta, lr)
        ratio = predicted / real.item()
        print(
            f"{lr:8.0e} {predicted:22.6e} {by_hand:32.6e} {real.item():14.6e} {ratio:15.9f} "
            f"{abs(ratio - 1) / lr:14.4f} {d_loss.item():11.3e}"
        )
    print("(predicted/real → 1 with |ratio − 1| ∝ η: the formula is the first-order term)")

    path = descent_path(pair, theta0, beta, 1.0, steps)
    ref_w, ref_l = pair.ref_logps[w].item(), pair.ref_logps[l].item()
    pi_end = torch.softmax(pair.features @ path["theta"], -1)
    h = _margin(path, pair)
    print(
        f"{steps} gradient steps (η = 1): the loss falls in {int((path['loss'].diff() < 0).sum())} "
        f"of {steps} steps ({path['loss'][0]:.4f} → {path['loss'][-1]:.4f}); log π(y_w) falls "
        f"in {int((path['chosen'].diff() < 0).sum())} of {steps}, to "
        f"{path['chosen'][-1] - ref_w:+.2f} nats from π_ref's"
    )
    print(
        f"  log π(y_l) ends {path['rejected'][-1] - ref_l:+.2f} nats; margin h = {h[-1]:.3f} > 0 "
        f"(the implicit reward calls the pair ordered); π(y_w) = {pi_end[w]:.1e} from "
        f"{math.exp(ref_w):.2f}; the mass went to y_4, φ = {pair.features[3].tolist()}, in no "
        f"pair: π(y_4) = {pi_end[3]:.4f}"
    )

    # random shared-feature pairs: does the first-order sign predict the real step's?
    gen = torch.Generator().manual_seed(seed)
    agree, displaced, cos_all, n_cos_neg, disp_cos_neg = 0, 0, [], 0, 0
    for _ in range(random_pairs):
        features = torch.randn(5, 3, generator=gen, **F64)
        ref = torch.log_softmax(features @ torch.randn(3, generator=gen, **F64), -1)
        rand = FeaturePair(features, ref, chosen=0, rejected=1)
        theta = torch.randn(3, generator=gen, **F64)
        predicted = predicted_chosen_change(rand, theta, beta, 1e-5).item()
        real, _ = realised_chosen_change(rand, theta, beta, 1e-5)
        agree += (predicted < 0) == (real.item() < 0)
        displaced += predicted < 0
        s = rand.scores(theta)
        cos = float(s[0] @ s[1] / (s[0].norm() * s[1].norm()))
        cos_all.append((cos, predicted < 0))
        if cos <= 0:
            n_cos_neg += 1
            disp_cos_neg += predicted < 0
    alike = [d for c, d in cos_all if c > 0.9]
    print(
        f"{random_pairs} random pairs (5 responses, 3 features, random θ and π_ref, η = 1e-5): the "
        f"first-order sign equals the real step's in {agree} of {random_pairs}; "
        f"{displaced} ({displaced / random_pairs:.0%}) displace"
    )
    print(
        f"  among pairs with cos(g_w, g_l) > 0.9: {sum(alike)} of {len(alike)} displace; with "
        f"cos ≤ 0: {disp_cos_neg} of {n_cos_neg} (⟨g_w, g_w − g_l⟩ > 0 there, always)"
    )
    worst, gap = math.inf, 0.0
    for _ in range(200):
        theta = torch.randn(5, generator=gen, **F64) * 2
        tab = FeaturePair(torch.eye(5, **F64), torch.full((5,), -math.log(5), **F64), 1, 3)
        s = tab.scores(theta)
        pi = torch.softmax(theta, -1)
        inner = float(s[1] @ (s[1] - s[3]))
        worst = min(worst, inner)
        gap = max(gap, abs(inner - float(1 - pi[1] + pi[3])))
    print(
        f"a tabular softmax (one logit per response, one-hot φ) never displaces a lone pair: "
        f"⟨g_w, g_w − g_l⟩ = 1 − π_w + π_l, min over 200 random θ = {worst:.4f} > 0 "
        f"(|Δ| to the formula ≤ {gap:.1e}); displacement needs shared parameters"
    )
    return pair, theta0, path


# --------------------------------------------------------------------------- 2. the fixes
def _fixes_section(pair, theta0, dpo_path, beta, steps):
    w, l = pair.chosen, pair.rejected
    g = pair.scores(theta0)
    c = float(g[w] @ g[l] / (g[w] @ g[w])) - 1
    lam_star = smallest_fix(pair, theta0, beta, "dpop")
    alpha_star = smallest_fix(pair, theta0, beta, "rpo")
    _section(
        "2. the fixes: DPOP (Pal et al. 2024) multiplies the chosen side by 1 + λ below π_ref; "
        "DPO + NLL (Pang et al. 2024, TRL's rpo_alpha) adds α/|y_w|"
    )
    print(
        "first order: DPOP Δℓ_w ≈ η·β·σ(−u)·‖g_w‖²·(λ − c), DPO + NLL "
        "Δℓ_w ≈ η·‖g_w‖²·(α/|y_w| − β·σ(−z)·c), with c = ⟨g_w, g_l⟩/‖g_w‖² − 1"
    )
    print(
        f"c = {c:.6f}: smallest λ = {lam_star:.6f} (= c); smallest α = {alpha_star:.6f} "
        f"(|y_w|·β·σ(0)·c = {pair.chosen_length * beta * 0.5 * c:.6f}, |y_w| = "
        f"{pair.chosen_length:g} tokens)"
    )
    lr = 1e-4
    print(
        f"{'fix':6s} {'weight':>16s} {'predicted Δlog π(y_w)':>22s} {'real step':>14s}  "
        f"(η = {lr:g}, from θ = 0)"
    )
    agree, shown = 0, 0
    for kind, star, name in (("dpop", lam_star, "λ"), ("rpo", alpha_star, "α")):
        for factor, tag in ((0.0, "0"), (0.9, "0.9×"), (1.0, "1×"), (1.1, "1.1×")):
            weight = factor * star
            predicted = predicted_chosen_change(pair, theta0, beta, lr, kind, weight).item()
            real, _ = realised_chosen_change(pair, theta0, beta, lr, kind, weight)
            label = f"{name} = {tag} = {weight:.4f}" if factor else f"{name} = 0 (DPO)"
            print(f"{kind:6s} {label:>16s} {predicted:22.3e} {real.item():14.3e}")
            if factor != 1.0:  # at the threshold the first order is 0: the sign is the remainder's
                shown += 1
                agree += (predicted > 0) == (real.item() > 0)
    print(
        f"below the threshold log π(y_w) falls, above it it rises: the real step's sign equals the "
        f"prediction's in {agree} of {shown}; at the threshold the first-order change is 0 to "
        "rounding and the real one O(η²)"
    )

    ref_w = pair.ref_logps[w].item()
    ref_l = pair.ref_logps[l].item()
    runs = {"DPO": ("dpo", 0.0)}
    for factor in (0.5, 2.0, 5.0):
        runs[f"DPOP λ = {factor:g}λ*"] = ("dpop", factor * lam_star)
    for factor in (0.5, 1.1, 2.0):
        runs[f"RPO α = {factor:g}α*"] = ("rpo", factor * alpha_star)
    print(
        f"over {steps} steps of η = 1 from π_ref (λ* = {lam_star:.4f}, α* = {alpha_star:.4f}, the "
        "thresholds at θ = 0):"
    )
    print(
        f"{'run':18s} {'weight':>7s} {'steps y_w falls':>16s} {'min log π/π_ref(y_w)':>21s} "
        f"{'from below π_ref':>16s} {'end y_w':>8s} {'end y_l':>8s} {'end margin h':>13s} "
        f"{'π(y_4) end':>11s} {'max threshold on path':>22s}"
    )
    paths = {}
    for label, (kind, weight) in runs.items():
        path = (
            dpo_path
            if kind == "dpo"
            else descent_path(pair, theta0, beta, 1.0, steps, kind, weight)
        )
        paths[label] = path
        chosen = path["chosen"] - ref_w
        # the threshold along the run's own path: DPOP's only where its penalty is active
        theta, fixes = theta0, []
        if kind != "dpo":
            for _ in range(steps):
                fixes.append(smallest_fix(pair, theta, beta, kind))
                theta = gradient_step(pair, theta, beta, 1.0, kind, weight)
        finite = [f for f in fixes if math.isfinite(f)]
        limit = f"{max(finite):.4f}" if finite else "—"
        pi4 = torch.softmax(pair.features @ path["theta"], -1)[3].item()
        falls = chosen.diff() < 0
        below = int((falls & (chosen[:-1] <= 0)).sum())  # falls that start at π(y_w) ≤ π_ref(y_w)
        print(
            f"{label:18s} {weight:7.4f} {int(falls.sum()):>11d} of {steps} "
            f"{chosen.min():21.3f} {below:16d} {chosen[-1]:8.3f} "
            f"{path['rejected'][-1] - ref_l:8.3f} {_margin(path, pair)[-1]:13.3f} {pi4:11.4f} "
            f"{limit:>22s}"
        )
    print(
        "(y_w, y_l: log π/π_ref at the end; 'from below π_ref': steps where y_w falls from "
        "π(y_w) ≤ π_ref(y_w); threshold: λ* or α* at each θ of the run's own path)"
    )
    print(
        "DPO + NLL with α above the largest threshold on its own path never lowers log π(y_w). "
        "DPOP with λ > λ* never lowers it from below π_ref(y_w); above π_ref(y_w) its penalty is "
        "off and DPOP is DPO, so with η = 1 it zig-zags across π_ref(y_w), within one step's "
        "overshoot of it (the min column)"
    )
    fixed = [k for k in paths if "λ = 0.5" not in k and "α = 0.5" not in k and k != "DPO"]
    margins = [_margin(paths[k], pair)[-1].item() for k in fixed]
    lowered = [(paths[k]["rejected"][-1] - ref_l).item() for k in fixed]
    print(
        f"the cost, at {steps} steps: margin h {_margin(paths['DPO'], pair)[-1]:.3f} for DPO, "
        f"{min(margins):.3f}–{max(margins):.3f} for the fixes above their thresholds; log π(y_l) "
        f"{paths['DPO']['rejected'][-1] - ref_l:.2f} nats for DPO, {min(lowered):.2f} to "
        f"{max(lowered):.2f} for them: they order the pair by less, and lower y_l far less"
    )
    return {k: paths[k] for k in ("DPO", "DPOP λ = 2λ*", "RPO α = 2α*")}, ref_w, ref_l


# --------------------------------------------------------------------------- 3. asymmetry
def _asymmetry_section(seed, beta, tabular_steps):
    _section(
        "3. gradient asymmetry (Feng et al. 2024): eq. (38) differentiated in the probabilities"
    )
    gen = torch.Generator().manual_seed(seed + 1)
    probs = [torch.rand(64, generator=gen, **F64) * 0.98 + 0.01 for _ in range(4)]
    leaves = [p.clone().requires_grad_(True) for p in probs[:2]]
    loss = dpo_loss(*(torch.log(p) for p in (*leaves, *probs[2:])), beta)
    auto_w, auto_l = torch.autograd.grad(loss.sum(), leaves)
    got_w, got_l = probability_gradients(*probs, beta)
    rel = max(
        ((got_w - auto_w) / auto_w).abs().max().item(),
        ((got_l - auto_l) / auto_l).abs().max().item(),
    )
    ratio = (got_l.abs() / got_w.abs()) / (probs[0] / probs[1])
    print(
        f"∂L/∂π(y_w) = −β·σ(−z)/π(y_w), ∂L/∂π(y_l) = +β·σ(−z)/π(y_l): 64 random probability "
        f"quadruples, max relative |formula − autograd| = {rel:.1e}"
    )
    print(
        f"|∂L/∂π(y_l)| / |∂L/∂π(y_w)| = π(y_w)/π(y_l): max |ratio/(π_w/π_l) − 1| = "
        f"{(ratio - 1).abs().max():.1e}"
    )

    Y = 6
    pi_ref = torch.softmax(torch.randn(Y, generator=gen, **F64), -1)
    w, l = (int(i) for i in torch.randperm(Y, generator=gen)[:2])
    pair = FeaturePair(torch.eye(Y, **F64), torch.log(pi_ref), w, l)
    print(
        f"a tabular world (one logit per response, {Y} responses, one pair, β = {beta:g}, η = 1): "
        f"π_ref(y_w) = {pi_ref[w]:.3f}, π_ref(y_l) = {pi_ref[l]:.3f}"
    )
    print(
        f"{'step':>6s} {'π(y_w)':>9s} {'π(y_l)':>10s} {'π_w/π_l':>10s} "
        f"{'|∂L/∂π_l|/|∂L/∂π_w|':>20s} {'share of ΔL from y_l':>21s} {'(1 + π_w − π_l)/2':>18s}"
    )
    path = descent_path(pair, torch.log(pi_ref), beta, 1.0, tabular_steps)
    theta = torch.log(pi_ref)
    marks = sorted({0, 1, 10, 100, tabular_steps})
    for step in range(tabular_steps + 1):
        if step in marks:
            lp = pair.logprobs(theta)
            pw, pl = lp[w].exp(), lp[l].exp()
            gw, gl = probability_gradients(pw, pl, pi_ref[w], pi_ref[l], beta)
            # one tiny real step: the loss decrease split into its y_w and y_l parts
            a_w, a_l = dpo_logprob_gradients(
                lp[w], lp[l], pair.ref_logps[w], pair.ref_logps[l], beta
            )
            new = pair.logprobs(gradient_step(pair, theta, beta, 1e-6))
            part_w, part_l = a_w * (new[w] - lp[w]), a_l * (new[l] - lp[l])
            print(
                f"{step:6d} {pw:9.4f} {pl:10.2e} {pw / pl:10.3g} {(gl / -gw).item():20.3g} "
                f"{(part_l / (part_w + part_l)).item():21.6f} {((1 + pw - pl) / 2).item():18.6f}"
            )
        if step < tabular_steps:
            theta = gradient_step(pair, theta, beta, 1.0)
    print(
        f"over the {tabular_steps} steps log π(y_w) rose by "
        f"{path['chosen'][-1] - path['chosen'][0]:.3f} nats and log π(y_l) fell by "
        f"{path['rejected'][0] - path['rejected'][-1]:.3f}: once y_l is the unlikely one the loss "
        "is π_w/π_l times more sensitive to π(y_l) than to π(y_w), and each step's decrease comes "
        "mostly from pushing y_l down (share (1 + π_w − π_l)/2 → 1, tabular softmax)"
    )

    _section('"loss stuck at 0.693, accuracy 0": what the first step reads, and when it stays')
    X, B = 8, 64
    ref_theta = torch.randn(X, Y, generator=gen, **F64)
    x = torch.randint(0, X, (B,), generator=gen)
    yw = torch.randint(0, Y, (B,), generator=gen)
    yl = (yw + torch.randint(1, Y, (B,), generator=gen)) % Y  # y_l ≠ y_w
    ref_lp = torch.log_softmax(ref_theta, -1)

    def batch(theta, live_reference=False):
        lp = torch.log_softmax(theta, -1)
        rl = lp if live_reference else ref_lp
        return lp[x, yw], lp[x, yl], rl[x, yw], rl[x, yl]

    first = step_readings(*batch(ref_theta), beta)
    ties = (torch.zeros(B, **F64) >= 0).double().mean().item()
    print(
        f"policy = reference ({B} pairs, {X} prompts × {Y} responses, β = {beta:g}): loss = "
        f"{first['loss']:.12f} (ln 2 = {LN2:.12f}), margin = {first['margin']:g}, accuracy = "
        f"{first['accuracy']:g}, ∂L/∂ℓ_w = {first['chosen_gradient']:.6f} (−β/2 = {-beta / 2:g})"
    )
    print(
        f"  every z = β·h is exactly 0: −log σ(0) = ln 2, and accuracy counts z > 0 strictly (with "
        f"z ≥ 0 it would read {ties:g}): the correct start, not a bug"
    )
    lr, k = 1.0, 20
    for live, name in ((False, "frozen reference"), (True, "reference = the live policy (bug)")):
        theta = ref_theta.clone()
        for _ in range(k):
            flat = theta.clone().requires_grad_(True)
            loss = dpo_loss(*batch(flat, live), beta).mean()
            (grad,) = torch.autograd.grad(loss, flat)
            theta = theta - lr * grad
        after = step_readings(*batch(theta, live), beta)
        print(
            f"  {name:34s}: after {k} steps of η = {lr:g}: loss = {after['loss']:.12f}, "
            f"accuracy = {after['accuracy']:.3f}, last ‖∇L‖ = {grad.norm():.1e}"
        )
    print(
        "  with the reference computed by the live model, π/π_ref = 1 for every θ: the loss is "
        "ln 2 and its gradient 0 forever; so is a run with no trainable parameter, lr = 0 or "
        "detached policy log-probs"
    )


# --------------------------------------------------------------------------- 4. length
def _length_section(seed, beta, gamma, prompts, n_alphas, name):
    gen = torch.Generator().manual_seed(seed + 2)
    X, Y = prompts, 6
    pi_ref = torch.softmax(torch.randn(X, Y, generator=gen, **F64), -1)
    quality = torch.randn(X, Y, generator=gen, **F64)  # q(x, y): the reward a labeller should use
    lengths = torch.randint(2, 41, (X, Y), generator=gen).to(torch.float64)  # |y| in tokens
    biased = quality + gamma * lengths  # a labeller that also likes length
    _section(
        f"4. length: a labeller with reward q + γ·|y| (γ = {gamma:g} per token), {X} prompts × {Y} "
        f"responses of 2–40 tokens, β = {beta:g}; R-DPO (Park et al. 2024)"
    )
    pi_q = optimal_policy(pi_ref, quality, beta)  # eq. (36) under q: what we want
    dpo = fit_r_dpo(pi_ref, biased, lengths, beta, 0.0)  # DPO = R-DPO with α = 0, by Newton
    dpo_closed = optimal_policy(pi_ref, biased, beta)
    print(
        f"DPO on the biased labels (Newton on the population loss): max |π − π* for q + γ|y|| = "
        f"{(dpo - dpo_closed).abs().max():.1e}; eq. (36) for the biased reward"
    )
    tilt = torch.log(dpo_closed) - torch.log(pi_q)
    tilt = tilt - tilt.mean(-1, keepdim=True)
    centred = lengths - lengths.mean(-1, keepdim=True)
    print(
        f"  log π_DPO/π*_q = (γ/β)·|y| + c(x): max |Δ| = "
        f"{(tilt - gamma / beta * centred).abs().max():.1e}, a factor e^(γ/β) = "
        f"{math.exp(gamma / beta):.3f} per token"
    )
    worst = 0.0
    weights = {
        "π_ref·π_ref": None,
        "uniform": torch.ones(X, Y, Y, **F64) - torch.eye(Y, **F64),
        "random": torch.rand(X, Y, Y, generator=gen, **F64) * 1.9 + 0.1,
    }
    newton = [(0.0, (dpo * lengths).sum(-1).mean().item())]  # DPO is R-DPO with α = 0
    for alpha in (0.5 * gamma, gamma, 2 * gamma):
        closed = r_dpo_optimal_policy(pi_ref, biased, lengths, beta, alpha)
        for label, wts in weights.items():
            fitted = fit_r_dpo(pi_ref, biased, lengths, beta, alpha, pair_weights=wts)
            worst = max(worst, (fitted - closed).abs().max().item())
            if label == "π_ref·π_ref":
                newton.append((alpha, (fitted * lengths).sum(-1).mean().item()))
    print(
        f"R-DPO's optimum π ∝ π_ref·exp((r − α|y|)/β) against Newton on its population loss, "
        f"α ∈ {{γ/2, γ, 2γ}} × pair weights {{{', '.join(weights)}}}: max |Δ| = {worst:.1e}"
    )
    r_dpo = r_dpo_optimal_policy(pi_ref, biased, lengths, beta, gamma)
    r_dpo_fit = fit_r_dpo(pi_ref, biased, lengths, beta, gamma)
    print(
        f"α = γ removes the bias exactly: max |π_R-DPO − π*_q| = "
        f"{(r_dpo - pi_q).abs().max():.1e} (closed form), {(r_dpo_fit - pi_q).abs().max():.1e} "
        "(Newton)"
    )

    def mean_length(pi):
        return (pi * lengths).sum(-1).mean().item()

    def objective(pi):  # eq. (27) under the true reward q: E_π[q] − β·KL(π‖π_ref)
        return ((pi * quality).sum(-1) - beta * kl_divergence(pi, pi_ref)).mean().item()

    rows = {
        "π_ref": pi_ref,
        "π* for q (the target)": pi_q,
        "DPO, biased labels": dpo,
        "R-DPO α = γ/2": r_dpo_optimal_policy(pi_ref, biased, lengths, beta, gamma / 2),
        "R-DPO α = γ": r_dpo_fit,
        "R-DPO α = 2γ": r_dpo_optimal_policy(pi_ref, biased, lengths, beta, 2 * gamma),
    }
    print(
        f"{'policy':24s} {'E|y| (tokens)':>14s} {'E[q]':>8s} {'KL(π‖π_ref)':>12s} "
        f"{'E[q] − β·KL (eq. (27))':>23s}"
    )
    for label, pi in rows.items():
        print(
            f"{label:24s} {mean_length(pi):14.3f} {(pi * quality).sum(-1).mean():8.4f} "
            f"{kl_divergence(pi, pi_ref).mean():12.4f} {objective(pi):23.4f}"
        )
    others = [k for k in rows if k not in ("π* for q (the target)", "R-DPO α = γ")]
    print(
        f"DPO's answers are {mean_length(dpo) - mean_length(pi_q):+.2f} tokens longer than the "
        f"target's on average, R-DPO's at α = γ {mean_length(r_dpo_fit) - mean_length(pi_q):+.1e}; "
        f"true objective: R-DPO at α = γ equals π*'s to "
        f"{abs(objective(r_dpo_fit) - objective(pi_q)):.1e}, every other row is lower by ≥ "
        f"{min(objective(pi_q) - objective(rows[k]) for k in others):.4f} (eq. (36) under q "
        "maximises eq. (27))"
    )
    alphas = torch.linspace(0, 3 * gamma, n_alphas, **F64)
    by_alpha = [
        mean_length(r_dpo_optimal_policy(pi_ref, biased, lengths, beta, a.item())) for a in alphas
    ]
    marks = {
        "π* for q (unbiased labels)": mean_length(pi_q),
        "π_ref": mean_length(pi_ref),
    }
    bars = {k: rows[k][0].numpy() for k in ("π_ref", "π* for q (the target)", "DPO, biased labels")}
    bars["R-DPO α = γ (Newton)"] = r_dpo_fit[0].numpy()
    length_figure(alphas.numpy(), by_alpha, newton, marks, gamma, bars, lengths[0].numpy(), name)


# --------------------------------------------------------------------------- 5. the miniature
def _marks(track):
    """The tracked readings at every 60th step and the last, and those steps as text."""
    marks = [t for t in track if t["step"] % 60 == 0 or t is track[-1]]
    return marks, ", ".join(str(t["step"]) for t in marks)


def _mean_delta(track, split, reading, marks):
    """Mean over the tracked pairs of reading − its step-0 value, at the steps in `marks`."""
    base = track[0][split][reading]
    return ", ".join(f"{(t[split][reading] - base).mean():+.2f}" for t in marks)


def _miniature_section(budget, seed, quick):
    """Section 5; returns chapter 8's miniature data for section 6 (None when skipped)."""
    _section(
        "5. on chapter 8's miniature (a GPT-2 trained here on the report's data): displacement, "
        "CHES, the fixes, and why DPO's answers grow"
    )
    if quick:
        print(
            "--quick: skipped (about 3 min when chapter 8's SFT model is on disk, 3 more to train "
            "it); run without --quick"
        )
        return None
    try:
        data = miniature_data(seed)
    except (pdata.DownloadError, ValueError, OSError) as e:
        print(f"skipped: chapter 8's data set is not at hand ({str(e).splitlines()[0][:150]})")
        return None
    result = miniature_experiment(budget, seed, data=data)
    result["suffix"] = "_full" if budget == "full" else ""  # the default's figures are committed
    runs, pairs = result["runs"], data["pairs"]
    first = runs[0]["history"]["steps"][0]
    print(
        f"SFT model: {result['source']}. Each run starts from it, with it as the frozen reference, "
        f"for chapter 8's DPO phase ({len(runs[0]['history']['steps'])} steps: "
        f"{SETTINGS['dpo_epochs']} epochs of batch {SETTINGS['batch_size']}, lr "
        f"{SETTINGS['dpo_lr']:g}) with the named loss; {len(pairs['train'])} training, "
        f"{len(pairs['validation'])} validation, {len(pairs['test'])} test pairs"
    )
    print(
        f"first step at π_θ = π_SFT: eq. (38) reads {first['loss']:.7f} (ln 2 = {LN2:.7f}), "
        f"accuracy {first['rewards/accuracies']:g}, margin {first['rewards/margins']:g}"
    )
    _miniature_displacement(result)
    _miniature_fixes(result)
    _miniature_length(result)
    print("time of each part (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["times"].items()))
    return data


def _miniature_displacement(result):
    beta, runs, sft, pairs = result["beta"], result["runs"], result["sft"], result["data"]["pairs"]
    print(
        "\n5a. likelihood displacement: pairs whose log π(y_w) ends DPO below the SFT model's, and "
        "CHES (SFT model's final hidden states at the response positions) against that change, "
        "by Spearman's ρ (< 0: higher CHES, larger fall); with π(EOS) where y_w ends (training "
        f"pairs, SFT {sft['train']['chosen_eos'].exp().mean():.3f}) and the greedy answers' mean "
        "length"
    )
    print(
        f"{'β':>5s} {'y_w fell: train':>16s} {'validation':>11s} {'both fell':>10s} "
        f"{'Δlog π(y_w) train / val':>24s} {'Δlog π(y_l) train / val':>24s} "
        f"{'ρ(CHES, Δ) train / val':>23s} {'ρ(CHES per token, Δ)':>21s} "
        f"{'π(EOS) end of y_w':>18s} {'length':>7s}"
    )
    wins = {row["model"]: row for row in result["win_rows"]}
    for r in (r for r in runs if r["objective"] == Objective("dpo", r["objective"].beta)):
        t, v = (displacement_summary(sft[k], r["readings"][k]) for k in ("train", "validation"))
        dt, dv = (r["readings"][k]["chosen"] - sft[k]["chosen"] for k in ("train", "validation"))
        print(
            f"{r['objective'].beta:5g} {t['displaced']:>9d} of {t['pairs']} "
            f"{v['displaced']:>5d} of {v['pairs']} {t['both_fell']:>10d} "
            f"{t['chosen_change']:>12.2f} / {v['chosen_change']:<9.2f} "
            f"{t['rejected_change']:>12.2f} / {v['rejected_change']:<9.2f} "
            f"{spearman(sft['train']['ches'], dt):>11.3f} / "
            f"{spearman(sft['validation']['ches'], dv):<9.3f} "
            f"{spearman(sft['train']['ches_per_token'], dt):>21.3f} "
            f"{r['readings']['train']['chosen_eos'].exp().mean():18.3f} "
            f"{wins[r['objective'].label]['mean_length']:7.1f}"
        )
    dpo = next(r for r in runs if r["objective"] == Objective("dpo", beta))
    change = dpo["readings"]["train"]["chosen"] - sft["train"]["chosen"]
    ches = sft["train"]["ches"]
    order = torch.argsort(ches)
    tenth = len(order) // 10
    length = torch.tensor([len(p.chosen) for p in pairs["train"]], dtype=torch.float64)
    rho = spearman(ches, change)
    print(
        f"β = {beta:g}: the tenth of training pairs with the highest CHES lose "
        f"{-change[order[-tenth:]].mean():.2f} nats of log π(y_w) on average, the lowest tenth "
        f"{-change[order[:tenth]].mean():.2f}; but CHES also ranks length: ρ(CHES, |y_w|) = "
        f"{spearman(ches, length):.3f}, ρ(|y_w|, Δ) = {spearman(length, change):.3f}, "
        f"ρ(CHES, Δ/|y_w|) = {spearman(ches, change / length):.3f}"
    )
    track = dpo["history"]["track"]
    marks, steps = _marks(track)
    print(
        f"β = {beta:g}, mean log π − log π_SFT over the {len(track[0]['train']['chosen'])} fixed "
        f"training pairs at steps {steps}: y_w {_mean_delta(track, 'train', 'chosen', marks)}; y_l "
        f"{_mean_delta(track, 'train', 'rejected', marks)}; validation y_w "
        f"{_mean_delta(track, 'validation', 'chosen', marks)}; y_l "
        f"{_mean_delta(track, 'validation', 'rejected', marks)}"
    )
    miniature_displacement_figure(result, rho, f"ch11_miniature_displacement{result['suffix']}")


def _miniature_fixes(result):
    beta, runs, sft = result["beta"], result["runs"], result["sft"]
    print(
        f"\n5b. the fixes at β = {beta:g}, same budget: validation loss (eq. (38)), accuracy, "
        "margin β·h and token-level KL to the SFT model; log π(y_w) on all training pairs; greedy "
        "answers to the test prompts: mean length (GPT-2 tokens), share ending with EOS within 64 "
        "tokens, SBERT win rate (95% interval) and length-controlled win rate"
    )
    print(
        f"{'run':22s} {'loss':>6s} {'acc':>6s} {'margin':>7s} {'KL':>6s} {'Δlog π(y_w)':>12s} "
        f"{'y_w fell':>9s} {'Δlog π(y_l)':>12s} {'length':>7s} {'EOS':>5s} "
        f"{'win rate (95% CI)':>19s} {'LC':>6s}"
    )
    wins = {row["model"]: row for row in result["win_rows"]}
    stopped = {"SFT": result["sft_stopped"]}
    stopped.update({r["objective"].label: r["stopped"] for r in runs})
    rows = [("SFT", None)] + [
        (r["objective"].label, r) for r in runs if r["objective"].beta == beta
    ]
    for label, r in rows:
        w = wins[label]
        if r is None:
            head = f"{'':>6s} {'':>6s} {0:7.3f} {0:6.3f} {0:12.2f} {0:>9d} {0:12.2f}"
        else:
            v, t = r["validation"], displacement_summary(sft["train"], r["readings"]["train"])
            head = (
                f"{v['loss']:6.3f} {v['rewards/accuracies']:6.3f} {v['rewards/margins']:7.3f} "
                f"{v['kl']:6.3f} {t['chosen_change']:12.2f} {t['displaced']:>9d} "
                f"{t['rejected_change']:12.2f}"
            )
        print(
            f"{label:22s} {head} {w['mean_length']:7.1f} {np.mean(stopped[label]):5.2f} "
            f"{w['win_rate']:7.3f} ({w['ci_low']:.2f}–{w['ci_high']:.2f}) {w['lc_win_rate']:6.3f}"
        )


def _miniature_length(result):
    beta, runs, sft, data = result["beta"], result["runs"], result["sft"], result["data"]
    train = data["pairs"]["train"]
    longer = np.mean([len(p.chosen) > len(p.rejected) for p in train])
    shorter = np.mean([len(p.chosen) < len(p.rejected) for p in train])
    print(
        f"\n5c. length: in the {len(train)} training pairs |y_w| = "
        f"{np.mean([len(p.chosen) for p in train]):.1f}, |y_l| = "
        f"{np.mean([len(p.rejected) for p in train]):.1f} tokens on average (EOS included); y_w "
        f"is the longer in {longer:.0%}, the shorter in {shorter:.0%}: no length to learn from "
        "the labels"
    )
    print(
        f"the SFT model's states at the two ends are alike: cos(h that predicts y_w's EOS, h that "
        f"predicts y_l's EOS) = {sft['train']['end_cosine'].mean():.3f} on average, against "
        f"{sft['train']['cross_cosine'].mean():.3f} for any two positions of the two responses: "
        "what pushes y_l's EOS down pushes y_w's down with it (displacement at one token)"
    )
    print(
        "π(EOS) where y_w and y_l end and mean π(EOS) inside y_w, on all training pairs (SFT → "
        "after the run), with the part of Δlog π(y_w) that is the EOS token's, and the greedy "
        "answers:"
    )
    print(
        f"{'run':22s} {'π(EOS) end of y_w':>18s} {'end of y_l':>14s} {'inside y_w':>14s} "
        f"{'EOS share of Δlog π(y_w)':>25s} {'length':>7s}"
    )
    wins = {row["model"]: row for row in result["win_rows"]}
    s = sft["train"]
    for r in (r for r in runs if r["objective"].beta == beta):
        a = r["readings"]["train"]
        share = (a["chosen_eos"] - s["chosen_eos"]).sum() / (a["chosen"] - s["chosen"]).sum()
        print(
            f"{r['objective'].label:22s} {s['chosen_eos'].exp().mean():8.3f} → "
            f"{a['chosen_eos'].exp().mean():<7.3f} {s['rejected_eos'].exp().mean():6.3f} → "
            f"{a['rejected_eos'].exp().mean():<5.3f} {s['chosen_early_eos'].mean():6.4f} → "
            f"{a['chosen_early_eos'].mean():<6.4f} {share:25.2f} "
            f"{wins[r['objective'].label]['mean_length']:7.1f}"
        )
    dpo = next(r for r in runs if r["objective"] == Objective("dpo", beta))
    no_eos = next(r for r in runs if r["objective"] == Objective("dpo", beta, without_eos=True))
    lengths = [wins[k]["mean_length"] for k in ("SFT", dpo["objective"].label)]
    lengths.append(wins[no_eos["objective"].label]["mean_length"])
    print(
        "EOS left out of log π and log π_ref (eq. (38) then puts no force on end-of-text where the "
        "responses stop): π(EOS) where y_w ends "
        f"{no_eos['readings']['train']['chosen_eos'].exp().mean():.3f} (DPO "
        f"{dpo['readings']['train']['chosen_eos'].exp().mean():.3f}), greedy answers "
        f"{lengths[2]:.1f} tokens (DPO {lengths[1]:.1f}, SFT {lengths[0]:.1f}): the force on EOS "
        f"accounts for {lengths[1] - lengths[2]:.1f} of DPO's {lengths[1] - lengths[0]:.1f} extra "
        "tokens, the rest comes with what DPO does to the other tokens"
    )
    gain = dpo["end"] - result["sft_end"]
    vocab, eos = data["vocab"], data["eos"]
    top = [int(i) for i in torch.argsort(gain, descending=True)[:6]]
    named = ", ".join(
        f"{'UNK' if i == vocab.unk else vocab.decode([i])!r} {gain[i]:+.3f}" for i in top
    )
    print(
        f"where the end-of-text mass went (DPO β = {beta:g}, mean next-token probability where y_w "
        f"ends, training pairs): EOS {result['sft_end'][eos]:.3f} → {dpo['end'][eos]:.3f}; the "
        f"largest gains {named}: a new sentence starts where y_w stopped"
    )
    marks, steps = _marks(dpo["history"]["track"])
    print(
        f"π(EOS) at the end of y_w over DPO's steps ({steps}), fixed training pairs: "
        + ", ".join(f"{t['train']['chosen_eos'].exp().mean():.3f}" for t in marks)
        + "; validation: "
        + ", ".join(f"{t['validation']['chosen_eos'].exp().mean():.3f}" for t in marks)
    )
    miniature_length_figure(result, f"ch11_miniature_length{result['suffix']}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"python3 -m {__package__}", description=summary(__doc__))
    parser.add_argument("--quick", action="store_true", help="a short form of the same run")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="seed for every random draw (default 0)")
    parser.add_argument("--full-miniature", action="store_true",
                        help="section 5 at full size: chapter 8's four β values and two weights "
                        "for each fix (about 7 min more)")
    args = parser.parse_args(argv)
    check_writable()
    started = time.perf_counter()
    cfg = QUICK if args.quick else FULL
    quick = "_quick" if args.quick else ""  # --quick never writes over the committed figures
    with one_thread():  # tiny float64 tensors: extra threads only add overhead on a shared CPU
        beta = 1.0
        pair, theta0, dpo_path = _displacement_section(
            beta, cfg["steps"], cfg["random_pairs"], args.seed
        )
        paths, ref_w, ref_l = _fixes_section(pair, theta0, dpo_path, beta, cfg["steps"])
        displacement_figure(paths, ref_w, ref_l, f"ch11_displacement{quick}")
        _asymmetry_section(args.seed, 0.5, cfg["tabular_steps"])
        _length_section(args.seed, 0.5, 0.05, cfg["prompts"], cfg["alphas"], f"ch11_length{quick}")
        data = _miniature_section(
            "full" if args.full_miniature else "default", args.seed, args.quick
        )
        lora_reference_section(
            "large" if args.full_miniature else "small", seed=args.seed, quick=args.quick, data=data
        )
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run(main)
