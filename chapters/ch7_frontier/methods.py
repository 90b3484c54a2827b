"""The methods placed on chapter 7's frontier besides PPO: best-of-n (exact, by enumeration), DPO on
the pairs (eq. (38)), and the unlikelihood baseline.
"""

import torch

from chapters.ch4_dpo.loss import dpo_loss
from chapters.ch7_frontier.task import PROMPT_LEN, logprob, sequence
from gpt import GPT


def best_of_n_logprobs(logp_ref: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Best-of-N's exact distribution: P(y) = π_ref(y)/m(s)·(F(s)^N − (F(s) − m(s))^N), s =
    score(y).

    F(s) = π_ref(score ≤ s), m(s) = π_ref(score = s): the best of N draws has score ≤ s with
    probability F(s)^N, and a tie among responses of equal score is broken uniformly, so within a
    score level π_ref's shape stays. With all scores distinct m(s) = π_ref(y). Computed in log space
    as log π_ref(y) + (N−1)·log F + log(expm1(N·d)/expm1(d)), d = log(1 − m/F), which is stable for
    tiny m. logp_ref, scores: (P, Y); returns log-probs (P, Y).
    """
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}")
    sorted_scores, order = scores.sort(dim=-1)  # (P, Y) ascending
    p_sorted = logp_ref.gather(-1, order).exp()  # (P, Y)
    new_level = torch.ones_like(sorted_scores, dtype=torch.bool)
    new_level[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    level = new_level.long().cumsum(-1) - 1  # (P, Y): index of each response's score level
    mass = torch.zeros_like(p_sorted).scatter_add_(-1, level, p_sorted)  # (P, levels): m(s)
    cdf = mass.cumsum(-1)  # (P, levels): F(s)
    m, Fs = mass.gather(-1, level), cdf.gather(-1, level).clamp(max=1.0)  # (P, Y) in sorted order
    d = torch.log1p(
        -(m / Fs).clamp(max=1.0)
    )  # log((F − m)/F) ≤ 0, −inf when the level is the lowest
    if n == 1:
        ratio = torch.zeros_like(d)
    else:
        ratio = torch.where(
            torch.isinf(d), torch.zeros_like(d), torch.log(torch.expm1(n * d) / torch.expm1(d))
        )
    logp_sorted = p_sorted.log() + (n - 1) * Fs.log() + ratio
    return torch.empty_like(logp_sorted).scatter_(-1, order, logp_sorted)


def dpo_batch_loss(policy: GPT, batch: dict, beta: float) -> torch.Tensor:
    """Report eq. (38) on a batch, through `chapters.ch4_dpo.dpo_loss`; reference log-probs come
    precomputed."""
    n = len(batch["prompt"])
    logps = logprob(
        policy, batch["prompt"].repeat(2, 1), torch.cat([batch["chosen"], batch["rejected"]])
    )  # (2n,)
    return dpo_loss(logps[:n], logps[n:], batch["ref_chosen"], batch["ref_rejected"], beta).mean()


def unlikelihood_loss(policy: GPT, batch: dict, alpha: float) -> torch.Tensor:
    """Report §6.1, unlikelihood [19]: −log π(y_w|x) − α·Σ_t log(1 − π(y_l,t | x, y_l,<t))."""
    ids = sequence(batch["prompt"], batch["rejected"])  # (B, SEQ_LEN)
    logp = torch.log_softmax(policy(ids)[:, PROMPT_LEN - 1 : -1], -1)  # (B, RESPONSE_LEN, V)
    p_rejected = logp.gather(-1, ids[:, PROMPT_LEN:, None]).squeeze(-1).exp()  # (B, RESPONSE_LEN)
    unlikely = torch.log1p(-p_rejected.clamp(max=1 - 1e-6)).sum(-1)  # (B,)
    return (-logprob(policy, batch["prompt"], batch["chosen"]) - alpha * unlikely).mean()
