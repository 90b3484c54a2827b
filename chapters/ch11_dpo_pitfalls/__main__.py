"""Chapter 11 (beyond the report, from eqs. (36), (38), (41)): where DPO goes wrong in practice,
derived and checked exactly in float64 — the chosen log-prob falling while the loss falls, the two
fixes (DPOP, DPO + NLL), gradient asymmetry and "loss 0.693, accuracy 0", and length (R-DPO).

Likelihood displacement on a softmax policy with shared features: the first-order change of
log π(y_w) against the real step as η → 0, a descent path where both fall, and random pairs. The
fixes: the smallest λ (DPOP) and α (DPO + NLL) that stop it, and what each costs in margin.
Gradient asymmetry: ∂L/∂π against autograd, and why the first step reads ln 2 and accuracy 0.
Length: R-DPO's optimum against Newton on its population loss, and α = γ undoing a length bias γ.

    python3 -m chapters.ch11_dpo_pitfalls          # every claim beside the number that checks it
    python3 -m chapters.ch11_dpo_pitfalls --quick  # a short form; writes *_quick figures
"""

import argparse
import math
import time

import torch

from chapters.ch3_kl_optimum import kl_divergence, optimal_policy
from chapters.ch4_dpo import dpo_loss
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
from chapters.ch11_dpo_pitfalls.losses import dpo_logprob_gradients
from chapters.common.files import check_writable
from chapters.common.runtime import one_thread
from gpt.cli import run, summary

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


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python3 -m chapters.ch11_dpo_pitfalls", description=summary(__doc__)
    )
    parser.add_argument("--quick", action="store_true", help="a short form of the same run")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for every random draw (default 0)"
    )
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
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run(main)
