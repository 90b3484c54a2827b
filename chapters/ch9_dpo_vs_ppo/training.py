"""Chapter 9's policies and trainers on its enumerable example (`chapters.ch9_dpo_vs_ppo.problem`).

Three parameterisations of π(y|x) (a free logit per response, log-linear in shared features,
autoregressive per prefix) and four ways to fit them or the reward: eq. (26) by L-BFGS
(`fit_reward_model`), eq. (38) by Adam (`train_tabular_dpo`) or L-BFGS (`minimise_dpo_lbfgs`), and
KL-regularised PPO on the fitted reward (`train_ppo`).
"""

import torch

from chapters.ch2_reward_model.bradley_terry import fit_bt_rewards
from chapters.ch3_kl_optimum.optimum import rlhf_token_rewards
from chapters.ch6_ppo.objective import clipped_surrogate, masked_mean, whiten
from chapters.ch9_dpo_vs_ppo.problem import (
    DT,
    Problem,
    autoregressive_logprobs,
    data_reward_loss,
    empirical_dpo_loss,
    measure,
    unseen_mask,
)
from chapters.common.lbfgs import lbfgs_minimise


class Tabular:
    """π(y|x) = softmax(θ(x, ·)): one free logit per (prompt, response), started at log π_ref. No
    sharing."""

    name = "tabular"

    def __init__(self, problem: Problem):
        self.params = [problem.pi_ref.log().clone().requires_grad_()]

    def logp(self):
        return torch.log_softmax(self.params[0], -1)  # (P, Y)


class LogLinear:
    """π_θ(y|x) ∝ π_ref(y|x)·exp(θ·φ(x, y)), θ = 0 at the start: a parameter per (position, token),
    shared by every response and prompt."""

    name = "log-linear"

    def __init__(self, problem: Problem):
        self.problem = problem
        self.params = [torch.zeros(problem.features.shape[-1], dtype=DT, requires_grad=True)]

    def logp(self):
        return torch.log_softmax(
            self.problem.pi_ref.log() + self.problem.features @ self.params[0], -1
        )  # (P, Y)


class Autoregressive:
    """π(y|x) = Π_t softmax(θ_t[x, y_<t])[y_t], started at the reference's logits: a language model
    in miniature.

    Responses sharing a prefix share its next-token softmax, so lowering π(y_l) hands mass to y_l's
    siblings.
    """

    name = "autoregressive"

    def __init__(self, problem: Problem):
        self.tokens = problem.tokens
        self.params = [step.clone().requires_grad_() for step in problem.ref_logits]

    def logp(self):
        return autoregressive_logprobs(self.params, self.tokens)  # (P, Y)


POLICIES = (Tabular, LogLinear, Autoregressive)


def fit_reward_model(problem: Problem, linear: bool = False) -> torch.Tensor:
    """Report eq. (26) minimised from r = 0: a table r(x, y) (ch2's `fit_bt_rewards`, no ridge), or
    r = φ(x, y)·ψ when `linear`.

    Returns r (P, Y). Started at 0, L-BFGS stays in the span of the loss's gradients: the table
    keeps r equal on every response in no pair, and ψ stays in the span of the vote differences φ(x,
    y_w) − φ(x, y_l).
    """
    if not linear:
        return fit_bt_rewards(
            problem.prompt, problem.chosen, problem.rejected, problem.shape, l2=0.0
        )
    psi = torch.zeros(problem.features.shape[-1], dtype=DT, requires_grad=True)
    lbfgs_minimise(
        [psi],
        lambda: data_reward_loss(problem.features @ psi, problem),
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
    )
    return problem.features @ psi.detach()  # (P, Y)


def train_tabular_dpo(policy, problem: Problem, steps: int, lr: float) -> list:
    """Report eq. (38) minimised by full-batch Adam over the votes, from π = π_ref; a `measure` dict
    at the start and after each step."""
    opt = torch.optim.Adam(policy.params, lr=lr)
    mask = unseen_mask(problem)
    history = [measure(policy.logp().detach(), problem, mask)]
    for _ in range(steps):
        opt.zero_grad()
        empirical_dpo_loss(policy.logp(), problem).backward()
        opt.step()
        history.append(measure(policy.logp().detach(), problem, mask))
    return history


def minimise_dpo_lbfgs(policy, problem: Problem):
    """Report eq. (38) minimised by L-BFGS from π = π_ref; returns the policy, trained in place.

    Like plain gradient descent its steps stay in the span of the gradients, so it lands on the
    minimiser gradient flow picks (Adam's per-parameter scaling leaves that span)."""
    lbfgs_minimise(
        policy.params,
        lambda: empirical_dpo_loss(policy.logp(), problem),
        max_iter=3000,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
    )
    return policy


def train_ppo(
    policy,
    problem: Problem,
    rewards: torch.Tensor,
    iterations: int,
    lr: float,
    batch: int = 64,
    epochs: int = 4,
    clip_eps: float = 0.2,
    generator=None,
) -> list:
    """Report eqs. (1), (28): KL-regularised PPO on whole responses, from π = π_ref.

    Each round: sample `batch` responses per prompt from π_old, score them with eq. (28), r̂(x, y) −
    β·log π_old/π_ref(y|x), advantage = score − its per-prompt batch mean (whitened), then `epochs`
    Adam steps on eq. (1), the learning rate annealed linearly to 0 over the rounds (as in Schulman
    et al.'s PPO runs). The whole response is one action, so a one-step episode. Returns `measure`
    dicts, one per optimiser step (plus the start).
    """
    opt = torch.optim.Adam(policy.params, lr=lr)
    anneal = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / iterations)
    mask = unseen_mask(problem)
    ref_logp = problem.pi_ref.log()
    P, _ = problem.shape
    history = [measure(policy.logp().detach(), problem, mask)]
    for _ in range(iterations):
        with torch.no_grad():
            logp_all = policy.logp()  # (P, Y)
            ys = torch.multinomial(
                logp_all.exp(), batch, replacement=True, generator=generator
            )  # (P, B)
            old_logp = logp_all.gather(1, ys)  # (P, B)
            score = rlhf_token_rewards(
                rewards.gather(1, ys).reshape(-1),
                old_logp.reshape(-1, 1),
                ref_logp.gather(1, ys).reshape(-1, 1),
                torch.ones(P * batch, 1),
                problem.beta,
            ).reshape(P, batch)  # one-token episodes: (P·B, 1) -> (P, B)
            advantages = whiten(score - score.mean(1, keepdim=True))  # (P, B)
        for _ in range(epochs):
            opt.zero_grad()
            logp = policy.logp().gather(1, ys)  # (P, B)
            (-masked_mean(clipped_surrogate(logp, old_logp, advantages, clip_eps))).backward()
            opt.step()
            history.append(measure(policy.logp().detach(), problem, mask))
        anneal.step()
    return history
