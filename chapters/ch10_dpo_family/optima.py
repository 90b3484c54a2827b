"""Population minimisers of preference losses for a tabular policy π_θ(·|x) = softmax(θ[x]) (chapter
10's machinery).

A tabular data set is its table of weights W (X, Y, Y): how often (or how probably) each (x, y_w,
y_l) occurs (`chapters.ch4_dpo.preference_probabilities` gives the infinite-data limit). Any
pairwise loss written on log-probs (`chapters.ch10_dpo_family.preference_loss`, ORPO) becomes a
function of θ (`pair_table_loss`), minimised in float64 by Newton's method (`newton_path`); the
hinge loss, piecewise linear, is a linear program (`hinge_minimiser`); KTO's is a fixed point in its
reference point z₀ (`kto_minimiser`).
"""

from functools import partial

import numpy as np
import torch
from scipy.optimize import linprog

from chapters.ch3_kl_optimum.optimum import kl_divergence
from chapters.ch7_frontier.task import (
    efficiency,
    exact_frontier,
    exact_reward_and_kl,
    frontier_reward,
)
from chapters.common.newton import newton_minimise


def tabular_problem(seed: int, prompts: int = 4, responses: int = 6):
    """Chapter 4's tabular problem (the same draws): π_ref (X, Y), r* (X, Y) ~ N(0, 1), float64."""
    g = torch.Generator().manual_seed(seed)
    pi_ref = torch.softmax(
        0.5 * torch.randn(prompts, responses, generator=g, dtype=torch.float64), -1
    )
    return pi_ref, torch.randn(prompts, responses, generator=g, dtype=torch.float64)


