"""What chapter 11 reads off a GPT-2 for preference pairs: log-probs, end-of-text, CHES, ranks.

- `pair_readings`: per pair, log π(y_w|x) and log π(y_l|x) (sums over response tokens, EOS
  included), the end-of-text log-prob where each response stops, the mass on stopping early inside
  y_w; from the final hidden states at the response positions, CHES (Razin et al. 2024) and how
  alike the two responses' end states are;
- `end_distribution`: the mean next-token distribution where y_w ends (what replaces EOS there);
- `displacement_summary`: how many pairs end with a lower log π(y_w) than a model before gave;
- `spearman`: Spearman's rank correlation (ties take their mean rank).
No training here: the readings run without gradients on any `gpt.GPT`.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from chapters.ch8_instruction_dpo.dpo_step import (
    batch_hidden_states,
    evaluation_batches,
    head_logprobs,
)
from chapters.ch11_dpo_pitfalls.displacement import ches_score
from chapters.common.rows import packed_pairs_batch

READINGS = ("chosen", "rejected", "chosen_eos", "rejected_eos", "chosen_early_eos")


@contextmanager
def _evaluating(model):
    """`model` in eval mode (no dropout) with gradients off inside the block; its mode restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _padded(parts):
    """Several responses' hidden states, [(T_i, C)], as (n, T, C) zero-padded and a (n, T) mask."""
    hidden = pad_sequence(parts, batch_first=True)  # (n, T, C)
    lengths = torch.tensor([len(p) for p in parts])
    return hidden, torch.arange(hidden.shape[1]) < lengths[:, None]


def pair_readings(
    model, pairs, pad_id: int, eos_id: int, *, batch_size: int = 16, device="cpu", hidden=False
) -> dict:
    """Readings of `model` on `pairs` (with .prompt, .chosen, .rejected; responses end with EOS),
    without gradients. Returns {name: (len(pairs),) float64}:

    - chosen, rejected: log π(y_w|x), log π(y_l|x), summed over the response tokens;
    - chosen_eos, rejected_eos: log π(EOS | x, y without its EOS), the end-of-text log-prob where
      the response stops;
    - chosen_early_eos: the mean over y_w's other positions of π(EOS | x, y_<k), the mass on
      stopping before y_w ends (NaN for a y_w of EOS alone);
    - with `hidden`, from the final hidden states h⁺_k, h⁻_k at the positions that predict y_w's
      and y_l's tokens: ches, CHES = ⟨Σ_k h⁺_k, Σ_k h⁻_k⟩ − ‖Σ_k h⁺_k‖² (`ches_score`);
      ches_per_token, the same on h⁺/|y_w| and h⁻/|y_l| (length-normalised); end_cosine, the
      cosine of the two states that predict the EOS of y_w and of y_l; cross_cosine, the mean
      cosine over every pair of positions (k, k'), the baseline it compares with.
    Pairs are packed one a row (prompt + chosen + rejected) in length-sorted batches.
    """
    extra = ("ches", "ches_per_token", "end_cosine", "cross_cosine") if hidden else ()
    names = READINGS + extra
    out = {k: torch.zeros(len(pairs), dtype=torch.float64) for k in names}
    head = model.lm_head.weight
    with _evaluating(model):
        for idx in evaluation_batches(pairs, batch_size):
            batch = packed_pairs_batch([pairs[i] for i in idx], pad_id).to(device)
            B = len(idx)
            h = batch_hidden_states(model, batch)[batch.rows, batch.cols]  # (N, C)
            logp = head_logprobs(h, head)  # (N, V)
            token = logp.gather(-1, batch.targets[:, None]).squeeze(-1)  # (N,)
            sums = token.new_zeros(2 * B).index_add(0, batch.seq, token)  # (2B,)
            counts = torch.bincount(batch.seq, minlength=2 * B)  # (2B,) response lengths
            ends = counts.cumsum(0) - 1  # the plan's last entry of each response: its EOS
            eos = logp[:, eos_id]  # (N,) log π(EOS | prefix) at every response position
            early = torch.ones_like(eos, dtype=torch.bool)
            early[ends] = False
            early_sum = eos.new_zeros(2 * B).index_add(0, batch.seq, eos.exp() * early)
            ids = torch.tensor(idx)
            out["chosen"][ids], out["rejected"][ids] = sums[:B].double(), sums[B:].double()
            out["chosen_eos"][ids] = eos[ends[:B]].double()
            out["rejected_eos"][ids] = eos[ends[B:]].double()
            out["chosen_early_eos"][ids] = (early_sum[:B] / (counts[:B] - 1)).double()
            if hidden:
                parts = torch.split(h.double(), counts.tolist())  # 2B × (T_s, C)
                hw, mw = _padded(parts[:B])
                hl, ml = _padded(parts[B:])
                out["ches"][ids] = ches_score(hw, hl, mw, ml)
                n_w, n_l = counts[:B, None, None].double(), counts[B:, None, None].double()
                out["ches_per_token"][ids] = ches_score(hw / n_w, hl / n_l, mw, ml)
                unit = F.normalize(h.double(), dim=-1)  # (N, C)
                out["end_cosine"][ids] = (unit[ends[:B]] * unit[ends[B:]]).sum(-1)
                mean_unit = torch.zeros(2 * B, h.shape[-1], dtype=torch.float64)
                mean_unit = mean_unit.index_add(0, batch.seq, unit) / counts[:, None]  # (2B, C)
                out["cross_cosine"][ids] = (mean_unit[:B] * mean_unit[B:]).sum(-1)
    return out


