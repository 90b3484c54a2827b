"""The DPO family's losses on eq. (38)'s log-probs (DPO, cDPO, rDPO, IPO, hinge, SimPO, ORPO, KTO)
and the closed-form optima of IPO and SimPO.
"""

import math

import torch
import torch.nn.functional as F

from chapters.ch3_kl_optimum.optimum import optimal_policy
from chapters.ch4_dpo.loss import dpo_loss

KINDS = ("dpo", "cdpo", "rdpo", "ipo", "hinge", "simpo")


# --------------------------------------------------------------------------- the losses
def _check(beta, label_smoothing=0.0):
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing (a flip rate ε) must be in [0, 0.5), got {label_smoothing}"
        )


def preference_loss(
    kind: str,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> torch.Tensor:
    """Report eq. (38) and its family, per example, from the log-probs of eq. (38) (summed over
    tokens).

    With h = log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x) and z = β·h:
    - "dpo": eq. (38), −log σ(z) (`chapters.ch4_dpo.dpo_loss`).
    - "cdpo": Mitchell (2023), "A note on DPO with noisy preferences & relationship to IPO",
      conservative DPO: −(1 − ε)·log σ(z) − ε·log σ(−z), eq. (38) with each label flipped with
      probability ε (ε = label_smoothing).
    - "rdpo": Chowdhury, Kini & Natarajan (2024), arXiv:2403.00409, the robust DPO loss (its
      equation number is not checked here): [−(1 − ε)·log σ(z) + ε·log σ(−z)] / (1 − 2ε), unbiased
      for eq. (38) under flips at rate ε.
    - "ipo": Azar et al. (2023), eq. (17), with τ = β: (h − 1/(2β))².
    - "hinge": Zhao et al. (2023), SLiC-HF's rank calibration loss max(0, δ − log π(y_w|x) + log
      π(y_l|x)), here on log-ratios with δ = 1/β and scaled by β (as Liu et al. 2024, RSO, and TRL
      write it): max(0, 1 − z).
    - "simpo": Meng, Xia & Chen (2024), eq. (6): −log σ(β·log π(y_w|x)/|y_w| − β·log π(y_l|x)/|y_l|
      − γ). Here the two policy arguments ARE the length-normalised (per-token mean) log-probs; the
      reference arguments are ignored (pass anything broadcastable, e.g. zeros).
    Returns the per-example losses; every argument broadcasts.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    _check(beta, label_smoothing)
    if label_smoothing and kind not in ("cdpo", "rdpo"):
        raise ValueError(
            f"label_smoothing is used only by 'cdpo' and 'rdpo', got {label_smoothing} for {kind!r}"
        )
    if gamma and kind != "simpo":
        raise ValueError(f"gamma is used only by 'simpo', got {gamma} for {kind!r}")
    if kind == "dpo":
        return dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
        )
    if kind == "simpo":
        return -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    z, eps = beta * h, label_smoothing
    if kind == "cdpo":
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if kind == "rdpo":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return torch.relu(1 - z)  # hinge


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(a)) for a < 0, stable at both ends (Mächler's switch at a = −log 2)."""
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def orpo_loss(
    policy_chosen_logps, policy_rejected_logps, lam: float, chosen_nll=None
) -> torch.Tensor:
    """Hong, Lee & Thorne (2024), ORPO eqs. (6)–(7): L_SFT + λ·L_OR, L_OR = −log σ(log
    odds(y_w|x)/odds(y_l|x)).

    odds(y|x) = P(y|x)/(1 − P(y|x)) (eq. (4)) with P(y|x) the length-normalised likelihood of eq.
    (3): the two log-prob arguments are per-token MEAN log-probs, each < 0. L_SFT (eq. (2)) is the
    chosen response's NLL; by default −policy_chosen_logps, its per-token mean (pass `chosen_nll`
    for another one, e.g. TRL's, which also counts the prompt tokens). No reference model. Returns
    per-example losses.
    """
    if lam < 0:
        raise ValueError(f"lam (ORPO's λ) must be >= 0, got {lam}")
    if (torch.as_tensor(policy_chosen_logps) >= 0).any() or (
        torch.as_tensor(policy_rejected_logps) >= 0
    ).any():
        raise ValueError(
            "ORPO's odds need per-token mean log-probs < 0 (a probability of 1 has infinite odds)"
        )
    log_odds = (policy_chosen_logps - log1mexp(policy_chosen_logps)) - (
        policy_rejected_logps - log1mexp(policy_rejected_logps)
    )
    nll = -policy_chosen_logps if chosen_nll is None else chosen_nll
    return nll - lam * F.logsigmoid(log_odds)


def kto_reference_point(mismatched_policy_logps, mismatched_ref_logps) -> torch.Tensor:
    """Ethayarajh et al. (2024), KTO: z₀ = max(0, mean log π(y'|x)/π_ref(y'|x)) over mismatched (x,
    y') pairs.

    A batch estimate of KL(π‖π_ref), detached: the paper (and TRL) do not back-propagate through z₀.
    """
    return (mismatched_policy_logps - mismatched_ref_logps).mean().detach().clamp(min=0.0)


def kto_loss(
    policy_logps,
    ref_logps,
    desirable,
    beta: float,
    z0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Ethayarajh et al. (2024), the KTO loss L_KTO = E[λ_y − v(x, y)] (arXiv:2402.01306), per
    example.

    Unpaired examples: `desirable` (bool, per example) says whether y is a desirable answer to x.
    With
    r = log π(y|x)/π_ref(y|x) and the reference point z₀ (`kto_reference_point`, a number or a 0-d
    tensor),
    v = λ_D·σ(β(r − z₀)) for desirable y, λ_U·σ(β(z₀ − r)) for undesirable y, and λ_y is λ_D or λ_U.
    (The equation number differs between the paper's versions: (7) in the one TRL cites, (8) in
    another.)
    """
    _check(beta)
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(
            f"KTO's weights must be >= 0, got {desirable_weight}, {undesirable_weight}"
        )
    r = policy_logps - ref_logps
    desirable = torch.as_tensor(desirable, dtype=torch.bool)
    value = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(beta * (r - z0)),
        undesirable_weight * torch.sigmoid(beta * (z0 - r)),
    )
    return torch.where(desirable, desirable_weight, undesirable_weight) - value


# ----------------------------------------------------------------------- what each one converges to
def ipo_optimal_policy(pi_ref: torch.Tensor, win_prob: torch.Tensor, beta: float) -> torch.Tensor:
    """Azar et al. (2023): IPO's population minimiser, ΨPO with Ψ = identity: π ∝ π_ref·exp(p*(y ≻
    μ)/τ).

    μ = π_ref draws the pairs, p*(y ≻ μ) = Σ_y' π_ref(y')·p*(y ≻ y'), τ = β: eq. (36) with the
    bounded reward p*(y ≻ π_ref) ∈ [0, 1] in place of r*. win_prob (X, Y, Y) is p*(y ≻ y'), ½ on the
    diagonal.
    """
    return optimal_policy(pi_ref, (pi_ref[:, None, :] * win_prob).sum(-1), beta)


def simpo_optimal_policy(rewards: torch.Tensor, lengths: torch.Tensor, beta: float) -> torch.Tensor:
    """Meng et al. (2024), eq. (6) at γ = 0, its population minimiser on BT(r*) pairs: π(y|x) =
    exp(|y|·(r*(x, y) + c(x))/β).

    Each pair is at its own optimum when β·log π(y)/|y| = r*(y) + c(x) (BT is fitted exactly); c(x)
    makes Σ_y π(y|x) = 1, found by bisection. No π_ref anywhere: the optimum is reference-free and
    length-scaled.
    """
    scaled = lengths.to(rewards.dtype) / beta  # (Y,)
    lo = torch.full(rewards.shape[:-1], -1e3, dtype=rewards.dtype)  # (X,)
    hi = torch.full_like(lo, 1e3)
    for _ in range(100):  # log Σ_y exp(|y|(r* + c)/β) rises with c: bisect to float64 precision
        mid = (lo + hi) / 2
        above = torch.logsumexp(scaled * (rewards + mid[..., None]), -1) > 0
        lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
    return torch.exp(scaled * (rewards + lo[..., None]))
