"""The two fixes for likelihood displacement, DPO-Positive and DPO + NLL, and their gradients.

Write ℓ_w = log π_θ(y_w|x), ℓ_l = log π_θ(y_l|x) (summed over tokens), the margin
h = (ℓ_w − log π_ref(y_w|x)) − (ℓ_l − log π_ref(y_l|x)) and z = β·h. Every loss here depends on θ
only through (ℓ_w, ℓ_l), so by the chain rule ∇_θ L = a_w·∇_θ ℓ_w + a_l·∇_θ ℓ_l with a_w = ∂L/∂ℓ_w
and a_l = ∂L/∂ℓ_l. The `*_logprob_gradients` functions give (a_w, a_l) in closed form;
`displacement.first_order_chosen_change` turns them into the change of ℓ_w after one step.
For DPO (report eq. (41)) a_w = −β·σ(−z) = −a_l: whatever pushes ℓ_l down pushes ℓ_w down as hard
when their gradients are alike.
"""

import torch
import torch.nn.functional as F

from chapters.ch4_dpo import dpo_loss
from chapters.ch11_dpo_pitfalls.validation import (
    check_beta,
    check_broadcast,
    check_lengths,
    check_weight,
)


def _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l): eq. (38)'s margin before β."""
    check_broadcast(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def _rpo_checked(policy_chosen_logps, chosen_lengths, beta, alpha):
    """RPO's arguments checked: (β, α, |y_w| as ℓ_w's dtype), |y_w| > 0 broadcasting with ℓ_w."""
    beta = check_beta(beta)
    alpha = check_weight("alpha", alpha, "RPO's weight on the chosen NLL")
    check_broadcast(policy_chosen_logps, chosen_lengths)
    return beta, alpha, check_lengths("chosen_lengths", chosen_lengths, policy_chosen_logps.dtype)


def dpop_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
    beta: float, lam: float,
) -> torch.Tensor:
    """Pal et al. 2024 (Smaug, DPOP), eq. (3): −log σ(β·(h − λ·max(0, log π_ref(y_w)/π(y_w)))).

    The penalty sits inside β's bracket, as the paper writes it. It is zero while
    π_θ(y_w|x) ≥ π_ref(y_w|x); once the chosen response falls below the reference it lowers the
    sigmoid's argument by β·λ per nat lost. At the kink π_θ(y_w) = π_ref(y_w) (the first step) the
    derivative of max(0, ·) is taken as 1 (torch.clamp's), so the penalty counts from the start.
    λ = 0 is eq. (38). Returns the per-example losses; the log-probs broadcast (e.g. all (B,)).
    """
    beta = check_beta(beta)
    lam = check_weight("lam", lam, "DPOP's λ")
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    penalty = torch.clamp(ref_chosen_logps - policy_chosen_logps, min=0.0)  # max(0, log π_ref/π)
    return -F.logsigmoid(beta * (h - lam * penalty))


def rpo_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
    chosen_lengths, beta: float, alpha: float,
) -> torch.Tensor:
    """Pang et al. 2024 (Iterative RPO), DPO + NLL: eq. (38) + α·(−log π_θ(y_w|x) / |y_w|).

    The chosen response's NLL per token, weighted by α as TRL's `rpo_alpha` weights it; per example.
    Two conventions differ from this one: TRL averages the NLL over all chosen tokens of the batch
    (Σ NLL / Σ |y_w|, one number), and Pang et al. divide by |x| + |y_w| (pass that as
    `chosen_lengths` to follow them). α = 0 is eq. (38). chosen_lengths: |y_w| in tokens, > 0.
    """
    beta, alpha, lengths = _rpo_checked(policy_chosen_logps, chosen_lengths, beta, alpha)
    _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    dpo = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return dpo + alpha * (-policy_chosen_logps / lengths)


def dpo_logprob_gradients(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float
):
    """Report eq. (41) before ∇_θ: (∂L/∂ℓ_w, ∂L/∂ℓ_l) = (−β·σ(−z), +β·σ(−z)), per example.

    Equal and opposite: DPO pushes ℓ_w up exactly as hard as it pushes ℓ_l down.
    Returns two tensors shaped like the broadcast inputs.
    """
    beta = check_beta(beta)
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    weight = beta * torch.sigmoid(-beta * h)  # β·σ(−z): large while the pair is misordered
    return -weight, weight


def dpop_logprob_gradients(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
    beta: float, lam: float,
):
    """Pal et al. 2024, eq. (3), differentiated: (−β·σ(−u)·(1 + λ·[ℓ_w ≤ ℓ_ref,w]), +β·σ(−u)).

    These are (∂L/∂ℓ_w, ∂L/∂ℓ_l), with u = β·(h − λ·max(0, ℓ_ref,w − ℓ_w)) DPOP's argument.
    Against eq. (41) the one change is the factor 1 + λ on the chosen side where
    π_θ(y_w) ≤ π_ref(y_w) (the kink counted in, as in `dpop_loss`): there ℓ_w is pushed up
    1 + λ times as hard as ℓ_l is pushed down.
    """
    beta = check_beta(beta)
    lam = check_weight("lam", lam, "DPOP's λ")
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    below = (policy_chosen_logps <= ref_chosen_logps).to(h.dtype)  # 1 where the penalty is active
    u = beta * (h - lam * torch.clamp(ref_chosen_logps - policy_chosen_logps, min=0.0))
    weight = beta * torch.sigmoid(-u)
    return -weight * (1 + lam * below), weight


def rpo_logprob_gradients(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
    chosen_lengths, beta: float, alpha: float,
):
    """Pang et al. 2024, DPO + NLL differentiated: ∂L/∂ℓ_w = −β·σ(−z) − α/|y_w|, ∂L/∂ℓ_l = β·σ(−z).

    Against eq. (41) the chosen side gets an extra pull α/|y_w| that does not fade with the margin
    (σ(−z) → 0 leaves it on): the NLL keeps raising ℓ_w after the pair is ordered.
    """
    beta, alpha, lengths = _rpo_checked(policy_chosen_logps, chosen_lengths, beta, alpha)
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    weight = beta * torch.sigmoid(-beta * h)
    return -weight - alpha / lengths, weight
