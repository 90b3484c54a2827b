"""Training loops of chapter 8's SFT → DPO pipeline, and DPO's metrics over a whole split.

- `sft_loss`, `train_sft`: SFT on (prompt, chosen + EOS); only response tokens are targets.
- `dpo_step`, `dpo_evaluate`, `train_dpo`: eq. (38) from π_θ = π_SFT with π_ref = π_SFT frozen, through the fast
  step of `chapters.dpo_step` (the reference's log-probs and hidden states cached once, pairs packed one a row).
Batches are grouped by length and seeded (`preference_data.length_grouped_batches`); the optimiser is AdamW with
gradients clipped at norm 1. The loops return plain dict rows (one per epoch or step) for tables and figures.
"""
import copy

import numpy as np
import torch
from tqdm import tqdm

from chapters.dpo_step import autocast, fast_dpo_loss, sequence_logprobs
from chapters.preference_data import length_grouped_batches
from chapters.rows import packed_pairs_batch, rows_batch

# chapters.ch4_dpo.dpo_metrics' keys, and the mean token-level KL(π‖π_ref) over response tokens
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl")


def _update(model, opt, loss):
    """One optimiser step on `loss`: backward, clip the gradient norm at 1, AdamW."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


# ---------------------------------------------------------------- SFT

def sft_loss(model, batch):
    """Report §6.2, SFT: −(1/N) Σ log π(y_t | x, y_<t) over the N response tokens (EOS included); prompt and padding
    are not targets."""
    sums, _ = sequence_logprobs(model, batch)  # (R,) per-row sums over response tokens only
    return -sums.sum() / batch.targets.numel()


def sft_batch(pairs, idx, pad_id: int, device):
    """Rows prompt + chosen of pairs[idx] as a TokenBatch on `device`."""
    return rows_batch([pairs[i].prompt for i in idx], [pairs[i].chosen for i in idx], pad_id).to(device)


def sft_evaluate(model, pairs, *, batch_size: int, device, pad_id: int, loss_fn=sft_loss) -> float:
    """Mean over length-sorted batches of `loss_fn` on (prompt, chosen) of `pairs`, without gradients."""
    model.eval()
    batches = length_grouped_batches([len(p.prompt) + len(p.chosen) for p in pairs], batch_size, 0, shuffle=False)
    with torch.no_grad(), autocast(device):
        return float(np.mean([loss_fn(model, sft_batch(pairs, idx, pad_id, device)).item() for idx in batches]))


def train_sft(model, train, val, *, epochs: int, lr: float, batch_size: int, seed: int, device, pad_id: int,
              loss_fn=sft_loss, label: str = "SFT") -> list:
    """Fine-tune `model` in place on (prompt, chosen); returns rows {epoch, train_loss, validation_loss}.

    `label` names the phase in the progress bar and the printed lines."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True)
    lengths = [len(p.prompt) + len(p.chosen) for p in train]
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        for idx in tqdm(length_grouped_batches(lengths, batch_size, seed + epoch), desc=f"{label} epoch {epoch}/{epochs}",
                        leave=False):
            with autocast(device):
                loss = loss_fn(model, sft_batch(train, idx, pad_id, device))
            _update(model, opt, loss)
            losses.append(loss.item())
        val_loss = sft_evaluate(model, val, batch_size=batch_size, device=device, pad_id=pad_id, loss_fn=loss_fn)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "validation_loss": val_loss})
        print(f"{label} epoch {epoch}: train loss {history[-1]['train_loss']:.4f}, validation loss {val_loss:.4f}")
    return history


# ---------------------------------------------------------------- DPO

def dpo_step(policy, pairs, idx, cache, beta: float, device, pad_id: int):
    """Report eq. (38) on pairs[idx], packed, against the cached reference: (mean loss, `METRICS` of the batch)."""
    batch = packed_pairs_batch([pairs[i] for i in idx], pad_id).to(device)
    ref_chosen, ref_rejected, ref_hidden = cache.get(idx)
    return fast_dpo_loss(policy, batch, ref_chosen, ref_rejected, beta, ref_hidden, cache.head_weight)


def dpo_evaluate(policy, pairs, cache, beta: float, *, batch_size: int, device, pad_id: int, step=dpo_step) -> dict:
    """`METRICS` of `policy` over all of `pairs` (no gradients), averaged per pair."""
    policy.eval()
    totals, n = dict.fromkeys(METRICS, 0.0), 0
    with torch.no_grad():
        for idx in length_grouped_batches([p.packed_length for p in pairs], batch_size, 0, shuffle=False):
            _, m = step(policy, pairs, idx, cache, beta, device, pad_id)
            for k in METRICS:
                totals[k] += m[k] * len(idx)
            n += len(idx)
    return {k: v / n for k, v in totals.items()}


def train_dpo(sft_model, train, val, caches, beta: float, *, epochs: int, lr: float, batch_size: int, seed: int,
              device, pad_id: int, step=dpo_step):
    """Report eq. (38) minimised from π_θ = π_SFT with π_ref = π_SFT frozen (`caches` "train" and "validation" hold
    it); returns the policy, one row per step and rows per epoch (epoch 0: validation before training)."""
    policy = copy.deepcopy(sft_model).requires_grad_(True)  # every β starts from the same SFT weights
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0, fused=True)
    lengths = [p.packed_length for p in train]
    settings = dict(batch_size=batch_size, device=device, pad_id=pad_id, step=step)
    steps = []
    epochs_rows = [{"beta": beta, "epoch": 0, "split": "validation",
                    **dpo_evaluate(policy, val, caches["validation"], beta, **settings)}]
    for epoch in range(1, epochs + 1):
        policy.train()
        for idx in tqdm(length_grouped_batches(lengths, batch_size, seed + epoch),
                        desc=f"DPO β={beta} epoch {epoch}/{epochs}", leave=False):
            loss, m = step(policy, train, idx, caches["train"], beta, device, pad_id)
            _update(policy, opt, loss)
            steps.append({"beta": beta, "epoch": epoch, "step": len(steps) + 1, **m})
        t = {"beta": beta, "epoch": epoch, "split": "train",
             **{k: float(np.mean([s[k] for s in steps if s["epoch"] == epoch])) for k in METRICS}}
        v = {"beta": beta, "epoch": epoch, "split": "validation",
             **dpo_evaluate(policy, val, caches["validation"], beta, **settings)}
        epochs_rows += [t, v]
        print(f"DPO β={beta} epoch {epoch}: train loss {t['loss']:.4f} acc {t['rewards/accuracies']:.3f} "
              f"KL {t['kl']:.4f} | validation loss {v['loss']:.4f} acc {v['rewards/accuracies']:.3f} "
              f"margin {v['rewards/margins']:.3f} KL {v['kl']:.4f}")
    policy.eval()
    return policy, steps, epochs_rows
