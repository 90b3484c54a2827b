"""Chapter 6 (report §2.2, §3.3; eqs (1)–(5), (28)): PPO with GAE, and PPO-based RLHF on the hand-written GPT-2.

The loss pieces are pure functions on per-token tensors (last axis = time); `PPOTrainer` puts them
together for a language model: sample responses, score them, turn scores into per-token rewards
(eq. 28), compute advantages (eq. 5), then several epochs of minibatch updates of eq. (4).

The language-model MDP: the state s_t is prompt + y_<t, the action a_t is the token y_t, the episode
ends after the response's last token; π(a_t | s_t) and V(s_t) are read at the position before y_t.
"""
import argparse
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

import gpt
from chapters import one_thread
from chapters.ch3_kl_optimum import rlhf_token_rewards
from gpt.generation import left_pad


# ---------------------------------------------------------------------------------------------------
# The loss pieces, eqs (1)–(5): pure functions, per token, last axis = time
# ---------------------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of `x` over the positions where `mask` is 1 (all positions when mask is None)."""
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float, mask: torch.Tensor | None = None):
    """Report eq. (5): A_t = Σ_{l=0}^{T−t−1} (γλ)^l δ_{t+l}, δ_t = r_t + γ·V(s_{t+1}) − V(s_t).

    rewards, values: (..., T). The episode ends after the last step (V(s_T) = 0), or, with `mask`
    (..., T) of 1s followed by 0s, after its last 1; masked positions get advantage 0 and return 0.
    Computed by the backward recursion A_t = δ_t + γλ·A_{t+1}. Returns (advantages, returns), the
    returns being A_t + V(s_t) (the TD(λ) return, the value target of eq. (2)), both (..., T).
    """
    mask = torch.ones_like(rewards) if mask is None else mask.to(rewards.dtype)
    next_mask = torch.cat([mask[..., 1:], torch.zeros_like(mask[..., :1])], dim=-1)  # (..., T): s_{t+1} exists
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1) * next_mask
    deltas = (rewards + gamma * next_values - values) * mask  # (..., T)
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[..., 0])  # A_{t+1}, (...)
    for t in reversed(range(rewards.shape[-1])):
        running = deltas[..., t] + gamma * lam * next_mask[..., t] * running
        advantages[..., t] = running
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the positions where `mask` is 1 (population variance); masked positions become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if mask is None else out * mask.to(x.dtype)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float):
    """Report eq. (1): min(r_t(θ)·A_t, clip(r_t(θ), 1 − ε, 1 + ε)·A_t), r_t(θ) = π_θ(a_t|s_t) / π_θold(a_t|s_t), per token.

    The expectation of eq. (1) is `masked_mean` of this. Its gradient is zero where the clip binds
    (r > 1 + ε with A > 0, r < 1 − ε with A < 0) and is the unclipped ∇(r·A) elsewhere.
    """
    ratio = torch.exp(logp - old_logp)
    return torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)


def value_loss(values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor | None = None,
               clip_eps: float | None = None) -> torch.Tensor:
    """Report eq. (2): (V_θ(s_t) − V_t^target)², per token; with `old_values` and `clip_eps`, the clipped variant.

    Clipped (as in OpenAI's baselines and RLHF code): max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²),
    which stops the value moving further than ε from the value at sampling time in one round.
    """
    loss = (values - returns) ** 2
    if clip_eps is None or old_values is None:
        return loss
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return torch.maximum(loss, (clipped - returns) ** 2)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Report eq. (3)'s H(π_θ) = −Σ_a π_θ(a|s) log π_θ(a|s), over the last axis of `logits` (..., A) -> (...)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def ppo_objective(surrogate, value_losses, entropies, mask=None, vf_coef: float = 0.5, ent_coef: float = 0.0):
    """Report eq. (4), signs corrected: L = E[L^CLIP] − c1·E[L^V] + c2·E[H], to MAXIMISE (minimise −L).

    The report writes L^H = E[−β·H] (eq. 3) and adds it with +c2, so maximising L would lower the
    entropy, the opposite of the "entropy bonus" it describes; PPO (Schulman et al. 2017, eq. 9) adds
    +c2·H. The report also calls L a loss to minimise; minimising it would lower the surrogate and
    raise the value error. L is an objective; the trainer minimises −L.
    All three inputs are per token (..., T) and averaged over `mask`.
    """
    return (masked_mean(surrogate, mask) - vf_coef * masked_mean(value_losses, mask)
            + ent_coef * masked_mean(entropies, mask))