def end_distribution(model, pairs, pad_id: int, *, batch_size: int = 16, device="cpu"):
    """The mean over `pairs` of π(· | x, y_w without its EOS), the next-token distribution where the
    chosen response stops: (vocab,) float64. Set against another model's, it shows where the
    end-of-text mass went."""
    total = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.float64)
    with _evaluating(model):
        for idx in evaluation_batches(pairs, batch_size):
            batch = packed_pairs_batch([pairs[i] for i in idx], pad_id).to(device)
            B = len(idx)
            ends = torch.bincount(batch.seq, minlength=2 * B).cumsum(0)[:B] - 1  # (B,)
            h = batch_hidden_states(model, batch)[batch.rows[ends], batch.cols[ends]]  # (B, C)
            total += head_logprobs(h, model.lm_head.weight).exp().double().sum(0)
    return total / len(pairs)


def displacement_summary(before: dict, after: dict) -> dict:
    """How `after`'s log-probs moved from `before`'s (`pair_readings` of two models, same pairs):
    pairs, displaced (log π(y_w) lower after), share, both_fell (y_w and y_l lower), and the mean
    changes of log π(y_w), log π(y_l) and of the margin."""
    dw = after["chosen"] - before["chosen"]
    dl = after["rejected"] - before["rejected"]
    displaced = int((dw < 0).sum())
    return {
        "pairs": len(dw),
        "displaced": displaced,
        "share": displaced / len(dw),
        "both_fell": int(((dw < 0) & (dl < 0)).sum()),
        "chosen_change": dw.mean().item(),
        "rejected_change": dl.mean().item(),
        "margin_change": (dw - dl).mean().item(),
    }


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor; tied values share the mean of their ranks."""
    order = torch.argsort(x, stable=True)
    _, group, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # each tie group's last 1-based rank
    ranks = torch.empty_like(x)
    ranks[order] = (last - (counts.double() - 1) / 2)[group]  # the group's mean rank
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equally long samples: Pearson's correlation of their
    ranks, ties taking their mean rank (scipy.stats.spearmanr's convention)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(
            f"spearman needs two samples of one length >= 2, got {len(x)} and {len(y)} values"
        )
    if not bool(torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("spearman: a value is NaN or infinite; drop it first")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    if denominator == 0:
        raise ValueError("spearman: a sample is constant, its ranks carry no order")
    return float((rx * ry).sum() / denominator)
