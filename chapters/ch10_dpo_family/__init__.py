"""Chapter 10 (beyond the report, from §4.1's optimum): the DPO family — IPO, cDPO, rDPO, hinge,
SimPO, ORPO, KTO.

    python -m chapters.ch10_dpo_family [--quick]

The losses and closed-form optima (`losses`), exact population minimisers (`optima`), the variants
on chapter 7's frontier (`frontier`).
"""

# the chapter's named API; everything else is imported from the module that defines it
from chapters.ch10_dpo_family.losses import (
    ipo_optimal_policy,
    kto_loss,
    orpo_loss,
    preference_loss,
    simpo_optimal_policy,
)

__all__ = ["ipo_optimal_policy", "kto_loss", "orpo_loss", "preference_loss", "simpo_optimal_policy"]