# ---------------------------------------------------------------------------------------------------
# KL estimators (the RLHF reward of eq. (28) is chapters.ch3_kl_optimum.rlhf_token_rewards)
# ---------------------------------------------------------------------------------------------------

def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π(a) − log π_ref(a), for a ~ π: an unbiased, sometimes negative, estimate of KL(π ‖ π_ref)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (ρ − 1) − log ρ with ρ = π_ref(a)/π(a), for a ~ π: unbiased for KL(π ‖ π_ref) and never negative."""
    log_rho = ref_logp - logp
    return torch.expm1(log_rho) - log_rho


class AdaptiveKLController:
    """Ziegler et al. (2019) §2.2: β ← β·(1 + K·clip(KL/KL_target − 1, −0.2, 0.2)), K = samples / horizon."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_samples / self.horizon
        return self.beta


# ---------------------------------------------------------------------------------------------------
# PPO for a GPT: value head, per-token log-probs, the trainer
# ---------------------------------------------------------------------------------------------------

class ValueHead(nn.Module):
    """V(s_t): a scalar per position from the GPT's final hidden states (`model.hidden_states`), (B, T, C) -> (B, T)."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.linear = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.linear.weight)  # start at V = 0: no prior on the return
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


def policy_forward(model: gpt.GPT, input_ids, attention_mask, start: int, value_head: ValueHead | None = None):
    """π(·|s_t) logits (B, R, V), log π(y_t|s_t) (B, R) and, with `value_head`, V(s_t) (B, R) for the tokens input_ids[:, start:].

    The state s_t before token t is read at position t − 1. Summed over a response mask, the log-probs are
    `chapters.ch4_dpo.response_logprobs`.
    """
    hidden = model.hidden_states(input_ids, attention_mask)[:, start - 1:-1]  # (B, R, C): states s_t
    logits = model.lm_head(hidden).float()  # (B, R, V)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, start:, None]).squeeze(-1)  # (B, R)
    return logits, logp, value_head(hidden) if value_head is not None else None


@dataclass
class PPOConfig:
    """Hyper-parameters of `PPOTrainer`. Sampling is at temperature 1 (on-policy, as PPO assumes)."""
    lr: float = 1e-4
    beta: float = 0.05  # KL coefficient of eq. (28)
    kl_target: float | None = None  # set it to adapt β (AdaptiveKLController); None keeps β fixed
    kl_horizon: int = 10_000
    clip_eps: float = 0.2  # ε of eq. (1)
    value_clip_eps: float | None = 0.2  # ε of the clipped eq. (2); None for plain eq. (2)
    vf_coef: float = 0.1  # c1 of eq. (4)
    ent_coef: float = 0.0  # c2 of eq. (4)
    gamma: float = 1.0  # γ of eq. (5)
    lam: float = 0.95  # λ of eq. (5)
    batch_size: int = 64  # prompts sampled per iteration
    epochs: int = 4  # passes over each batch
    minibatch_size: int = 16
    response_length: int = 16  # new tokens per response
    eos_id: int | None = None  # a response ends at its first eos_id (kept, then masked)
    whiten_advantages: bool = True
    max_grad_norm: float | None = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("lr", "clip_eps", "batch_size", "epochs", "minibatch_size", "response_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.beta < 0 or not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"need beta >= 0 and gamma, lam in [0, 1]; got {self.beta}, {self.gamma}, {self.lam}")


class PPOTrainer:
    """PPO-based RLHF (report §2.2 and eq. (28)) for a `gpt.GPT` policy against a frozen reference.

    policy: the GPT to train (updated in place; a `ValueHead` on its hidden states is added).
    ref: the frozen reference π_ref, a separate model (usually a copy of the SFT policy); its gradients are turned off.
    reward_fn(input_ids, attention_mask, response_mask) -> (B,) scores, called on prompt + response
    ids (B, T) with masks (B, T); a true reward or a learned reward model (`lambda ids, am, rm: model(ids, am)`).
    prompts: a list of token-id sequences (lists or 1-D tensors), left-padded into batches.
    """

    def __init__(self, policy: gpt.GPT, ref: gpt.GPT, reward_fn, prompts, config: PPOConfig | None = None):
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt (a list of token ids)")
        config = config or PPOConfig()
        self.policy, self.ref, self.reward_fn, self.config = policy, ref, reward_fn, config
        self.prompts = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
        self.policy.eval()  # no dropout: the ratio π_θ/π_θold must be 1 before the first step
        self.ref.eval().requires_grad_(False)
        self.value_head = ValueHead(policy.config.n_embd)
        params = list(policy.parameters()) + list(self.value_head.parameters())
        self.optimizer = torch.optim.Adam(params, lr=config.lr)
        self.kl_ctl = (AdaptiveKLController(config.beta, config.kl_target, config.kl_horizon)
                       if config.kl_target is not None else None)
        self.beta = config.beta
        self.generator = torch.Generator().manual_seed(config.seed)
        self.history = []

    def sample_prompts(self, n: int):
        """n prompts drawn at random, left-padded: ids (n, P) and attention mask (n, P)."""
        idx = torch.randint(len(self.prompts), (n,), generator=self.generator)
        return left_pad([self.prompts[i] for i in idx], pad_id=0)

    @torch.no_grad()
    def rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> dict:
        """Sample responses, score them, and compute eq. (28) rewards and eq. (5) advantages; a dict of (B, ...) tensors."""
        cfg, P = self.config, prompt_ids.shape[1]
        seq = gpt.generate(self.policy, prompt_ids, cfg.response_length, eos_id=cfg.eos_id,
                           attention_mask=prompt_mask, generator=self.generator)  # (B, P + R)
        mask = response_mask(seq[:, P:], cfg.eos_id)  # (B, R)
        attention_mask = torch.cat([prompt_mask, mask], dim=1)  # (B, P + R)
        _, logp, values = policy_forward(self.policy, seq, attention_mask, P, self.value_head)
        _, ref_logp, _ = policy_forward(self.ref, seq, attention_mask, P)
        full_response_mask = torch.cat([torch.zeros_like(prompt_mask), mask], dim=1)  # (B, P + R)
        scores = self.reward_fn(seq, attention_mask, full_response_mask).float()  # (B,)
        rewards = rlhf_token_rewards(scores, logp, ref_logp, mask, self.beta)  # (B, R)
        advantages, returns = gae(rewards, values * mask, cfg.gamma, cfg.lam, mask)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        return dict(input_ids=seq, attention_mask=attention_mask, mask=mask, start=P, logp=logp, ref_logp=ref_logp,
                    values=values, scores=scores, rewards=rewards, advantages=advantages, returns=returns)

    def update(self, batch: dict) -> dict:
        """`epochs` passes of minibatch ascent on eq. (4) over one rollout; the mean of each logged quantity."""
        cfg, logs = self.config, []
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(batch["scores"]), generator=self.generator).split(cfg.minibatch_size):
                mask = batch["mask"][idx]
                logits, logp, values = policy_forward(self.policy, batch["input_ids"][idx], batch["attention_mask"][idx],
                                                    batch["start"], self.value_head)
                old_logp, advantages = batch["logp"][idx], batch["advantages"][idx]
                surrogate = clipped_surrogate(logp, old_logp, advantages, cfg.clip_eps)
                v_loss = value_loss(values, batch["returns"][idx], batch["values"][idx], cfg.value_clip_eps)
                ent = entropy(logits)
                objective = ppo_objective(surrogate, v_loss, ent, mask, cfg.vf_coef, cfg.ent_coef)
                self.optimizer.zero_grad()
                (-objective).backward()
                if cfg.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    ratio = torch.exp(logp - old_logp)
                    logs.append(dict(policy_objective=masked_mean(surrogate, mask).item(),
                                     value_loss=masked_mean(v_loss, mask).item(),
                                     entropy=masked_mean(ent, mask).item(),
                                     clip_frac=masked_mean(((ratio - 1).abs() > cfg.clip_eps).float(), mask).item(),
                                     approx_kl=masked_mean(kl_k3(old_logp, logp), mask).item()))  # KL(π_old ‖ π_θ)
        return {k: sum(log[k] for log in logs) / len(logs) for k in logs[0]}

    def step(self) -> dict:
        """One PPO iteration: rollout, update, (maybe) adapt β. Returns its log (reward, KL, clip fraction, ...)."""
        batch = self.rollout(*self.sample_prompts(self.config.batch_size))
        mask = batch["mask"]
        kl = (kl_k1(batch["logp"], batch["ref_logp"]) * mask).sum(-1).mean().item()  # per sequence
        log = dict(reward=batch["scores"].mean().item(), kl=kl,
                   kl_k3=(kl_k3(batch["logp"], batch["ref_logp"]) * mask).sum(-1).mean().item(),
                   beta=self.beta, response_length=mask.sum(-1).float().mean().item())
        log.update(self.update(batch))
        if self.kl_ctl is not None:
            self.beta = self.kl_ctl.update(kl, self.config.batch_size)
        self.history.append(log)
        return log

    def train(self, iterations: int, progress: bool = True) -> list[dict]:
        """`iterations` PPO steps with a progress bar showing reward and KL; returns the logs."""
        bar = tqdm(range(iterations), desc="PPO", disable=not progress)
        for _ in bar:
            log = self.step()
            bar.set_postfix(reward=f"{log['reward']:.3f}", kl=f"{log['kl']:.2f}", clip=f"{log['clip_frac']:.2f}")
        return self.history[-iterations:]


def response_mask(response: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 for each response token up to and including its first `eos_id`, 0 after; (B, R) -> (B, R) long."""
    if eos_id is None:
        return torch.ones_like(response)
    after_eos = (response == eos_id).long().cumsum(-1) - (response == eos_id).long()  # eos tokens strictly before
    return (after_eos == 0).long()


