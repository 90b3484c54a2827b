"""Chapter 5 (report §5.1, §5.2): the implicit reward loses nothing, and DPO needs no baseline.

python -m chapters.ch5_theory
"""

from chapters.ch5_theory.baselines import (  # noqa: F401
    dpg_baseline,
    dpg_weights,
    dpo_gradient_samples,
    expected_gradient,
    gradient_variance,
    min_variance_baseline,
    rl_baseline,
    score_function_samples,
    score_matrix,
    total_variance,
)
from chapters.ch5_theory.equivalence import (  # noqa: F401
    are_equivalent,
    equivalent_reward,
    implied_policy,
    lemma2_proof_steps,
    project_reward,
    ranking_distribution,
)
