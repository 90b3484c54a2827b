"""Chapter 10 (beyond the report, from §4.1's optimum): the DPO family — IPO, cDPO, rDPO, hinge,
SimPO, ORPO, KTO.

    python -m chapters.ch10_dpo_family [--quick]

The losses and closed-form optima (`losses`), exact population minimisers (`optima`), the variants
on chapter 7's
frontier (`frontier`).
"""

from chapters.ch10_dpo_family.losses import (  # noqa: F401
    ipo_optimal_policy,
    kto_loss,
    kto_reference_point,
    log1mexp,
    orpo_loss,
    preference_loss,
    simpo_optimal_policy,
)