# ---------------------------------------------------------------------------------------------------
# A task with a known reward: a Markov chain, a tiny GPT fitted to it (SFT), PPO on a token-class reward
# ---------------------------------------------------------------------------------------------------

def markov_chain(vocab_size: int, concentration: float, generator: torch.Generator):
    """A random first-order Markov chain: start distribution (V,) and transition matrix (V, V), float64."""
    dirichlet = lambda shape: torch.distributions.Gamma(concentration, 1.0).sample(shape).double()  # noqa: E731
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        start, transition = dirichlet((vocab_size,)), dirichlet((vocab_size, vocab_size))
    return start / start.sum(), transition / transition.sum(-1, keepdim=True)


def sample_markov(start, transition, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """n sequences of `length` tokens from the chain, (n, length) long."""
    tokens = [torch.multinomial(start.expand(n, -1), 1, generator=generator)]  # (n, 1)
    for _ in range(length - 1):
        tokens.append(torch.multinomial(transition[tokens[-1][:, 0]], 1, generator=generator))
    return torch.cat(tokens, dim=1)


def chain_entropy_rate(start, transition, length: int) -> float:
    """The chain's exact mean next-token entropy over positions 1..length−1: the NLL floor of a model fitted to it."""
    marginal, total = start, 0.0
    plogp = torch.where(transition > 0, transition * transition.log(), torch.zeros_like(transition))
    row_entropy = -plogp.sum(-1)  # (V,)
    for _ in range(length - 1):
        total += float(marginal @ row_entropy)
        marginal = marginal @ transition
    return total / (length - 1)


def expected_class_fraction(last_tokens: torch.Tensor, transition, token_class, length: int) -> torch.Tensor:
    """Exact E[fraction of the next `length` tokens in `token_class`] under the chain, given each prompt's last token; (n,)."""
    in_class = torch.zeros(transition.shape[0], dtype=transition.dtype)
    in_class[list(token_class)] = 1.0
    dist = torch.nn.functional.one_hot(last_tokens, transition.shape[0]).to(transition.dtype)  # (n, V)
    total = torch.zeros(len(last_tokens), dtype=transition.dtype)
    for _ in range(length):
        dist = dist @ transition
        total += dist @ in_class
    return total / length


def chain_kl_optimum(last_tokens: torch.Tensor, transition, token_class, length: int, beta: float) -> dict:
    """Report eq. (36) on the chain: π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β) with π_ref = the chain, r = class fraction.

    The reward is a sum over tokens, so π* is again a Markov policy, found by a backward (soft Bellman)
    recursion V_t(s) = log Σ_a P(a|s)·exp(c(a)/(β·length) + V_{t+1}(a)). Returns the exact per-prompt
    E_π*[r], KL(π* ‖ π_ref) and β·log Z(x) = β·V_0 (the optimum of eq. (27)), each (n,), float64.
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
    dist = torch.nn.functional.one_hot(last_tokens, transition.shape[0]).to(transition.dtype)  # (n, V)
    log_z = dist @ values  # (n,): log Z(x) = V_0(last prompt token)
    reward = torch.zeros(len(last_tokens), dtype=transition.dtype)
    kl = torch.zeros_like(reward)
    for pi in policies:
        reward += dist @ (pi @ in_class) / length
        kl += dist @ (pi * (pi.log() - log_p)).sum(-1)
        dist = dist @ pi
    return dict(reward=reward, kl=kl, objective=beta * log_z)


def class_fraction_reward(token_class):
    """reward_fn for `PPOTrainer`: the fraction of response tokens that lie in `token_class`, exactly."""
    members = torch.tensor(sorted(token_class))

    def reward_fn(input_ids, attention_mask, response_mask):
        hits = torch.isin(input_ids, members) & response_mask.bool()  # (B, T)
        return hits.sum(-1).double() / response_mask.sum(-1).clamp(min=1)  # (B,)
    return reward_fn


def train_sft(model: gpt.GPT, sequences: torch.Tensor, steps: int, batch_size: int, lr: float,
              generator: torch.Generator, progress: bool = True) -> list[float]:
    """Next-token cross-entropy training on `sequences` (N, T) with Adam; returns the loss of each step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="SFT", disable=not progress):
        batch = sequences[torch.randint(len(sequences), (batch_size,), generator=generator)]  # (b, T)
        logits = model(batch[:, :-1])  # (b, T-1, V)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def evaluate(policy, ref, reward_fn, prompt_ids, prompt_mask, response_length, generator):
    """Sample one response per prompt from `policy`: mean reward, its standard error, and the mean KL(π ‖ π_ref) by k1 and k3."""
    P = prompt_ids.shape[1]
    seq = gpt.generate(policy, prompt_ids, response_length, attention_mask=prompt_mask, generator=generator)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(seq[:, P:])], dim=1)
    _, logp, _ = policy_forward(policy, seq, attention_mask, P)  # (B, R)
    _, ref_logp, _ = policy_forward(ref, seq, attention_mask, P)
    scores = reward_fn(seq, attention_mask, torch.cat([torch.zeros_like(prompt_mask), torch.ones_like(seq[:, P:])], 1))
    return dict(reward=scores.mean().item(), reward_se=(scores.std() / math.sqrt(len(scores))).item(),
                kl=kl_k1(logp, ref_logp).sum(-1).mean().item(), kl_k3=kl_k3(logp, ref_logp).sum(-1).mean().item())


