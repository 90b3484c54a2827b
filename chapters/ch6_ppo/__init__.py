"""Chapter 6 (report §2.2, §3.3; eqs. (1)–(5), (28)): PPO with GAE, and PPO-based RLHF on the
hand-written GPT-2.

    python -m chapters.ch6_ppo [--quick]

The loss pieces (`objective`), the trainer for a GPT-2 policy (`trainer`), and a Markov task with a
known
optimum (`markov_task`).
"""

from chapters.ch6_ppo.objective import (  # noqa: F401
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
from chapters.ch6_ppo.trainer import (  # noqa: F401
    AdaptiveKLController,
    PPOConfig,
    PPOTrainer,
    ValueHead,
    policy_forward,
    response_mask,
)
