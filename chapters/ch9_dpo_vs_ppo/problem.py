"""Chapter 9's example: a preference problem small enough to enumerate, its votes, and exact
measurements on it.

A few prompts, responses = every sequence of L tokens from a V-token vocabulary, an autoregressive
reference policy, a true reward r*, and votes on a few pairs per prompt sampled from π_ref. Tensors
over responses are (P, Y): prompts × responses, float64. Here too: the two losses on the votes (eq.
(38) and eq. (26), through chapters 4 and 2) and `measure`, the exact quantities chapter 9 reports
for a policy.
"""

import itertools
from dataclasses import dataclass

import torch

from chapters.ch2_reward_model.bradley_terry import reward_model_loss
from chapters.ch3_kl_optimum.optimum import kl_divergence
from chapters.ch4_dpo.loss import dpo_loss

DT = torch.float64  # all of it is tabular maths


@dataclass
class Problem:
    """A small preference problem, enumerable: every response of every prompt is a row of a (P, Y)
    tensor."""

    tokens: torch.Tensor  # (Y, L) long: response y is the token sequence tokens[y]
    ref_logits: (
        list  # the reference's autoregressive logits: [(P, V), (P, V, V), ...], one per position
    )
    pi_ref: torch.Tensor  # (P, Y): π_ref(y|x), the product of the per-token softmaxes
    true_reward: torch.Tensor  # (P, Y): r*(x, y)
    features: (
        torch.Tensor
    )  # (P, Y, d): φ(x, y) = [one-hot of token 1, one-hot of token 2, ...], shared across prompts
    prompt: torch.Tensor  # (N,) long: x of each vote (x, y_w, y_l)
    chosen: torch.Tensor  # (N,) long: y_w
    rejected: torch.Tensor  # (N,) long: y_l
    beta: float

    @property
    def shape(self):
        return self.pi_ref.shape


def autoregressive_logprobs(logits: list, tokens: torch.Tensor) -> torch.Tensor:
    """log π(y|x) = Σ_t log softmax(logits_t[x, y_<t])[y_t] for every response y; logits as in
    `Problem.ref_logits`; (P, Y)."""
    total = 0.0
    for t, step in enumerate(logits):
        logp = torch.log_softmax(step, dim=-1)  # (P, V^t..., V)
        index = (slice(None),) + tuple(
            tokens[:, s] for s in range(t + 1)
        )  # pick [x, y_1, ..., y_t] for all y
        total = total + logp[index]  # (P, Y)
    return total


def make_problem(
    seed: int = 0,
    prompts: int = 3,
    vocab: int = 4,
    length: int = 2,
    pairs: int = 3,
    votes: int = 10,
    beta: float = 0.5,
) -> Problem:
    """The chapter's example: random reference and true reward, `pairs` pairs per prompt drawn from
    π_ref, `votes` votes each.

    Votes for y1 over y2: round(votes · σ(r*(x, y1) − r*(x, y2))) (eq. (23), the expected count),
    kept in [1, votes − 1] so every pair was won both ways: then the DPO loss has a finite
    minimiser.
    """
    if min(prompts, vocab, length, pairs) < 1 or votes < 2 or beta <= 0:
        raise ValueError("need prompts, vocab, length, pairs >= 1, votes >= 2 and beta > 0")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.tensor(list(itertools.product(range(vocab), repeat=length)))  # (Y, L), Y = V^L
    ref_logits = [
        1.5 * torch.randn((prompts,) + (vocab,) * (t + 1), generator=g, dtype=DT)
        for t in range(length)
    ]
    pi_ref = autoregressive_logprobs(ref_logits, tokens).exp()  # (P, Y)
    features = torch.cat(
        [torch.nn.functional.one_hot(tokens[:, t], vocab) for t in range(length)], -1
    ).to(DT)
    features = features.expand(prompts, -1, -1)  # (P, Y, L·V)
    token_value = torch.randn(length * vocab, generator=g, dtype=DT)
    true_reward = features @ token_value + 0.5 * torch.randn(
        prompts, len(tokens), generator=g, dtype=DT
    )  # (P, Y)
    rows = []
    for x in range(prompts):
        for _ in range(pairs):
            while True:  # two distinct responses from π_ref
                y1, y2 = torch.multinomial(pi_ref[x], 2, replacement=True, generator=g).tolist()
                if y1 != y2:
                    break
            p = torch.sigmoid(true_reward[x, y1] - true_reward[x, y2]).item()
            wins = min(max(round(votes * p), 1), votes - 1)
            rows += [(x, y1, y2)] * wins + [(x, y2, y1)] * (votes - wins)
    prompt, chosen, rejected = torch.tensor(rows).T
    return Problem(
        tokens, ref_logits, pi_ref, true_reward, features, prompt, chosen, rejected, beta
    )


