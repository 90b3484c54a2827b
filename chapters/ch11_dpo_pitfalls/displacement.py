"""Likelihood displacement: a gradient step on eq. (38) can lower log π(y_w|x) while the loss falls.

Exactly, on a softmax policy with shared features: logits = Φθ, Φ (Y, d) with one feature row φ_y
per response, so ∇_θ log π_θ(y) = φ_y − E_{y'∼π_θ}[φ_y'] (`FeaturePair.scores`). When y_w and y_l
have alike features, pushing y_l down drags y_w down too, and the mass goes to a third response.
On a language model, `ches_score` (Razin et al. 2024) measures that likeness from hidden states.
"""

import math
from dataclasses import dataclass

import torch

from chapters.ch4_dpo import dpo_loss
from chapters.ch11_dpo_pitfalls.losses import (
    dpo_logprob_gradients,
    dpop_logprob_gradients,
    dpop_loss,
    rpo_logprob_gradients,
    rpo_loss,
)
from chapters.ch11_dpo_pitfalls.validation import check_beta

# each kind's loss and its (∂L/∂ℓ_w, ∂L/∂ℓ_l) in closed form, which take the same arguments
FORMS = {
    "dpo": (dpo_loss, dpo_logprob_gradients),
    "dpop": (dpop_loss, dpop_logprob_gradients),
    "rpo": (rpo_loss, rpo_logprob_gradients),
}
KINDS = tuple(FORMS)


def first_order_chosen_change(
    grad_chosen, grad_rejected, dloss_dchosen, dloss_drejected, lr: float
):
    """Report eq. (41), first order: Δ log π(y_w) ≈ −η·(a_w·‖g_w‖² + a_l·⟨g_w, g_l⟩), θ ← θ − η∇L.

    g_w = ∇_θ log π(y_w|x), g_l = ∇_θ log π(y_l|x) (..., P); a_w = ∂L/∂ℓ_w, a_l = ∂L/∂ℓ_l (...,),
    from the `*_logprob_gradients` functions. ∇_θL = a_w·g_w + a_l·g_l and, to first order,
    Δℓ_w = ⟨g_w, −η·∇_θL⟩. For DPO a_w = −β·σ(−z) = −a_l, so Δℓ_w ≈ η·β·σ(−z)·⟨g_w, g_w − g_l⟩:
    negative whenever ⟨g_w, g_l⟩ > ‖g_w‖² (alike gradients, g_l the longer along g_w).
    Returns (...,).
    """
    gw_gw = (grad_chosen * grad_chosen).sum(-1)  # (..., P) -> (...,)
    gw_gl = (grad_chosen * grad_rejected).sum(-1)  # (..., P) -> (...,)
    return -lr * (dloss_dchosen * gw_gw + dloss_drejected * gw_gl)


@dataclass(frozen=True, eq=False)
class FeaturePair:
    """One pair y_w ≻ y_l under a softmax policy with shared features, π_θ = softmax(Φθ), θ (d,).

    features (Y, d): φ_y, one row per response; ref_logps (Y,): log π_ref(y); chosen, rejected:
    indices into Y; chosen_length: |y_w| in tokens, used by RPO's per-token NLL only.
    """

    features: torch.Tensor
    ref_logps: torch.Tensor
    chosen: int
    rejected: int
    chosen_length: float = 1.0

    def logprobs(self, theta: torch.Tensor) -> torch.Tensor:
        """log π_θ(y) = φ_yᵀθ − log Σ_y' exp(φ_y'ᵀθ). Returns (Y,)."""
        return torch.log_softmax(self.features @ theta, dim=-1)  # (Y, d) @ (d,) -> (Y,)

    def scores(self, theta: torch.Tensor) -> torch.Tensor:
        """∇_θ log π_θ(y) = φ_y − E_{y'∼π_θ}[φ_y'], in closed form. Returns (Y, d)."""
        pi = torch.softmax(self.features @ theta, dim=-1)  # (Y,)
        return self.features - pi @ self.features  # (Y, d) − (d,) -> (Y, d)

    def _args(self, theta):
        lp, ref = self.logprobs(theta), self.ref_logps
        return lp[self.chosen], lp[self.rejected], ref[self.chosen], ref[self.rejected]

    def loss(self, theta, beta: float, kind: str = "dpo", weight: float = 0.0) -> torch.Tensor:
        """The loss at θ (0-d): eq. (38), DPOP with λ = weight, or DPO + NLL with α = weight."""
        inputs = self._inputs(theta, beta, kind, weight)  # checks `kind` first
        return FORMS[kind][0](*inputs)

    def logprob_gradients(self, theta, beta: float, kind: str = "dpo", weight: float = 0.0):
        """(∂L/∂ℓ_w, ∂L/∂ℓ_l) at θ in closed form (the `losses` module's formulas), each 0-d."""
        inputs = self._inputs(theta, beta, kind, weight)
        return FORMS[kind][1](*inputs)

    def _inputs(self, theta, beta, kind, weight):
        """What `kind`'s loss and gradients take at θ: the four log-probs, then |y_w| for RPO, β,
        and λ or α for DPOP and RPO."""
        _check_kind(kind, weight)
        args = self._args(theta)
        if kind == "dpop":
            return (*args, beta, weight)
        if kind == "rpo":
            return (*args, torch.tensor(self.chosen_length, dtype=args[0].dtype), beta, weight)
        return (*args, beta)


