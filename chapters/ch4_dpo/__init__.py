"""Chapter 4 (report §4.2–§4.4; eqs. (38)–(41)): the DPO loss, its gradient, and the implicit
reward.

    python -m chapters.ch4_dpo

Importing this package loads the maths only (no matplotlib, no training loop).
"""

from chapters.ch4_dpo.loss import (  # noqa: F401
    dpo_gradient,
    dpo_loss,
    dpo_metrics,
    fit_tabular_dpo,
    implicit_reward,
    logprob_by_prefixes,
    plackett_luce_dpo_loss,
    preference_counts,
    preference_probabilities,
    random_tiny_gpt2,
    response_logprobs,
    tabular_dpo_loss,
    unshifted_logprobs,
)