def comparison_graph(problem: Problem):
    """Per prompt: the connected components of its comparison graph (responses joined by a voted
    pair) and the responses in no pair.

    Returns (components, unseen): components[x] is a list of sorted lists of responses, unseen[x] a
    sorted list.
    """
    P, Y = problem.shape
    components, unseen = [], []
    for x in range(P):
        edges = {
            (a, b)
            for p, a, b in zip(
                problem.prompt.tolist(), problem.chosen.tolist(), problem.rejected.tolist()
            )
            if p == x
        }
        neighbours = {}
        for a, b in edges:
            neighbours.setdefault(a, set()).add(b)
            neighbours.setdefault(b, set()).add(a)
        left, comps = set(neighbours), []
        while left:  # depth-first search from any response not yet reached
            stack, comp = [left.pop()], set()
            while stack:
                y = stack.pop()
                comp.add(y)
                stack += [z for z in neighbours[y] if z not in comp and z in left]
                left -= neighbours[y]
            comps.append(sorted(comp))
        components.append(sorted(comps))
        unseen.append(sorted(set(range(Y)) - set(neighbours)))
    return components, unseen


def unseen_mask(problem: Problem) -> torch.Tensor:
    """(P, Y) bool: True where response y never appears in a vote on prompt x."""
    _, unseen = comparison_graph(problem)
    mask = torch.zeros(problem.shape, dtype=torch.bool)
    for x, us in enumerate(unseen):
        mask[x, us] = True
    return mask


# --------------------------------------------------------------- the two losses, exact measurements


def empirical_dpo_loss(logp: torch.Tensor, problem: Problem) -> torch.Tensor:
    """Report eq. (38) on the data: the mean over votes (x, y_w, y_l) of −log σ(β·log π/π_ref(y_w) −
    β·log π/π_ref(y_l)).

    logp (..., P, Y): log π(y|x) of one or more policies; returns (...).
    """
    ref = problem.pi_ref.log()
    x, w, l = problem.prompt, problem.chosen, problem.rejected
    return dpo_loss(logp[..., x, w], logp[..., x, l], ref[x, w], ref[x, l], problem.beta).mean(-1)


def data_reward_loss(rewards: torch.Tensor, problem: Problem) -> torch.Tensor:
    """Report eq. (26) on the votes (`chapters.ch2_reward_model.reward_model_loss`) for a reward
    table r (P, Y)."""
    x = problem.prompt
    return reward_model_loss(rewards[x, problem.chosen], rewards[x, problem.rejected])


def measure(logp: torch.Tensor, problem: Problem, mask: torch.Tensor) -> dict:
    """Exact, by enumeration: mass on unseen responses, E_π[r*], KL(π ‖ π_ref) and eq. (38), each
    averaged over prompts."""
    pi = logp.exp()
    return dict(
        unseen=(pi * mask).sum(-1).mean().item(),
        true_reward=(pi * problem.true_reward).sum(-1).mean().item(),
        kl=kl_divergence(pi, problem.pi_ref).mean().item(),
        dpo=empirical_dpo_loss(logp, problem).item(),
    )


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def response_name(problem: Problem, y: int) -> str:
    return "".join(LETTERS[t] for t in problem.tokens[y].tolist())
