"""RLHF on the frontier task (chapter 7): a reward model fitted to the preference pairs, then PPO
against it or r*.

Both are the general machinery of `chapters.ch2_reward_model.reward_head` and
`chapters.ch6_ppo.trainer`, run on `chapters.ch7_frontier.task`'s tiny GPT; chapter 7 evaluates the
checkpoints exactly.
"""

import copy

import torch
from tqdm import tqdm

from chapters.ch2_reward_model.reward_head import (
    PreferencePairs,
    RewardModel,
    pair_accuracy,
    train_reward_model,
)
from chapters.ch6_ppo.trainer import PPOConfig, PPOTrainer
from chapters.ch7_frontier.task import RESPONSE_LEN, SEQ_LEN, sequence
from gpt import GPT


def learn_reward_model(ref: GPT, data: dict, steps: int, generator: torch.Generator) -> RewardModel:
    """Report eq. (26) via `chapters.ch2_reward_model.reward_head`: r_φ = a scalar head on a copy of
    π_ref, fitted to the pairs."""
    ones = torch.ones(len(data["prompt"]), SEQ_LEN, dtype=torch.long)
    pairs = PreferencePairs(
        sequence(data["prompt"], data["chosen"]),
        ones,
        sequence(data["prompt"], data["rejected"]),
        ones,
    )
    rm = RewardModel(copy.deepcopy(ref).requires_grad_(True))
    train_reward_model(rm, pairs, steps, batch_size=64, lr=1e-3, generator=generator)
    rm.requires_grad_(False)
    rm.train_accuracy = pair_accuracy(rm, pairs)
    return rm


@torch.no_grad()
def score_all(rm: RewardModel, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """r_φ(x, y) of every response of every prompt, (P, Y) float64, in batches of one prompt's
    responses."""
    return torch.stack(
        [
            torch.cat(
                [
                    rm(sequence(x.expand(len(chunk), -1), chunk)).double()
                    for chunk in responses.split(8192)
                ]
            )
            for x in prompts
        ]
    )


def ppo_checkpoints(
    ref: GPT,
    reward_fn,
    prompts: torch.Tensor,
    beta: float,
    checkpoints,
    seed: int,
    desc: str,
    progress: bool = True,
):
    """PPO-based RLHF with KL coefficient β (eqs. (1)–(5), (28)) via
    `chapters.ch6_ppo.trainer.PPOTrainer`, from π_ref.

    Yields (iteration, policy) at each iteration count in `checkpoints`; the policy is trained in
    place.
    """
    policy = copy.deepcopy(ref).requires_grad_(True)
    config = PPOConfig(beta=beta, lr=1e-3, response_length=RESPONSE_LEN, batch_size=64, seed=seed)
    trainer = PPOTrainer(policy, ref, reward_fn, list(prompts), config)
    bar = tqdm(total=max(checkpoints), desc=desc, leave=False, disable=not progress)
    for iteration in range(1, max(checkpoints) + 1):
        log = trainer.step()
        bar.update()
        bar.set_postfix(reward=f"{log['reward']:.2f}", kl=f"{log['kl']:.2f}")
        if iteration in checkpoints:
            yield iteration, policy
    bar.close()