def _check_kind(kind, weight):
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "dpo" and weight:
        raise ValueError(f"weight is λ for 'dpop', α for 'rpo'; 'dpo' takes none, got {weight!r}")


def displacement_example(dtype: torch.dtype = torch.float64) -> tuple:
    """A pair whose chosen log-prob falls under DPO: y_w, y_l with alike features, y_l the larger.

    Four responses, two features, π_ref uniform (θ_ref = 0), |y_w| = 10 tokens. φ_w = (1.0, 0.3)
    and φ_l = (1.2, 0.2): every DPO step moves θ along −(φ_w − φ_l) = (−0.2, 0.1), which lowers
    both their logits against the fourth response's, φ = (−0.5, 0.4); the mass goes there.
    Returns (pair, θ_ref (2,)).
    """
    rows = [[1.0, 0.3], [1.2, 0.2], [0.0, 0.0], [-0.5, 0.4]]  # φ_w, φ_l, and two other responses
    features = torch.tensor(rows, dtype=dtype)  # (Y=4, d=2)
    ref_logps = torch.full((4,), -math.log(4.0), dtype=dtype)  # (Y,): π_ref = softmax(Φ·0)
    pair = FeaturePair(features, ref_logps, chosen=0, rejected=1, chosen_length=10.0)
    return pair, torch.zeros(2, dtype=dtype)


def predicted_chosen_change(
    pair: FeaturePair, theta, beta: float, lr: float, kind: str = "dpo", weight: float = 0.0
) -> torch.Tensor:
    """Report eq. (41), first order: the change of log π(y_w) after one step of size η (0-d).

    From the closed-form scores φ_y − E_π[φ] and closed-form (∂L/∂ℓ_w, ∂L/∂ℓ_l); no autograd.
    """
    g = pair.scores(theta)  # (Y, d)
    a_w, a_l = pair.logprob_gradients(theta, beta, kind, weight)
    return first_order_chosen_change(g[pair.chosen], g[pair.rejected], a_w, a_l, lr)


def gradient_step(
    pair: FeaturePair, theta, beta: float, lr: float, kind: str = "dpo", weight: float = 0.0
) -> torch.Tensor:
    """One real step of gradient descent, θ − η·∇_θL(θ), the gradient by autograd. Returns (d,)."""
    flat = theta.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(pair.loss(flat, beta, kind, weight), flat)  # (d,)
    return theta.detach() - lr * grad


def realised_chosen_change(
    pair: FeaturePair, theta, beta: float, lr: float, kind: str = "dpo", weight: float = 0.0
):
    """What one real step does: (Δ log π(y_w), Δ loss), each 0-d, from θ to `gradient_step`'s θ'."""
    new = gradient_step(pair, theta, beta, lr, kind, weight)
    with torch.no_grad():
        d_chosen = pair.logprobs(new)[pair.chosen] - pair.logprobs(theta)[pair.chosen]
        d_loss = pair.loss(new, beta, kind, weight) - pair.loss(theta, beta, kind, weight)
    return d_chosen, d_loss


def descent_path(
    pair: FeaturePair,
    theta,
    beta: float,
    lr: float,
    steps: int,
    kind: str = "dpo",
    weight: float = 0.0,
) -> dict:
    """`steps` real gradient steps from θ, recording log π(y_w), log π(y_l) and the loss.

    Returns {"chosen", "rejected", "loss"}, each (steps + 1,): before every step and after the
    last; and "theta" (d,), where the path ends.
    """
    chosen, rejected, losses = [], [], []
    for step in range(steps + 1):
        with torch.no_grad():
            lp = pair.logprobs(theta)
            chosen.append(lp[pair.chosen])
            rejected.append(lp[pair.rejected])
            losses.append(pair.loss(theta, beta, kind, weight))
        if step < steps:
            theta = gradient_step(pair, theta, beta, lr, kind, weight)
    return {
        "chosen": torch.stack(chosen),
        "rejected": torch.stack(rejected),
        "loss": torch.stack(losses),
        "theta": theta,
    }


