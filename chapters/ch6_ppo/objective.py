"""PPO's loss pieces (report eqs. (1)–(5)): masked means, GAE, whitening, the clipped surrogate, the
value loss, the entropy bonus, the combined objective, and the k1/k3 KL estimators. Pure functions
on per-token tensors (last axis = time).
"""

import torch

# ------------------------------------------------------------------------------------------------
# The loss pieces, eqs. (1)–(5): pure functions, per token, last axis = time
# ------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of `x` over the positions where `mask` is 1 (all positions when mask is None)."""
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    lam: float,
    mask: torch.Tensor | None = None,
    last_value: torch.Tensor | None = None,
):
    """Report eq. (5): A_t = Σ_{l=0}^{T−t−1} (γλ)^l δ_{t+l}, δ_t = r_t + γ·V(s_{t+1}) − V(s_t).

    rewards, values: (..., T). The episode ends after the last step (V(s_T) = 0), or, with `mask`
    (..., T) of 1s followed by 0s, after its last 1; masked positions get advantage 0 and return 0.
    A segment cut off before its episode ends (the report's fixed-length T) bootstraps from
    `last_value` (...,) = V(s_T), the value of the state after its last step; rows whose mask ends
    before T ended there and ignore it. Computed by the backward recursion A_t = δ_t + γλ·A_{t+1}.
    Returns (advantages, returns), the returns being A_t + V(s_t) (the TD(λ) return, the value
    target of eq. (2)), both (..., T).
    """
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma} and {lam}")
    if values.shape != rewards.shape or (mask is not None and mask.shape != rewards.shape):
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and the mask must have "
            f"one shape (..., T)"
        )
    mask = torch.ones_like(rewards) if mask is None else mask.to(rewards.dtype)
    next_mask = torch.cat(
        [mask[..., 1:], torch.zeros_like(mask[..., :1])], dim=-1
    )  # (..., T): s_{t+1} in the segment
    after_last = torch.zeros_like(values[..., :1])  # (..., 1): V(s_T), 0 once the episode has ended
    if last_value is not None:  # cut off: bootstrap where the row still runs at the last step
        after_last = torch.as_tensor(last_value, dtype=values.dtype)[..., None] * mask[..., -1:]
    next_values = torch.cat(
        [values[..., 1:] * mask[..., 1:], after_last], dim=-1
    )  # (..., T): V(s_{t+1})
    deltas = (rewards + gamma * next_values - values) * mask  # (..., T)
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[..., 0])  # A_{t+1}, (...)
    for t in reversed(range(rewards.shape[-1])):
        running = deltas[..., t] + gamma * lam * next_mask[..., t] * running
        advantages[..., t] = running
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the positions where `mask` is 1 (population variance); masked positions
    become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if mask is None else out * mask.to(x.dtype)


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float
):
    """Report eq. (1): min(r_t(θ)·A_t, clip(r_t(θ), 1 − ε, 1 + ε)·A_t), r_t(θ) = π_θ(a_t|s_t) /
    π_θold(a_t|s_t), per token.

    The expectation of eq. (1) is `masked_mean` of this. Its gradient is zero where the clip binds
    (r > 1 + ε with A > 0, r < 1 − ε with A < 0) and is the unclipped ∇(r·A) elsewhere.
    """
    ratio = torch.exp(logp - old_logp)
    return torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    old_values: torch.Tensor | None = None,
    clip_eps: float | None = None,
) -> torch.Tensor:
    """Report eq. (2): (V_θ(s_t) − V_t^target)², per token; with `old_values` and `clip_eps`, the
    clipped variant.

    Clipped (as in OpenAI's baselines and RLHF code): max((V − R)², (V_old + clip(V − V_old, −ε, ε)
    − R)²), which stops the value moving further than ε from the value at sampling time in one
    round.
    """
    loss = (values - returns) ** 2
    if clip_eps is None or old_values is None:
        return loss
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return torch.maximum(loss, (clipped - returns) ** 2)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Report eq. (3)'s H(π_θ) = −Σ_a π_θ(a|s) log π_θ(a|s), over the last axis of `logits` (..., A)
    -> (...)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def ppo_objective(
    surrogate, value_losses, entropies, mask=None, vf_coef: float = 0.5, ent_coef: float = 0.0
):
    """Report eq. (4), signs corrected: L = E[L^CLIP] − c1·E[L^V] + c2·E[H], to MAXIMISE (minimise
    −L).

    The report writes L^H = E[−β·H] (eq. (3)) and adds it with +c2, so maximising L would lower the
    entropy, the opposite of the "entropy bonus" it describes; PPO (Schulman et al. 2017, equation 9
    of their paper) adds +c2·H. The report also calls L a loss to minimise; minimising it would
    lower the surrogate and raise the value error. L is an objective; the trainer minimises −L. All
    three inputs are per token (..., T) and averaged over `mask`.
    """
    return (
        masked_mean(surrogate, mask)
        - vf_coef * masked_mean(value_losses, mask)
        + ent_coef * masked_mean(entropies, mask)
    )


# ------------------------------------------------------------------------------------------------
# KL estimators (the RLHF reward of eq. (28) is chapters.ch3_kl_optimum.rlhf_token_rewards)
# ------------------------------------------------------------------------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π(a) − log π_ref(a), for a ~ π: an unbiased, sometimes negative, estimate of KL(π ‖
    π_ref)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (ρ − 1) − log ρ with ρ = π_ref(a)/π(a), for a ~ π: unbiased for KL(π ‖ π_ref) and never
    negative."""
    log_rho = ref_logp - logp
    return torch.expm1(log_rho) - log_rho
