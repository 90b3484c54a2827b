"""Report §7: the set of DPO minimisers on a tabular problem, its flat directions, and the unseen
responses along them."""

import math

import torch

from chapters.ch3_kl_optimum.optimum import kl_divergence, optimal_policy
from chapters.ch9_dpo_vs_ppo.problem import (
    DT,
    Problem,
    comparison_graph,
    empirical_dpo_loss,
    unseen_mask,
)

# -------------------------------------------------------------------------------- the minimiser set


def dpo_flat_directions(problem: Problem) -> torch.Tensor:
    """Report §7 (Xu et al. 2024), made exact: the directions of the logits θ (π = softmax θ) along
    which eq. (38) is constant.

    With h(x, y) = β·log π(y|x)/π_ref(y|x), eq. (38) on the data is eq. (26) at r = h: it sees h
    only through h(x, y_w) − h(x, y_l) on voted pairs. So it is unchanged by adding to θ(x, ·) any
    vector that is constant on each connected component of prompt x's comparison graph and arbitrary
    on responses in no pair (the per-prompt shift from the softmax is constant on everything, so it
    is one of them). Returns an orthonormal basis (k, P·Y) of that span V: one normalised indicator
    per component, one unit vector per unseen response.
    """
    P, Y = problem.shape
    components, unseen = comparison_graph(problem)
    rows = []
    for x in range(P):
        for group in components[x] + [[u] for u in unseen[x]]:
            v = torch.zeros(P, Y, dtype=DT)
            v[x, group] = 1 / math.sqrt(len(group))
            rows.append(v.flatten())
    return torch.stack(rows)  # (k, P·Y), orthonormal: disjoint supports


def dpo_minimiser(problem: Problem, rewards: torch.Tensor, direction=None) -> torch.Tensor:
    """Report eq. (36) for the reward r̂ + β·v: a member of Π_DPO when r̂ minimises eq. (26) and v
    (P, Y) lies in span V.

    r̂ + β·v differs from r̂ by a constant on each component and anything on unseen responses, so it
    minimises eq. (26) too; its eq. (36) policy has β·log π/π_ref = r̂ + β·v − β·log Z and so
    minimises eq. (38). With
    v = 0 (the default) it is π*, the KL-regularised optimum for r̂ that PPO aims at. Returns π (P,
    Y).
    """
    v = 0.0 if direction is None else direction
    return optimal_policy(problem.pi_ref, rewards + problem.beta * v, problem.beta)


def loglinear_flat_directions(problem: Problem) -> torch.Tensor:
    """Report §7 for π_θ ∝ π_ref·exp(θ·φ): eq. (38) sees θ only through θ·(φ(x, y_w) − φ(x, y_l)),
    so it is constant along the null space of the vote-difference matrix; returns an orthonormal
    basis (k, d) of it (SVD, singular values < 1e-10).
    """
    diffs = (
        problem.features[problem.prompt, problem.chosen]
        - problem.features[problem.prompt, problem.rejected]
    )  # (N, d)
    _, sing, vh = torch.linalg.svd(diffs, full_matrices=True)
    rank = int((sing > 1e-10 * sing.max()).sum())
    return vh[rank:]  # (d − rank, d)


def logit_hessian(problem: Problem, logits: torch.Tensor) -> torch.Tensor:
    """Report eq. (38), its Hessian with respect to the flat logits θ (P·Y) of π = softmax θ, at
    `logits` (P, Y); (P·Y, P·Y)."""
    P, Y = problem.shape

    def loss(flat):
        return empirical_dpo_loss(torch.log_softmax(flat.view(P, Y), -1), problem)

    return torch.autograd.functional.hessian(loss, logits.flatten())


def unseen_shift(problem: Problem, rewards: torch.Tensor, target: float) -> torch.Tensor:
    """The v in span V that raises the logits of each prompt's unseen responses by s_x so they carry
    mass `target`: (P, Y).

    Unseen mass m(s) = a·e^s / (a·e^s + b) with a, b the unseen and seen mass at s = 0, so s =
    log(target·b / ((1 − target)·a)).
    """
    mask = unseen_mask(problem)
    base = dpo_minimiser(problem, rewards)
    a, b = (base * mask).sum(-1), (base * ~mask).sum(-1)  # (P,)
    s = torch.log(target * b / ((1 - target) * a))  # (P,)
    return torch.where(mask, s[:, None], 0.0)


# --------------------------------------------------------------------------------------- the script


def minimiser_set_checks(problem: Problem, rewards: torch.Tensor, generator) -> dict:
    """The characterisation checked at π* (logits log π*): flat along V, Hessian null space = V,
    loss rises off V."""
    star = dpo_minimiser(problem, rewards).log()  # (P, Y) logits of a minimiser
    base = empirical_dpo_loss(star, problem).item()
    basis = dpo_flat_directions(problem)  # (k, P·Y)
    steps = torch.linspace(-3, 3, 7, dtype=DT)
    flat = max(
        abs(
            empirical_dpo_loss(
                torch.log_softmax(star + t * v.view(problem.shape), -1), problem
            ).item()
            - base
        )
        for v in basis
        for t in steps
    )
    combo = (
        torch.randn(len(basis), generator=generator, dtype=DT) @ basis
    )  # a random direction inside V
    flat_combo = abs(
        empirical_dpo_loss(
            torch.log_softmax(star + 2 * combo.view(problem.shape), -1), problem
        ).item()
        - base
    )
    hess = logit_hessian(problem, star)
    eig, vec = torch.linalg.eigh(hess)
    null = vec[:, eig.abs() < 1e-10]  # (P·Y, k')
    projector_gap = (null @ null.T - basis.T @ basis).abs().max().item()
    off = torch.randn(basis.shape[1], generator=generator, dtype=DT)
    off = off - basis.T @ (basis @ off)  # remove the part in V
    off = off / off.norm()
    rises = [
        empirical_dpo_loss(
            torch.log_softmax(star + t * off.view(problem.shape), -1), problem
        ).item()
        - base
        for t in (-0.5, 0.5)
    ]
    return dict(
        loss=base,
        dim=len(basis),
        flat=max(flat, flat_combo),
        null_dim=null.shape[1],
        projector_gap=projector_gap,
        min_curvature=eig[eig.abs() >= 1e-10].min().item(),
        quad=0.5 * 0.25 * (off @ hess @ off).item(),
        rises=rises,
    )


def family_along_unseen(problem: Problem, rewards: torch.Tensor, masses) -> list:
    """Members of Π_DPO with unseen mass m on every prompt: (m, eq. (38) − its minimum, E_π[r*],
    KL(π ‖ π_ref))."""
    base = empirical_dpo_loss(dpo_minimiser(problem, rewards).log(), problem).item()
    rows = []
    for m in masses:
        pi = dpo_minimiser(problem, rewards, unseen_shift(problem, rewards, m))
        rows.append(
            (
                m,
                empirical_dpo_loss(pi.log(), problem).item() - base,
                (pi * problem.true_reward).sum(-1).mean().item(),
                kl_divergence(pi, problem.pi_ref).mean().item(),
            )
        )
    return rows
