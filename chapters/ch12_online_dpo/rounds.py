"""Offline, iterative and online DPO on a tabular policy, with a Bradley–Terry labeller on r*.

A policy over Y responses for P prompts is a (P, Y) tensor of logits θ, π_θ = softmax(θ); a world
may also be given as (Y,), one prompt, and then comes back as (Y,). A labelled data set is
summarised exactly by its counts C (P, Y, Y): C[x, w, l] = the pairs of prompt x where y_w was
preferred to y_l. The empirical DPO loss is the count-weighted mean of eq. (38) over those cells,
plus a Gaussian prior at the reference, (l2/2)·‖θ − log π_ref‖², which keeps the minimiser finite
when a response was only seen winning (or losing); then l2 alone decides how far its logit goes.

Random streams: a run with seed s samples responses from a generator seeded 2s and labels them from
one seeded 2s + 1, each consumed in order, round after round. So the labels never depend on how
many random numbers the sampling used, and one round of N pairs draws exactly what offline DPO does.
"""

import math

import torch

from chapters.ch1_preference_models import bradley_terry
from chapters.ch4_dpo import dpo_loss

DT = torch.float64  # tabular maths


# ------------------------------------------------------------------------------------ checks
def check_world(pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float) -> None:
    """Raise a one-line ValueError unless π_ref is a full-support distribution, r* fits, β > 0."""
    if not (isinstance(pi_ref, torch.Tensor) and isinstance(rewards, torch.Tensor)):
        raise ValueError("pi_ref and rewards must be torch tensors, (Y,) or (P, Y)")
    if pi_ref.dim() not in (1, 2) or pi_ref.shape[-1] < 2:
        raise ValueError(
            f"pi_ref must be (Y,) or (P, Y) with Y >= 2 responses, got shape {tuple(pi_ref.shape)}"
        )
    if rewards.shape != pi_ref.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} must have pi_ref's shape "
            f"{tuple(pi_ref.shape)}: one true reward r*(x, y) per response"
        )
    if not bool((pi_ref > 0).all()):  # also refuses NaN
        raise ValueError(
            "pi_ref must give every response positive mass (log π_ref enters "
            "eq. (38)); drop the responses it never samples"
        )
    sums = pi_ref.sum(-1)
    if not bool(((sums - 1).abs() < 1e-9).all()):
        raise ValueError(
            f"pi_ref must sum to 1 over the last axis, got sums {sums.tolist()}; "
            "normalise it: pi_ref / pi_ref.sum(-1, keepdim=True)"
        )
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite numbers (got inf or NaN)")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(
            f"beta must be a finite number > 0 (the KL weight of eq. (27)), got {beta!r}"
        )


def _as_table(t: torch.Tensor) -> torch.Tensor:
    """(Y,) or (P, Y) → (P, Y), float64."""
    return t.to(DT).reshape(-1, t.shape[-1])


# ------------------------------------------------------------------------------------- pairs
def bt_labeller(rewards: torch.Tensor, generator: torch.Generator):
    """Report eq. (23): a labeller preferring y_a to y_b with probability σ(r*(y_a) − r*(y_b)).

    rewards (Y,) or (P, Y). Returns label(a, b, prompts=None): a, b are index tensors of one shape
    into the last axis; with (P, Y) rewards, prompts (same shape) picks each pair's row (None means
    row 0, for one prompt). Returns a bool tensor, True where a is preferred, from one uniform per
    pair drawn from `generator` in order.
    """
    table = _as_table(rewards)  # (P, Y)
    win = bradley_terry(table[:, :, None], table[:, None, :])  # (P, Y, Y): eq. (16) = eq. (23)

    def label(a: torch.Tensor, b: torch.Tensor, prompts: torch.Tensor = None) -> torch.Tensor:
        if prompts is None:
            if table.shape[0] != 1:
                raise ValueError(
                    f"rewards hold {table.shape[0]} prompts; pass prompts=, one per pair"
                )
            prompts = torch.zeros_like(a)
        return torch.rand(a.shape, generator=generator, dtype=DT) < win[prompts, a, b]

    return label