def smallest_fix(pair: FeaturePair, theta, beta: float, kind: str) -> float:
    """The smallest λ ("dpop") or α ("rpo") whose first-order change of log π(y_w) at θ is ≥ 0.

    With g_w, g_l the scores of y_w, y_l and c = ⟨g_w, g_l⟩/‖g_w‖² − 1 (> 0 exactly when DPO
    displaces): DPOP's step gives Δℓ_w ≈ η·β·σ(−u)·‖g_w‖²·(λ − c) while its penalty is active
    (π_θ(y_w) ≤ π_ref(y_w)), so λ* = c; where π_θ(y_w) > π_ref(y_w) DPOP is DPO and no λ helps
    (inf). DPO + NLL gives Δℓ_w ≈ η·‖g_w‖²·(α/|y_w| − β·σ(−z)·c), so α* = |y_w|·β·σ(−z)·c.
    0 where DPO does not displace.
    """
    if kind not in ("dpop", "rpo"):
        raise ValueError(f"kind must be 'dpop' or 'rpo' (the two fixes), got {kind!r}")
    beta = check_beta(beta)
    g = pair.scores(theta)  # (Y, d)
    g_w, g_l = g[pair.chosen], g[pair.rejected]
    c = float((g_w @ g_l) / (g_w @ g_w)) - 1.0
    if c <= 0:
        return 0.0
    chosen, rejected, ref_chosen, ref_rejected = pair._args(theta)
    if kind == "dpop":
        return c if bool(chosen <= ref_chosen) else math.inf
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    return pair.chosen_length * beta * float(torch.sigmoid(-beta * h)) * c


def ches_score(
    chosen_hidden: torch.Tensor,
    rejected_hidden: torch.Tensor,
    chosen_mask: torch.Tensor = None,
    rejected_mask: torch.Tensor = None,
) -> torch.Tensor:
    """Razin et al. 2024 (arXiv 2410.08847), CHES: ⟨Σ_k h⁺_k, Σ_k' h⁻_k'⟩ − ‖Σ_k h⁺_k‖², per pair.

    chosen_hidden (..., T_w, d), rejected_hidden (..., T_l, d): the model's last hidden states
    (those the unembedding multiplies, after GPT-2's final layer norm) at the positions whose next
    token is a response token. h_{x, y<k} predicts y_k, so for a causal LM that is the response
    mask shifted left by one, as `chapters.ch4_dpo.response_logprobs` shifts it. chosen_mask
    (..., T_w), rejected_mask (..., T_l): true at those positions (any padding side); None: all
    count. A high CHES means the chosen response's summed embedding is alike the rejected one's:
    the pairs where DPO displaces most. Returns (...,).
    """
    if (
        chosen_hidden.dim() < 2
        or rejected_hidden.dim() < 2
        or chosen_hidden.shape[-1] != rejected_hidden.shape[-1]
    ):
        raise ValueError(
            f"hidden states must be (..., T, d) with one d, got "
            f"{tuple(chosen_hidden.shape)} and {tuple(rejected_hidden.shape)}"
        )
    sums = []
    for name, hidden, mask in (
        ("chosen", chosen_hidden, chosen_mask),
        ("rejected", rejected_hidden, rejected_mask),
    ):
        if mask is None:
            sums.append(hidden.sum(-2))  # (..., T, d) -> (..., d)
            continue
        if tuple(mask.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"{name}_mask must be (..., T) = {tuple(hidden.shape[:-1])}, got "
                f"{tuple(mask.shape)}; give one flag per hidden state"
            )
        if not bool(mask.bool().any(-1).all()):
            raise ValueError(
                f"{name}_mask has a row with no response position; each response needs >= 1 token"
            )
        sums.append((hidden * mask[..., None].to(hidden.dtype)).sum(-2))  # (..., T, d) -> (..., d)
    chosen_sum, rejected_sum = sums
    try:
        cross = (chosen_sum * rejected_sum).sum(-1)  # (..., d) -> (...,)
    except RuntimeError:
        raise ValueError(
            f"the hidden states' leading dims do not broadcast: "
            f"{tuple(chosen_hidden.shape)} and {tuple(rejected_hidden.shape)}; "
            "give both as (B, T, d)"
        ) from None
    return cross - (chosen_sum * chosen_sum).sum(-1)
