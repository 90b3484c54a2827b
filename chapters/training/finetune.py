"""SFT's next-token loss, and `finetune`: chapters 6, 7 and 10's Adam steps on random minibatches.

    # SFT on token sequences (chapter 6):
    losses, saved = finetune(model, next_token_loss, {"ids": sequences}, steps=600, batch_size=64,
                             lr=3e-3, generator=g)
    # chapter 7:
    _, saved = finetune(policy, loss_fn, data, steps, batch_size, lr, g, checkpoints=(100, 200))

Each step draws `batch_size` row indices uniformly with replacement (`generator` seeds them) and
takes those rows of every tensor in `data`, so `loss_fn(model, batch)` sees a dict with the same
keys. The steps run through chapter 8's loop (`chapters.training.loop.train_epochs`) as one epoch of
`steps` batches on one process, one micro-batch each, without gradient clipping: one training loop
in the code, whatever the chapter.
"""

import copy

import torch
import torch.nn.functional as F

from chapters.training.distributed import Dist, wrap
from chapters.training.loop import train_epochs


def next_token_loss(model, batch: dict) -> torch.Tensor:
    """SFT's next-token cross-entropy on every position of batch["ids"] (b, T): mean of −log π(x_t |
    x_<t), t ≥ 1."""
    ids = batch["ids"]
    logits = model(ids[:, :-1])  # (b, T−1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def finetune(
    model,
    loss_fn,
    data: dict,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    checkpoints=(),
    desc: str = "fine-tune",
    progress: bool = True,
):
    """Adam on `loss_fn(model, minibatch)` for `steps` steps; returns (the loss of each step,
    [(step, state_dict)]).

    A state dict is copied after each step whose number (1-based) is in `checkpoints`. Leaves the
    model in eval mode. All `steps` minibatches are drawn from `generator` before the first step
    (`loss_fn` draws nothing from it).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    n = len(next(iter(data.values())))
    drawn = [torch.randint(n, (batch_size,), generator=generator).tolist() for _ in range(steps)]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # the loop zeroes after each step: a gradient left on the model must not join the first
    optimizer.zero_grad()
    saved = []

    def step_loss(
        model, idx
    ):  # a minibatch's mean loss, and the metric the loop averages over the batch
        loss = loss_fn(model, {k: v[torch.tensor(idx)] for k, v in data.items()})
        return loss, {"loss": loss.item()}

    def record(losses, epoch, metrics):
        losses.append(
            metrics["loss"]
        )  # Σ w·loss / Σ w over one micro-batch: the loss itself, exactly
        if len(losses) in checkpoints:
            saved.append((len(losses), copy.deepcopy(model.state_dict())))

    losses = train_epochs(
        wrap(model, Dist()),
        optimizer,
        None,
        loss_fn=step_loss,
        batches=lambda epoch: drawn,
        weight=len,
        epochs=1,
        dist=Dist(),
        history=[],
        on_step=record,
        clip=None,
        desc=desc,
        progress=progress,
    )
    return losses, saved
