"""PPO-based RLHF for a `gpt.GPT` policy (report §2.2, eq. (28)): value head, per-token log-probs,
the trainer.

The loss pieces are chapter 6's eqs. (1)–(5) (`chapters.ch6_ppo`); `PPOTrainer` puts them together
for a language model: sample responses, score them, turn scores into per-token rewards (eq. (28),
`chapters.ch3_kl_optimum.rlhf_token_rewards`), compute advantages (eq. (5)), then several epochs of
minibatch updates of eq. (4).

The language-model MDP: the state s_t is prompt + y_<t, the action a_t is the token y_t, the episode
ends after the response's last token; π(a_t | s_t) and V(s_t) are read at the position before y_t.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

import gpt
from chapters.ch3_kl_optimum.optimum import rlhf_token_rewards
from chapters.ch6_ppo.objective import (
    clipped_surrogate,
    entropy,
    gae,
    kl_k1,
    kl_k3,
    masked_mean,
    ppo_objective,
    value_loss,
    whiten,
)
from chapters.training.loop import check_finite, gradient_norm
from gpt.generation import left_pad


class AdaptiveKLController:
    """Ziegler et al. (2019) §2.2: β ← β·(1 + K·clip(KL/KL_target − 1, −0.2, 0.2)), K = samples /
    horizon."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_samples / self.horizon
        return self.beta


