"""Row layouts: how token lists become the (B, T) tensors a GPT-2 reads, and which positions score a
response.

Every layout the chapters use, in one place:
- `right_pad` and `left_pad` (left padding is `gpt.generation.left_pad`, re-exported: batched
  generation in gpt/ needs it, and gpt/ imports nothing from chapters/, so it lives there once);
- `prompt_response_rows`: rows [prompt, response, right padding] with attention and response masks,
  the layout `chapters.ch4_dpo.response_logprobs` reads; `pair_rows` lays out preference pairs that
  way, chosen rows first;
- `TokenBatch`, the same rows plus a plan of which hidden state predicts which response token
  (`rows_batch`, `unpacked_pairs_batch`), or one row per pair with the prompt once
  (`packed_pairs_batch`).
"""

from dataclasses import dataclass

import torch

from gpt.generation import left_pad  # noqa: F401 (re-exported)


def _ids(tokens) -> list:
    """A token list from a list or a 1-D tensor."""
    return tokens.tolist() if torch.is_tensor(tokens) else list(tokens)


def right_pad(sequences, pad_id: int = 0, length: int = None):
    """Token lists -> (ids (N, T) long, attention_mask (N, T) long), padded on the right with
    `pad_id`.

    T is `length` if given, else the longest sequence.
    """
    if len(sequences) == 0:
        raise ValueError("no sequences to pad; give at least one")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)  # (N,)
    length = int(lengths.max()) if length is None else length
    if lengths.max() > length:
        raise ValueError(
            f"a sequence is longer than length={length}; raise it or truncate the sequence"
        )
    mask = (
        torch.arange(length) < lengths[:, None]
    ).long()  # (N, T): 1 on each row's first len(s) positions
    ids = torch.full(mask.shape, pad_id, dtype=torch.long)
    ids[mask.bool()] = torch.tensor(
        [t for s in sequences for t in _ids(s)], dtype=torch.long
    )  # row-major order
    return ids, mask


def prompt_response_rows(prompts, responses, pad_id: int = 0):
    """Rows [prompt, response, right padding]: the layout `chapters.ch4_dpo.response_logprobs`
    reads.

    prompts, responses: token lists or 1-D LongTensors, one response per prompt. Returns input_ids
    (B, T), attention_mask (B, T) long (1 = real token) and response_mask (B, T) bool (True =
    response token), aligned.
    """
    if len(prompts) != len(responses):
        raise ValueError(
            f"{len(prompts)} prompts but {len(responses)} responses; give one response per prompt"
        )
    if any(len(p) == 0 for p in prompts):
        raise ValueError(
            "an empty prompt leaves the first response token unpredicted; start with at least one "
            "token"
        )
    ids, attention_mask = right_pad([_ids(p) + _ids(r) for p, r in zip(prompts, responses)], pad_id)
    prompt_lengths = torch.tensor([len(p) for p in prompts])  # (B,)
    response_mask = attention_mask.bool() & (
        torch.arange(ids.shape[1]) >= prompt_lengths[:, None]
    )  # (B, T)
    return ids, attention_mask, response_mask


def pair_rows(pairs, pad_id: int):
    """Preference pairs (with .prompt, .chosen, .rejected) as rows [chosen_0..chosen_{B-1},
    rejected_0..], each prompt + response, right-padded: `prompt_response_rows`' three (2B, T)
    tensors."""
    return prompt_response_rows(
        [p.prompt for p in pairs] * 2,
        [p.chosen for p in pairs] + [p.rejected for p in pairs],
        pad_id,
    )


@dataclass
class TokenBatch:
    """Token rows plus the plan of which hidden state predicts which response token.

    input_ids: (R, L). Plain causal rows have attention_mask (R, L), 1 = real; packed rows have
    position_ids (R, L) and attn (R, 1, L, L) bool, True = may attend (the other fields None). rows,
    cols, targets, seq: (N,) — hidden state (rows, cols) predicts token `targets`, which belongs to
    response sequence `seq` (0..B-1 chosen, B..2B-1 rejected; or 0..R-1 for SFT). Entries are
    ordered by `seq`, then by position in the response.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    attn: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    n_seq: int

    def to(self, device):
        return TokenBatch(
            **{k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()}
        )


def _plan(entries):
    """(row, col, target, seq) tuples sorted by seq (stable) -> four (N,) tensors."""
    entries.sort(key=lambda e: e[3])
    rows, cols, targets, seq = (torch.tensor(c, dtype=torch.long) for c in zip(*entries))
    return rows, cols, targets, seq


def rows_batch(prompts, responses, pad_id: int) -> TokenBatch:
    """`prompt_response_rows` as a TokenBatch: one row per (prompt, response); sequence r is row r's
    response."""
    ids, attention_mask, _ = prompt_response_rows(prompts, responses, pad_id)
    entries = [
        (r, len(p) + j - 1, tok, r)  # the token at len(p) + j is predicted from the one before
        for r, (p, resp) in enumerate(zip(prompts, responses))
        for j, tok in enumerate(_ids(resp))
    ]
    return TokenBatch(ids, None, attention_mask, None, *_plan(entries), n_seq=len(prompts))


def unpacked_pairs_batch(pairs, pad_id: int) -> TokenBatch:
    """Chosen and rejected as separate rows of one batch, as `pair_rows` lays them out."""
    return rows_batch(
        [p.prompt for p in pairs] * 2,
        [p.chosen for p in pairs] + [p.rejected for p in pairs],
        pad_id,
    )


def packed_pairs_batch(pairs, pad_id: int) -> TokenBatch:
    """One row per pair: prompt + chosen + rejected, right-padded; the rejected tokens attend to the
    prompt and to themselves, not to the chosen ones, and take positions len(prompt), len(prompt)+1,
    ... like the chosen."""
    B = len(pairs)
    ids, _ = right_pad([p.prompt + p.chosen + p.rejected for p in pairs], pad_id)  # (B, L)
    L = ids.shape[1]
    sizes = [(len(p.prompt), len(p.chosen), len(p.rejected)) for p in pairs]
    pos, _ = right_pad([[*range(P + C), *range(P, P + R)] for P, C, R in sizes], 0, L)  # (B, L)
    segment, _ = right_pad(
        [[0] * P + [1] * C + [2] * R for P, C, R in sizes], -1, L
    )  # 0 prompt, 1 chosen, 2 rejected
    entries = []
    for b, (p, (P, C, R)) in enumerate(zip(pairs, sizes)):
        entries += [(b, P + j - 1, tok, b) for j, tok in enumerate(p.chosen)]
        # the first rejected token is predicted from the last prompt token, the others from the one
        # before
        entries += [
            (b, P - 1 if j == 0 else P + C + j - 1, tok, B + b) for j, tok in enumerate(p.rejected)
        ]
    q, k = segment[:, :, None], segment[:, None, :]  # (B, L, 1), (B, 1, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()  # (L, L)
    attn = causal & (k != -1) & (q != -1) & ((k == 0) | (k == q))  # (B, L, L)
    attn |= torch.eye(L, dtype=torch.bool)  # padding rows see themselves, so they stay finite
    return TokenBatch(ids, pos, None, attn[:, None], *_plan(entries), n_seq=2 * B)
