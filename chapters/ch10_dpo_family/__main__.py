"""Chapter 10 (report §4, §7): the DPO family from one optimum — IPO, cDPO, rDPO, hinge, SimPO,
ORPO, KTO.

Every variant is a loss on the same log-probs as eq. (38). On chapter 4's tabular problem (a few
prompts, a small response set, preferences from Bradley–Terry on a known r*) each one's population
minimiser is solved exactly and set beside π* = π_ref·exp(r*/β)/Z of eq. (36): which variants
recover it, which recover it for a changed reward, which do not, and by how much.

Then, on chapter 7's miniature (same π_ref, pairs, budget; two of its β), every variant is trained
and each checkpoint placed on the exact reward–KL frontier, with chapter 7's efficiency.

    python3 -m chapters.ch10_dpo_family          # every claim beside its check (< 3 min, 2 cores)
    python3 -m chapters.ch10_dpo_family --quick  # a short form of the same run; *_quick files
"""

import argparse
import math
import time
from functools import partial

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from chapters.ch3_kl_optimum.optimum import kl_divergence, optimal_policy
from chapters.ch4_dpo.loss import preference_probabilities
from chapters.ch7_frontier.task import FULL, QUICK, reference_and_pairs
from chapters.ch10_dpo_family.figures import deterministic_figure, tabular_figure
from chapters.ch10_dpo_family.frontier import (
    add_mismatched,
    family_batch_loss,
    frontier_figure,
    train_and_place,
    write_rows,
)
from chapters.ch10_dpo_family.losses import (
    ipo_optimal_policy,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    preference_loss,
    simpo_optimal_policy,
)
from chapters.ch10_dpo_family.optima import (
    Frontier,
    deterministic_labels,
    flip_labels,
    kto_table_loss,
    mass_moved_rises,
    minimise_pairs,
    newton_path,
    one_row_per_pair,
    pair_table_loss,
    policy_summary,
    population_minimisers,
    tabular_problem,
    unpaired,
)
from chapters.common.files import check_writable
from chapters.common.runtime import available_cores, one_thread
from gpt.cli import nonnegative_int, run, summary


# --------------------------------------------------------------------------- the script
def _section(title):
    print(f"\n--- {title}")


def _loss_checks(beta, eps, gamma, lam):
    _section(
        f"the losses on one pair, beside the formula by hand (β = {beta}, ε = {eps}, γ = {gamma}, "
        f"λ = {lam})"
    )
    pc, pr, rc, rr, z0 = (
        -4.0,
        -6.5,
        -5.0,
        -5.5,
        0.3,
    )  # log π(y_w), log π(y_l), log π_ref(y_w), log π_ref(y_l); KTO's z₀
    mc, mr = pc / 5, pr / 7  # per-token means for SimPO and ORPO: |y_w| = 5, |y_l| = 7 tokens
    h, t = (pc - rc) - (pr - rr), lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    lsig = lambda v: -math.log1p(math.exp(-v))  # noqa: E731  log σ(v)
    log_odds = (mc - math.log(-math.expm1(mc))) - (mr - math.log(-math.expm1(mr)))
    print(
        f"log-probs y_w {pc}, y_l {pr}; reference {rc}, {rr}: h = {h}, β·h = {beta * h}; per-token "
        f"means {mc}, {mr:.4f}; KTO's z₀ = {z0}"
    )
    checks = [
        ("dpo", lambda: preference_loss("dpo", t(pc), t(pr), t(rc), t(rr), beta), -lsig(beta * h)),
        (
            "cdpo",
            lambda: preference_loss("cdpo", t(pc), t(pr), t(rc), t(rr), beta, label_smoothing=eps),
            -(1 - eps) * lsig(beta * h) - eps * lsig(-beta * h),
        ),
        (
            "rdpo",
            lambda: preference_loss("rdpo", t(pc), t(pr), t(rc), t(rr), beta, label_smoothing=eps),
            (-(1 - eps) * lsig(beta * h) + eps * lsig(-beta * h)) / (1 - 2 * eps),
        ),
        (
            "ipo",
            lambda: preference_loss("ipo", t(pc), t(pr), t(rc), t(rr), beta),
            (h - 1 / (2 * beta)) ** 2,
        ),
        (
            "hinge",
            lambda: preference_loss("hinge", t(pc), t(pr), t(rc), t(rr), beta),
            max(0.0, 1 - beta * h),
        ),
        (
            "simpo",
            lambda: preference_loss("simpo", t(mc), t(mr), t(0.0), t(0.0), beta, gamma=gamma),
            -lsig(beta * (mc - mr) - gamma),
        ),
        ("orpo", lambda: orpo_loss(t(mc), t(mr), lam), -mc - lam * lsig(log_odds)),
        (
            "kto y_w desirable",
            lambda: kto_loss(t(pc), t(rc), True, beta, z0),
            1 - math.exp(lsig(beta * (pc - rc - z0))),
        ),
        (
            "kto y_w undesirable",
            lambda: kto_loss(t(pc), t(rc), False, beta, z0),
            1 - math.exp(lsig(beta * (z0 - pc + rc))),
        ),
    ]
    for name, got, want in checks:
        print(
            f"  {name:20s} {got().item():.12f}   by hand {want:.12f}   |Δ| = "
            f"{abs(got().item() - want):.1e}"
        )


