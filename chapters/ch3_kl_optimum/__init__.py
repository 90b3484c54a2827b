"""Chapter 3 (report §3.3, §4.1; eqs. (27)–(37)): the KL-constrained objective and its closed-form
optimum.

python -m chapters.ch3_kl_optimum
"""

from chapters.ch3_kl_optimum.optimum import (  # noqa: F401
    ascend_logits,
    kl_divergence,
    kl_objective,
    log_partition_function,
    objective_rewritings,
    optimal_policy,
    reward_from_policy,
    rlhf_token_rewards,
)