def pair_distribution(pi: torch.Tensor) -> torch.Tensor:
    """P(a, b) ∝ π(a)·π(b) for a ≠ b: two different responses of the policy. (P, Y) → (P, Y, Y).

    Two samples of one response carry no preference (eq. (38) is flat on them), so they are redrawn,
    as with an LLM, whose two samples almost never coincide. A side effect that matters here: the
    sharper π is, the more the second response comes from the rest of π (exploration by redrawing).
    Computed in logs, so a policy with mass ≈ 1 on one response still gives a proper distribution.
    """
    log_pi = torch.log(pi)
    log_pair = log_pi[:, :, None] + log_pi[:, None, :]  # (P, Y, Y)
    log_pair = log_pair.masked_fill(torch.eye(pi.shape[-1], dtype=torch.bool), -math.inf)
    return torch.softmax(log_pair.flatten(1), -1).reshape(log_pair.shape)


def sample_pairs(pi: torch.Tensor, n: int, generator: torch.Generator):
    """n pairs (x, a, b): x uniform over the P prompts, (a, b) from `pair_distribution(pi)[x]`.

    pi (P, Y). Returns three (n,) long tensors: prompts, a, b.
    """
    P, Y = pi.shape
    cells = pair_distribution(pi).flatten() / P  # (P·Y·Y,)
    flat = torch.multinomial(cells, n, replacement=True, generator=generator)  # (n,)
    return flat // (Y * Y), (flat // Y) % Y, flat % Y


def count_preferences(prompts, a, b, a_wins, shape) -> torch.Tensor:
    """A labelled data set as counts (P, Y, Y): C[x, w, l] = pairs of prompt x where w beat l."""
    winner, loser = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    counts = torch.zeros(shape[0], shape[1], shape[1], dtype=DT)
    ones = torch.ones(len(a), dtype=DT)
    return counts.index_put_((prompts, winner, loser), ones, accumulate=True)


def expected_counts(pi: torch.Tensor, rewards: torch.Tensor, n: float) -> torch.Tensor:
    """Infinite data: the mean of the counts of n pairs from π labelled by eq. (23); (P, Y, Y).

    (w, l) arises as (a, b) = (w, l) or (l, w), w winning either way; the pairs are symmetric.
    """
    win = torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])  # (P, Y, Y): P(w ≻ l)
    return n / pi.shape[0] * 2 * pair_distribution(pi) * win


def minimiser_at_infinity(counts: torch.Tensor) -> bool:
    """Whether eq. (38) on these counts, without the prior (l2 = 0), has no finite minimiser.

    It has one exactly when every voted pair (w beat l) lies on a directed cycle of wins, i.e. l
    also reaches w through wins (Zermelo 1929; Ford 1957). Otherwise some group of responses won
    (or lost) every comparison linking it to the rest, and the loss keeps falling as their logits
    go to ±∞.
    """
    beats = counts > 0  # (P, Y, Y): w → l
    reach = beats | torch.eye(counts.shape[-1], dtype=torch.bool)
    for _ in range(max(1, math.ceil(math.log2(counts.shape[-1])))):  # transitive closure
        reach = reach | ((reach.to(DT) @ reach.to(DT)) > 0)
    return bool((beats & ~reach.transpose(1, 2)).any())


# ----------------------------------------------------------------------------------- fitting
def empirical_dpo_loss(theta, log_ref, counts, beta: float, l2: float) -> torch.Tensor:
    """Report eq. (38), mean over counts, + (l2/2)·‖θ − log π_ref‖²; θ (P, Y)."""
    logp = torch.log_softmax(theta, -1)  # (P, Y)
    # every (x, w, l) cell at once: chosen (P, Y, 1) against rejected (P, 1, Y) -> (P, Y, Y)
    losses = dpo_loss(
        logp[:, :, None], logp[:, None, :], log_ref[:, :, None], log_ref[:, None, :], beta
    )
    return (counts * losses).sum() / counts.sum() + l2 / 2 * ((theta - log_ref) ** 2).sum()