def _population_section(seed, beta, eps, gamma, lam):
    pi_ref, rewards = tabular_problem(seed)
    X, Y = pi_ref.shape
    lengths = torch.arange(1, Y + 1)  # |y| in tokens, for the per-token-mean losses (SimPO, ORPO)
    weights = preference_probabilities(pi_ref, rewards)
    pi_star = optimal_policy(pi_ref, rewards, beta)
    _section(
        f"each variant's population minimiser on chapter 4's problem ({X} prompts × {Y} responses, "
        f"β = {beta}, y1 ≠ y2 ~ π_ref, labels from BT(r*)), beside π* of eq. (36)"
    )
    front = Frontier(torch.log(pi_ref), rewards)
    losses = dict(preference=preference_loss, orpo=orpo_loss, kto=kto_loss)
    found = population_minimisers(losses, pi_ref, weights, beta, eps, gamma, lam, lengths)
    win = torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])  # (X, Y, Y): BT p*(y ≻ y')
    closed = {
        "dpo": pi_star,
        "ipo": ipo_optimal_policy(pi_ref, win, beta),
        "simpo γ=0": simpo_optimal_policy(rewards, lengths, beta),
    }
    rows = {"π* (eq. (36))": policy_summary(pi_star, pi_ref, pi_star, rewards)}
    print(
        f"{'variant':14s} {'solved by':26s} {'|π − closed form|':>17s} {'max|π − π*|':>12s} "
        f"{'KL(π‖π*)':>9s} {'E[r*]':>7s} {'KL(π‖π_ref)':>11s} {'efficiency':>10s}"
    )
    for label, (pi, how) in [("π* (eq. (36))", (pi_star, "closed form")), *found.items()]:
        s = rows[label] = policy_summary(pi, pi_ref, pi_star, rewards)
        s["efficiency"] = front.efficiency(s["reward"], s["kl_ref"])
        gap = f"{(pi - closed[label]).abs().max():.1e}" if label in closed else "—"
        print(
            f"{label:14s} {how:26s} {gap:>17s} {s['max_diff']:12.1e} {s['kl_star']:9.4f} "
            f"{s['reward']:7.4f} {s['kl_ref']:11.4f} {s['efficiency']:10.4f}"
        )
    print(
        "(efficiency: E[r*] gain over π_ref / the exact frontier's gain at the same KL; 1 = on the "
        "frontier)"
    )

    cdpo = found[f"cdpo ε={eps}"][0]
    fit = minimize_scalar(
        lambda lb: kl_divergence(cdpo, optimal_policy(pi_ref, rewards, math.exp(lb))).mean().item(),
        bounds=(math.log(beta) - 3, math.log(beta) + 3),
        method="bounded",
        options=dict(xatol=1e-10),
    )
    print(
        f"cDPO ε = {eps}: closest π*_β' at β' = {math.exp(fit.x):.4f} (β/(1 − 2ε) = "
        f"{beta / (1 - 2 * eps):.4f}), "
        f"KL(π_cDPO ‖ π*_β') = {fit.fun:.1e}: π* for a larger β, i.e. shrunk rewards"
    )
    print(
        f"rDPO ε = {eps} on clean labels: KL(π‖π_ref) = {rows[f'rdpo ε={eps}']['kl_ref']:.4f} > "
        f"π*'s "
        f"{rows['π* (eq. (36))']['kl_ref']:.4f}: it un-flips flips that did not happen (sharper "
        f"than π*)"
    )
    print(
        f"IPO = eq. (36) for the bounded reward p*(y ≻ π_ref) ∈ [0, 1]: max |π_IPO − closed form| "
        f"= {(found['ipo'][0] - closed['ipo']).abs().max():.1e}"
    )
    u = beta * (torch.log(found["hinge"][0]) - torch.log(pi_ref))
    u = u - u.min(-1, keepdim=True).values
    print(
        f"hinge: β·log π/π_ref takes integer steps (levels "
        f"{sorted(set(u.round().int().flatten().tolist()))}); "
        f"max distance to an integer = {(u - u.round()).abs().max():.1e}: only r*'s order and the "
        f"pair masses count"
    )
    other_ref = torch.softmax(
        torch.randn(X, Y, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64),
        -1,
    )
    again = minimise_pairs(
        partial(preference_loss, "simpo", beta=beta),
        other_ref,
        preference_probabilities(other_ref, rewards),
        lengths,
        start=torch.full_like(pi_ref, 1 / Y),
    )
    ones = simpo_optimal_policy(rewards, torch.ones(Y), beta)
    uniform = torch.full_like(pi_ref, 1 / Y)
    print(
        f"SimPO γ = 0: pairs drawn from another π_ref give the same minimiser (max |Δ| = "
        f"{(again - found['simpo γ=0'][0]).abs().max():.1e}); with |y| = 1 it is π* for a uniform "
        f"π_ref (max |Δ| = {(ones - optimal_policy(uniform, rewards, beta)).abs().max():.1e})"
    )
    desirable, undesirable = unpaired(weights)
    sft = desirable / lengths
    sft = sft / sft.sum(-1, keepdim=True)
    print(
        f"ORPO λ = {lam}: close to its SFT term's optimum π ∝ P(y chosen)/|y|: KL = "
        f"{kl_divergence(found[f'orpo λ={lam}'][0], sft).mean():.4f} (π*: "
        f"{kl_divergence(pi_star, sft).mean():.4f})"
    )
    losers = undesirable > desirable
    kto, z0 = found["kto"][0], kl_divergence(found["kto"][0], pi_ref).mean().item()
    rises = mass_moved_rises(
        lambda t: kto_table_loss(
            partial(kto_loss, beta=beta), t, pi_ref, desirable, undesirable, z0
        ),
        kto,
        losers,
    )
    print(
        f"KTO: the {int(losers.sum())} of {X * Y} responses chosen less often than rejected get π "
        f"= 0 (π* gives them "
        f"{pi_star[losers].sum() / X:.3f} per prompt): each one's loss term rises with its log π, "
        f"and moving 1e-4 of "
        f"mass onto any of them raises the loss (by ≥ {rises.min():.1e}); z₀ = KL(π‖π_ref) = "
        f"{z0:.4f}"
    )
    return front, rows


