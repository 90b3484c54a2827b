"""A fast DPO step, and the plain one it must equal (values and gradients).

The plain step runs policy and reference forward on every batch, chosen and rejected in separate
passes, and takes log-softmax over the full (B, T, vocab) logits. The fast step:
- takes the reference log-probs from a cache built once (the reference is frozen), together with the
  reference's final hidden states at the response positions, so the token-level KL needs no
  reference forward;
- packs each pair into one row, prompt + chosen + rejected
  (`chapters.common.rows.packed_pairs_batch`), where the rejected tokens skip the chosen ones in
  attention and restart their positions after the prompt: the shared prompt runs once, not twice;
- applies the tied output head only at the positions that predict a response token;
- takes batches grouped by length (`preference_data.length_grouped_batches`, `dpo_batches`), and
  bf16 autocast on a GPU.
"""

import torch

from chapters.ch4_dpo.loss import dpo_loss, dpo_metrics, response_logprobs
from chapters.ch8_instruction_dpo.data import length_grouped_batches
from chapters.common.rows import TokenBatch, packed_pairs_batch, pair_rows


def batch_hidden_states(model, batch: TokenBatch) -> torch.Tensor:
    """The final LayerNorm's output (R, L, C) for a TokenBatch: plain rows via
    `model.hidden_states`, packed rows via `model.run_blocks` with the packed attention mask and
    positions."""
    if batch.attn is None:
        return model.hidden_states(batch.input_ids, batch.attention_mask)
    return model.run_blocks(batch.input_ids, batch.position_ids, batch.attn)  # (R, L, C)


