"""Plackett–Luce and Bradley–Terry probabilities (report eqs. (6)–(16)), Christiano's preference
loss with ties.

Rankings are index tensors, most preferred first: `ranking[..., t]` is τ(t + 1), an index into the
last axis of `rewards` (or `p`). Every function is batched over leading axes (prompts), which
broadcast.
"""

import torch


def as_tensor(x) -> torch.Tensor:
    """A tensor of `x`; Python numbers and lists become float64 (the precision of tabular maths
    here).
    """
    return x if torch.is_tensor(x) else torch.as_tensor(x, dtype=torch.float64)


def _indices(ranking, n_options: int, full: bool) -> torch.Tensor:
    """`ranking` as a long tensor, checked: distinct indices in [0, n_options), all of them if
    `full`.
    """
    ranking = torch.as_tensor(ranking, dtype=torch.long)
    m = ranking.shape[-1]
    if full and m != n_options:
        raise ValueError(
            f"ranking has {m} entries but there are {n_options} options; give a full permutation"
        )
    if ranking.numel() and (ranking.min() < 0 or ranking.max() >= n_options):
        raise ValueError(
            f"ranking indices must lie in [0, {n_options}); got {ranking.min()}..{ranking.max()}"
        )
    srt = ranking.sort(-1).values
    if (srt[..., 1:] == srt[..., :-1]).any():
        raise ValueError("ranking repeats an option; each option appears at most once")
    return ranking


def _broadcast(values: torch.Tensor, ranking: torch.Tensor):
    """Broadcast the leading (prompt) axes of values (..., K) and ranking (..., m)."""
    lead = torch.broadcast_shapes(values.shape[:-1], ranking.shape[:-1])
    return values.expand(*lead, values.shape[-1]), ranking.expand(*lead, ranking.shape[-1])


# ------------------------------------------------------ §3.1: Plackett's model with probabilities p


def plackett_sequential(p, ranking) -> torch.Tensor:
    """Report eq. (7) (product over j): P(τ) = Π_j p_{i_j} / (1 − Σ_{k<j} p_{i_k}); eq. (6) is its
    first 3 factors.

    p (..., r) sums to 1 over the last axis. `ranking` (..., m) may be a top-m list (m ≤ r): the
    result is the probability that these m options are chosen first, in this order (m = 3 gives eq.
    (6)).
    """
    p = as_tensor(p)
    if not torch.allclose(p.sum(-1), torch.ones((), dtype=p.dtype), atol=1e-9):
        raise ValueError(
            "p must sum to 1 over the last axis (eq. (7) uses 1 − Σ p); normalise it, e.g. with "
            "eq. (9)"
        )
    p, ranking = _broadcast(p, _indices(ranking, p.shape[-1], full=False))
    chosen = p.gather(-1, ranking)  # (..., m): p_{i_1}, ..., p_{i_m}
    taken = chosen.cumsum(-1) - chosen  # (..., m): Σ_{k<j} p_{i_k}, the mass already chosen
    return (chosen / (1 - taken)).prod(-1)  # (...,)


def plackett_remaining(p, ranking) -> torch.Tensor:
    """Report eq. (8): P(τ) = Π_j p_{i_j} / Σ_{k≥j} p_{i_k}, over a full permutation τ.

    Unlike eq. (7) it needs no Σ p = 1: scaling every p by the same factor leaves it unchanged.
    """
    p = as_tensor(p)
    p, ranking = _broadcast(p, _indices(ranking, p.shape[-1], full=True))
    chosen = p.gather(-1, ranking)  # (..., r)
    remaining = (
        chosen.flip(-1).cumsum(-1).flip(-1)
    )  # (..., r): Σ_{k≥j} p_{i_k}, the mass still available
    return (chosen / remaining).prod(-1)  # (...,)


def plackett_probabilities(scores) -> torch.Tensor:
    """Report eq. (9): p_{i_j} = e^{β_{i_j}} / Σ_a e^{β_{i_a}}, a softmax of the scores β over the
    last axis."""
    return torch.softmax(as_tensor(scores), dim=-1)


def plackett_eq10_steps(scores, ranking) -> tuple:
    """Report eq. (10), its three lines: eq. (9)'s p put into eq. (8); the common Σ_a e^β pulled
    out; cancelled.

    Computed literally (exp without a shift), so use moderate scores. Returns three (...,) tensors.
    """
    scores = as_tensor(scores)
    scores, ranking = _broadcast(scores, _indices(ranking, scores.shape[-1], full=True))
    e = scores.exp()  # (..., r)
    total = e.sum(-1, keepdim=True)  # (..., 1): Σ_a e^{β_{i_a}}
    ordered = e.gather(-1, ranking)  # (..., r): e^{β_{i_j}} in ranking order
    tail = ordered.flip(-1).cumsum(-1).flip(-1)  # (..., r): Σ_{k≥j} e^{β_{i_k}}
    p = ordered / total
    line1 = (p / p.flip(-1).cumsum(-1).flip(-1)).prod(-1)  # Π_j p_j / Σ_{k≥j} p_k
    line2 = (p / (tail / total)).prod(-1)  # Π_j p_j / ((Σ_{k≥j} e^β) / Σ_a e^β)
    line3 = (ordered / tail).prod(-1)  # Π_j e^{β_j} / Σ_{k≥j} e^{β_k}
    return line1, line2, line3


# ---------------------------------------------------------------- §3.1: Plackett–Luce with rewards


