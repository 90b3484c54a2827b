"""Chapter 1 (report §2.1, §3.1, §3.2; eqs. (6)–(16)): Plackett–Luce and Bradley–Terry, Christiano's
loss.

python -m chapters.ch1_preference_models
"""

# the chapter's named API; everything else is imported from the module that defines it
from chapters.ch1_preference_models.probabilities import (
    bradley_terry,
    christiano_loss,
    plackett_luce,
)

__all__ = ["bradley_terry", "christiano_loss", "plackett_luce"]
