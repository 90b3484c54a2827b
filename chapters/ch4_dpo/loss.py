"""The DPO loss and what it is made of (report eqs. (38)–(41)): response log-probs, the loss,
Plackett–Luce DPO, the gradient, the implicit reward, and DPO on a tabular problem, whose minimiser
is eq. (36)'s π*.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

import gpt
from chapters.common.newton import newton_minimise


# -------------------------------------------------------------------------- log-probs of a response
def response_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    per_token_mean: bool = False,
) -> torch.Tensor:
    """Report eq. (38)'s log π(y | x) = Σ_t log π(y_t | x, y_<t), over the tokens where
    `response_mask` is true.

    logits (B, T, V) are the model's outputs for input_ids (B, T); response_mask (B, T) is aligned
    with input_ids. The token at position t is predicted by the logits at t − 1, hence the shift by
    one. Prompt and padding tokens are left out by the mask. Returns (B,).

    per_token_mean=True divides by the number of response tokens. That is no longer log π(y|x): in
    eq. (38) it acts as a per-response β/|y|, the optimum becomes π_ref·exp(|y|·(r/β + c(x)))
    instead of π*, and long responses move further from π_ref than short ones
    (`fit_tabular_dpo(lengths=...)`).
    """
    if (
        logits.dim() != 3
        or input_ids.shape != response_mask.shape
        or logits.shape[:2] != input_ids.shape
    ):
        raise ValueError(
            f"shapes disagree: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"response_mask {tuple(response_mask.shape)}; want (B, T, V), (B, T), (B, T)"
        )
    if input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be token ids of dtype torch.long, got {input_ids.dtype}")
    gpt.model.check_token_ids(input_ids, logits.shape[-1], whose="the logits'")
    if response_mask[:, 0].any():
        raise ValueError(
            "response_mask marks position 0, which no logits predict; put the prompt (or a BOS) "
            "first"
        )
    dtype = torch.promote_types(
        logits.dtype, torch.float32
    )  # float32 for GPT-2, float64 stays float64
    logp = torch.log_softmax(
        logits[:, :-1].to(dtype), dim=-1
    )  # (B, T-1, V): predicts tokens 1..T-1
    token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    mask = response_mask[:, 1:].bool()  # (B, T-1)
    total = torch.where(mask, token_logp, 0.0).sum(-1)  # (B,)
    if not per_token_mean:
        return total
    if not mask.any(-1).all():
        raise ValueError(
            "a row has no response tokens, so it has no per-token mean; drop it or mark its "
            "response"
        )
    return total / mask.sum(-1)


def unshifted_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The report authors' log-prob (their `get_log_prob`): log_softmax(logits_t)[token_t], NO
    shift. Returns (B,).

    The logits at t have already read token t, so this scores each token with a model that saw it:
    it is not log π(y | x) and, summed over all responses, exp of it is not 1. Kept to show the
    mistake.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    token_logp = logp.gather(-1, input_ids[..., None]).squeeze(-1)  # (B, T)
    return torch.where(mask.bool(), token_logp, 0.0).sum(-1)  # (B,)


def logprob_by_prefixes(model, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Report eq. (38)'s log π(y | x) by definition, Σ_t log π(y_t | x, y_<t): one forward pass per
    prefix (slow)."""
    total = 0.0
    for t in range(len(response)):
        prefix = torch.cat([prompt, response[:t]])[None]  # (1, |x| + t)
        total = total + torch.log_softmax(model(prefix)[0, -1].float(), dim=-1)[response[t]]
    return total


# ------------------------------------------------------------------------- the loss, eqs. (38)–(40)
def implicit_reward(policy_logps, ref_logps, beta: float):
    """Report §4.4: r̂_θ(x, y) = β·log π_θ(y|x)/π_ref(y|x), the reward the policy implicitly
    defines.
    """
    if not (isinstance(beta, (int, float)) and 0 < beta < math.inf):
        raise ValueError(
            f"beta must be a finite number > 0 (the KL weight of eq. (27)), got {beta!r}"
        )
    return beta * (policy_logps - ref_logps)


def dpo_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float
):
    """Report eq. (38): −log σ(β·log π(y_w|x)/π_ref(y_w|x) − β·log π(y_l|x)/π_ref(y_l|x)), per
    example.

    F.logsigmoid is −softplus(−z): finite for any margin z (±1e4 included), unlike log(sigmoid(z)).
    """
    try:
        chosen = implicit_reward(policy_chosen_logps, ref_chosen_logps, beta)  # r̂(x, y_w)
        rejected = implicit_reward(policy_rejected_logps, ref_rejected_logps, beta)  # r̂(x, y_l)
        return -F.logsigmoid(chosen - rejected)
    except RuntimeError as e:  # shapes that do not broadcast
        raise ValueError(
            f"the four log-probs do not broadcast ({e}); give each as (B,), one per pair"
        ) from None


def plackett_luce_dpo_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float
) -> torch.Tensor:
    """Report eq. (40): −log Π_k exp(r̂(y_τ(k))) / Σ_{j≥k} exp(r̂(y_τ(j))), with r̂ = β·log
    π_θ/π_ref.

    policy_logps, ref_logps (B, K): column k holds the response ranked k-th (most preferred first).
    The summand is eq. (39)'s second line, where Z(x) has cancelled. Returns (B,).
    """
    if (
        policy_logps.shape != ref_logps.shape
        or policy_logps.dim() != 2
        or policy_logps.shape[1] < 2
    ):
        raise ValueError(
            f"want (B, K) log-probs with K >= 2 in ranked order; got {tuple(policy_logps.shape)} "
            f"and {tuple(ref_logps.shape)}"
        )
    r = implicit_reward(policy_logps, ref_logps, beta)  # (B, K)
    tail_lse = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)  # (B, K): log Σ_{j≥k} exp r̂_j
    return -(r - tail_lse).sum(-1)  # (B,)


