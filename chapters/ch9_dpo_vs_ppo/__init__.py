"""Chapter 9 (report §7; Xu et al. 2024): Π_PPO ⊂ Π_DPO, and the mass DPO may put on responses the
data never showed.

python -m chapters.ch9_dpo_vs_ppo
"""

from chapters.ch9_dpo_vs_ppo.minimisers import (  # noqa: F401
    dpo_flat_directions,
    dpo_minimiser,
    family_along_unseen,
    logit_hessian,
    loglinear_flat_directions,
    minimiser_set_checks,
    unseen_shift,
)
from chapters.ch9_dpo_vs_ppo.problem import (  # noqa: F401
    Problem,
    autoregressive_logprobs,
    comparison_graph,
    data_reward_loss,
    empirical_dpo_loss,
    make_problem,
    measure,
    response_name,
    unseen_mask,
)