def empirical_dpo_gradient(theta, log_ref, counts, beta: float, l2: float) -> torch.Tensor:
    """Report eq. (41) on counts: ∇_θ of `empirical_dpo_loss` in closed form; (P, Y).

    A pair (w, l) adds −β·σ(−z)·(e_w − e_l)/n, z = β·(δ_w − δ_l), δ = θ − log π_ref: the winner goes
    up and the loser down by the same amount, so each prompt's loss gradient sums to zero.
    """
    delta = theta - log_ref  # (P, Y)
    z = beta * (delta[:, :, None] - delta[:, None, :])  # (P, Y, Y)
    push = counts * torch.sigmoid(-z)  # (P, Y, Y)
    return beta * (push.sum(-2) - push.sum(-1)) / counts.sum() + l2 * delta


def _hessian(theta, log_ref, counts, beta, l2) -> torch.Tensor:
    """The loss's Hessian in closed form, (P, Y, Y): a weighted Laplacian of the voted pairs + l2·I.

    Each pair adds β²·σ(z)·σ(−z)·(e_w − e_l)(e_w − e_l)ᵀ / n, with z as in `empirical_dpo_gradient`.
    """
    delta = theta - log_ref  # (P, Y)
    z = beta * (delta[:, :, None] - delta[:, None, :])  # (P, Y, Y)
    w = beta**2 * (counts + counts.transpose(1, 2)) * torch.sigmoid(z) * torch.sigmoid(-z)
    w = w / counts.sum()
    return torch.diag_embed(w.sum(-1)) - w + l2 * torch.eye(theta.shape[-1], dtype=DT)


def newton_fit(theta, log_ref, counts, beta: float, l2: float, max_iter: int = 200) -> torch.Tensor:
    """Minimise `empirical_dpo_loss` from θ (P, Y) to convergence: Newton with backtracking.

    The loss is convex in θ (−log σ of a linear map, + a convex prior), so this finds its minimiser,
    unique when l2 > 0. With l2 = 0 the directions it does not see (θ[x] + c, unseen responses) stay
    put (pseudo-inverse of the Hessian). Stops when the largest gradient entry is below 1e-12, when
    the predicted decrease is below rounding (after that last full step), or after max_iter steps.
    """
    for _ in range(max_iter):
        grad = empirical_dpo_gradient(theta, log_ref, counts, beta, l2)  # (P, Y)
        if grad.abs().max() < 1e-12:
            break
        eigval, eigvec = torch.linalg.eigh(_hessian(theta, log_ref, counts, beta, l2))
        keep = eigval > 1e-12 * eigval.abs().amax(-1, keepdim=True)  # (P, Y)
        coeff = (eigvec.transpose(1, 2) @ grad[..., None])[..., 0]  # (P, Y): g in the eigenbasis
        step = (eigvec @ torch.where(keep, coeff / eigval, 0.0)[..., None])[..., 0]  # (P, Y): H⁺g
        slope = (grad * step).sum()  # twice the decrease the quadratic model predicts
        loss = empirical_dpo_loss(theta, log_ref, counts, beta, l2)
        if slope < 1e-15 * (1 + loss.abs()):  # invisible to a line search; the full step is safe
            return theta - step
        t = 1.0
        while (
            empirical_dpo_loss(theta - t * step, log_ref, counts, beta, l2)
            > loss - 1e-4 * t * slope
        ):
            t /= 2
            if t < 1e-10:
                return theta
        theta = theta - t * step
    return theta


def gradient_steps(theta, log_ref, counts, beta: float, l2: float, steps: int, lr: float):
    """`steps` full-batch gradient steps of size lr on `empirical_dpo_loss`, from θ (P, Y)."""
    for _ in range(steps):
        theta = theta - lr * empirical_dpo_gradient(theta, log_ref, counts, beta, l2)
    return theta


def _generators(seed: int):
    """The two random streams of a run: (responses, labels)."""
    return torch.Generator().manual_seed(2 * seed), torch.Generator().manual_seed(2 * seed + 1)