def _deterministic_section(seed, betas, steps, name):
    pi_ref, rewards = tabular_problem(seed)
    weights = deterministic_labels(preference_probabilities(pi_ref, rewards), rewards)
    win = (rewards[:, :, None] > rewards[:, None, :]).double() + 0.5 * torch.eye(
        rewards.shape[-1], dtype=torch.float64
    )
    limit = -torch.log(pi_ref.gather(-1, rewards.argmax(-1, keepdim=True))).mean().item()
    _section(
        "deterministic preferences (Azar et al. 2023's argument): p*(y_w ≻ y_l) = 1 for every "
        "pair, same pairs"
    )
    print(
        f"E_x −log π_ref(best y|x) = {limit:.4f}: the largest KL(π‖π_ref) a policy on the best "
        f"responses can have"
    )
    print(
        f"{'β':>6s} {'DPO loss after ' + str(steps) + ' Newton steps':>30s} {'KL(π‖π_ref)':>12s} "
        f"{'min_y π(y|x)':>13s}"
        f" {'max |log π/π_ref|':>18s} {'IPO KL (exact)':>15s} {'IPO |Newton − closed form|':>27s}"
    )
    paths = {}
    for beta in betas:
        kls, losses = [], []
        loss_fn = partial(
            pair_table_loss,
            partial(preference_loss, "dpo", beta=beta),
            pi_ref=pi_ref,
            weights=weights,
        )

        def record(k, theta):
            kls.append(kl_divergence(torch.softmax(theta, -1), pi_ref).mean().item())
            losses.append(loss_fn(theta).item())

        theta = newton_path(loss_fn, torch.log(pi_ref), max_iter=steps, on_step=record)
        pi = torch.softmax(theta, -1)
        ipo = ipo_optimal_policy(pi_ref, win, beta)
        solved = minimise_pairs(partial(preference_loss, "ipo", beta=beta), pi_ref, weights)
        ipo_kl = kl_divergence(ipo, pi_ref).mean().item()
        paths[beta] = (kls, ipo_kl)
        print(
            f"{beta:6g} {losses[-1]:30.2e} {kls[-1]:12.4f} {pi.min():13.1e} "
            f"{(torch.log(pi) - torch.log(pi_ref)).abs().max():18.1f} {ipo_kl:15.4f} "
            f"{(solved - ipo).abs().max():27.1e}"
        )
    print("(inf: π(y_l) underflowed to 0 in float64)")
    print(
        f"DPO: the loss falls towards 0 and π(y_l) → 0 whatever β is (no minimiser: its infimum 0 "
        f"needs log π/π_ref "
        f"= −∞ on every loser), KL → {limit:.4f} for every β; IPO: one finite minimiser, its KL "
        f"set by β"
    )

    sharp = torch.logspace(-1, 2, 31, dtype=torch.float64)
    sweep = {
        beta: (
            [
                kl_divergence(optimal_policy(pi_ref, s * rewards, beta), pi_ref).mean().item()
                for s in sharp
            ],
            [
                kl_divergence(
                    ipo_optimal_policy(
                        pi_ref, torch.sigmoid(s * (rewards[:, :, None] - rewards[:, None, :])), beta
                    ),
                    pi_ref,
                )
                .mean()
                .item()
                for s in sharp
            ],
        )
        for beta in betas
    }
    print(
        "near-deterministic, p* = σ(s·(r*(y_w) − r*(y_l))) as s grows: DPO's minimiser is π* for "
        "s·r* (eq. (36)), IPO's the closed form above"
    )
    for beta in betas:
        d, i = sweep[beta]
        print(
            f"  β = {beta:g}: KL(π‖π_ref) at s = 1, 10, 100: DPO {d[10]:.3f}, {d[20]:.3f}, "
            f"{d[30]:.3f};  IPO {i[10]:.3f}, {i[20]:.3f}, {i[30]:.3f}"
        )

    once = one_row_per_pair(
        torch.sigmoid(rewards[:, :, None] - rewards[:, None, :]),
        torch.Generator().manual_seed(seed + 2),
    )
    unbeaten = ((once.sum(1) == 0) & (once.sum(2) > 0)).any(
        -1
    )  # (X,): a prompt where a response never lost
    dpo_loss_fn = partial(preference_loss, "dpo", beta=betas[1])
    dpo_once = minimise_pairs(dpo_loss_fn, pi_ref, once, max_iter=steps)
    ipo_once = minimise_pairs(partial(preference_loss, "ipo", beta=betas[1]), pi_ref, once)
    spread = lambda pi: (torch.log(pi) - torch.log(pi_ref)).abs().max().item()  # noqa: E731
    print(
        f"each pair seen once (one BT draw per pair; in {int(unbeaten.sum())} of {len(unbeaten)} "
        f"prompts a response "
        f"never lost), β = {betas[1]}: DPO's Newton stops at max |log π/π_ref| = "
        f"{spread(dpo_once):.1f} only because float64 can lower its loss "
        f"({pair_table_loss(dpo_loss_fn, torch.log(dpo_once), pi_ref, once):.1e}) no "
        f"further; IPO's minimiser: {spread(ipo_once):.2f}"
    )
    deterministic_figure(paths, sharp.numpy(), sweep, limit, name)


