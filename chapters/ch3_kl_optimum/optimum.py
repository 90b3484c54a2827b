"""The KL-constrained objective and its closed-form optimum (report eqs. (27)–(37)): KL, the
objective, the partition function, π* = π_ref·exp(r/β)/Z (eq. (36)), the reward recovered from a
policy (eq. (37)).
"""

import math

import torch

from chapters.common.lbfgs import lbfgs_minimise


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Report §4.1: D_KL[P‖Q] = Σ_i P(i)·log P(i)/Q(i), over the last axis (with 0·log 0 = 0)."""
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1)  # (...,)


def kl_objective(
    pi: torch.Tensor, pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float
) -> torch.Tensor:
    """Report eq. (27): J(π) = E_{y∼π}[r(x, y)] − β·D_KL(π(·|x) ‖ π_ref(·|x)), one value per prompt
    (...,)."""
    return (pi * rewards).sum(-1) - beta * kl_divergence(pi, pi_ref)


def rlhf_token_rewards(
    score: torch.Tensor,
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    response_mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Report eq. (28), per token: r_t = −β·(log π_θ(y_t|·) − log π_ref(y_t|·)), plus r_φ(x, y) on
    the last response token.

    score (B,) is r_φ(x, y); policy_logps, ref_logps, response_mask (B, T) are aligned with each
    other: the log-probability of the token at each position under π_θ and π_ref, and which
    positions are response tokens (any padding side). Returns (B, T), zero outside the mask; its sum
    over T is eq. (28), r_φ(x, y) − β·(log π_θ(y|x) − log π_ref(y|x)). Gradients flow through; PPO
    passes detached log-probs.
    """
    mask = response_mask.to(policy_logps.dtype)  # (B, T)
    if (mask.sum(-1) == 0).any():
        raise ValueError(
            "rlhf_token_rewards: a row has no response token; the reward model score needs one"
        )
    rewards = -beta * (policy_logps - ref_logps) * mask  # (B, T): the per-token KL penalty
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = (positions * mask).argmax(-1, keepdim=True)  # (B, 1): index of the last response token
    return rewards.scatter_add(-1, last, score[:, None].to(rewards.dtype))


def log_partition_function(
    pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float
) -> torch.Tensor:
    """Report eq. (32), in logs: log Z(x) = log Σ_y π_ref(y|x)·exp(r(x, y)/β), a log-sum-exp, finite
    for any β > 0."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return torch.logsumexp(torch.log(pi_ref) + rewards / beta, dim=-1)  # (...,)


def optimal_policy(pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Report eq. (36): π*(y|x) = π_ref(y|x)·exp(r(x, y)/β) / Z(x), normalised over the last axis.

    `pi_ref` and `rewards` are (..., Y): a distribution over Y responses and their rewards. Computed
    as a softmax of log π_ref + r/β, which is stable for any β > 0.
    """
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be > 0 and finite (the KL weight of eq. (27)), got {beta}")
    try:
        torch.broadcast_shapes(pi_ref.shape, rewards.shape)
    except RuntimeError:
        raise ValueError(
            f"pi_ref {tuple(pi_ref.shape)} and rewards {tuple(rewards.shape)} do not broadcast; "
            "give one reward per response, (..., Y) each"
        ) from None
    if not bool((pi_ref >= 0).all()):  # also refuses NaN
        raise ValueError(
            "pi_ref must be a distribution over the last axis: every entry >= 0 (got a negative or "
            "NaN)"
        )
    return torch.softmax(torch.log(pi_ref) + rewards / beta, dim=-1)


def objective_rewritings(
    pi: torch.Tensor, pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float
) -> dict:
    """Report eqs. (29)–(35): the objective of eq. (27) at π, evaluated as each line of §4.1's
    derivation.

    Returns {"(29)", "(30)", "(31)", "(34)", "(35)"} → (...,) per prompt. The derivation claims (29)
    = (27), (30) = −(29)/β (the max becomes a min), and (31) = (34) = (35) = (30).
    """
    log_z = log_partition_function(pi_ref, rewards, beta)[..., None]  # (..., 1)
    gibbs = pi_ref * torch.exp(rewards / beta - log_z)  # eq. (33) written out: π_ref·exp(r/β)/Z

    def expect(v):  # E_{y∼π}[v(y)], with 0·(anything) = 0 where π(y) = 0
        return torch.where(pi > 0, pi * v, 0.0).sum(-1)

    log_ratio = torch.log(pi) - torch.log(pi_ref)
    return {
        "(29)": expect(rewards - beta * log_ratio),
        "(30)": expect(log_ratio - rewards / beta),
        "(31)": expect(torch.log(pi) - torch.log(gibbs) - log_z),
        "(34)": expect(torch.log(pi) - torch.log(optimal_policy(pi_ref, rewards, beta)))
        - log_z[..., 0],
        "(35)": kl_divergence(pi, optimal_policy(pi_ref, rewards, beta)) - log_z[..., 0],
    }


def reward_from_policy(
    pi: torch.Tensor, pi_ref: torch.Tensor, beta: float, log_z=0.0
) -> torch.Tensor:
    """Report eq. (37): r(x, y) = β·log π_r(y|x)/π_ref(y|x) + β·log Z(x).

    Z(x) is what nobody can compute, so `log_z` defaults to 0: the result is then r − β·log Z(x),
    the member of r's class that §5.1's Theorem 1 picks. `log_z` is (...,) or a number.
    """
    return (
        beta * (torch.log(pi) - torch.log(pi_ref))
        + beta * torch.as_tensor(log_z, dtype=pi.dtype)[..., None]
    )


# --------------------------------------------------------------------------------------- the script


def _random_problem(generator, responses, prompts=1):
    """A random discrete problem in float64: π_ref (prompts, Y) with full support and rewards
    (prompts, Y)."""
    logits = torch.randn(prompts, responses, generator=generator, dtype=torch.float64)
    return torch.softmax(logits, -1), torch.randn(
        prompts, responses, generator=generator, dtype=torch.float64
    )


def ascend_logits(
    pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float, max_evals: int = 300
) -> torch.Tensor:
    """Report eq. (36) reached by search: gradient ascent on eq. (27) over free logits θ, π_θ =
    softmax(θ).

    Starts from θ = 0 (the uniform policy) and climbs with L-BFGS, a gradient method with a line
    search (plain fixed-step ascent gets there too, but needs thousands of steps for the small
    entries of π*). Returns π_θ (..., Y).
    """
    theta = torch.zeros_like(pi_ref, requires_grad=True)
    lbfgs_minimise(
        [theta],
        lambda: -kl_objective(torch.softmax(theta, -1), pi_ref, rewards, beta).sum(),
        max_iter=max_evals,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
    )
    return torch.softmax(theta.detach(), -1)