def closed_form_checks() -> list[str]:
    """The chapter's derivations on small float64 examples, one printable line each (claim: measurement)."""
    g = torch.Generator().manual_seed(0)
    f64 = dict(generator=g, dtype=torch.float64)
    r, v = torch.randn(4, 7, **f64), torch.randn(4, 7, **f64)
    gamma, lam = 0.9, 0.8
    adv, _ = gae(r, v, gamma, lam)
    v_next = torch.cat([v[:, 1:], torch.zeros(4, 1, dtype=torch.float64)], 1)
    delta = r + gamma * v_next - v
    explicit = torch.stack([sum((gamma * lam) ** l * delta[:, t + l] for l in range(7 - t)) for t in range(7)], 1)

    ratio, a = torch.linspace(0.55, 1.45, 10, dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)[:, None]
    logp = ratio.log().expand(2, -1).clone().requires_grad_()
    clipped_surrogate(logp, torch.zeros_like(logp), a, 0.2).sum().backward()
    binds = ((a > 0) & (ratio > 1.2)) | ((a < 0) & (ratio < 0.8))
    clip_err = (logp.grad - torch.where(binds, 0.0, ratio * a)).abs().max().item()

    h = torch.ones(3, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(3, dtype=torch.float64)
    ppo_objective(zero, zero, h, ent_coef=0.01).backward()

    p, q = torch.softmax(torch.randn(6, **f64), 0), torch.softmax(torch.randn(6, **f64), 0)
    kl = float((p * (p / q).log()).sum())
    return [
        f"eq. (5): backward recursion vs the explicit sum Σ_(l=0..T−t−1) (γλ)^l δ_(t+l): max |Δ| = {(adv - explicit).abs().max():.1e}",
        f"eq. (1): ∂L^CLIP/∂log π vs (0 where the clip binds, r·A elsewhere), {int(binds.sum())} of 20 bind: max |Δ| = {clip_err:.1e}",
        f"eq. (3): entropy of the uniform distribution over 5 actions vs log 5: |Δ| = {abs(entropy(torch.zeros(5, dtype=torch.float64)).item() - math.log(5)):.1e}",
        f"eq. (4): as printed (+c2·E[−βH]) ∂L/∂H = −c2·β < 0, an entropy penalty; corrected +c2·E[H]: ∂L/∂H = {h.grad.sum().item():+.3f} (c2 = 0.01)",
        f"k1, k3 estimators: E_π[k] by enumeration vs KL(π ‖ π_ref) = {kl:.4f}: |Δ| = "
        f"{abs(float((p * kl_k1(p.log(), q.log())).sum()) - kl):.1e}, {abs(float((p * kl_k3(p.log(), q.log())).sum()) - kl):.1e}",
    ]


def plot_training(history, after, exact_ref_reward, optimum, beta, name):
    """Mean reward and KL(π ‖ π_ref) over PPO iterations, beside the exact reference and the exact optimum of eq. (27)."""
    import matplotlib.pyplot as plt
    from chapters import plotting

    it = range(1, len(history) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax1.plot(it, [h["reward"] for h in history], color="C0", label="PPO rollouts: mean reward")
    ax1.axhline(optimum["reward"], color="C3", ls="--", label=f"exact optimum π* of eq. (27) ({optimum['reward']:.3f})")
    ax1.axhline(after["reward"], color="C2", ls=":", label=f"final policy, held-out prompts ({after['reward']:.3f})")
    ax1.axhline(exact_ref_reward, color="gray", ls="--", label=f"reference: the chain, exact ({exact_ref_reward:.3f})")
    ax1.set(xlabel="PPO iteration", ylabel="reward = fraction of class tokens", title="Reward rises under PPO")
    ax1.legend(fontsize=8, loc="lower right")
    ax2.plot(it, [h["kl"] for h in history], color="C0", label="PPO rollouts: KL(π ‖ π_ref), k1")
    ax2.plot(it, [h["kl_k3"] for h in history], color="C1", ls="--", lw=1, label="PPO rollouts: KL(π ‖ π_ref), k3")
    ax2.axhline(optimum["kl"], color="C3", ls="--", label=f"exact optimum π* ({optimum['kl']:.2f} nats)")
    ax2.set(xlabel="PPO iteration", ylabel="KL per response (nats)", title="KL to the reference stays bounded")
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Chapter 6: PPO-based RLHF (eq. (28), β = {beta:g}) on a tiny GPT fitted to a Markov chain")
    return plotting.save(fig, name)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m chapters.ch6_ppo", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a short run (seconds) of the same experiment")
    parser.add_argument("--iterations", type=int, default=None, help="PPO iterations (default 60, quick 6)")
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient β of eq. (28)")
    args = parser.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        raise SystemExit("error: --iterations must be at least 1")
    if args.beta <= 0:
        raise SystemExit("error: --beta must be > 0 (the exact optimum π* ∝ π_ref·exp(r/β) needs it)")
    with one_thread():  # a GPT this small runs fastest on one thread (and is then repeatable across machines' core counts)
        return run_experiment(args)


def run_experiment(args):
    """Closed-form checks, then SFT on a Markov chain and PPO on a token-class reward; returns the measurements."""
    iterations = args.iterations or (6 if args.quick else 60)
    sft_steps = 100 if args.quick else 600
    vocab, prompt_len, response_len, token_class = 16, 4, 12, (0, 1, 2, 3)

    print("Closed forms (float64):")
    for line in closed_form_checks():
        print("  " + line)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    start, transition = markov_chain(vocab, 0.3, g)
    data = sample_markov(start, transition, 4000, prompt_len + response_len, g)  # (4000, 16)
    sft = gpt.GPT(gpt.GPTConfig.tiny(vocab_size=vocab, n_positions=32))
    losses = train_sft(sft, data, sft_steps, 64, 3e-3, g)
    floor = chain_entropy_rate(start, transition, prompt_len + response_len)
    print(f"\nSFT on a random {vocab}-token Markov chain: final loss {sum(losses[-20:]) / 20:.3f} nats/token "
          f"vs the chain's exact entropy rate {floor:.3f} (the floor)")

    eval_prompts = sample_markov(start, transition, 512, prompt_len, g)  # held out, (512, P)
    eval_mask = torch.ones_like(eval_prompts)
    exact = expected_class_fraction(eval_prompts[:, -1], transition, token_class, response_len).mean().item()
    optimum = {k: v.mean().item() for k, v in chain_kl_optimum(eval_prompts[:, -1], transition, token_class,
                                                               response_len, args.beta).items()}
    reward_fn = class_fraction_reward(token_class)
    ref = gpt.GPT(sft.config)
    ref.load_state_dict(sft.state_dict())
    before = evaluate(sft, ref, reward_fn, eval_prompts, eval_mask, response_len, torch.Generator().manual_seed(args.seed))
    print(f"reward = fraction of response tokens in {set(token_class)}: exact expectation under the chain {exact:.3f}, "
          f"SFT policy {before['reward']:.3f} ± {before['reward_se']:.3f}")

    train_prompts = list(sample_markov(start, transition, 2000, prompt_len, g))
    config = PPOConfig(lr=1e-3 if not args.quick else 2e-3, beta=args.beta, batch_size=64, epochs=4, minibatch_size=16,
                       response_length=response_len, seed=args.seed)
    print(f"\nPPO, {iterations} iterations: " + ", ".join(f"{k}={v}" for k, v in asdict(config).items()))
    trainer = PPOTrainer(sft, ref, reward_fn, train_prompts, config)
    history = trainer.train(iterations)
    for i in sorted({0, iterations // 2, iterations - 1}):
        h = history[i]
        print(f"  iteration {i + 1:3d}: reward {h['reward']:.3f}  KL {h['kl']:.3f}  clip frac {h['clip_frac']:.3f}  "
              f"approx KL {h['approx_kl']:.4f}  value loss {h['value_loss']:.4f}  entropy {h['entropy']:.3f}")
    after = evaluate(trainer.policy, ref, reward_fn, eval_prompts, eval_mask, response_len,
                     torch.Generator().manual_seed(args.seed))
    gain = after["reward"] - before["reward"]
    se = math.hypot(after["reward_se"], before["reward_se"])
    print(f"\nheld-out prompts (512): reward {before['reward']:.3f} -> {after['reward']:.3f}, "
          f"gain {gain:+.3f} ± {se:.3f} ({gain / se:.1f} standard errors)")
    print(f"KL(π ‖ π_ref) per response: k1 {after['kl']:.3f}, k3 {after['kl_k3']:.3f} nats "
          f"(max over iterations {max(h['kl'] for h in history):.3f})")
    print(f"eq. (27) objective E[r] − β·KL: SFT {before['reward'] - args.beta * before['kl']:.3f}, "
          f"PPO {after['reward'] - args.beta * after['kl']:.3f}, exact optimum π* (β·log Z, reference = the chain) "
          f"{optimum['objective']:.3f} at reward {optimum['reward']:.3f}, KL {optimum['kl']:.3f}")
    plot_training(history, after, exact, optimum, args.beta, "ch6_ppo_quick" if args.quick else "ch6_ppo_reward_kl")
    return dict(before=before, after=after, history=history, optimum=optimum)


if __name__ == "__main__":
    main()