def _label_noise_section(seed, beta, flip):
    pi_ref, rewards = tabular_problem(seed)
    clean = preference_probabilities(pi_ref, rewards)
    noisy = flip_labels(clean, flip)
    pi_star = optimal_policy(pi_ref, rewards, beta)
    _section(
        f"label noise: every label flipped with probability {flip} (Chowdhury et al. 2024's "
        f"setting)"
    )
    centred = lambda v: v - v.mean(-1, keepdim=True)  # noqa: E731  (rewards are free up to f(x))
    target = centred(rewards)
    print(
        f"{'loss':14s} {'data':7s} {'max|π − π*|':>12s} {'KL(π‖π*)':>10s} "
        f"{'implied r̂ / r* (slope)':>23s}"
    )
    implied = {}
    for label, kind, eps, data in (
        ("dpo", "dpo", 0.0, clean),
        ("dpo", "dpo", 0.0, noisy),
        (f"cdpo ε={flip}", "cdpo", flip, noisy),
        (f"rdpo ε={flip}", "rdpo", flip, noisy),
    ):
        kw = dict(label_smoothing=eps) if eps else {}
        pi = minimise_pairs(partial(preference_loss, kind, beta=beta, **kw), pi_ref, data)
        r_hat = centred(beta * (torch.log(pi) - torch.log(pi_ref)))  # eq. (37) up to β·log Z
        slope = ((r_hat * target).sum() / (target * target).sum()).item()
        name = "clean" if data is clean else "noisy"
        implied[f"{label}, {name}" + (" (= r*, under rdpo)" if data is clean else "")] = r_hat
        print(
            f"{label:14s} {name:7s} {(pi - pi_star).abs().max():12.1e} "
            f"{kl_divergence(pi, pi_star).mean().clamp(min=0):10.1e} {slope:23.4f}"
        )
    print(
        f"plain DPO on flipped labels is π* for shrunk rewards (slope < 1; 1 − 2ε = "
        f"{1 - 2 * flip}); cDPO shrinks "
        f"them again; rDPO at the true flip rate is unbiased: its population loss is eq. (38)'s on "
        f"clean labels"
    )
    return target, implied


