"""The generic training machinery; imports only `gpt` and `chapters.common`, and knows no chapter's
loss (every loss is passed in).

- `loop`: `train_epochs`, the one training loop (micro-batches, gradient accumulation, checkpoints,
  resume);
- `checkpoints`: training checkpoints and their fingerprints, learning-rate schedules, saved models;
- `distributed`: torchrun, DDP and FSDP2 (`Dist`, `wrap`), and one process as the same code with N =
  1;
- `finetune`: `finetune` (Adam steps on random minibatches, chapters 6, 7 and 10) and
  `next_token_loss`.
"""

from chapters.training.finetune import finetune, next_token_loss  # noqa: F401
from chapters.training.loop import Run, train_epochs  # noqa: F401
