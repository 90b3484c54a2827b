"""One fine-tuning loop for the small models of chapters 6, 7 and 10: Adam steps on a loss over random minibatches.

    losses, saved = finetune(model, next_token_loss, {"ids": sequences}, steps=600, batch_size=64, lr=3e-3,
                             generator=g)                       # SFT on token sequences (chapter 6)
    _, saved = finetune(policy, loss_fn, data, steps, batch_size, lr, g, checkpoints=(100, 200))  # chapter 7

Each step draws `batch_size` row indices uniformly with replacement (`generator` seeds them) and takes those
rows of every tensor in `data`, so `loss_fn(model, batch)` sees a dict with the same keys.
"""
import copy

import torch
import torch.nn.functional as F
from tqdm import tqdm


def next_token_loss(model, batch: dict) -> torch.Tensor:
    """SFT's next-token cross-entropy on every position of batch["ids"] (b, T): mean of −log π(x_t | x_<t), t ≥ 1."""
    ids = batch["ids"]
    logits = model(ids[:, :-1])  # (b, T−1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def finetune(model, loss_fn, data: dict, steps: int, batch_size: int, lr: float, generator: torch.Generator,
             checkpoints=(), desc: str = "fine-tune", progress: bool = True):
    """Adam on `loss_fn(model, minibatch)` for `steps` steps; returns (the loss of each step, [(step, state_dict)]).

    A state dict is copied after each step whose number (1-based) is in `checkpoints`. Leaves the model in eval mode.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    n = len(next(iter(data.values())))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses, saved = [], []
    for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False):
        idx = torch.randint(n, (batch_size,), generator=generator)  # (b,)
        loss = loss_fn(model, {k: v[idx] for k, v in data.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step in checkpoints:
            saved.append((step, copy.deepcopy(model.state_dict())))
    model.eval()
    return losses, saved
