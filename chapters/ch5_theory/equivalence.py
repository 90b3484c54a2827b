"""Report §5.1: equivalent rewards (Definition 1), Lemmas 1–2, Theorem 1 and its projection f(r)."""

import itertools

import torch

from chapters.ch1_preference_models.probabilities import plackett_luce
from chapters.ch3_kl_optimum.optimum import log_partition_function, optimal_policy

# ----------------------------------------------------------------------------- §5.1: reward classes


def equivalent_reward(rewards: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Report §5.1, Definition 1: r'(x, y) = r(x, y) + f(x), a member of r's class. rewards (X, Y),
    f (X,)."""
    return rewards + f[..., None]


def are_equivalent(r1: torch.Tensor, r2: torch.Tensor, atol: float = 1e-9) -> torch.Tensor:
    """Report §5.1, Definition 1: r ~ r' iff r(x, y) − r'(x, y) = f(x), the same number for every y.
    Returns (X,) bools.

    Checked on the given responses only, to `atol`: on a finite problem that is the whole
    definition.
    """
    gap = r1 - r2  # (X, Y)
    return (gap.max(-1).values - gap.min(-1).values) <= atol


def ranking_distribution(rewards: torch.Tensor):
    """Report §5.1, Lemma 1's object: p_r(τ | y_1..y_K, x) of every ranking τ, by eq. (11) over all
    K! of them.

    rewards (..., K). Returns (rankings (K!, K), probabilities (..., K!)). Comparing it for r and r
    + f(x) checks Lemma 1 on the rewards and f tried; that exp(f(x)) cancels for every r is the
    proof's step.
    """
    rankings = torch.tensor(list(itertools.permutations(range(rewards.shape[-1]))))  # (K!, K)
    return rankings, plackett_luce(rewards[..., None, :], rankings)  # (..., K!)


def lemma2_proof_steps(
    pi_ref: torch.Tensor, rewards: torch.Tensor, f: torch.Tensor, beta: float
) -> dict:
    """Report §5.1, Lemma 2's proof, line by line, for r' = r + f(x): returns each line's numerator
    and π.

    "π_r'": eq. (36) at r'; "numerator": π_ref·exp(r'/β) = π_ref·exp((r + f(x))/β), the correct
    second line; "factored": π_ref·exp(r/β)·exp(f(x)/β), the third line with the right factor; "as
    printed": the report's π_ref·exp(r/β + f(x)), which differs unless β = 1, and "π as printed": it
    normalised; "π_r": eq. (36) at r. A numerical mismatch between two lines would refute a step;
    agreement shows it only for the problems tried.
    """
    shifted = equivalent_reward(rewards, f)
    printed = pi_ref * torch.exp(rewards / beta + f[..., None])
    return {
        "π_r'": optimal_policy(pi_ref, shifted, beta),
        "numerator": pi_ref * torch.exp(shifted / beta),
        "factored": pi_ref * torch.exp(rewards / beta) * torch.exp(f / beta)[..., None],
        "as printed": printed,
        "π as printed": printed / printed.sum(-1, keepdim=True),
        "π_r": optimal_policy(pi_ref, rewards, beta),
    }


def project_reward(rewards: torch.Tensor, pi_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """Report §5.1, Theorem 1: f(r, π_ref, β)(x, y) = r(x, y) − β·log Z(x), which equals β·log
    π_r(y|x)/π_ref(y|x).

    Numbers check, on a given problem, that the result is in r's class, equals β·log π_r/π_ref, and
    is the same for every member of the class; that this holds for every reward is the theorem's
    algebra, not the numbers.
    """
    return rewards - beta * log_partition_function(pi_ref, rewards, beta)[..., None]


def implied_policy(rewards: torch.Tensor, pi_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """Report §5.1, Proposition 1: r = β·log π/π_ref forces π = π_ref·exp(r/β), a distribution only
    if Σ_y π = 1.

    Not normalised on purpose. For r' = r + f(x) with r = β·log π/π_ref the mass is exp(f(x)/β),
    which is 1 only at f(x) = 0: the proof's step. Numbers check it at the points tried; uniqueness
    for all f is the proof's.
    """
    return pi_ref * torch.exp(rewards / beta)
