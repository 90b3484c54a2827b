"""Chapter 2 (report §3.3; eqs. (17)–(26)): Bradley–Terry as a sigmoid, the reward-model NLL, a
GPT-2 reward model.

python -m chapters.ch2_reward_model [--quick]
"""

from chapters.ch2_reward_model.bradley_terry import (  # noqa: F401
    bt_probability,
    bt_sigmoid_steps,
    centred_rmse,
    fit_bt_rewards,
    normalize_rewards,
    preference_likelihood,
    preference_nll,
    reward_model_loss,
    reward_model_loss_grad,
    sample_bt_comparisons,
    sigmoid,
)
from chapters.ch2_reward_model.reward_head import (  # noqa: F401
    PreferencePairs,
    RewardModel,
    count_task_pairs,
    pair_accuracy,
    pair_rewards,
    train_reward_model,
)
