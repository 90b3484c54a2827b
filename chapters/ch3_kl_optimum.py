"""Chapter 3 (report §3.3, §4.1; eqs (27)–(37)): the KL-constrained objective and its closed-form optimum."""
import torch


def optimal_policy(pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Report eq. (36): π*(y|x) = π_ref(y|x)·exp(r(x, y)/β) / Z(x), normalised over the last axis.

    `pi_ref` and `rewards` are (..., Y): a distribution over Y responses and their rewards.
    Computed as a softmax of log π_ref + r/β, which is stable for any β > 0.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return torch.softmax(torch.log(pi_ref) + rewards / beta, dim=-1)