# --------------------------------------------------------------------------------- schedules
def offline_dpo(pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float, budget: int, seed: int, *,
                l2: float = 1e-3) -> torch.Tensor:
    """Report eq. (38), offline: `budget` pairs from π_ref, labelled once, DPO to convergence."""
    check_world(pi_ref, rewards, beta)
    if not (isinstance(budget, int) and budget >= 1):
        raise ValueError(f"budget must be an int >= 1 (labelled pairs), got {budget!r}")
    ref, r = _as_table(pi_ref), _as_table(rewards)  # (P, Y)
    sampler, labels = _generators(seed)
    prompts, a, b = sample_pairs(ref, budget, sampler)
    a_wins = bt_labeller(r, labels)(a, b, prompts)
    counts = count_preferences(prompts, a, b, a_wins, ref.shape)  # (P, Y, Y)
    theta = newton_fit(torch.log(ref), torch.log(ref), counts, beta, l2)
    return torch.softmax(theta, -1).reshape(pi_ref.shape)


def run_rounds(pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float, budget: int, rounds: int,
               seed: int, steps_per_round: int = None, *, lr: float = 1.0, l2: float = 1e-3,
               keep_pairs: bool = True, expected: bool = False):
    """`preference_rounds`, also returning the counts (P, Y, Y) of all pairs labelled so far."""
    check_world(pi_ref, rewards, beta)
    for name, value in (("budget", budget), ("rounds", rounds)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if budget < rounds:
        raise ValueError(
            f"budget ({budget} pairs) < rounds ({rounds}): each round needs at least "
            "one labelled pair; use rounds <= budget"
        )
    if not (steps_per_round is None or (isinstance(steps_per_round, int) and steps_per_round > 0)):
        raise ValueError(
            f"steps_per_round must be None (to convergence) or an int >= 1, got {steps_per_round!r}"
        )
    if not (lr > 0 and l2 >= 0):
        raise ValueError(f"need lr > 0 and l2 >= 0, got lr={lr!r}, l2={l2!r}")
    ref, r = _as_table(pi_ref), _as_table(rewards)  # (P, Y)
    log_ref = torch.log(ref)
    sampler, labels = _generators(seed)
    label = bt_labeller(r, labels)
    theta = log_ref.clone()  # (P, Y): start at π_ref
    seen = torch.zeros(ref.shape + ref.shape[-1:], dtype=DT)  # (P, Y, Y): all pairs so far
    policies, data = [], []
    for k in range(rounds):
        n = budget // rounds + (k < budget % rounds)
        pi = torch.softmax(theta, -1)  # (P, Y): the policy that samples this round
        if expected:
            new = expected_counts(pi, r, n)
        else:
            prompts, a, b = sample_pairs(pi, n, sampler)
            new = count_preferences(prompts, a, b, label(a, b, prompts), ref.shape)
        seen = seen + new
        counts = seen if keep_pairs else new
        if steps_per_round is None:
            theta = newton_fit(theta, log_ref, counts, beta, l2)
        else:
            theta = gradient_steps(theta, log_ref, counts, beta, l2, steps_per_round, lr)
        policies.append(torch.softmax(theta, -1).reshape(pi_ref.shape))
        data.append(seen)
    return policies, data


def preference_rounds(pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float, budget: int,
                      rounds: int, seed: int, steps_per_round: int = None, **options) -> list:
    """Report eq. (38) on on-policy data: `rounds` rounds share `budget` pairs; π after each round.

    Round k samples its share (budget // rounds, one more in the first budget % rounds rounds) from
    the CURRENT policy, labels it by eq. (23), and continues DPO from the current logits with the
    reference fixed at π_ref, on all pairs so far (keep_pairs=True) or this round's only (False).
    steps_per_round=None minimises that loss to convergence (`newton_fit`); an int takes that many
    gradient steps of size lr. rounds=1 is offline DPO (`offline_dpo`: the same numbers);
    rounds=budget, steps_per_round=1, keep_pairs=False is online DPO: a fresh pair each step, one
    gradient step on it alone. expected=True uses each round's mean counts (`expected_counts`):
    infinite data. Each policy is a float64 tensor shaped like pi_ref, (Y,) or (P, Y). `options`
    are `run_rounds`'s: lr=1.0, l2=1e-3, keep_pairs=True, expected=False.
    """
    return run_rounds(pi_ref, rewards, beta, budget, rounds, seed, steps_per_round, **options)[0]
