"""The reward–KL frontier task of chapters 7 and 10: small enough to enumerate, so every expectation
is exact.

8 tokens (2 positive, 2 negative, 4 neutral), prompts of 2 tokens, responses of 5 tokens: each
prompt has 8^5 = 32,768 responses. A known Markov process stands behind the reference; r* is a
sentiment score that counts double when it echoes the prompt. Here: the task, exact evaluation of a
policy by walking its prefix tree, the exact frontier of π*_β = π_ref·exp(r*/β)/Z (eq. (36)) and a
point's distance to it, the paper's sampled KL estimate, preference data labelled by BT(r*), and the
settings both chapters share.
"""

import math

import numpy as np
import torch

from chapters.ch3_kl_optimum.optimum import optimal_policy
from chapters.ch4_dpo.loss import response_logprobs
from chapters.training import finetune
from gpt import GPT, GPTConfig, KVCache, generate

VOCAB = 8
SENTIMENT = torch.tensor(
    [1.0, 1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64
)  # tokens 0,1 +; 2,3 −
PROMPT_LEN, RESPONSE_LEN = 2, 5
SEQ_LEN = PROMPT_LEN + RESPONSE_LEN
RESPONSE_MASK = torch.tensor(
    [0] * PROMPT_LEN + [1] * RESPONSE_LEN
)  # (SEQ_LEN,): which tokens are the response


# ---------------------------------------------------------------- the task


def true_reward(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """The ground-truth reward r*(x, y): Σ_t s(y_t)·(1 + [y_t ∈ x]), s = +1 positive, −1 negative, 0
    neutral.

    A token's sentiment counts double when it echoes a prompt token, so the best response depends on
    the prompt. prompts (..., PROMPT_LEN) and responses (..., RESPONSE_LEN) broadcast; returns
    float64 (...).
    """
    echo = (responses[..., :, None] == prompts[..., None, :]).any(-1)  # (..., RESPONSE_LEN)
    return (SENTIMENT[responses] * (1.0 + echo)).sum(-1)


def all_responses() -> torch.Tensor:
    """Every response, (VOCAB**RESPONSE_LEN, RESPONSE_LEN), in lexicographic order (first token
    slowest)."""
    return torch.cartesian_prod(*[torch.arange(VOCAB)] * RESPONSE_LEN)


def task_prompts(n: int) -> torch.Tensor:
    """The task's n prompts, (n, PROMPT_LEN): the first n of all VOCAB**2 prompts in a fixed
    shuffled order."""
    if not 1 <= n <= VOCAB**PROMPT_LEN:
        raise ValueError(f"the number of prompts must be in 1..{VOCAB**PROMPT_LEN}, got {n}")
    every = torch.cartesian_prod(*[torch.arange(VOCAB)] * PROMPT_LEN)  # (64, 2)
    return every[torch.randperm(len(every), generator=torch.Generator().manual_seed(1234))[:n]]


def transition_matrix() -> torch.Tensor:
    """The known random process behind the reference: a Markov chain where positive tokens are rare
    and repeat.

    P(next = b | a) ∝ base(b)·(1 + 2·[a = b]); base gives positive tokens 0.04, negative 0.16,
    neutral 0.15.
    """
    base = torch.tensor([0.04, 0.04, 0.16, 0.16, 0.15, 0.15, 0.15, 0.15], dtype=torch.float64)
    T = base[None, :] * (1.0 + 2.0 * torch.eye(VOCAB, dtype=torch.float64))  # (V, V)
    return T / T.sum(-1, keepdim=True)


def sample_process(prompts: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n sequences (n, SEQ_LEN) of the process: a prompt drawn uniformly from `prompts`, then the
    Markov chain."""
    T = transition_matrix()
    seq = [prompts[torch.randint(len(prompts), (n,), generator=generator)]]  # [(n, PROMPT_LEN)]
    last = seq[0][:, -1]
    for _ in range(RESPONSE_LEN):
        last = torch.multinomial(T[last], 1, generator=generator).squeeze(-1)  # (n,)
        seq.append(last[:, None])
    return torch.cat(seq, dim=1)


def process_logprobs(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """log P(y | x) under the known process, float64; prompts (P, PROMPT_LEN), responses (Y,
    RESPONSE_LEN) -> (P, Y)."""
    logT = transition_matrix().log()
    prev = torch.cat(
        [
            prompts[:, None, -1:].expand(-1, len(responses), 1),
            responses[None, :, :-1].expand(len(prompts), -1, -1),
        ],
        dim=-1,
    )  # (P, Y, RESPONSE_LEN)
    return logT[prev, responses[None].expand_as(prev)].sum(-1)


def new_model(seed: int) -> GPT:
    """The tiny GPT-2 config used for every policy here (vocabulary 8, context 7, 2 layers of width
    32)."""
    torch.manual_seed(seed)
    return GPT(GPTConfig.tiny(vocab_size=VOCAB, n_positions=SEQ_LEN))


def sequence(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """Prompt and response side by side: (B, SEQ_LEN)."""
    return torch.cat([prompts, responses], dim=-1)


def logprob(model: GPT, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """log π(y | x) for a batch, (B,), through `chapters.ch4_dpo.response_logprobs`."""
    ids = sequence(prompts, responses)  # (B, SEQ_LEN)
    return response_logprobs(model(ids), ids, RESPONSE_MASK.expand_as(ids))


def preference_pairs(
    ref: GPT, prompts: torch.Tensor, draws: int, k: int, generator: torch.Generator
) -> dict:
    """As in the paper: k responses sampled from π_ref per prompt draw, all k(k−1)/2 pairs labelled
    by BT(r*).

    Report eq. (23): y1 ≻ y2 with probability σ(r*(x, y1) − r*(x, y2)). With infinitely many such
    pairs DPO's minimiser would be π*_β exactly (chapter 4); with finitely many it is only near it
    (chapter 7 measures how near). `draws` prompt draws per prompt. Returns a dict of (N, ·)
    tensors: prompt, chosen, rejected.
    """
    ref.eval()
    x = prompts.repeat_interleave(draws * k, 0)  # (P·draws·k, PROMPT_LEN)
    y = generate(ref, x, RESPONSE_LEN, generator=generator)[:, PROMPT_LEN:].view(
        -1, k, RESPONSE_LEN
    )  # (D, k, L)
    x = x[::k]  # (D, PROMPT_LEN)
    i, j = torch.triu_indices(k, k, offset=1)  # all pairs i < j
    yi, yj = y[:, i], y[:, j]  # (D, pairs, L)
    gap = true_reward(x[:, None], yi) - true_reward(x[:, None], yj)  # (D, pairs)
    i_wins = torch.bernoulli(torch.sigmoid(gap), generator=generator).bool()[
        ..., None
    ]  # (D, pairs, 1)
    chosen, rejected = torch.where(i_wins, yi, yj), torch.where(i_wins, yj, yi)
    return dict(
        prompt=x[:, None].expand(-1, len(i), -1).reshape(-1, PROMPT_LEN),
        chosen=chosen.reshape(-1, RESPONSE_LEN),
        rejected=rejected.reshape(-1, RESPONSE_LEN),
    )


def true_reward_fn(
    input_ids: torch.Tensor, attention_mask=None, response_mask=None
) -> torch.Tensor:
    """r*(x, y) in the form `PPOTrainer` calls a reward: on (B, SEQ_LEN) ids, prompt first (no
    padding here)."""
    return true_reward(input_ids[:, :PROMPT_LEN], input_ids[:, PROMPT_LEN:])


def preferred_ft_loss(policy: GPT, batch: dict) -> torch.Tensor:
    """−E log π(y_w | x): SFT on the preferred responses (Preferred-FT), or on the process text (the
    reference)."""
    return -logprob(policy, batch["prompt"], batch["chosen"]).mean()


def reference_and_pairs(cfg: dict, seed: int) -> dict:
    """The experiment's common start: π_ref fitted by SFT to the process, then the preference pairs
    sampled from it.

    cfg: `FULL` or `QUICK`. One generator, seeded by `seed`, draws the SFT text, the SFT minibatches
    and the pairs, in that order, so chapters 7 and 10 start from the same π_ref and data. Returns a
    dict: prompts (P, PROMPT_LEN), rewards r* (P, Y), ref (frozen), logp_ref (P, Y) by enumeration,
    data (prompt, chosen, rejected, ref_chosen, ref_rejected) and the generator, to be drawn on
    further.
    """
    gen = torch.Generator().manual_seed(seed)
    prompts = task_prompts(cfg["prompts"])
    rewards = true_reward(prompts[:, None], all_responses()[None])  # (P, Y)
    text = sample_process(prompts, cfg["sft_sequences"], gen)
    ref = new_model(seed)
    finetune(
        ref,
        preferred_ft_loss,
        dict(prompt=text[:, :PROMPT_LEN], chosen=text[:, PROMPT_LEN:]),
        cfg["sft_steps"],
        cfg["sft_batch"],
        cfg["sft_lr"],
        gen,
        desc="SFT reference",
    )
    ref.requires_grad_(False)
    data = preference_pairs(ref, prompts, cfg["draws"], cfg["k"], gen)
    with torch.no_grad():
        data["ref_chosen"] = logprob(ref, data["prompt"], data["chosen"])
        data["ref_rejected"] = logprob(ref, data["prompt"], data["rejected"])
    return dict(
        prompts=prompts,
        rewards=rewards,
        ref=ref,
        logp_ref=enumerate_logprobs(ref, prompts),
        data=data,
        generator=gen,
    )


# ---------------------------------------------------------------- exact evaluation by enumeration


@torch.no_grad()
def enumerate_logprobs(model: GPT, prompts: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """log π(y | x) of every response of every prompt, (P, VOCAB**RESPONSE_LEN) float64, by walking
    the prefix tree.

    Level t feeds one token to each of the P·8^t prefixes, whose keys and values sit in a KV cache
    that is copied 8 times (one per next token) before each level: 8 + 64 + 512 + 4096 one-token
    steps per prompt instead of 32,768 full sequences. Columns follow `all_responses()`.
    """
    was_training = model.training
    model.eval()
    out = []
    for x in prompts.split(chunk):
        P = len(x)
        cache = KVCache(model.config, P, SEQ_LEN - 1)
        logp = torch.log_softmax(model(x, cache=cache)[:, -1].double(), -1)  # (P, V): log π(y1 | x)
        for _ in range(RESPONSE_LEN - 1):
            rows = cache.k.shape[1]  # prefixes in the cache, P·8^t
            cache.reorder(
                torch.arange(rows).repeat_interleave(VOCAB)
            )  # each prefix once per next token
            token = torch.arange(VOCAB).repeat(rows)[:, None]  # (rows·V, 1)
            step = torch.log_softmax(model(token, cache=cache)[:, -1].double(), -1)  # (rows·V, V)
            logp = (logp.reshape(P, -1, 1) + step.view(P, -1, VOCAB)).reshape(P, -1)  # (P, 8^(t+2))
        out.append(logp)
    model.train(was_training)
    return torch.cat(out)


def exact_reward_and_kl(logp: torch.Tensor, logp_ref: torch.Tensor, rewards: torch.Tensor):
    """E_x E_{y∼π}[r*(x, y)] and E_x KL(π(·|x) ‖ π_ref(·|x)), both exact sums over the enumeration
    (floats)."""
    p = logp.exp()  # (P, Y)
    reward = (p * rewards).sum(-1).mean().item()
    kl = torch.where(p > 0, p * (logp - logp_ref), 0.0).sum(-1).mean().item()  # 0·log 0 = 0
    return reward, kl


def exact_frontier(logp_ref: torch.Tensor, rewards: torch.Tensor, betas):
    """Report eq. (36) swept over β: E[r*] and KL(π*_β ‖ π_ref) of π*_β = π_ref·exp(r*/β)/Z, by
    enumeration.

    Returns two float64 arrays over `betas`. Smaller β buys more reward for more KL; nothing lies
    above the curve, because E_π[r*] − β·KL(π‖π_ref) ≤ β·log Z(β) for every π (eq. (35)).
    """
    rewards_out, kls = [], []
    for beta in betas:
        logp = optimal_policy(logp_ref.exp(), rewards, beta).log()  # (P, Y)
        r, kl = exact_reward_and_kl(logp, logp_ref, rewards)
        rewards_out.append(r)
        kls.append(kl)
    return np.array(rewards_out), np.array(kls)


def frontier_reward(kl: float, front_rewards, front_kls) -> float:
    """The most reward any policy can have at this KL: the frontier, sampled densely over β,
    interpolated in KL.

    front_rewards, front_kls: the frontier's points in any order (as `exact_frontier` returns them,
    plus π_ref's point at KL 0). Beyond the largest KL (β → 0, all mass on the best responses) the
    frontier stays flat.
    """
    front_rewards, front_kls = (
        np.asarray(front_rewards, dtype=float),
        np.asarray(front_kls, dtype=float),
    )
    if front_rewards.shape != front_kls.shape or front_kls.ndim != 1 or len(front_kls) == 0:
        raise ValueError(
            f"the frontier needs as many rewards as KLs, at least one; got shapes "
            f"{front_rewards.shape} and {front_kls.shape}"
        )
    order = np.argsort(front_kls)
    return float(np.interp(kl, front_kls[order], front_rewards[order]))


def efficiency(
    reward: float, kl: float, front_rewards, front_kls, ref_reward: float, min_kl: float = 1e-3
) -> float:
    """A point's reward gain over π_ref as a share of the frontier's gain at the same KL (1 = on the
    frontier).

    (reward − E_ref[r*]) / (frontier_reward(kl) − E_ref[r*]). Above 1 the point lies above the
    frontier (no policy can); nan at KL ≤ `min_kl`, where both gains vanish and their ratio is
    noise.
    """
    if kl <= min_kl:
        return math.nan
    return (reward - ref_reward) / (frontier_reward(kl, front_rewards, front_kls) - ref_reward)


@torch.no_grad()
def sampled_kl(
    policy: GPT, ref: GPT, prompts: torch.Tensor, per_prompt: int, generator: torch.Generator
):
    """The paper's KL estimate: Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)) on sampled y ∼ π, and log
    π/π_ref beside it.

    Both are unbiased for the sequence KL (the first by the chain rule). Returns (per-token mean,
    its standard error, log-ratio mean, its standard error).
    """
    policy.eval()
    x = prompts.repeat_interleave(per_prompt, 0)  # (P·k, PROMPT_LEN)
    ids = generate(policy, x, RESPONSE_LEN, generator=generator)  # (P·k, SEQ_LEN)
    logp = torch.log_softmax(policy(ids).double(), -1)[
        :, PROMPT_LEN - 1 : -1
    ]  # (B, RESPONSE_LEN, V)
    logq = torch.log_softmax(ref(ids).double(), -1)[:, PROMPT_LEN - 1 : -1]
    per_token = (logp.exp() * (logp - logq)).sum(-1).sum(-1)  # (B,)
    y = ids[:, PROMPT_LEN:, None]  # (B, RESPONSE_LEN, 1)
    ratio = (logp.gather(-1, y) - logq.gather(-1, y)).sum((-1, -2))  # (B,)
    se = lambda v: (v.std() / math.sqrt(len(v))).item()  # noqa: E731
    return per_token.mean().item(), se(per_token), ratio.mean().item(), se(ratio)


def evaluate_checkpoint(
    policy: GPT, ref: GPT, prompts, logp_ref, rewards, per_prompt: int, generator
) -> tuple:
    """Exact E[r*] and KL(π‖π_ref) by enumeration, beside the sampled estimates; returns (log π (P,
    Y), row dict)."""
    logp = enumerate_logprobs(policy, prompts)
    reward, kl = exact_reward_and_kl(logp, logp_ref, rewards)
    tok, tok_se, ratio, ratio_se = sampled_kl(policy, ref, prompts, per_prompt, generator)
    return logp, dict(
        reward=reward,
        kl=kl,
        kl_per_token=tok,
        kl_per_token_se=tok_se,
        kl_log_ratio=ratio,
        kl_log_ratio_se=ratio_se,
    )


# ---------------------------------------------------------------- the settings (chapters 7 and 10)

# The experiment's settings. sft_*: fitting π_ref to the process; steps, checkpoints, batch_size,
# lr: each offline method's fine-tuning budget (DPO over dpo_betas, ...); rm_steps: the reward
# model; ppo_*: PPO's sweep.
SETTINGS = {  # name: (full run, --quick)
    "prompts": (16, 4),
    "sft_sequences": (20_000, 4000),
    "sft_steps": (1000, 150),
    "sft_batch": (256, 256),
    "sft_lr": (3e-3, 3e-3),
    "draws": (64, 16),
    "k": (4, 4),
    "steps": (400, 40),
    "checkpoints": ((100, 200, 300, 400), (20, 40)),
    "batch_size": (64, 64),
    "lr": (1e-3, 1e-3),
    "dpo_betas": ((0.25, 0.5, 1.0, 2.0, 4.0), (0.5, 2.0)),
    "ul_alphas": ((0.05, 0.1, 0.5, 1.0), (0.5,)),
    "pft_seeds": ((0, 1), (0,)),
    "rm_steps": (600, 40),
    "ppo_betas": ((0.25, 0.5, 1.0, 2.0, 4.0), (1.0,)),
    "ppo_checkpoints": ((50, 100, 150, 200), (10, 20)),
    "best_of": ((1, 2, 4, 8, 16, 32, 64, 128, 256), (1, 4, 16)),
    "kl_samples": (32, 8),
    "frontier": (np.geomspace(0.02, 200.0, 200), np.geomspace(0.05, 100.0, 60)),
}
FULL = {name: full for name, (full, _) in SETTINGS.items()}
QUICK = {name: quick for name, (_, quick) in SETTINGS.items()}
