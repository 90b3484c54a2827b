"""Chapter 9 (report §7; Xu et al. 2024): Π_PPO ⊂ Π_DPO, and the mass DPO may put on responses the
data never showed.

python -m chapters.ch9_dpo_vs_ppo
"""

# the chapter's named API; everything else is imported from the module that defines it
from chapters.ch9_dpo_vs_ppo.minimisers import dpo_flat_directions, dpo_minimiser
from chapters.ch9_dpo_vs_ppo.problem import make_problem

__all__ = ["make_problem", "dpo_flat_directions", "dpo_minimiser"]