def plackett_luce_logprob(rewards, ranking) -> torch.Tensor:
    """Report eq. (11), in logs: log p*(τ | y_1..y_K, x) = Σ_t [r*(x, y_τ(t)) − log Σ_{j≥t} e^{r*(x,
    y_τ(j))}].

    rewards (..., K); ranking (..., K) a permutation, most preferred first. Stable for any reward
    scale.
    """
    rewards = as_tensor(rewards)
    rewards, ranking = _broadcast(rewards, _indices(ranking, rewards.shape[-1], full=True))
    ordered = rewards.gather(-1, ranking)  # (..., K): r*(x, y_τ(1)), ..., r*(x, y_τ(K))
    tail = ordered.flip(-1).logcumsumexp(-1).flip(-1)  # (..., K): log Σ_{j≥t} e^{r*(x, y_τ(j))}
    return (ordered - tail).sum(-1)  # (...,)


def plackett_luce(rewards, ranking) -> torch.Tensor:
    """Report eq. (11): p*(τ | y_1..y_K, x) = Π_t e^{r*(x, y_τ(t))} / Σ_{j≥t} e^{r*(x, y_τ(j))}."""
    return plackett_luce_logprob(rewards, ranking).exp()


def sample_rankings(rewards, num_samples: int, generator=None) -> torch.Tensor:
    """Rankings drawn from eq. (11) by the Gumbel trick: sort r*(x, y) + Gumbel noise, largest
    first.

    rewards (..., K) -> rankings (num_samples, ..., K). Why it works: the argmax of r + Gumbel is y
    with probability softmax(r)_y (the first factor of eq. (11)), and the order of the rest is again
    Gumbel-max.
    """
    rewards = as_tensor(rewards)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    exp1 = torch.empty((num_samples, *rewards.shape), dtype=rewards.dtype).exponential_(
        generator=generator
    )
    gumbel = -exp1.log()  # (num_samples, ..., K): Gumbel(0, 1), since −log of an Exp(1) is Gumbel
    return (rewards + gumbel).argsort(dim=-1, descending=True)


# ------------------------------------------------------ §3.2: Bradley–Terry, Plackett–Luce at K = 2


def bt_from_plackett_luce_steps(r1, r2) -> dict:
    """Report eqs. (12)–(15): eq. (11) at K = 2, τ = (1, 2), factor by factor. Returns {"(12)": …,
    …, "(15)": …}."""
    r1, r2 = as_tensor(r1), as_tensor(r2)
    first = r1.exp() / (r1.exp() + r2.exp())  # eq. (13), the factor for t = 1
    second = r2.exp() / r2.exp()  # eq. (14), the factor for t = 2: always 1
    return {"(12)": first * second, "(13)": first, "(14)": second, "(15)": first}


def bradley_terry(r1, r2) -> torch.Tensor:
    """Report eq. (16): p*(y1 ≻ y2 | x) = e^{r*(x, y1)} / (e^{r*(x, y1)} + e^{r*(x, y2)}).

    It is eq. (11) at K = 2.

    r1, r2 broadcast; computed as plackett_luce of the pair ranked (y1, y2), which is stable.
    """
    pair = torch.stack(torch.broadcast_tensors(as_tensor(r1), as_tensor(r2)), dim=-1)  # (..., 2)
    return plackett_luce(pair, [0, 1])


# ---------------------------------------------------------------- §2.1: Christiano et al.

MU = {"1": (1.0, 0.0), "2": (0.0, 1.0), "tie": (0.5, 0.5), "incomparable": None}


def preference_database(segment_rewards_1, segment_rewards_2, judgements):
    """Report §2.1, preference elicitation: triples (τ1, τ2, μ); μ on the preferred segment, uniform
    for a tie; incomparable pairs are not included.

    segment_rewards_* (N, k): r̂ at each step of each segment; judgements: N of "1", "2", "tie",
    "incomparable". Returns (rewards_1 (M, k), rewards_2 (M, k), mu (M, 2)) with the M comparable
    triples.
    """
    if len(judgements) != len(segment_rewards_1) or len(judgements) != len(segment_rewards_2):
        raise ValueError("need one judgement per pair of segments")
    bad = sorted({j for j in judgements if j not in MU})
    if bad:
        raise ValueError(f"unknown judgement(s) {bad}; use one of {list(MU)}")
    keep = [i for i, j in enumerate(judgements) if MU[j] is not None]
    mu = torch.tensor([MU[judgements[i]] for i in keep], dtype=torch.float64).reshape(
        -1, 2
    )  # (M, 2)
    return as_tensor(segment_rewards_1)[keep], as_tensor(segment_rewards_2)[keep], mu


def christiano_predictor(segment_rewards_1, segment_rewards_2) -> torch.Tensor:
    """Report §2.1: P̂(1 ≻ 2) = exp(Σ_t r̂(o¹_t, a¹_t)) / (exp(Σ_t r̂(o¹_t, a¹_t)) + exp(Σ_t
    r̂(o²_t, a²_t))).

    segment_rewards_* (..., k) -> (...,): Bradley–Terry on the rewards summed over each segment.
    """
    return bradley_terry(as_tensor(segment_rewards_1).sum(-1), as_tensor(segment_rewards_2).sum(-1))


def christiano_loss(segment_rewards_1, segment_rewards_2, mu) -> torch.Tensor:
    """Report §2.1, with its minus sign restored: loss(r̂) = −Σ_{(τ1,τ2,μ)∈D} [μ(1) log P̂(1≻2) +
    μ(2) log P̂(2≻1)].

    segment_rewards_* (N, k), mu (N, 2) as from `preference_database`. Returns a scalar (a sum over
    D).
    """
    sums = torch.stack(
        [as_tensor(segment_rewards_1).sum(-1), as_tensor(segment_rewards_2).sum(-1)], dim=-1
    )  # (N, 2)
    log_p = torch.log_softmax(sums, dim=-1)  # (N, 2): log P̂(1≻2), log P̂(2≻1), stably
    return -(as_tensor(mu) * log_p).sum()
