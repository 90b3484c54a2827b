"""Chapter 7 (report §6.1, the DPO paper's Fig. 1 left): the reward–KL frontier in miniature, with the exact optimum.

The paper asks which method buys the most reward for a given KL(π‖π_ref). Here the task is small enough to
enumerate: 8 tokens (2 positive, 2 negative, 4 neutral), prompts of 2 tokens, responses of 5 tokens, so each of
16 prompts (of the 64 possible) has 8^5 = 32,768 responses and every expectation is an exact sum. That lets us
draw what the paper could not: the frontier of π*_β = π_ref·exp(r*/β)/Z (eq. 36), which no policy can cross.

    python3 -m chapters.ch7_frontier            # the full sweep (about 5 minutes on 2 busy cores)
    python3 -m chapters.ch7_frontier --quick    # a short form of the same run (under a minute)
"""
import argparse
import copy
import csv
import math
import time
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from chapters import one_thread
from chapters.reward_model import PreferencePairs, RewardModel, pair_accuracy, train_reward_model
from chapters.ch3_kl_optimum import optimal_policy
from chapters.ch4_dpo import dpo_loss, response_logprobs
from chapters.ppo_trainer import PPOConfig, PPOTrainer
from chapters.plotting import plots_dir, plt, save
from gpt import GPT, GPTConfig, KVCache, generate

VOCAB = 8
SENTIMENT = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # tokens 0,1 +; 2,3 −
PROMPT_LEN, RESPONSE_LEN = 2, 5
SEQ_LEN = PROMPT_LEN + RESPONSE_LEN
RESPONSE_MASK = torch.tensor([0] * PROMPT_LEN + [1] * RESPONSE_LEN)  # (SEQ_LEN,): which tokens are the response


# ---------------------------------------------------------------- the task


