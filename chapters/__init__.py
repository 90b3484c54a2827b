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
    "ch10_dpo_family",
    "ch11_dpo_pitfalls",
    "ch12_online_dpo",
]

# chapters whose `main` takes --quick (a short form of the same run); `python -m chapters --quick`
# passes it on
QUICK_CHAPTERS = {
    "ch2_reward_model",
    "ch6_ppo",
    "ch7_frontier",
    "ch10_dpo_family",
    "ch11_dpo_pitfalls",
    "ch12_online_dpo",
}

# chapters that take hours at full size: `python -m chapters --quick` skips them unless they are in
# QUICK_CHAPTERS
LONG_CHAPTERS = {
    "ch8_instruction_dpo": "no short form (minutes with --miniature, hours on GPT-2's weights); "
    "python -m chapters.ch8_instruction_dpo --smoke runs its whole pipeline in under a minute",
}