def dpo_metrics(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float
) -> dict:
    """Report eq. (38) and §4.4's r̂, as a trainer logs them (batch means): loss, r̂(y_w), r̂(y_l),
    margin, accuracy."""
    chosen = implicit_reward(policy_chosen_logps, ref_chosen_logps, beta)
    rejected = implicit_reward(policy_rejected_logps, ref_rejected_logps, beta)
    loss = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return {
        "loss": loss.mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).double().mean().item(),  # ties count as wrong
    }


# --------------------------------------------------------------------------- the gradient, eq. (41)
def dpo_gradient(
    grad_chosen_logps,
    grad_rejected_logps,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta: float,
) -> torch.Tensor:
    """Report eq. (41): ∇_θ L = −β·mean[σ(r̂(y_l) − r̂(y_w))·(∇_θ log π(y_w|x) − ∇_θ log π(y_l|x))].

    grad_*_logps (B, P): per-example gradients of log π(y|x) w.r.t. the P parameters; the rest are
    (B,). Returns (P,), the gradient of the batch mean of eq. (38).
    """
    weight = torch.sigmoid(
        implicit_reward(policy_rejected_logps, ref_rejected_logps, beta)
        - implicit_reward(policy_chosen_logps, ref_chosen_logps, beta)
    )  # (B,): large when misordered
    return -beta * (weight[:, None] * (grad_chosen_logps - grad_rejected_logps)).mean(0)  # (P,)


# ----------------------------------------------------------------------- the central claim, tabular
def preference_probabilities(pi_ref: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Report §4.4 step 1 with eq. (16): P(x, y_w, y_l) of a data row, BT labels on y1 ≠ y2 ~
    π_ref(·|x).

    x is uniform; y1 ≻ y2 with probability σ(r*(x, y1) − r*(x, y2)).

    pi_ref, rewards (X, Y). Returns (X, Y, Y), summing to 1: the infinite-data limit of a data set's
    counts.
    """
    pair = pi_ref[:, :, None] * pi_ref[:, None, :]  # (X, Y, Y): y1, y2 iid from π_ref
    pair = pair * (
        1 - torch.eye(pi_ref.shape[1], dtype=pi_ref.dtype)
    )  # drop y1 = y2 (no preference to state)
    pair = pair / pair.sum((1, 2), keepdim=True)
    win = torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])  # (X, Y, Y): P(y_w ≻ y_l)
    # (y_w, y_l) arises as (y1, y2) with y1 winning or as (y2, y1) with y2 winning; pair is
    # symmetric
    return 2 * pair * win / pi_ref.shape[0]


def preference_counts(probs: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """How often each (x, y_w, y_l) occurs among n rows drawn from `probs`: all the DPO loss needs
    of a data set."""
    counts = np.random.default_rng(seed).multinomial(n, probs.flatten().numpy())
    return torch.from_numpy(counts).to(probs.dtype).reshape(probs.shape)


def tabular_dpo_loss(
    theta: torch.Tensor,
    pi_ref: torch.Tensor,
    weights: torch.Tensor,
    beta: float,
    lengths: torch.Tensor = None,
) -> torch.Tensor:
    """Report eq. (38) averaged over a data set, for a tabular policy π_θ(·|x) = softmax(θ[x]), θ
    (X, Y).

    weights (X, Y, Y): how often each (x, y_w, y_l) occurs (or its probability): the mean over the
    data set's rows. lengths (Y,), optional: per-token mean log-ratios log(π_θ/π_ref)(y)/|y| instead
    of sums.
    """
    per_token = 1.0 if lengths is None else lengths.to(pi_ref.dtype)
    logp = torch.log_softmax(theta, dim=-1) / per_token  # (X, Y)
    ref = torch.log(pi_ref) / per_token  # (X, Y)
    # every (x, w, l) cell at once: (X, Y, 1) chosen against (X, 1, Y) rejected -> (X, Y, Y)
    losses = dpo_loss(logp[:, :, None], logp[:, None, :], ref[:, :, None], ref[:, None, :], beta)
    return (weights * losses).sum() / weights.sum()


def fit_tabular_dpo(
    pi_ref: torch.Tensor,
    weights: torch.Tensor,
    beta: float,
    lengths: torch.Tensor = None,
    max_iter: int = 50,
) -> torch.Tensor:
    """Report eq. (38) minimised over a tabular policy (`tabular_dpo_loss`), from π_θ = π_ref;
    returns π_θ (X, Y).

    Full batch, float64, by Newton's method (`chapters.common.newton.newton_minimise`, which steps
    downhill even where the loss is not convex, as with `lengths`). If the data put the minimiser at
    infinity (a response that never lost), it stops after max_iter steps.
    """

    def loss_fn(flat):
        return tabular_dpo_loss(flat.reshape(pi_ref.shape), pi_ref, weights, beta, lengths)

    theta = newton_minimise(loss_fn, torch.log(pi_ref).flatten(), max_iter)  # (X*Y,)
    return torch.softmax(theta.reshape(pi_ref.shape), dim=-1)


# --------------------------------------------------------------------------- the script
def random_tiny_gpt2(seed: int, weight_std: float = 0.3):
    """A tiny random GPT-2 with larger-than-init weights, so its next-token distributions are far
    from uniform."""
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig.tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, weight_std)
    return model