def true_reward(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """The ground-truth reward r*(x, y): Σ_t s(y_t)·(1 + [y_t ∈ x]), s = +1 positive, −1 negative, 0 neutral.

    A token's sentiment counts double when it echoes a prompt token, so the best response depends on the prompt.
    prompts (..., PROMPT_LEN) and responses (..., RESPONSE_LEN) broadcast; returns float64 (...).
    """
    echo = (responses[..., :, None] == prompts[..., None, :]).any(-1)  # (..., RESPONSE_LEN)
    return (SENTIMENT[responses] * (1.0 + echo)).sum(-1)


def all_responses() -> torch.Tensor:
    """Every response, (VOCAB**RESPONSE_LEN, RESPONSE_LEN), in lexicographic order (first token slowest)."""
    return torch.cartesian_prod(*[torch.arange(VOCAB)] * RESPONSE_LEN)


def task_prompts(n: int) -> torch.Tensor:
    """The task's n prompts, (n, PROMPT_LEN): the first n of all VOCAB**2 prompts in a fixed shuffled order."""
    if not 1 <= n <= VOCAB**PROMPT_LEN:
        raise ValueError(f"the number of prompts must be in 1..{VOCAB**PROMPT_LEN}, got {n}")
    every = torch.cartesian_prod(*[torch.arange(VOCAB)] * PROMPT_LEN)  # (64, 2)
    return every[torch.randperm(len(every), generator=torch.Generator().manual_seed(1234))[:n]]


def transition_matrix() -> torch.Tensor:
    """The known random process behind the reference: a Markov chain where positive tokens are rare and repeat.

    P(next = b | a) ∝ base(b)·(1 + 2·[a = b]); base gives positive tokens 0.04, negative 0.16, neutral 0.15.
    """
    base = torch.tensor([0.04, 0.04, 0.16, 0.16, 0.15, 0.15, 0.15, 0.15], dtype=torch.float64)
    T = base[None, :] * (1.0 + 2.0 * torch.eye(VOCAB, dtype=torch.float64))  # (V, V)
    return T / T.sum(-1, keepdim=True)


def sample_process(prompts: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n sequences (n, SEQ_LEN) of the process: a prompt drawn uniformly from `prompts`, then the Markov chain."""
    T = transition_matrix()
    seq = [prompts[torch.randint(len(prompts), (n,), generator=generator)]]  # [(n, PROMPT_LEN)]
    last = seq[0][:, -1]
    for _ in range(RESPONSE_LEN):
        last = torch.multinomial(T[last], 1, generator=generator).squeeze(-1)  # (n,)
        seq.append(last[:, None])
    return torch.cat(seq, dim=1)


def process_logprobs(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """log P(y | x) under the known process, float64; prompts (P, PROMPT_LEN), responses (Y, RESPONSE_LEN) -> (P, Y)."""
    logT = transition_matrix().log()
    prev = torch.cat([prompts[:, None, -1:].expand(-1, len(responses), 1),
                      responses[None, :, :-1].expand(len(prompts), -1, -1)], dim=-1)  # (P, Y, RESPONSE_LEN)
    return logT[prev, responses[None].expand_as(prev)].sum(-1)


def new_model(seed: int) -> GPT:
    """The tiny GPT-2 config used for every policy here (vocabulary 8, context 7, 2 layers of width 32)."""
    torch.manual_seed(seed)
    return GPT(GPTConfig.tiny(vocab_size=VOCAB, n_positions=SEQ_LEN))


def sequence(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """Prompt and response side by side: (B, SEQ_LEN)."""
    return torch.cat([prompts, responses], dim=-1)


def logprob(model: GPT, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """log π(y | x) for a batch, (B,), through `chapters.ch4_dpo.response_logprobs`."""
    ids = sequence(prompts, responses)  # (B, SEQ_LEN)
    return response_logprobs(model(ids), ids, RESPONSE_MASK.expand_as(ids))


# ---------------------------------------------------------------- exact evaluation by enumeration


@torch.no_grad()
def enumerate_logprobs(model: GPT, prompts: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """log π(y | x) of every response of every prompt, (P, VOCAB**RESPONSE_LEN) float64, by walking the prefix tree.

    Level t feeds one token to each of the P·8^t prefixes, whose keys and values sit in a KV cache that is
    copied 8 times (one per next token) before each level: 8 + 64 + 512 + 4096 one-token steps per prompt
    instead of 32,768 full sequences. Columns follow `all_responses()`.
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
            cache.reorder(torch.arange(rows).repeat_interleave(VOCAB))  # each prefix once per next token
            token = torch.arange(VOCAB).repeat(rows)[:, None]  # (rows·V, 1)
            step = torch.log_softmax(model(token, cache=cache)[:, -1].double(), -1)  # (rows·V, V)
            logp = (logp.reshape(P, -1, 1) + step.view(P, -1, VOCAB)).reshape(P, -1)  # (P, 8^(t+2))
        out.append(logp)
    model.train(was_training)
    return torch.cat(out)


def exact_reward_and_kl(logp: torch.Tensor, logp_ref: torch.Tensor, rewards: torch.Tensor):
    """E_x E_{y∼π}[r*(x, y)] and E_x KL(π(·|x) ‖ π_ref(·|x)), both exact sums over the enumeration (floats)."""
    p = logp.exp()  # (P, Y)
    reward = (p * rewards).sum(-1).mean().item()
    kl = torch.where(p > 0, p * (logp - logp_ref), 0.0).sum(-1).mean().item()  # 0·log 0 = 0
    return reward, kl


def exact_frontier(logp_ref: torch.Tensor, rewards: torch.Tensor, betas):
    """Report eq. (36) swept over β: E[r*] and KL(π*_β ‖ π_ref) of π*_β = π_ref·exp(r*/β)/Z, by enumeration.

    Returns two float64 arrays over `betas`. Smaller β buys more reward for more KL; nothing lies above the curve,
    because E_π[r*] − β·KL(π‖π_ref) ≤ β·log Z(β) for every π (eq. 35).
    """
    rewards_out, kls = [], []
    for beta in betas:
        logp = optimal_policy(logp_ref.exp(), rewards, beta).log()  # (P, Y)
        r, kl = exact_reward_and_kl(logp, logp_ref, rewards)
        rewards_out.append(r)
        kls.append(kl)
    return np.array(rewards_out), np.array(kls)


def frontier_reward(kl: float, front_rewards: np.ndarray, front_kls: np.ndarray) -> float:
    """The most reward any policy can have at this KL: the frontier, sampled densely over β, interpolated in KL.

    Beyond the frontier's largest KL (β → 0, all mass on the best responses) it stays flat.
    """
    order = np.argsort(front_kls)
    return float(np.interp(kl, front_kls[order], front_rewards[order]))


def best_of_n_logprobs(logp_ref: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Best-of-N's exact distribution: P(y) = π_ref(y)/m(s)·(F(s)^N − (F(s) − m(s))^N), s = score(y).

    F(s) = π_ref(score ≤ s), m(s) = π_ref(score = s): the best of N draws has score ≤ s with probability F(s)^N,
    and a tie among responses of equal score is broken uniformly, so within a score level π_ref's shape stays.
    With all scores distinct m(s) = π_ref(y). Computed in log space as
    log π_ref(y) + (N−1)·log F + log(expm1(N·d)/expm1(d)), d = log(1 − m/F), which is stable for tiny m.
    logp_ref, scores: (P, Y); returns log-probs (P, Y).
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
    d = torch.log1p(-(m / Fs).clamp(max=1.0))  # log((F − m)/F) ≤ 0, −inf when the level is the lowest
    if n == 1:
        ratio = torch.zeros_like(d)
    else:
        ratio = torch.where(torch.isinf(d), torch.zeros_like(d), torch.log(torch.expm1(n * d) / torch.expm1(d)))
    logp_sorted = p_sorted.log() + (n - 1) * Fs.log() + ratio
    return torch.empty_like(logp_sorted).scatter_(-1, order, logp_sorted)


@torch.no_grad()
def sampled_kl(policy: GPT, ref: GPT, prompts: torch.Tensor, per_prompt: int, generator: torch.Generator):
    """The paper's KL estimate: Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)) on sampled y ∼ π, and log π/π_ref beside it.

    Both are unbiased for the sequence KL (the first by the chain rule). Returns
    (per-token mean, its standard error, log-ratio mean, its standard error).
    """
    policy.eval()
    x = prompts.repeat_interleave(per_prompt, 0)  # (P·k, PROMPT_LEN)
    ids = generate(policy, x, RESPONSE_LEN, generator=generator)  # (P·k, SEQ_LEN)
    logp = torch.log_softmax(policy(ids).double(), -1)[:, PROMPT_LEN - 1:-1]  # (B, RESPONSE_LEN, V)
    logq = torch.log_softmax(ref(ids).double(), -1)[:, PROMPT_LEN - 1:-1]
    per_token = (logp.exp() * (logp - logq)).sum(-1).sum(-1)  # (B,)
    y = ids[:, PROMPT_LEN:, None]  # (B, RESPONSE_LEN, 1)
    ratio = (logp.gather(-1, y) - logq.gather(-1, y)).sum((-1, -2))  # (B,)
    se = lambda v: (v.std() / math.sqrt(len(v))).item()  # noqa: E731
    return per_token.mean().item(), se(per_token), ratio.mean().item(), se(ratio)


# ---------------------------------------------------------------- preference data and the offline methods


def preference_pairs(ref: GPT, prompts: torch.Tensor, draws: int, k: int, generator: torch.Generator) -> dict:
    """As in the paper: k responses sampled from π_ref per prompt draw, all k(k−1)/2 pairs labelled by BT(r*).

    Report eq. (23): y1 ≻ y2 with probability σ(r*(x, y1) − r*(x, y2)), so DPO's target is exactly π*_β.
    `draws` prompt draws per prompt. Returns a dict of (N, ·) tensors: prompt, chosen, rejected.
    """
    ref.eval()
    x = prompts.repeat_interleave(draws * k, 0)  # (P·draws·k, PROMPT_LEN)
    y = generate(ref, x, RESPONSE_LEN, generator=generator)[:, PROMPT_LEN:].view(-1, k, RESPONSE_LEN)  # (D, k, L)
    x = x[::k]  # (D, PROMPT_LEN)
    i, j = torch.triu_indices(k, k, offset=1)  # all pairs i < j
    yi, yj = y[:, i], y[:, j]  # (D, pairs, L)
    gap = true_reward(x[:, None], yi) - true_reward(x[:, None], yj)  # (D, pairs)
    i_wins = torch.bernoulli(torch.sigmoid(gap), generator=generator).bool()[..., None]  # (D, pairs, 1)
    chosen, rejected = torch.where(i_wins, yi, yj), torch.where(i_wins, yj, yi)
    return dict(prompt=x[:, None].expand(-1, len(i), -1).reshape(-1, PROMPT_LEN),
                chosen=chosen.reshape(-1, RESPONSE_LEN), rejected=rejected.reshape(-1, RESPONSE_LEN))


def sft_loss(policy: GPT, batch: dict) -> torch.Tensor:
    """−E log π(y_w | x): SFT on the preferred responses (Preferred-FT), or on the process text (the reference)."""
    return -logprob(policy, batch["prompt"], batch["chosen"]).mean()


def dpo_batch_loss(policy: GPT, batch: dict, beta: float) -> torch.Tensor:
    """Report eq. (38) on a batch, through `chapters.ch4_dpo.dpo_loss`; reference log-probs come precomputed."""
    n = len(batch["prompt"])
    logps = logprob(policy, batch["prompt"].repeat(2, 1), torch.cat([batch["chosen"], batch["rejected"]]))  # (2n,)
    return dpo_loss(logps[:n], logps[n:], batch["ref_chosen"], batch["ref_rejected"], beta).mean()


def unlikelihood_loss(policy: GPT, batch: dict, alpha: float) -> torch.Tensor:
    """Report §6.1, Unlikelihood (ref. [19]): −log π(y_w|x) − α·Σ_t log(1 − π(y_l,t | x, y_l,<t))."""
    ids = sequence(batch["prompt"], batch["rejected"])  # (B, SEQ_LEN)
    logp = torch.log_softmax(policy(ids)[:, PROMPT_LEN - 1:-1], -1)  # (B, RESPONSE_LEN, V)
    p_rejected = logp.gather(-1, ids[:, PROMPT_LEN:, None]).squeeze(-1).exp()  # (B, RESPONSE_LEN)
    unlikely = torch.log1p(-p_rejected.clamp(max=1 - 1e-6)).sum(-1)  # (B,)
    return (-logprob(policy, batch["prompt"], batch["chosen"]) - alpha * unlikely).mean()


def finetune(policy: GPT, loss_fn, data: dict, steps: int, checkpoints, batch_size: int, lr: float,
             generator: torch.Generator, desc: str) -> list:
    """Adam on `loss_fn(policy, minibatch)`; returns [(step, state_dict)] at each step in `checkpoints`."""
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    policy.train()
    saved = []
    n = len(next(iter(data.values())))
    for step in tqdm(range(1, steps + 1), desc=desc, leave=False):
        idx = torch.randint(n, (batch_size,), generator=generator)
        loss = loss_fn(policy, {k: v[idx] for k, v in data.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in checkpoints:
            saved.append((step, copy.deepcopy(policy.state_dict())))
    policy.eval()
    return saved


# ---------------------------------------------------------------- the reward model and PPO (chapters 2 and 6)


def true_reward_fn(input_ids: torch.Tensor, attention_mask=None, response_mask=None) -> torch.Tensor:
    """r*(x, y) in the form `PPOTrainer` calls a reward: on (B, SEQ_LEN) ids, prompt first (no padding here)."""
    return true_reward(input_ids[:, :PROMPT_LEN], input_ids[:, PROMPT_LEN:])


def learn_reward_model(ref: GPT, data: dict, steps: int, generator: torch.Generator) -> RewardModel:
    """Report eq. (26) via `chapters.ch2_reward_model`: r_φ = a scalar head on a copy of π_ref, fitted to the pairs."""
    ones = torch.ones(len(data["prompt"]), SEQ_LEN, dtype=torch.long)
    pairs = PreferencePairs(sequence(data["prompt"], data["chosen"]), ones, sequence(data["prompt"], data["rejected"]), ones)
    rm = RewardModel(copy.deepcopy(ref).requires_grad_(True))
    train_reward_model(rm, pairs, steps, batch_size=64, lr=1e-3, generator=generator)
    rm.requires_grad_(False)
    rm.train_accuracy = pair_accuracy(rm, pairs)
    return rm


@torch.no_grad()
def score_all(rm: RewardModel, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """r_φ(x, y) of every response of every prompt, (P, Y) float64, in batches of one prompt's responses."""
    return torch.stack([torch.cat([rm(sequence(x.expand(len(chunk), -1), chunk)).double()
                                   for chunk in responses.split(8192)]) for x in prompts])


def ppo_checkpoints(ref: GPT, reward_fn, prompts: torch.Tensor, beta: float, checkpoints, seed: int, desc: str):
    """PPO-based RLHF with KL coefficient β (eqs. (1)–(5), (28)) via `chapters.ch6_ppo.PPOTrainer`, from π_ref.

    Yields (iteration, policy) at each iteration count in `checkpoints`; the policy is trained in place.
    """
    policy = copy.deepcopy(ref).requires_grad_(True)
    config = PPOConfig(beta=beta, lr=1e-3, response_length=RESPONSE_LEN, batch_size=64, seed=seed)
    trainer = PPOTrainer(policy, ref, reward_fn, list(prompts), config)
    bar = tqdm(total=max(checkpoints), desc=desc, leave=False)
    for iteration in range(1, max(checkpoints) + 1):
        log = trainer.step()
        bar.update()
        bar.set_postfix(reward=f"{log['reward']:.2f}", kl=f"{log['kl']:.2f}")
        if iteration in checkpoints:
            yield iteration, policy
    bar.close()


# ---------------------------------------------------------------- the experiment

FULL = dict(prompts=16, sft_sequences=20_000, sft_steps=1000, draws=64, k=4, steps=400, checkpoints=(100, 200, 300, 400),
            dpo_betas=(0.25, 0.5, 1.0, 2.0, 4.0), ul_alphas=(0.05, 0.1, 0.5, 1.0), pft_seeds=(0, 1), rm_steps=600,
            ppo_betas=(0.25, 0.5, 1.0, 2.0, 4.0), ppo_checkpoints=(50, 100, 150, 200),
            best_of=(1, 2, 4, 8, 16, 32, 64, 128, 256), kl_samples=32, frontier=np.geomspace(0.02, 200.0, 200))
QUICK = dict(prompts=4, sft_sequences=4000, sft_steps=150, draws=16, k=4, steps=40, checkpoints=(20, 40),
             dpo_betas=(0.5, 2.0), ul_alphas=(0.5,), pft_seeds=(0,), rm_steps=40, ppo_betas=(1.0,), ppo_checkpoints=(10, 20),
             best_of=(1, 4, 16), kl_samples=8,
             frontier=np.geomspace(0.05, 100.0, 60))
COLUMNS = ["method", "setting", "step", "reward", "kl", "kl_per_token", "kl_per_token_se", "kl_log_ratio",
           "kl_log_ratio_se", "gap", "efficiency"]


def evaluate(policy: GPT, ref: GPT, prompts, logp_ref, rewards, per_prompt: int, generator) -> tuple:
    """Exact E[r*] and KL(π‖π_ref) by enumeration, beside the sampled estimates; returns (log π (P, Y), row dict)."""
    logp = enumerate_logprobs(policy, prompts)
    reward, kl = exact_reward_and_kl(logp, logp_ref, rewards)
    tok, tok_se, ratio, ratio_se = sampled_kl(policy, ref, prompts, per_prompt, generator)
    return logp, dict(reward=reward, kl=kl, kl_per_token=tok, kl_per_token_se=tok_se, kl_log_ratio=ratio,
                      kl_log_ratio_se=ratio_se)


def plot(rows, front_r, front_kl, ref_reward, dpo_logp, opt_logp, dpo_beta, kl_to_opt, name: str):
    """Fig. 1 left in miniature (exact frontier, each method's points) and DPO's log π against log π*_β."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    top_kl = max(r["kl"] for r in rows) * 1.1
    order = np.argsort(front_kl)
    keep = order[:np.searchsorted(front_kl[order], top_kl) + 1]  # up to the first frontier point past top_kl
    ax.plot(front_kl[keep], front_r[keep], "k-", lw=2, label="exact frontier π*_β (eq. 36)")
    ax.set_xlim(-0.03 * top_kl, top_kl)
    styles = {"DPO": ("C0", "o"), "PPO": ("C1", "s"), "PPO-GT": ("C2", "D"), "Unlikelihood": ("C3", "v"),
              "Preferred-FT": ("C4", "^"), "Best-of-N": ("C5", "*"), "Best-of-N (RM)": ("C7", "P")}
    for method, (color, marker) in styles.items():
        pts = [r for r in rows if r["method"] == method]
        if pts:
            ax.scatter([r["kl"] for r in pts], [r["reward"] for r in pts], c=color, marker=marker, s=36,
                       alpha=0.85, label=method, zorder=3)
    ax.axhline(ref_reward, color="grey", ls=":", lw=1, label="π_ref")
    ax.set_xlabel("KL(π ‖ π_ref), nats per response (exact, by enumeration)")
    ax.set_ylabel("E[r*(x, y)] (exact)")
    ax.set_title("Reward vs KL: no method can cross the exact frontier")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)

    hb = ax2.hexbin(opt_logp.flatten().numpy(), dpo_logp.flatten().numpy(), gridsize=60, bins="log", mincnt=1,
                    cmap="viridis")
    lo = max(min(float(opt_logp.min()), float(dpo_logp.min())) - 0.5, -40.0)
    ax2.plot([lo, 0], [lo, 0], "r--", lw=1, label="log π = log π*_β")
    ax2.set_xlim(lo, 0.5)
    ax2.set_ylim(lo, 0.5)
    ax2.set_xlabel(f"log π*_β(y|x), β = {dpo_beta} (exact optimum)")
    ax2.set_ylabel(f"log π_DPO(y|x), β = {dpo_beta} (trained)")
    ax2.set_title(f"DPO's learned policy against the optimum it targets\nKL(π_DPO ‖ π*_β) = {kl_to_opt:.3f} nats")
    fig.colorbar(hb, ax=ax2, label="responses (all prompts), log count")
    ax2.legend(loc="upper left")
    return save(fig, name)


def write_table(rows, name: str) -> str:
    """The results table as plots/<name>.csv (or under $DPO_PLOTS_DIR); returns its path."""
    path = plots_dir() / f"{name}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    print(f"table: {path}")
    return str(path)


def main(argv=None):
    """Run the chapter on one thread: these models are so small that a second thread only adds waiting."""
    with one_thread():
        return run(argv)


def run(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m chapters.ch7_frontier", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short form of the same run (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)

    prompts, responses = task_prompts(cfg["prompts"]), all_responses()
    rewards = true_reward(prompts[:, None], responses[None])  # (P, Y)
    print(f"task: {len(prompts)} prompts x {len(responses)} responses of {RESPONSE_LEN} tokens, "
          f"r* from {rewards.min():.0f} to {rewards.max():.0f}")

    print("\n1. the reference: a tiny GPT-2 fitted (SFT) to the known process")
    text = sample_process(prompts, cfg["sft_sequences"], gen)
    ref = new_model(args.seed)
    finetune(ref, sft_loss, dict(prompt=text[:, :PROMPT_LEN], chosen=text[:, PROMPT_LEN:]), cfg["sft_steps"], (),
             256, 3e-3, gen, "SFT reference")
    ref.requires_grad_(False)
    logp_ref = enumerate_logprobs(ref, prompts)
    logp_proc = process_logprobs(prompts, responses)
    print(f"   enumeration: max |Σ_y π_ref(y|x) − 1| = {(logp_ref.exp().sum(-1) - 1).abs().max():.1e}")
    print(f"   KL(process ‖ π_ref) = {(logp_proc.exp() * (logp_proc - logp_ref)).sum(-1).mean():.4f} nats "
          f"(process entropy {-(logp_proc.exp() * logp_proc).sum(-1).mean():.3f} nats per response)")
    ref_reward, _ = exact_reward_and_kl(logp_ref, logp_ref, rewards)
    print(f"   E_ref[r*] = {ref_reward:.3f}; E_process[r*] = {(logp_proc.exp() * rewards).sum(-1).mean():.3f}; "
          f"max_y r* averaged over prompts = {rewards.max(-1).values.mean():.3f}")

    print("\n2. the exact frontier, eq. (36): π*_β = π_ref·exp(r*/β)/Z for each β, by enumeration")
    front_r, front_kl = exact_frontier(logp_ref, rewards, cfg["frontier"])
    front_r, front_kl = np.append(front_r, ref_reward), np.append(front_kl, 0.0)  # β → ∞: π*_β → π_ref
    for beta in (cfg["frontier"][0], *sorted(set(cfg["dpo_betas"]) | set(cfg["ppo_betas"])), cfg["frontier"][-1]):
        (r,), (kl,) = exact_frontier(logp_ref, rewards, [beta])
        print(f"   π*_β, β = {beta:7.3f}: E[r*] = {r:6.3f}, KL = {kl:6.3f}")
    print(f"   monotone in β (reward and KL both fall as β grows): "
          f"{bool(np.all(np.diff(front_r) <= 1e-9) and np.all(np.diff(front_kl) <= 1e-9))}")

    print("\n3. preference data, as in the paper: 4 samples of π_ref per prompt draw, all 6 pairs, labels ~ BT(r*)")
    data = preference_pairs(ref, prompts, cfg["draws"], cfg["k"], gen)
    with torch.no_grad():
        data["ref_chosen"] = logprob(ref, data["prompt"], data["chosen"])
        data["ref_rejected"] = logprob(ref, data["prompt"], data["rejected"])
    gap = true_reward(data["prompt"], data["chosen"]) - true_reward(data["prompt"], data["rejected"])
    print(f"   {len(gap)} pairs; chosen better / tied / worse by r*: {(gap > 0).float().mean():.2f} / "
          f"{(gap == 0).float().mean():.2f} / {(gap < 0).float().mean():.2f}")

    print("\n4. the methods, each a sweep; every checkpoint evaluated exactly")
    rows, panel = [], {}
    runs = [("DPO", f"beta={b}", partial(dpo_batch_loss, beta=b), args.seed) for b in cfg["dpo_betas"]]
    runs += [("Preferred-FT", f"seed={s}", sft_loss, args.seed + s) for s in cfg["pft_seeds"]]
    runs += [("Unlikelihood", f"alpha={a}", partial(unlikelihood_loss, alpha=a), args.seed) for a in cfg["ul_alphas"]]
    for method, setting, loss_fn, seed in runs:
        policy = copy.deepcopy(ref).requires_grad_(True)
        run_gen = torch.Generator().manual_seed(seed)
        for step, state in finetune(policy, loss_fn, data, cfg["steps"], cfg["checkpoints"], 64, 1e-3, run_gen,
                                    f"{method} {setting}"):
            policy.load_state_dict(state)
            logp, row = evaluate(policy, ref, prompts, logp_ref, rewards, cfg["kl_samples"], gen)
            rows.append(dict(method=method, setting=setting, step=step, **row))
            if method == "DPO":
                panel[float(setting.split("=")[1])] = logp
    for n in cfg["best_of"]:
        reward, kl = exact_reward_and_kl(best_of_n_logprobs(logp_ref, rewards, n), logp_ref, rewards)
        rows.append(dict(method="Best-of-N", setting=f"N={n}", step=0, reward=reward, kl=kl, kl_per_token=math.nan,
                         kl_per_token_se=math.nan, kl_log_ratio=math.nan, kl_log_ratio_se=math.nan))
        print(f"   Best-of-{n}: exact KL = {kl:.3f} ≤ log N − (N−1)/N = {math.log(n) - (n - 1) / n:.3f} "
              f"(equal when no two responses tie)")

    print("\n   the reward model: ch2's RewardModel on a copy of π_ref, fitted to the same pairs (eq. 26)")
    rm = learn_reward_model(ref, data, cfg["rm_steps"], gen)
    rm_scores = score_all(rm, prompts, responses)  # (P, Y)
    centred = lambda v: (v - v.mean(-1, keepdim=True)).flatten().numpy()  # noqa: E731  (r_φ is free up to f(x))
    print(f"   pair accuracy {rm.train_accuracy:.3f} (r* itself: {((gap > 0) + 0.5 * (gap == 0)).double().mean():.3f}); "
          f"corr(r_φ, r*) over all responses, centred per prompt: {np.corrcoef(centred(rm_scores), centred(rewards))[0, 1]:.3f}")
    for n in cfg["best_of"]:
        reward, kl = exact_reward_and_kl(best_of_n_logprobs(logp_ref, rm_scores, n), logp_ref, rewards)
        rows.append(dict(method="Best-of-N (RM)", setting=f"N={n}", step=0, reward=reward, kl=kl,
                         kl_per_token=math.nan, kl_per_token_se=math.nan, kl_log_ratio=math.nan,
                         kl_log_ratio_se=math.nan))
    rm_fn = lambda ids, mask, response_mask: rm(ids, mask)  # noqa: E731
    for method, reward_fn in (("PPO", rm_fn), ("PPO-GT", true_reward_fn)):
        for beta in cfg["ppo_betas"]:
            for step, policy in ppo_checkpoints(ref, reward_fn, prompts, beta, cfg["ppo_checkpoints"], args.seed,
                                                f"{method} beta={beta}"):
                _, row = evaluate(policy, ref, prompts, logp_ref, rewards, cfg["kl_samples"], gen)
                rows.append(dict(method=method, setting=f"beta={beta}", step=step, **row))

    for r in rows:  # gap ≥ 0 for every policy; efficiency: the share of the frontier's gain over π_ref at this KL
        best = frontier_reward(r["kl"], front_r, front_kl)
        r["gap"] = best - r["reward"]
        r["efficiency"] = (r["reward"] - ref_reward) / (best - ref_reward) if r["kl"] > 1e-3 else math.nan
    sampled = [r for r in rows if not math.isnan(r["kl_per_token"])]
    z_tok = [abs(r["kl_per_token"] - r["kl"]) / r["kl_per_token_se"] for r in sampled if r["kl_per_token_se"] > 0]
    z_ratio = [abs(r["kl_log_ratio"] - r["kl"]) / r["kl_log_ratio_se"] for r in sampled if r["kl_log_ratio_se"] > 0]
    print("\n5. the sampled KL estimates against the exact KL (|estimate − exact| / standard error, median):")
    print(f"   paper's Σ_t per-token KL: {np.median(z_tok):.2f}, mean SE {np.mean([r['kl_per_token_se'] for r in sampled]):.4f}; "
          f"log π/π_ref: {np.median(z_ratio):.2f}, mean SE {np.mean([r['kl_log_ratio_se'] for r in sampled]):.4f}")

    print("\n6. results (gap = frontier reward at the same KL − reward; ≥ 0 for every valid policy)")
    print(f"   {'method':<16}{'setting':<12}{'step':>5}{'E[r*]':>9}{'KL':>8}{'KL/tok (MC)':>14}{'gap':>8}{'effic.':>8}")
    for r in rows:
        mc = "" if math.isnan(r["kl_per_token"]) else f"{r['kl_per_token']:.3f}±{r['kl_per_token_se']:.3f}"
        print(f"   {r['method']:<16}{r['setting']:<12}{r['step']:>5}{r['reward']:>9.3f}{r['kl']:>8.3f}{mc:>14}"
              f"{r['gap']:>8.3f}{r['efficiency']:>8.2f}")
    print(f"   highest point above the frontier: {-min(r['gap'] for r in rows):.1e} (≤ 0 up to float error: none)")
    print("\n   closeness to the frontier, per method: mean gap, mean efficiency "
          "(reward gain over π_ref / the frontier's gain at the same KL), largest KL reached")
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        summary[method] = dict(mean_gap=float(np.mean([r["gap"] for r in pts])),
                               mean_efficiency=float(np.nanmean([r["efficiency"] for r in pts])),
                               max_kl=max(r["kl"] for r in pts), max_reward=max(r["reward"] for r in pts))
        s = summary[method]
        print(f"   {method:<16} mean gap {s['mean_gap']:.3f}, mean efficiency {s['mean_efficiency']:.2f}, "
              f"KL up to {s['max_kl']:.2f}, E[r*] up to {s['max_reward']:.2f} ({len(pts)} points)")
    best = max(summary, key=lambda m: summary[m]["mean_efficiency"])
    print(f"   closest to the frontier (highest mean efficiency): {best}")

    dpo_beta = sorted(panel)[len(panel) // 2]
    opt_logp = optimal_policy(logp_ref.exp(), rewards, dpo_beta).log()
    dpo_logp = panel[dpo_beta]
    kl_to_opt = (dpo_logp.exp() * (dpo_logp - opt_logp)).sum(-1).mean().item()
    corr = np.corrcoef(opt_logp.flatten().numpy(), dpo_logp.flatten().numpy())[0, 1]
    print(f"\n7. DPO (β = {dpo_beta}, last checkpoint) against π*_β: KL(π_DPO ‖ π*_β) = {kl_to_opt:.3f} nats, "
          f"corr(log π_DPO, log π*_β) = {corr:.3f}")
    name = "ch7_frontier_quick" if args.quick else "ch7_frontier"  # --quick never overwrites the committed results
    plot(rows, front_r, front_kl, ref_reward, dpo_logp, opt_logp, dpo_beta, kl_to_opt, name)
    write_table(rows, name)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    return dict(rows=rows, summary=summary, frontier=(front_r, front_kl), betas=np.append(cfg["frontier"], np.inf), logp_ref=logp_ref,
                rewards=rewards, prompts=prompts)


if __name__ == "__main__":
    main()
