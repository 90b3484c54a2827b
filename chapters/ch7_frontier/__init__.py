"""Chapter 7 (report §6.1, the DPO paper's Fig. 1 left): the reward–KL frontier in miniature, with
the exact optimum.

    python -m chapters.ch7_frontier [--quick]

The task small enough to enumerate (`task`), the methods placed on it (`methods`, `rlhf`), and the
sweeps that train them side by side (`sweeps`).
"""

# the chapter's named API; everything else is imported from the module that defines it
from chapters.ch7_frontier.methods import best_of_n_logprobs, dpo_batch_loss, unlikelihood_loss

__all__ = ["best_of_n_logprobs", "dpo_batch_loss", "unlikelihood_loss"]
