"""Chapter 1 (report §2.1, §3.1, §3.2; eqs. (6)–(16)): Plackett–Luce and Bradley–Terry, Christiano's
loss.

python -m chapters.ch1_preference_models
"""

from chapters.ch1_preference_models.probabilities import (  # noqa: F401
    as_tensor,
    bradley_terry,
    bt_from_plackett_luce_steps,
    christiano_loss,
    christiano_predictor,
    plackett_eq10_steps,
    plackett_luce,
    plackett_luce_logprob,
    plackett_probabilities,
    plackett_remaining,
    plackett_sequential,
    preference_database,
    sample_rankings,
)
