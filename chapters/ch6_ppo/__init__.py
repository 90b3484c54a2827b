"""Chapter 6 (report §2.2, §3.3; eqs. (1)–(5), (28)): PPO with GAE, and PPO-based RLHF on the
hand-written GPT-2.

    python -m chapters.ch6_ppo [--quick]

The loss pieces (`objective`), the trainer for a GPT-2 policy (`trainer`), and a Markov task with a
known optimum (`markov_task`).
"""

# the chapter's named API; everything else is imported from the module that defines it
from chapters.ch6_ppo.objective import clipped_surrogate, entropy, gae, ppo_objective, value_loss
from chapters.ch6_ppo.trainer import PPOConfig, PPOTrainer

__all__ = [
    "clipped_surrogate",
    "entropy",
    "gae",
    "ppo_objective",
    "value_loss",
    "PPOConfig",
    "PPOTrainer",
]
