"""Chapter 4 (report §4.2–§4.4; eqs. (38)–(41)): the DPO loss, its gradient, and the implicit
reward.

    python -m chapters.ch4_dpo

Importing this package loads the maths only (no matplotlib, no training loop).
"""

# the chapter's named API; everything else is imported from the module that defines it
from chapters.ch4_dpo.loss import (
    dpo_gradient,
    dpo_loss,
    implicit_reward,
    plackett_luce_dpo_loss,
    response_logprobs,
)

__all__ = [
    "dpo_gradient",
    "dpo_loss",
    "implicit_reward",
    "plackett_luce_dpo_loss",
    "response_logprobs",
]
