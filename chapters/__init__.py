"""The report's argument as code, one module per step, run in this order by `python -m chapters`."""

CHAPTERS = [
    "ch1_preference_models",
    "ch2_reward_model",
    "ch3_kl_optimum",
    "ch4_dpo",
    "ch5_theory",
    "ch6_ppo",
    "ch7_frontier",
    "ch8_instruction_dpo",
    "ch9_dpo_vs_ppo",
]

# chapters whose `main` takes --quick (a short form of the same run); `python -m chapters --quick` passes it on
QUICK_CHAPTERS = {"ch2_reward_model", "ch6_ppo", "ch7_frontier"}


class ChapterSkipped(Exception):
    """Raised by a chapter's `main` when it cannot run here; the message is one line saying what to do."""