def head_logprobs(hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """log π(· | prefix) = log_softmax(h Wᵀ) at the given hidden states only: (N, C) -> (N, vocab),
    float32 or wider."""
    logits = hidden @ head_weight.T  # (N, V)
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def plan_logprobs(hidden, head_weight, batch: TokenBatch):
    """log π(y | x) = Σ_t log π(y_t | x, y_<t) per response sequence, from the hidden states at the
    plan's positions.

    hidden (N, C). Returns (n_seq,) sums and the (N, vocab) log-probs (for the token-level KL).
    """
    logp = head_logprobs(hidden, head_weight)  # (N, V)
    token = logp.gather(-1, batch.targets[:, None]).squeeze(-1)  # (N,)
    return token.new_zeros(batch.n_seq).index_add(0, batch.seq, token), logp


def sequence_logprobs(model, batch: TokenBatch):
    """`plan_logprobs` of `model` on `batch`: the output head is applied only where a response token
    is predicted."""
    h = batch_hidden_states(model, batch)[batch.rows, batch.cols]  # (R, L, C) -> (N, C)
    return plan_logprobs(h, model.lm_head.weight, batch)


def dpo_batches(pairs, batch_size: int, seed: int):
    """`train_dpo`'s global batches: epoch -> lists of indices into `pairs`, grouped by packed
    length and shuffled with seed + epoch (epochs 1-based, as `chapters.training.loop.train_epochs`
    counts them). The training split's reference cache is built in epoch 1's batches
    (`first_epoch_batches`) through this same function."""
    lengths = [p.packed_length for p in pairs]
    return lambda epoch: length_grouped_batches(lengths, batch_size, seed + epoch)


def evaluation_batches(pairs, batch_size: int) -> list:
    """The batches `dpo_evaluate` reads a split in, sorted by packed length: a reference cache's
    default order."""
    return length_grouped_batches([p.packed_length for p in pairs], batch_size, 0, shuffle=False)


def first_epoch_batches(pairs, batch_size: int, seed: int) -> list:
    """The batches of `train_dpo`'s first epoch: its first step packs exactly the rows of the first
    of them."""
    return dpo_batches(pairs, batch_size, seed)(1)


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Report §6.2, Fig. 3 right: token-level KL(π‖π_ref) = Σ_v π(v|·) (log π(v|·) − log
    π_ref(v|·)), per position: (N,)."""
    return (logp.exp() * (logp - ref_logp)).sum(-1)


class ReferenceCache:
    """The frozen reference's log π_ref(y | x) for every pair, and its final hidden states at the
    response positions.

    Built once, without gradients. `get(ids)` returns ref chosen (B,), ref rejected (B,) log-probs
    and the hidden states (N, C) in the order of a TokenBatch of those pairs; `head_weight` turns
    them into π_ref's distributions.

    `batches` (lists of indices covering every pair once): the packed batches it is computed in;
    default, sorted by length (the order `dpo_evaluate` reads a split in). Why it matters: a pair's
    float32 sums depend on the rows packed beside it (the padding, the kernels' blocking), by ~1e-6.
    At DPO's first step the policy is the reference, so every reward margin of eq. (38) is 0 only if
    the policy's log-probs are the cache's bit for bit; for the training split, pass
    `first_epoch_batches(pairs, batch_size, seed)`, and the first step (one process, one
    micro-batch) packs the identical tensor the cache did: loss ln 2 and accuracy 0 exactly. Under
    torchrun or with
    --grad-accum K each rank packs its share of a batch, in pieces: those steps are equal up to
    rounding only.
    """

    def __init__(
        self,
        reference,
        pairs,
        pad_id: int,
        batch_size: int = 8,
        keep_hidden: bool = True,
        batches=None,
    ):
        self.head_weight = reference.lm_head.weight.detach()
        n = len(pairs)
        if batches is None:
            batches = evaluation_batches(pairs, batch_size)
        elif sorted(i for idx in batches for i in idx) != list(range(n)):
            raise ValueError(
                f"ReferenceCache: the batches must hold each of the {n} pairs' indices once; pass "
                "first_epoch_batches(pairs, ...) or leave batches out (by length)"
            )
        dtype = torch.promote_types(self.head_weight.dtype, torch.float32)
        self.chosen, self.rejected = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
        self.hidden_chosen, self.hidden_rejected = [None] * n, [None] * n
        device = self.head_weight.device
        with torch.no_grad():
            for idx in batches:
                batch = packed_pairs_batch([pairs[i] for i in idx], pad_id).to(device)
                with autocast(device):
                    h = batch_hidden_states(reference, batch)[batch.rows, batch.cols]  # (N, C)
                    logps, _ = plan_logprobs(h, self.head_weight, batch)
                B = len(idx)
                self.chosen[idx], self.rejected[idx] = logps[:B].cpu(), logps[B:].cpu()
                if keep_hidden:
                    for s, part in zip(
                        range(2 * B),
                        torch.split(h, torch.bincount(batch.seq, minlength=2 * B).tolist()),
                    ):
                        (self.hidden_chosen if s < B else self.hidden_rejected)[idx[s % B]] = part
        self.keep_hidden = keep_hidden

    def get(self, ids):
        hidden = (
            torch.cat([self.hidden_chosen[i] for i in ids] + [self.hidden_rejected[i] for i in ids])
            if self.keep_hidden
            else None
        )  # (N, C)
        return self.chosen[ids], self.rejected[ids], hidden


def autocast(device):
    """bf16 autocast on a GPU; a no-op on the CPU (float32 there)."""
    device = torch.device(device)
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )


def fast_dpo_loss(
    policy, batch: TokenBatch, ref_chosen, ref_rejected, beta: float, ref_hidden=None, ref_head=None
):
    """Report eq. (38) on one forward pass of packed pairs with cached reference log-probs: (mean
    loss, metrics).

    With the reference's hidden states (ref_hidden, ref_head) the metrics include the mean
    token-level KL.
    """
    device = batch.input_ids.device
    with autocast(device):
        logps, logp = sequence_logprobs(policy, batch)  # (2B,), (N, V)
    B = batch.n_seq // 2
    ref_chosen, ref_rejected = ref_chosen.to(device), ref_rejected.to(device)
    losses = dpo_loss(logps[:B], logps[B:], ref_chosen, ref_rejected, beta)  # (B,)
    with torch.no_grad():
        metrics = dpo_metrics(logps[:B], logps[B:], ref_chosen, ref_rejected, beta)
        if ref_hidden is not None:
            with autocast(device):
                ref_logp = head_logprobs(ref_hidden.to(device), ref_head)
            metrics["kl"] = token_kl(logp, ref_logp).mean().item()
    return losses.mean(), metrics


def plain_dpo_loss(policy, reference, pairs, pad_id: int, beta: float):
    """Report eq. (38) the plain way: policy and reference forward, chosen and rejected apart, full
    logits. Mean loss."""
    ids, att, resp = pair_rows(pairs, pad_id)  # (2B, T) each
    B = len(pairs)
    c, r = slice(0, B), slice(B, 2 * B)
    policy_chosen = response_logprobs(policy(ids[c], att[c]), ids[c], resp[c])
    policy_rejected = response_logprobs(policy(ids[r], att[r]), ids[r], resp[r])
    with torch.no_grad():
        ref_chosen = response_logprobs(reference(ids[c], att[c]), ids[c], resp[c])
        ref_rejected = response_logprobs(reference(ids[r], att[r]), ids[r], resp[r])
    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta).mean()