MINIATURE = [
    ("dpo", {}),
    ("cdpo", dict(label_smoothing=0.1)),
    ("rdpo", dict(label_smoothing=0.1)),
    ("ipo", {}),
    ("hinge", {}),
    ("simpo", dict(gamma=0.5)),
    ("orpo", {}),
    ("kto", {}),
]


def _miniature_section(cfg, betas, seed, name):
    _section(
        f"chapter 7's miniature: every variant fine-tuned from π_ref on the same pairs, "
        f"{cfg['steps']} Adam steps "
        f"(batch {cfg['batch_size']}, lr {cfg['lr']}), β ∈ {list(betas)} (ORPO: λ), exact E[r*] "
        f"and KL"
    )
    setup = reference_and_pairs(cfg, seed)
    add_mismatched(setup["data"], setup["ref"], torch.Generator().manual_seed(seed + 3))
    losses = dict(
        preference=preference_loss,
        orpo=orpo_loss,
        kto=kto_loss,
        reference_point=kto_reference_point,
    )
    runs = [
        (kind, f"β={b:g}", partial(family_batch_loss, kind, losses, beta=b, **kw))
        for kind, kw in MINIATURE
        for b in betas
    ]
    rows, frontier = train_and_place(setup, runs, cfg, seed, workers=available_cores())
    last = max(r["step"] for r in rows)
    print(
        f"{'variant':8s} "
        + " ".join(f"{'β=' + format(b, 'g') + ': E[r*], KL, eff.':>26s}" for b in betas)
        + f" {'mean efficiency':>16s}"
    )
    summary = {}
    for kind, _ in MINIATURE:
        pts = [r for r in rows if r["variant"] == kind]
        ends = [r for r in pts if r["step"] == last]
        summary[kind] = float(np.nanmean([r["efficiency"] for r in pts]))
        print(
            f"{kind:8s} "
            + " ".join(f"{r['reward']:10.3f}{r['kl']:8.3f}{r['efficiency']:8.3f}" for r in ends)
            + f" {summary[kind]:16.3f}"
        )
    print(
        f"(step {last}; mean efficiency over all {len(pts)} checkpoints of a variant; the highest "
        f"efficiency of any "
        f"checkpoint is {np.nanmax([r['efficiency'] for r in rows]):.3f} ≤ 1: no point lies above "
        f"the exact frontier)"
    )
    frontier_figure(rows, frontier, name)
    write_rows(rows, name)
    return rows, summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"python3 -m {__package__}", description=summary(__doc__))
    parser.add_argument("--quick", action="store_true", help="a short form of the same run")
    parser.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed for every random draw (default 0)"
    )
    args = parser.parse_args(argv)
    check_writable()
    started = time.perf_counter()
    with one_thread():  # tiny tensors: extra threads only add overhead on a shared CPU
        beta, eps, gamma, lam = 0.5, 0.1, 0.5, 0.1
        _loss_checks(beta, eps, gamma, lam)
        front, rows = _population_section(args.seed, beta, eps, gamma, lam)
        quick = "_quick" if args.quick else ""  # --quick never writes over the committed figures
        _deterministic_section(
            args.seed, (0.1, 0.5, 2.0), 60, f"ch10_deterministic_preferences{quick}"
        )
        target, implied = _label_noise_section(args.seed, beta, 0.2)
        tabular_figure(front, rows, target, implied, f"ch10_tabular_optima{quick}")
        # chapter 7's budget and data, two of its five β, half its evaluations: 3 minutes on 2 cores
        cfg = QUICK if args.quick else dict(FULL, checkpoints=(200, 400))
        _miniature_section(cfg, (0.5, 2.0), args.seed, f"ch10_frontier{quick}")
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run(main)
