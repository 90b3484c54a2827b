"""GPT-2, written out: pre-LayerNorm transformer blocks, learned positions, a tied output head.

Module names follow the checkpoint (wte, wpe, h.N.ln_1, attn.c_attn, mlp.c_fc, ln_f, ...), so
`gpt/checkpoint.py` maps OpenAI's and Hugging Face's tensors onto it with one table. Shapes: B
batch, T new tokens, S tokens attended to (past + new), C n_embd, H heads, D = C / H.
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import GPTConfig


def check_token_ids(ids: torch.Tensor, vocab_size: int, name="input_ids", whose="the model's"):
    """ValueError, one line naming the offending id, the range and the vocabulary's size, unless
    every id in `ids` lies in 0..vocab_size − 1 (an embedding or a gather would fail with a raw
    indexing error, or on a GPU with a device-side assert)."""
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{name} hold token id {high if high >= vocab_size else low}, outside {whose} "
            f"vocabulary 0..{vocab_size - 1} ({vocab_size} tokens); encode with the tokenizer the "
            f"checkpoint was trained with"
        )


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` tokens and filled as tokens
    arrive.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32
    ):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # tokens stored so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new (B, H, T, D) keys and values; return all of them so far, (B, H, S, D)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(
                f"KV cache holds {self.k.shape[3]} tokens; {end} requested. Make it larger"
            )
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, keep: torch.Tensor):
        """Keep only the batch rows `keep` (e.g. after dropping finished sequences)."""
        self.k, self.v = self.k[:, keep], self.v[:, keep]


class Unpadded(NamedTuple):
    """Where the N real tokens of a padded (B, T) batch sit: `index` (N,) holds b * T + t for each,
    in order.

    Layers that treat tokens one by one (embeddings, LayerNorm, the linear layers, the MLP) run on
    the N real tokens only, so padding costs them nothing; attention runs in the padded layout,
    where the KV cache lives.
    """

    index: torch.Tensor
    batch: int
    length: int

    @classmethod
    def of(cls, attention_mask):
        return cls(attention_mask.flatten().nonzero().squeeze(1), *attention_mask.shape)

    def pad(self, x):
        """(1, N, K) -> (B, T, K), zeros at padding."""
        out = x.new_zeros(self.batch * self.length, x.shape[-1])
        return out.index_copy_(0, self.index, x[0]).view(self.batch, self.length, -1)

    def unpad(self, x):
        """(B, T, ...) -> (1, N, ...)."""
        return x.flatten(0, 1).index_select(0, self.index)[None]


class Linear(nn.Linear):
    """nn.Linear, except that a CPU product needing no gradient runs on oneDNN's inner product.

    PyTorch's CPU matrix products go to MKL. For GPT-2's shapes oneDNN's inner product (the kernel
    torch.compile picks for a CPU linear layer, `torch.ops.mkldnn._linear_pointwise`) is faster:
    decoding's single row runs on every core (MKL's matrix-vector product uses one), and a forward
    pass's many rows run nearer the cores' peak (on the AMD EPYC this project is measured on, about
    twice MKL's speed). It has no backward, so products that need a gradient keep nn.Linear's path,
    and so do small ones, where its fixed cost of some 20 µs a call is more than it saves. Same sums
    in another order: values agree to float32 rounding. bench/bench_gpt2.py measures it.
    """

    ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ONEDNN_MIN_WEIGHT = (
        2**19
    )  # weights this large pay its fixed cost (GPT-2's smallest is 768 x 768)

    def forward(self, x):
        if (
            self.ONEDNN
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and self.weight.numel() >= self.ONEDNN_MIN_WEIGHT
            and not torch.is_autocast_enabled("cpu")
            and not (
                torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias))
            )
        ):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.layer, self.dropout = config.n_head, layer, config.dropout
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, cache=None, unpadded=None):
        qkv = self.c_attn(
            x
        )  # (B, T, 3C); (1, N, 3C) for the real tokens only when `unpadded` says where they sit
        if unpadded is not None:
            qkv = unpadded.pad(qkv)
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H, S, D)
        # No mask and no past: plain causal attention. With a mask, `mask` is (B, 1, T, S) and
        # already causal.
        causal = mask is None and T > 1 and (cache is None or cache.length == 0)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        if unpadded is not None:
            y = unpadded.unpad(y)  # (1, N, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None, unpadded=None):
        x = x + self.attn(self.ln_1(x), mask, cache, unpadded)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one Parameter, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, input_ids, attention_mask=None, cache=None, skip_padding=False):
        """The final LayerNorm's output, (B, T, C), for the T tokens of `input_ids`.

        `attention_mask` (B, S) is 1 for real tokens and 0 for padding, and covers the cached past
        too (S = past + T). Positions count real tokens only, so left- and right-padded rows get the
        positions they would have alone. With `skip_padding`, every layer but attention runs on the
        real tokens only (`Unpadded`; the prompt pass of batched generation) and padding's outputs
        are zeros.
        """
        B, T = input_ids.shape
        check_token_ids(input_ids, self.config.vocab_size)
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than the context of "
                f"{self.config.n_positions}; shorten the prompt"
            )
        if (
            attention_mask is None and past > 0 and T > 1
        ):  # new tokens after a past need an offset causal mask
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask is None:
            pos = torch.arange(past, past + T, device=input_ids.device)  # (T,)
            mask = None
        else:
            real = attention_mask.bool()  # (B, S)
            pos = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T): skips padding
            q_idx = torch.arange(past, past + T, device=input_ids.device)[:, None]  # (T, 1)
            k_idx = torch.arange(past + T, device=input_ids.device)[None, :]  # (1, S)
            # causal and not padding; every query also sees itself, so rows of padding stay finite
            mask = ((k_idx <= q_idx) & real[:, None, :]) | (k_idx == q_idx)  # (B, T, S)
            mask = mask[:, None]  # (B, 1, T, S)
            if skip_padding and not bool(real[:, past:].all()):
                unpadded = Unpadded.of(real[:, past:])
                x = self.run_blocks(
                    unpadded.unpad(input_ids), unpadded.unpad(pos), mask, cache, unpadded
                )  # (1, N, C)
                return unpadded.pad(x)
        return self.run_blocks(input_ids, pos, mask, cache)

    def run_blocks(self, input_ids, position_ids, mask=None, cache=None, unpadded=None):
        """Embeddings, the blocks and the final LayerNorm, with positions (T,) or (B, T) and a
        boolean attention mask (B, 1, T, S) given explicitly (None: plain causal). `hidden_states`
        derives both from a padding mask; packed sequences (chapters/dpo_step.py) build their own.
        Returns (B, T, C). With `unpadded`, `input_ids` and `position_ids` are (1, N): the real
        tokens only; returns (1, N, C)."""
        x = self.transformer.drop(
            self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)
        )  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, mask, cache, unpadded)
        if cache is not None:
            cache.length += unpadded.length if unpadded is not None else input_ids.shape[1]
        return self.transformer.ln_f(x)

    def forward(self, input_ids, attention_mask=None, cache=None):
        """Next-token logits, (B, T, vocab_size)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache))
