"""Two exact worlds (reference, true reward, β), what is measured on a policy, the exact frontier.

Each world is one prompt with Y = 8 responses, float64, small enough that π* of eq. (36) and every
metric is a finite sum. A response is "rare" when π_ref(y) < `World.rare_below` = 0.02: π_ref draws
it less than once in 50 samples.
"""

from dataclasses import dataclass

import torch

from chapters.ch3_kl_optimum import kl_divergence, optimal_policy

DT = torch.float64


@dataclass(frozen=True)
class World:
    """A bandit world: π_ref (Y,) over one prompt's responses, the true reward r* (Y,), DPO's β."""

    name: str
    pi_ref: torch.Tensor
    rewards: torch.Tensor
    beta: float
    rare_below: float = 0.02

    @property
    def rare(self) -> torch.Tensor:
        """(Y,) bool: the responses π_ref rarely samples, π_ref(y) < rare_below."""
        return self.pi_ref < self.rare_below

    @property
    def optimum(self) -> torch.Tensor:
        """Report eq. (36): π* = π_ref·exp(r*/β)/Z, what every schedule aims at; (Y,)."""
        return optimal_policy(self.pi_ref, self.rewards, self.beta)


def hidden_best_world() -> World:
    """Offline DPO's bad case: the best response (r* = 2.5) has π_ref mass 0.002, π* ≈ 0.41.

    β = 0.5. π_ref's habit (mass 0.8) is poor (r* = −1); two decent responses (0.10, 0.05; r* = 0.5,
    0) are compared with it often; four bad responses (0.012 each, r* = −2) and the best are rare.
    A pair from π_ref holds the best response with probability 0.0115: 256 pairs show it about 3
    times (never, 5% of the time), nearly always winning, so its logit's DPO minimiser is at ∞.
    """
    pi_ref = torch.tensor([0.80, 0.10, 0.05, 0.012, 0.012, 0.012, 0.012, 0.002], dtype=DT)
    rewards = torch.tensor([-1.0, 0.5, 0.0, -2.0, -2.0, -2.0, -2.0, 2.5], dtype=DT)
    return World("hidden best", pi_ref, rewards, beta=0.5)


def covered_world() -> World:
    """Offline DPO's good case: π_ref samples every good response often; only two bad ones are rare.

    β = 1. Six common responses (π_ref 0.10 to 0.30, r* from −1 to 1.5; the best has π_ref = 0.20,
    π* ≈ 0.48) and two rare bad ones (0.005 each, r* = −2).
    """
    pi_ref = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.12, 0.10, 0.005, 0.005], dtype=DT)
    rewards = torch.tensor([0.0, 1.5, 0.5, -1.0, 1.0, -0.5, -2.0, -2.0], dtype=DT)
    return World("covered", pi_ref, rewards, beta=1.0)


WORLDS = {"hidden_best": hidden_best_world, "covered": covered_world}


def policy_metrics(pi: torch.Tensor, world: World) -> dict:
    """On π (Y,): KL(π‖π*), E_π[r*], KL(π‖π_ref), π's mass on rare responses, on the best."""
    return {
        "kl_to_optimum": kl_divergence(pi, world.optimum).item(),
        "reward": (pi * world.rewards).sum().item(),
        "kl_to_ref": kl_divergence(pi, world.pi_ref).item(),
        "rare_mass": pi[world.rare].sum().item(),
        "best_mass": pi[world.rewards.argmax()].item(),
    }


def frontier(world: World, betas: torch.Tensor) -> dict:
    """Report eq. (36) over β: the exact frontier E_{π*_β}[r*] and KL(π*_β‖π_ref), each (B,).

    π*_β maximises E_π[r*] − β·KL(π‖π_ref) (eq. (27)): no policy has more reward at the same KL.
    """
    optima = torch.stack([optimal_policy(world.pi_ref, world.rewards, float(b)) for b in betas])
    return {
        "beta": betas.to(DT),
        "reward": optima @ world.rewards,  # (B, Y) -> (B,)
        "kl_to_ref": kl_divergence(optima, world.pi_ref[None, :]),
    }
