"""Chapter 8 (report §6.2, Figs. 3–4): the report's GPT-2 SFT → DPO experiment, done right, with
SBERT win rates.

    python -m chapters.ch8_instruction_dpo --miniature   # minutes on a CPU

The data (`data`), the token rows and the fast DPO step (`dpo_step`), the SFT and DPO trainers
(`trainers`), the miniature's base model (`miniature`), win rates and length control (`win_rates`,
`length_control`), the authors' setup (`authors_setup`), torchrun and run folders (`scaled_run`,
`reference_store`), figures.
"""

# the chapter's named API; everything else is imported from the module that defines it
from chapters.ch8_instruction_dpo.trainers import sft_loss, train_dpo, train_sft

__all__ = ["sft_loss", "train_dpo", "train_sft"]
