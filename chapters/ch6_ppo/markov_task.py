"""Chapter 6's task with a known answer: a random Markov chain, a token-class reward, and the exact
optimum on it.

A tiny GPT is fitted to the chain (SFT), then trained by PPO on r(x, y) = the fraction of response
tokens in a class. Because the reward is a sum over tokens, the KL-regularised optimum π* ∝
π_ref·exp(r/β) (eq. (36)) with
π_ref = the chain is again a Markov policy, found exactly by a backward recursion
(`chain_kl_optimum`).
"""

import math

import torch

import gpt
from chapters.ch6_ppo.objective import kl_k1, kl_k3
from chapters.ch6_ppo.trainer import policy_forward


def markov_chain(vocab_size: int, concentration: float, generator: torch.Generator):
    """A random first-order Markov chain: start distribution (V,) and transition matrix (V, V),
    float64."""
    dirichlet = lambda shape: torch.distributions.Gamma(concentration, 1.0).sample(shape).double()  # noqa: E731
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        start, transition = dirichlet((vocab_size,)), dirichlet((vocab_size, vocab_size))
    return start / start.sum(), transition / transition.sum(-1, keepdim=True)


def sample_markov(
    start, transition, n: int, length: int, generator: torch.Generator
) -> torch.Tensor:
    """n sequences of `length` tokens from the chain, (n, length) long."""
    tokens = [torch.multinomial(start.expand(n, -1), 1, generator=generator)]  # (n, 1)
    for _ in range(length - 1):
        tokens.append(torch.multinomial(transition[tokens[-1][:, 0]], 1, generator=generator))
    return torch.cat(tokens, dim=1)


def chain_entropy_rate(start, transition, length: int) -> float:
    """The chain's exact mean next-token entropy over positions 1..length−1: the NLL floor of a
    model fitted to it."""
    marginal, total = start, 0.0
    plogp = torch.where(transition > 0, transition * transition.log(), torch.zeros_like(transition))
    row_entropy = -plogp.sum(-1)  # (V,)
    for _ in range(length - 1):
        total += float(marginal @ row_entropy)
        marginal = marginal @ transition
    return total / (length - 1)


def expected_class_fraction(
    last_tokens: torch.Tensor, transition, token_class, length: int
) -> torch.Tensor:
    """Exact E[fraction of the next `length` tokens in `token_class`] under the chain, given each
    prompt's last token; (n,)."""
    in_class = torch.zeros(transition.shape[0], dtype=transition.dtype)
    in_class[list(token_class)] = 1.0
    dist = torch.nn.functional.one_hot(last_tokens, transition.shape[0]).to(
        transition.dtype
    )  # (n, V)
    total = torch.zeros(len(last_tokens), dtype=transition.dtype)
    for _ in range(length):
        dist = dist @ transition
        total += dist @ in_class
    return total / length


def chain_kl_optimum(
    last_tokens: torch.Tensor, transition, token_class, length: int, beta: float
) -> dict:
    """Report eq. (36) on the chain: π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β) with π_ref = the chain, r =
    class fraction.

    The reward is a sum over tokens, so π* is again a Markov policy, found by a backward (soft
    Bellman) recursion V_t(s) = log Σ_a P(a|s)·exp(c(a)/(β·length) + V_{t+1}(a)). Returns the exact
    per-prompt E_π*[r], KL(π* ‖ π_ref) and β·log Z(x) = β·V_0 (the optimum of eq. (27)), each (n,),
    float64.
    """
    in_class = torch.zeros(transition.shape[0], dtype=transition.dtype)
    in_class[list(token_class)] = 1.0
    bonus = in_class / (beta * length)  # (V,): each class token adds 1/length to r, divided by β
    log_p = transition.log()  # (V, V): log P(a|s)
    values, policies = torch.zeros(transition.shape[0], dtype=transition.dtype), []
    for _ in range(length):  # backward: V_{t+1} -> V_t
        logits = log_p + bonus + values  # (V, V): log P(a|s) + c(a)/(βL) + V_{t+1}(a)
        values = torch.logsumexp(logits, dim=-1)  # (V,)
        policies.insert(0, torch.softmax(logits, dim=-1))  # π*_t(a|s)
    dist = torch.nn.functional.one_hot(last_tokens, transition.shape[0]).to(
        transition.dtype
    )  # (n, V)
    log_z = dist @ values  # (n,): log Z(x) = V_0(last prompt token)
    reward = torch.zeros(len(last_tokens), dtype=transition.dtype)
    kl = torch.zeros_like(reward)
    for pi in policies:
        reward += dist @ (pi @ in_class) / length
        kl += dist @ (pi * (pi.log() - log_p)).sum(-1)
        dist = dist @ pi
    return dict(reward=reward, kl=kl, objective=beta * log_z)


def class_fraction_reward(token_class):
    """reward_fn for `PPOTrainer`: the fraction of response tokens that lie in `token_class`,
    exactly.
    """
    members = torch.tensor(sorted(token_class))

    def reward_fn(input_ids, attention_mask, response_mask):
        hits = torch.isin(input_ids, members) & response_mask.bool()  # (B, T)
        return hits.sum(-1).double() / response_mask.sum(-1).clamp(min=1)  # (B,)

    return reward_fn


@torch.no_grad()
def evaluate_on_chain(policy, ref, reward_fn, prompt_ids, prompt_mask, response_length, generator):
    """Sample one response per prompt from `policy`: mean reward, its standard error, and the mean
    KL(π ‖ π_ref) by k1 and k3."""
    P = prompt_ids.shape[1]
    seq = gpt.generate(
        policy, prompt_ids, response_length, attention_mask=prompt_mask, generator=generator
    )
    attention_mask = torch.cat([prompt_mask, torch.ones_like(seq[:, P:])], dim=1)
    _, logp, _ = policy_forward(policy, seq, attention_mask, P)  # (B, R)
    _, ref_logp, _ = policy_forward(ref, seq, attention_mask, P)
    scores = reward_fn(
        seq,
        attention_mask,
        torch.cat([torch.zeros_like(prompt_mask), torch.ones_like(seq[:, P:])], 1),
    )
    return dict(
        reward=scores.mean().item(),
        reward_se=(scores.std() / math.sqrt(len(scores))).item(),
        kl=kl_k1(logp, ref_logp).sum(-1).mean().item(),
        kl_k3=kl_k3(logp, ref_logp).sum(-1).mean().item(),
    )
