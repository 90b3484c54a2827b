"""Chapter 11 (beyond the report, from eqs. (36), (38), (41)): where DPO goes wrong in practice.

- Likelihood displacement (`displacement`): one gradient step on eq. (38) changes log π(y_w|x) by
  η·β·σ(−z)·⟨∇log π(y_w), ∇log π(y_w) − ∇log π(y_l)⟩ to first order: negative when the two
  responses' gradients are alike. Shown exactly on a softmax policy with shared features;
  CHES (Razin et al. 2024, arXiv 2410.08847) measures the likeness from hidden states.
- The fixes (`losses`): DPO-Positive (Pal et al. 2024, arXiv 2402.13228, eq. (3)) multiplies the
  chosen side of eq. (41) by 1 + λ once π(y_w) falls below π_ref(y_w); DPO + NLL (Pang et al.
  2024, arXiv 2404.19733; TRL's `rpo_alpha`) adds a pull α/|y_w| on it that never fades.
- Gradient asymmetry (`gradients`, Feng et al. 2024, arXiv 2404.04626): in the probabilities,
  |∂L/∂π(y_l)| / |∂L/∂π(y_w)| = π(y_w)/π(y_l); and why the first step reads ln 2 and accuracy 0.
- Length (`length`, R-DPO, Park et al. 2024, arXiv 2403.19159): its optimum is eq. (36) with the
  reward r − α·|y|, so α = γ undoes a labeller that adds γ·|y| to the reward.
- On chapter 8's miniature (`miniature_runs`, `pair_readings`, `miniature_figures`; not
  re-exported, as they load chapter 8's trainers): DPO at chapter 8's β values, DPOP, DPO + NLL and
  R-DPO from its SFT model; how many pairs end with a lower log π(y_w), CHES against that change,
  and the end-of-text probability where the responses stop, the cause of DPO's longer answers.

    python -m chapters.ch11_dpo_pitfalls

Importing this package loads the maths only (no matplotlib: the run's figures are in `figures`).
"""

from chapters.ch11_dpo_pitfalls.displacement import (
    FeaturePair,
    ches_score,
    descent_path,
    displacement_example,
    first_order_chosen_change,
    gradient_step,
    predicted_chosen_change,
    realised_chosen_change,
    smallest_fix,
)
from chapters.ch11_dpo_pitfalls.gradients import probability_gradients, step_readings
from chapters.ch11_dpo_pitfalls.length import (
    fit_r_dpo,
    r_dpo_loss,
    r_dpo_optimal_policy,
    r_dpo_population_loss,
)
from chapters.ch11_dpo_pitfalls.losses import (
    dpo_logprob_gradients,
    dpop_logprob_gradients,
    dpop_loss,
    rpo_logprob_gradients,
    rpo_loss,
)

__all__ = [
    "FeaturePair",
    "ches_score",
    "descent_path",
    "displacement_example",
    "dpo_logprob_gradients",
    "dpop_logprob_gradients",
    "dpop_loss",
    "first_order_chosen_change",
    "fit_r_dpo",
    "gradient_step",
    "predicted_chosen_change",
    "probability_gradients",
    "r_dpo_loss",
    "r_dpo_optimal_policy",
    "r_dpo_population_loss",
    "realised_chosen_change",
    "rpo_logprob_gradients",
    "rpo_loss",
    "smallest_fix",
    "step_readings",
]