class ValueHead(nn.Module):
    """V(s_t): a scalar per position from the GPT's final hidden states (`model.hidden_states`), (B,
    T, C) -> (B, T)."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.linear = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.linear.weight)  # start at V = 0: no prior on the return
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


def policy_forward(
    model: gpt.GPT, input_ids, attention_mask, start: int, value_head: ValueHead | None = None
):
    """π(·|s_t) logits (B, R, V), log π(y_t|s_t) (B, R) and, with `value_head`, V(s_t) (B, R) for
    the tokens input_ids[:, start:].

    The state s_t before token t is read at position t − 1. Summed over a response mask, the
    log-probs are `chapters.ch4_dpo.response_logprobs`.
    """
    hidden = model.hidden_states(input_ids, attention_mask)[
        :, start - 1 : -1
    ]  # (B, R, C): states s_t
    logits = model.lm_head(hidden).float()  # (B, R, V)
    logp = (
        torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, start:, None]).squeeze(-1)
    )  # (B, R)
    return logits, logp, value_head(hidden) if value_head is not None else None


@dataclass
class PPOConfig:
    """Hyper-parameters of `PPOTrainer`. Sampling at temperature 1 (on-policy, as PPO assumes)."""

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
            raise ValueError(
                f"need beta >= 0 and gamma, lam in [0, 1]; got {self.beta}, {self.gamma}, "
                f"{self.lam}"
            )


class PPOTrainer:
    """PPO-based RLHF (report §2.2 and eq. (28)) for a `gpt.GPT` policy against a frozen reference.

    policy: the GPT to train (updated in place; a `ValueHead` on its hidden states is added). ref:
    the frozen reference π_ref, a separate model (usually a copy of the SFT policy); its gradients
    are turned off. reward_fn(input_ids, attention_mask, response_mask) -> (B,) scores, called on
    prompt + response ids (B, T) with masks (B, T); a true reward or a learned reward model (`lambda
    ids, am, rm: model(ids, am)`). prompts: a list of token-id sequences (lists or 1-D tensors),
    left-padded into batches.
    """

    def __init__(
        self, policy: gpt.GPT, ref: gpt.GPT, reward_fn, prompts, config: PPOConfig | None = None
    ):
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
        self.kl_ctl = (
            AdaptiveKLController(config.beta, config.kl_target, config.kl_horizon)
            if config.kl_target is not None
            else None
        )
        self.beta = config.beta
        self.generator = torch.Generator().manual_seed(config.seed)
        self.history = []

    def sample_prompts(self, n: int):
        """n prompts drawn at random, left-padded: ids (n, P) and attention mask (n, P)."""
        idx = torch.randint(len(self.prompts), (n,), generator=self.generator)
        return left_pad([self.prompts[i] for i in idx], pad_id=0)

    @torch.no_grad()
    def rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> dict:
        """Sample responses, score them, and compute eq. (28) rewards and eq. (5) advantages; a dict
        of (B, ...) tensors."""
        cfg, P = self.config, prompt_ids.shape[1]
        seq = gpt.generate(
            self.policy,
            prompt_ids,
            cfg.response_length,
            eos_id=cfg.eos_id,
            attention_mask=prompt_mask,
            generator=self.generator,
        )  # (B, P + R)
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
        return dict(
            input_ids=seq,
            attention_mask=attention_mask,
            mask=mask,
            start=P,
            logp=logp,
            ref_logp=ref_logp,
            values=values,
            scores=scores,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
        )

    def update(self, batch: dict) -> dict:
        """`epochs` passes of minibatch ascent on eq. (4) over one rollout; the mean of each logged
        quantity."""
        cfg, logs = self.config, []
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(batch["scores"]), generator=self.generator).split(
                cfg.minibatch_size
            ):
                mask = batch["mask"][idx]
                logits, logp, values = policy_forward(
                    self.policy,
                    batch["input_ids"][idx],
                    batch["attention_mask"][idx],
                    batch["start"],
                    self.value_head,
                )
                old_logp, advantages = batch["logp"][idx], batch["advantages"][idx]
                surrogate = clipped_surrogate(logp, old_logp, advantages, cfg.clip_eps)
                v_loss = value_loss(
                    values, batch["returns"][idx], batch["values"][idx], cfg.value_clip_eps
                )
                ent = entropy(logits)
                objective = ppo_objective(surrogate, v_loss, ent, mask, cfg.vf_coef, cfg.ent_coef)
                self.optimizer.zero_grad()
                (-objective).backward()
                norm = float(
                    nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    if cfg.max_grad_norm is not None
                    else gradient_norm(params)
                )
                where = f"iteration {len(self.history) + 1}, update {len(logs) + 1}"
                lower = f"PPOConfig.lr (now {cfg.lr:g})"
                check_finite("PPO", where, -objective.item(), norm, lower)  # before the update
                self.optimizer.step()
                with torch.no_grad():
                    ratio = torch.exp(logp - old_logp)
                    logs.append(
                        dict(
                            policy_objective=masked_mean(surrogate, mask).item(),
                            value_loss=masked_mean(v_loss, mask).item(),
                            entropy=masked_mean(ent, mask).item(),
                            clip_frac=masked_mean(
                                ((ratio - 1).abs() > cfg.clip_eps).float(), mask
                            ).item(),
                            approx_kl=masked_mean(kl_k3(old_logp, logp), mask).item(),
                        )
                    )  # KL(π_old ‖ π_θ)
        return {k: sum(log[k] for log in logs) / len(logs) for k in logs[0]}

    def step(self) -> dict:
        """One PPO iteration: rollout, update, (maybe) adapt β. Returns its log (reward, KL, clip
        fraction, ...)."""
        batch = self.rollout(*self.sample_prompts(self.config.batch_size))
        mask = batch["mask"]
        kl = (kl_k1(batch["logp"], batch["ref_logp"]) * mask).sum(-1).mean().item()  # per sequence
        log = dict(
            reward=batch["scores"].mean().item(),
            kl=kl,
            kl_k3=(kl_k3(batch["logp"], batch["ref_logp"]) * mask).sum(-1).mean().item(),
            beta=self.beta,
            response_length=mask.sum(-1).float().mean().item(),
        )
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
            bar.set_postfix(
                reward=f"{log['reward']:.3f}", kl=f"{log['kl']:.2f}", clip=f"{log['clip_frac']:.2f}"
            )
        return self.history[-iterations:]


def response_mask(response: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 for each response token up to and including its first `eos_id`, 0 after; (B, R) -> (B, R)
    long."""
    if eos_id is None:
        return torch.ones_like(response)
    after_eos = (response == eos_id).long().cumsum(-1) - (
        response == eos_id
    ).long()  # eos tokens strictly before
    return (after_eos == 0).long()
