"""Report §5.2: score-function gradients, baselines and their variance; DPO's gradient needs no
baseline."""

import torch

from chapters.ch1_preference_models.probabilities import bradley_terry
from chapters.ch4_dpo.loss import dpo_loss

# ------------------------------------------------------------------------ §5.2: baselines, variance


def score_matrix(theta: torch.Tensor) -> torch.Tensor:
    """∇_θ log π_θ(y) for every response y, by autograd, for π_θ = softmax(θ). theta (Y,) -> (Y, Y),
    row y.

    For a softmax it is e_y − π_θ (the tests check that): each row sums to zero, which is why
    baselines are free.
    """
    return torch.autograd.functional.jacobian(lambda t: torch.log_softmax(t, -1), theta)  # (Y, Y)


def score_function_samples(theta, weights, baseline, n: int, generator=None) -> torch.Tensor:
    """Report §5.2: n draws of the policy-gradient estimate (w(y) − B)·∇_θ log π_θ(y), y ∼ π_θ.

    theta (Y,) logits; weights (Y,): w(y) = r(y) for RL, w(y) = P(y)/π_θ(y) for DPG. Returns (n, Y).
    """
    y = torch.multinomial(
        torch.softmax(theta, -1), n, replacement=True, generator=generator
    )  # (n,)
    return (weights[y] - baseline)[:, None] * score_matrix(theta)[y]  # (n, Y)


def expected_gradient(theta, weights, baseline) -> torch.Tensor:
    """Report §5.2, by enumeration: E_{y∼π_θ}[(w(y) − B)·∇_θ log π_θ(y)] = Σ_y π_θ(y)·(w(y) − B)·∇_θ
    log π_θ(y).

    Exact on a finite Y, so "unbiased for every B" is checked to round-off, for the B tried.
    """
    pi = torch.softmax(theta, -1)
    return ((pi * (weights - baseline))[:, None] * score_matrix(theta)).sum(0)  # (Y,)


def gradient_variance(theta, weights, baseline) -> torch.Tensor:
    """The total variance tr Cov of one draw of `score_function_samples`, by enumeration: E‖g‖² − ‖E
    g‖²."""
    pi = torch.softmax(theta, -1)
    sq_norms = ((weights - baseline)[:, None] * score_matrix(theta)).pow(2).sum(-1)  # (Y,): ‖g(y)‖²
    return (pi * sq_norms).sum() - expected_gradient(theta, weights, baseline).pow(2).sum()


def rl_baseline(theta, rewards) -> torch.Tensor:
    """Report §5.2: B_RL = E_{y∼π_θ}[r(y)], re-estimated whenever θ changes."""
    return (torch.softmax(theta, -1) * rewards).sum()


def min_variance_baseline(theta, weights) -> torch.Tensor:
    """Not in the report, for comparison: the constant B minimising `gradient_variance`, Σ π w ‖s‖²
    / Σ π ‖s‖²."""
    pi = torch.softmax(theta, -1)
    s2 = score_matrix(theta).pow(2).sum(-1)  # (Y,): ‖∇_θ log π_θ(y)‖²
    return (pi * weights * s2).sum() / (pi * s2).sum()


def dpg_weights(theta, energy) -> torch.Tensor:
    """Report §5.2 (DPG): R_θ(y) = P(y)/π_θ(y), the importance weight of the energy-based model P.
    (Y,)
    """
    return energy / torch.softmax(theta, -1)


def dpg_baseline(energy) -> torch.Tensor:
    """Report §5.2 (DPG): B = E_{y∼π_θ}[P(y)/π_θ(y)] = Σ_y P(y); for P = π_ref·exp(r/β) it is Z(x)
    of eq. (32)."""
    return energy.sum(-1)


def dpo_gradient_samples(
    theta, pi_ref, rewards, beta: float, n: int, generator=None
) -> torch.Tensor:
    """Report §5.2 (DPO needs no baseline): n per-example gradients ∇_θ of eq. (38), with DPO's
    data.

    y1, y2 ∼ π_ref independently; y1 is y_w with probability σ(r(y1) − r(y2)) (ch1's Bradley–Terry).
    The reward enters only through that label, and eq. (38) only through r̂(y_w) − r̂(y_l). Returns
    (n, Y).
    """
    y1, y2 = torch.multinomial(pi_ref, 2 * n, replacement=True, generator=generator).view(
        2, n
    )  # (n,) each
    first_wins = torch.rand(n, generator=generator, dtype=rewards.dtype) < bradley_terry(
        rewards[y1], rewards[y2]
    )
    y_w, y_l = torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1)
    thetas = (
        theta.detach().expand(n, -1).clone().requires_grad_(True)
    )  # (n, Y): row i is example i's copy of θ
    logp, log_ref = torch.log_softmax(thetas, -1), torch.log(pi_ref)
    pick = lambda t, y: t.gather(-1, y[:, None])[:, 0]  # noqa: E731  (n, Y), (n,) -> (n,)
    loss = dpo_loss(pick(logp, y_w), pick(logp, y_l), log_ref[y_w], log_ref[y_l], beta)  # (n,)
    return torch.autograd.grad(loss.sum(), thetas)[0]  # (n, Y): row i = ∇_θ of example i's loss


def total_variance(samples: torch.Tensor) -> torch.Tensor:
    """Measured tr Cov of gradient samples (n, Y): the mean squared distance to their mean."""
    return (samples - samples.mean(0)).pow(2).sum(-1).mean()
