"""Chapter 12 (beyond the report, after §7): offline vs iterative vs online DPO on exact worlds.

The report's §7 (chapter 9) shows where offline DPO goes wrong: eq. (38) sees a policy only on the
pairs its data compare, so a response the data never show, or show only winning, is left to chance
or to the regulariser. The field's answer is on-policy preference data: iterative DPO (Xiong et al.
2024, "Iterative Preference Learning from Human Feedback", arXiv 2312.11456), online DPO with an AI
labeller (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv
2402.04792), and on-policy, suboptimal samples (Tajwar et al. 2024, "Preference Fine-Tuning of LLMs
Should Leverage Suboptimal, On-Policy Data", arXiv 2404.14367). Here, on bandit worlds where π* of
eq. (36) is known exactly, one labelling budget is spent three ways (offline, iterative, online),
labelled by Bradley–Terry (eq. (23)) on the true reward, and each result is measured against π*,
π_ref and the exact reward-vs-KL frontier.

- `rounds`: the labeller, pair sampling, eq. (38) on counts and its minimisation, the schedules.
- `worlds`: two worlds (the best response hidden from π_ref, or covered), metrics, the frontier.
- `experiment`: the schedules over seeds with intervals, and the sweep over the prior's weight.
- `miniature_online`: the same question on chapter 8's miniature GPT-2: online DPO with a
  Sentence-BERT judge against offline DPO on the data set's pairs, at one labelling budget.
"""

from chapters.ch12_online_dpo.experiment import (
    compare_schedules,
    regulariser_sweep,
    run_experiment,
    schedules,
)
from chapters.ch12_online_dpo.miniature_online import (
    closer_wins,
    compare_on_miniature,
    labelled_pairs,
    run_offline,
    run_online,
    sbert_judge,
    sequence_kl,
)
from chapters.ch12_online_dpo.rounds import (
    bt_labeller,
    empirical_dpo_gradient,
    empirical_dpo_loss,
    expected_counts,
    minimiser_at_infinity,
    newton_fit,
    offline_dpo,
    pair_distribution,
    preference_rounds,
    run_rounds,
    sample_pairs,
)
from chapters.ch12_online_dpo.worlds import (
    WORLDS,
    World,
    covered_world,
    frontier,
    hidden_best_world,
    policy_metrics,
)

__all__ = [
    "bt_labeller",
    "preference_rounds",
    "run_rounds",
    "offline_dpo",
    "empirical_dpo_loss",
    "empirical_dpo_gradient",
    "newton_fit",
    "pair_distribution",
    "sample_pairs",
    "expected_counts",
    "minimiser_at_infinity",
    "World",
    "WORLDS",
    "hidden_best_world",
    "covered_world",
    "policy_metrics",
    "frontier",
    "schedules",
    "compare_schedules",
    "run_experiment",
    "regulariser_sweep",
    "closer_wins",
    "sbert_judge",
    "labelled_pairs",
    "run_online",
    "run_offline",
    "sequence_kl",
    "compare_on_miniature",
]
