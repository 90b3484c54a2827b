"""Chapter 2 (report §3.3; eqs. (17)–(26)): Bradley–Terry as a sigmoid, the reward-model NLL, a
GPT-2 reward model.

python -m chapters.ch2_reward_model [--quick]
"""

# the chapter's named API; everything else is imported from the module that defines it
from chapters.ch2_reward_model.bradley_terry import bt_probability, reward_model_loss
from chapters.ch2_reward_model.reward_head import RewardModel, train_reward_model

__all__ = ["bt_probability", "reward_model_loss", "RewardModel", "train_reward_model"]