def flip_labels(weights: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows (x, y_w, y_l) with each label flipped at rate ε: W_ε = (1 − ε)·W + ε·Wᵀ (W (X, Y, Y)
    over (x, y_w, y_l))."""
    return (1 - eps) * weights + eps * weights.transpose(1, 2)


def deterministic_labels(weights: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """The same pairs with p*(y_w ≻ y_l) = 1 whenever r*(y_w) > r*(y_l): each pair's mass goes to
    the better one."""
    better = rewards[:, :, None] > rewards[:, None, :]  # (X, Y, Y)
    return (weights + weights.transpose(1, 2)) * better


def pair_table_loss(pair_loss, theta, pi_ref, weights, lengths=None):
    """Mean of `pair_loss(chosen, rejected, ref_chosen, ref_rejected)` over the rows W describes, at
    π_θ = softmax θ.

    theta, pi_ref (X, Y); weights (X, Y, Y) over (x, y_w, y_l). lengths (Y,), optional: per-token
    mean log-probs log π(y|x)/|y| (SimPO's, ORPO's) instead of sums.
    """
    scale = 1.0 if lengths is None else lengths.to(theta.dtype)
    logp = torch.log_softmax(theta, -1) / scale  # (X, Y)
    ref = torch.log(pi_ref) / scale
    losses = pair_loss(
        logp[:, :, None], logp[:, None, :], ref[:, :, None], ref[:, None, :]
    )  # (X, Y, Y)
    return (weights * losses).sum() / weights.sum()


def newton_path(loss_fn, theta, max_iter: int = 80, on_step=None):
    """Minimise loss_fn(θ) over θ (any shape), one `chapters.common.newton.newton_minimise` step at
    a time, in float64.

    `on_step(k, θ)` is called after each step k = 1, 2, ... Stops when a step no longer lowers the
    loss (or moves θ) in float64, or after max_iter steps (a minimiser at infinity never stops
    early).
    """
    shape, flat = theta.shape, theta.detach().flatten().to(torch.float64)

    def f(v):
        return loss_fn(v.reshape(shape))

    for k in range(1, max_iter + 1):
        value = f(flat).item()
        new = newton_minimise(f, flat, max_iter=1).detach()
        if torch.equal(new, flat) or f(new).item() > value + 1e-15 * abs(value):
            break
        flat = new
        if on_step is not None:
            on_step(k, flat.reshape(shape))
    return flat.reshape(shape)


def minimise_pairs(pair_loss, pi_ref, weights, lengths=None, start=None, **newton):
    """The policy minimising `pair_table_loss`, from π_θ = `start` (default π_ref); returns π (X,
    Y).
    """
    theta0 = torch.log(pi_ref if start is None else start)
    theta = newton_path(
        lambda t: pair_table_loss(pair_loss, t, pi_ref, weights, lengths), theta0, **newton
    )
    return torch.softmax(theta, -1)


def hinge_minimiser(pi_ref, weights, beta: float):
    """A minimiser of the mean hinge loss max(0, 1 − β·h) over W, as a linear program (HiGHS);
    returns π (X, Y).

    Variables: u = log π/π_ref per (x, y) and one slack t ≥ 1 − β(u_w − u_l), t ≥ 0 per weighted
    cell; minimise Σ W·t. The constraint matrix is a network matrix, so a vertex solution has β·(u_a
    − u_b) integer.
    """
    X, Y = pi_ref.shape
    cells = torch.nonzero(weights > 0).tolist()  # [(x, w, l)]
    n_u, n_t = X * Y, len(cells)
    A = np.zeros((n_t, n_u + n_t))
    for i, (x, w, l) in enumerate(cells):  # −β·u_w + β·u_l − t ≤ −1
        A[i, x * Y + w], A[i, x * Y + l], A[i, n_u + i] = -beta, beta, -1.0
    cost = np.concatenate([np.zeros(n_u), [weights[x, w, l].item() for x, w, l in cells]])
    bounds = [(None, None)] * n_u + [(0, None)] * n_t
    res = linprog(cost, A_ub=A, b_ub=-np.ones(n_t), bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"hinge LP: {res.message}")
    u = torch.tensor(res.x[:n_u], dtype=torch.float64).reshape(X, Y)
    return torch.softmax(torch.log(pi_ref) + u, -1)


def unpaired(weights):
    """KTO's data from pairs: each row's y_w is a desirable example, its y_l an undesirable one; (D,
    U), each (X, Y)."""
    total = weights.sum()
    return weights.sum(2) / total, weights.sum(1) / total


def one_row_per_pair(win_prob, generator):
    """A data set that sees each unordered pair of each prompt once, its label drawn from win_prob
    (X, Y, Y): W (X, Y, Y)."""
    upper = torch.triu(torch.ones_like(win_prob[0]), 1).bool()  # (Y, Y): y < y'
    first = torch.bernoulli(win_prob, generator=generator).bool()  # (X, Y, Y): y beats y'
    return (upper & first).to(win_prob.dtype) + (upper & ~first).to(win_prob.dtype).transpose(1, 2)


def kto_table_loss(kto_loss, theta, pi_ref, desirable, undesirable, z0):
    """Mean KTO loss over the unpaired examples with masses D, U (X, Y) at π_θ = softmax θ, for a
    fixed z₀."""
    u = torch.log_softmax(theta, -1) - torch.log(pi_ref)  # (X, Y)
    good = kto_loss(u, 0.0, torch.ones_like(u, dtype=torch.bool), z0=z0)
    bad = kto_loss(u, 0.0, torch.zeros_like(u, dtype=torch.bool), z0=z0)
    return (desirable * good + undesirable * bad).sum() / (desirable.sum() + undesirable.sum())


def kto_minimiser(
    kto_loss,
    pi_ref,
    desirable,
    undesirable,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    rounds: int = 100,
    tol: float = 1e-12,
):
    """KTO's stationary policy: θ minimising `kto_table_loss` at z₀ = E_x KL(π_θ(·|x) ‖ π_ref(·|x)),
    z₀ held fixed.

    Per response the loss is λ_D·D·σ(β(z₀ − u)) + λ_U·U·σ(β(u − z₀)) + const, u = log π/π_ref:
    monotone in u, falling where λ_D·D > λ_U·U. So every other response ends with π = 0 (at θ = −∞;
    here θ = −1000, where e^θ is 0 in float64) and Newton solves for the rest. z₀ is not
    differentiated (the paper's stop-gradient): the solution is a fixed point, reached by
    alternating Newton at fixed z₀ with z₀ ← KL. Returns (π, z₀).
    """
    keep = (
        desirable_weight * desirable > undesirable_weight * undesirable
    )  # (X, Y): responses that keep mass
    theta, z0 = torch.where(keep, torch.log(pi_ref), -1000.0), 0.0
    for _ in range(rounds):
        theta = newton_path(
            lambda t: kto_table_loss(
                kto_loss, torch.where(keep, t, -1000.0), pi_ref, desirable, undesirable, z0
            ),
            theta,
        )
        z0, previous = kl_divergence(torch.softmax(theta, -1), pi_ref).mean().item(), z0
        if abs(z0 - previous) < tol:
            break
    return torch.softmax(theta, -1), z0


def mass_moved_rises(loss_fn, pi, cells, amount: float = 1e-4):
    """loss_fn(log π) after moving `amount` of mass from each prompt's largest entry onto each cell,
    minus at π itself.

    cells (X, Y) bool. Log-probs are clamped at −1000 (zero mass) so the losses stay finite. Returns
    one rise per cell.
    """
    at = lambda p: loss_fn(torch.log(p).clamp(min=-1000.0)).item()  # noqa: E731
    base, rises = at(pi), []
    for x, y in torch.nonzero(cells).tolist():
        moved = pi.clone()
        moved[x, y] += amount
        moved[x, pi[x].argmax()] -= amount
        rises.append(at(moved) - base)
    return np.array(rises)


def population_minimisers(losses: dict, pi_ref, weights, beta, eps, gamma, lam, lengths) -> dict:
    """Chapter 10's variants' population minimisers on the rows W: {label: (π (X, Y), how it was
    solved)}.

    losses: chapter 10's formulas, {"preference": preference_loss, "orpo": orpo_loss, "kto":
    kto_loss}. The reference-free losses (SimPO, ORPO, on per-token means over `lengths`) start from
    the uniform policy.
    """
    uniform = torch.full_like(pi_ref, 1 / pi_ref.shape[-1])

    def pairs(kind, **kw):
        return partial(losses["preference"], kind, beta=beta, **kw)

    def orpo(pc, pr, rc, rr):
        return losses["orpo"](pc, pr, lam)

    return {
        "dpo": (minimise_pairs(pairs("dpo"), pi_ref, weights), "Newton"),
        f"cdpo ε={eps}": (
            minimise_pairs(pairs("cdpo", label_smoothing=eps), pi_ref, weights),
            "Newton",
        ),
        f"rdpo ε={eps}": (
            minimise_pairs(pairs("rdpo", label_smoothing=eps), pi_ref, weights),
            "Newton",
        ),
        "ipo": (minimise_pairs(pairs("ipo"), pi_ref, weights), "Newton"),
        "hinge": (hinge_minimiser(pi_ref, weights, beta), "linear program"),
        "simpo γ=0": (
            minimise_pairs(pairs("simpo"), pi_ref, weights, lengths, start=uniform),
            "Newton",
        ),
        f"simpo γ={gamma}": (
            minimise_pairs(pairs("simpo", gamma=gamma), pi_ref, weights, lengths, start=uniform),
            "Newton",
        ),
        f"orpo λ={lam}": (minimise_pairs(orpo, pi_ref, weights, lengths, start=uniform), "Newton"),
        "kto": (
            kto_minimiser(partial(losses["kto"], beta=beta), pi_ref, *unpaired(weights))[0],
            "Newton, fixed point in z₀",
        ),
    }


def policy_summary(pi, pi_ref, pi_star, rewards) -> dict:
    """E_x E_π[r*], E_x KL(π‖π_ref), E_x KL(π‖π*) and max |π − π*| of a tabular policy (floats)."""
    return dict(
        reward=(pi * rewards).sum(-1).mean().item(),
        kl_ref=kl_divergence(pi, pi_ref).mean().item(),
        kl_star=kl_divergence(pi, pi_star).mean().clamp(min=0).item(),
        max_diff=(pi - pi_star).abs().max().item(),
    )


class Frontier:
    """Chapter 7's exact reward–KL frontier, π*_β of eq. (36) over a dense β grid, and its
    efficiency measure.

    logp_ref, rewards (P, Y). `efficiency(reward, kl)` = (reward − E_ref[r*]) / (frontier(kl) −
    E_ref[r*]): the share of the frontier's gain over π_ref that a policy at this KL gets (1 on the
    frontier, NaN at KL ≈ 0).
    """

    def __init__(self, logp_ref, rewards, betas=np.geomspace(0.01, 100.0, 400)):
        self.ref_reward, _ = exact_reward_and_kl(logp_ref, logp_ref, rewards)
        front_r, front_kl = exact_frontier(logp_ref, rewards, betas)
        self.rewards, self.kls = (
            np.append(front_r, self.ref_reward),
            np.append(front_kl, 0.0),
        )  # β → ∞: π_ref

    def reward_at(self, kl: float) -> float:
        return frontier_reward(kl, self.rewards, self.kls)

    def efficiency(self, reward: float, kl: float) -> float:
        return efficiency(reward, kl, self.rewards, self.kls, self.ref_reward)
