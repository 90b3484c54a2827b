"""Length: R-DPO (Park, Rafailov, Ermon & Finn 2024, arXiv 2403.19159), its optimum, length bias.

With summed log-probs, a labeller that also likes length, r(y) = q(y) + γ·|y|, moves DPO's
optimum (eq. (36) with that r) toward long responses by the factor exp(γ·|y|/β). R-DPO adds
α·(|y_w| − |y_l|) inside the sigmoid; its optimum is eq. (36) with the reward r(y) − α·|y|, so
α = γ gives back eq. (36) under q exactly. Tabular worlds: π_ref, rewards (X, Y); lengths (Y,) or
(X, Y).
"""

import torch
import torch.nn.functional as F

from chapters.ch3_kl_optimum import optimal_policy
from chapters.ch11_dpo_pitfalls.validation import (
    check_beta,
    check_broadcast,
    check_lengths,
    check_weight,
)
from chapters.common import newton_minimise


def r_dpo_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
    chosen_lengths, rejected_lengths, beta: float, alpha: float,
) -> torch.Tensor:
    """Park et al. 2024, R-DPO: −log σ(β·h + α·(|y_w| − |y_l|)), h the margin of report eq. (38).

    The sign is the one the derivation gives (α ≥ 0 penalises length; the paper's text was not at
    hand to check its printed sign). R-DPO is DPO for the length-penalised objective
    max E[r] − α·E|y| − β·KL, whose optimum π ∝ π_ref·exp((r − α|y|)/β) gives
    r = β·log π/π_ref + α·|y| + β·log Z; Bradley–Terry on that r is this sigmoid. A longer chosen
    response already explains part of the preference, so the policy needs less margin for it:
    length earns less. (With −α, an α ≥ 0 would reward length.) α = 0 is eq. (38). Lengths in
    tokens, > 0; the arguments broadcast (e.g. all (B,)). Returns the per-example losses.
    """
    beta = check_beta(beta)
    alpha = check_weight("alpha", alpha, "R-DPO's length weight")
    check_broadcast(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_lengths, rejected_lengths,
    )
    dtype = policy_chosen_logps.dtype
    chosen_len = check_lengths("chosen_lengths", chosen_lengths, dtype)
    rejected_len = check_lengths("rejected_lengths", rejected_lengths, dtype)
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * h + alpha * (chosen_len - rejected_len))


def r_dpo_optimal_policy(
    pi_ref: torch.Tensor, rewards: torch.Tensor, lengths, beta: float, alpha: float
) -> torch.Tensor:
    """Park et al. 2024, R-DPO's population minimiser: π(y|x) ∝ π_ref(y|x)·exp((r(x,y) − α|y|)/β).

    Preferences follow Bradley–Terry on `rewards` and every pair (y, y') is observed with some
    weight > 0. A pair's expected loss −p·log σ(d) − (1 − p)·log σ(−d), p = σ(r(y) − r(y')), is
    least at d = r(y) − r(y'). Here d = u(y) − u(y') with u(y) = β·log π(y)/π_ref(y) + α·|y|, and
    a tabular π can set u(y) = r(y) + c(x) for every y at once: every pair at its own minimum,
    whatever the weights. Solved for π, that is eq. (36) with the reward r − α·|y|.
    pi_ref, rewards (..., Y); lengths (Y,) or (..., Y). Returns (..., Y).
    """
    beta = check_beta(beta)
    alpha = check_weight("alpha", alpha, "R-DPO's length weight")
    check_broadcast(pi_ref, rewards, lengths)
    lengths = check_lengths("lengths", lengths, rewards.dtype)
    return optimal_policy(pi_ref, rewards - alpha * lengths, beta)


def r_dpo_population_loss(
    theta: torch.Tensor, pi_ref: torch.Tensor, rewards: torch.Tensor, lengths, beta: float,
    alpha: float, pair_weights: torch.Tensor = None,
) -> torch.Tensor:
    """Park et al. 2024, R-DPO's loss with infinite data, for π_θ(·|x) = softmax(θ[x]), θ (X, Y).

    A pair (x, y, y') is drawn with weight pair_weights[x, y, y'] (X, Y, Y) and labelled by
    Bradley–Terry on `rewards`: y ≻ y' with probability σ(r(x, y) − r(x, y')). Default weights:
    π_ref(y|x)·π_ref(y'|x) for y ≠ y' (both responses sampled from the reference).
    Returns the weighted mean of the expected per-pair losses (0-d).
    """
    if pair_weights is None:
        pair_weights = pi_ref[:, :, None] * pi_ref[:, None, :]  # (X, Y, Y)
        pair_weights = pair_weights * (1 - torch.eye(pi_ref.shape[-1], dtype=pi_ref.dtype))
    want = tuple(pi_ref.shape) + (pi_ref.shape[-1],)
    if tuple(pair_weights.shape) != want or bool((pair_weights < 0).any()):
        raise ValueError(
            f"pair_weights must be (X, Y, Y) = {want} and >= 0, "
            f"got shape {tuple(pair_weights.shape)}"
        )
    lengths = torch.broadcast_to(torch.as_tensor(lengths, dtype=pi_ref.dtype), pi_ref.shape)
    logp = torch.log_softmax(theta, dim=-1)  # (X, Y)
    ref = torch.log(pi_ref)  # (X, Y)
    # every (x, y ≻ y') at once: (X, Y, 1) chosen against (X, 1, Y) rejected -> (X, Y, Y)
    wins = r_dpo_loss(
        logp[:, :, None], logp[:, None, :], ref[:, :, None], ref[:, None, :],
        lengths[:, :, None], lengths[:, None, :], beta, alpha,
    )
    p = torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])  # (X, Y, Y): P(y ≻ y')
    expected = p * wins + (1 - p) * wins.transpose(-1, -2)  # labelled y ≻ y' or y' ≻ y
    return (pair_weights * expected).sum() / pair_weights.sum()


def fit_r_dpo(
    pi_ref: torch.Tensor, rewards: torch.Tensor, lengths, beta: float, alpha: float,
    pair_weights: torch.Tensor = None, max_iter: int = 50,
) -> torch.Tensor:
    """Park et al. 2024, R-DPO's population loss minimised by Newton's method; returns π_θ (X, Y).

    Tabular logits from π_θ = π_ref. The loss is convex in θ (u(y) − u(y') is linear in θ under a
    softmax), so Newton's method converges in a few steps.
    """

    def loss_fn(flat):
        theta = flat.reshape(pi_ref.shape)
        return r_dpo_population_loss(theta, pi_ref, rewards, lengths, beta, alpha, pair_weights)

    theta = newton_minimise(loss_fn, torch.log(pi_ref).flatten(), max_iter)  # (X*Y,)
    return torch.softmax(theta.reshape(pi_ref.shape), dim=-1)
