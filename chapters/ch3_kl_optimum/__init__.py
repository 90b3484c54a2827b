"""Chapter 3 (report §3.3, §4.1; eqs. (27)–(37)): the KL-constrained objective and its closed-form
optimum.

python -m chapters.ch3_kl_optimum
"""

# the chapter's named API; everything else is imported from the module that defines it
from chapters.ch3_kl_optimum.optimum import (
    kl_divergence,
    log_partition_function,
    optimal_policy,
    reward_from_policy,
)

__all__ = ["kl_divergence", "log_partition_function", "optimal_policy", "reward_from_policy"]
