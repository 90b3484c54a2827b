"""Chapter 5 (report §5.1, §5.2): the implicit reward loses nothing, and DPO needs no baseline.

python -m chapters.ch5_theory
"""

# the chapter's named API; everything else is imported from the module that defines it
from chapters.ch5_theory.baselines import dpo_gradient_samples, min_variance_baseline
from chapters.ch5_theory.equivalence import equivalent_reward, project_reward

__all__ = ["equivalent_reward", "project_reward", "dpo_gradient_samples", "min_variance_baseline"]
