"""Eq. (38) from the probabilities' side: Feng et al.'s gradient asymmetry, and the first step."""

import torch

from chapters.ch4_dpo import dpo_loss
from chapters.ch11_dpo_pitfalls.validation import check_beta, check_broadcast


def probability_gradients(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    """Report eq. (38) differentiated in the probabilities (Feng et al. 2024, arXiv 2404.04626).

    With z = β·(log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l)) and ∂L/∂z = −σ(−z):
        ∂L/∂π(y_w) = −β·σ(−z) / π(y_w),     ∂L/∂π(y_l) = +β·σ(−z) / π(y_l),
    so |∂L/∂π(y_l)| / |∂L/∂π(y_w)| = π(y_w)/π(y_l). Once the rejected response is the less likely
    one, the loss is far more sensitive to π(y_l) than to π(y_w): it falls mostly by pushing π(y_l)
    toward 0, and asks little of π(y_w). All four arguments are probabilities in (0, 1]
    (a sequence's probability underflows float32 past ~87 nats: use float64).
    Returns (∂L/∂π(y_w), ∂L/∂π(y_l)), per example.
    """
    beta = check_beta(beta)
    check_broadcast(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
    for name, p in (
        ("pi_chosen", pi_chosen),
        ("pi_rejected", pi_rejected),
        ("ref_chosen", ref_chosen),
        ("ref_rejected", ref_rejected),
    ):
        if not bool(((p > 0) & (p <= 1)).all()):
            raise ValueError(
                f"{name} must hold probabilities in (0, 1], got a value outside; "
                "pass exp(log-prob), in float64 for long responses"
            )
    z = beta * (
        (torch.log(pi_chosen) - torch.log(ref_chosen))
        - (torch.log(pi_rejected) - torch.log(ref_rejected))
    )
    weight = beta * torch.sigmoid(-z)
    return -weight / pi_chosen, weight / pi_rejected


def step_readings(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float
) -> dict:
    """Report eq. (38) as a trainer logs it (batch means): loss, margin z, accuracy, ∂L/∂ℓ_w.

    At the first step π_θ = π_ref, so every margin z = β·h is exactly 0: the loss reads
    −log σ(0) = ln 2 = 0.6931…, the accuracy (the share of pairs with z > 0, ties counted wrong)
    reads exactly 0, and ∂L/∂ℓ_w = −β·σ(0) = −β/2. That is the right start, not a bug. A run that
    still reads ln 2 and 0 after many steps has a policy that equals its reference: a reference
    computed by the same live model, an optimiser with no trainable parameter or lr = 0, or
    detached policy log-probs. Returns {"loss", "margin", "accuracy", "chosen_gradient"} (floats).
    """
    beta = check_beta(beta)
    check_broadcast(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    z = beta * (
        (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    )
    loss = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return {
        "loss": loss.mean().item(),
        "margin": z.mean().item(),
        "accuracy": (z > 0).double().mean().item(),  # strict: a tie is not a correct ordering
        "chosen_gradient": (-beta * torch.sigmoid(-z)).mean().item(),
    }
