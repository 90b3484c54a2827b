"""Text generation: greedy, temperature, top-k and top-p sampling, with a KV cache; its command line
is `main`:

python -m gpt.generation --model gpt2 --prompt "The meaning of life is"
"""

import argparse
import math
from numbers import Integral, Real

import torch

from gpt.checkpoint import load_gpt2
from gpt.cli import nonnegative_float, nonnegative_int, positive_int, probability, run
from gpt.config import PRESETS
from gpt.model import GPT, KVCache, check_token_ids
from gpt.tokenizer import EOS_ID, get_tokenizer


def left_pad(sequences, pad_id: int):
    """Stack token lists of different lengths, padding on the left: (input_ids, attention_mask),
    each (B, T)."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, T - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            mask[i, T - len(s) :] = 1
    return ids, mask


def check_sampling(temperature=1.0, top_k=None, top_p=None):
    """Refuse what `sample_next` cannot mean, as transformers' `generate` does: one-line
    ValueErrors.
    """
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, Real)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}"
        )
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 0
    ):
        raise ValueError(
            f"top_k must be an integer >= 1 (None or 0: off, every token stays), got {top_k!r}"
        )
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0 < top_p <= 1
    ):
        raise ValueError(
            f"top_p must be a number in (0, 1] (None or 1: off, every token stays), got {top_p!r}"
        )


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row of `logits` (B, V): argmax when temperature is 0, else sample. Returns
    (B,).

    `top_k` keeps the k most likely tokens, `top_p` the fewest whose probabilities sum to p; 0 and 1
    (or None) turn them off, as in transformers.
    """
    check_sampling(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be (batch, vocab), got shape {tuple(logits.shape)}; take logits[:, -1]"
        )
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first
        # always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def check_prompt(model: GPT, input_ids, max_new_tokens, attention_mask=None, eos_id=None):
    """Refuse prompts and lengths that `generate` cannot run, in one line saying what to change."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, Integral)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype != torch.long
    ):
        what = (
            f"a {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}"
            if isinstance(input_ids, torch.Tensor)
            else type(input_ids).__name__
        )
        raise ValueError(
            f"input_ids must be a (batch, tokens) tensor of token ids (torch.long), got {what}"
        )
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(
            f"the prompt is empty (input_ids of shape {(B, T)}); give at least one token, "
            "e.g. GPT-2's <|endoftext|> (50256) to generate from nothing"
        )
    V = model.config.vocab_size
    check_token_ids(input_ids, V)
    if eos_id is not None and not 0 <= eos_id < V:
        raise ValueError(f"eos_id {eos_id} is outside the model's vocabulary 0..{V - 1}")
    if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {(B, T)}; "
            "make both with left_pad"
        )
    if T + max_new_tokens > model.config.n_positions:
        raise ValueError(
            f"prompt of {T} tokens + {max_new_tokens} new ones exceeds the context of "
            f"{model.config.n_positions}; shorten the prompt or ask for fewer tokens"
        )


@torch.no_grad()
def generate(
    model: GPT,
    input_ids,
    max_new_tokens: int,
    temperature=1.0,
    top_k=None,
    top_p=None,
    eos_id=None,
    use_cache=True,
    attention_mask=None,
    generator=None,
):
    """Continue each row of `input_ids` (B, T) by up to `max_new_tokens` tokens; returns (B, T +
    new).

    Batched prompts of different lengths come left-padded with their `attention_mask` (see
    `left_pad`). A row stops at its first `eos_id`; after that it is filled with `eos_id`, and
    generation ends when every row has stopped. `temperature=0` is greedy; `top_k`, `top_p` as in
    `sample_next`; `generator` seeds the sampling. Bad arguments are a one-line ValueError before
    any work.
    """
    check_sampling(temperature, top_k, top_p)
    check_prompt(model, input_ids, max_new_tokens, attention_mask, eos_id)
    B, T = input_ids.shape
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: plain causal attention is faster
    cache = (
        KVCache(model.config, B, T + max_new_tokens, input_ids.device, model.lm_head.weight.dtype)
        if use_cache
        else None
    )
    ids, step_input = input_ids, input_ids
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        # the prompt's pass skips padding in every layer but attention; with the cache, later steps
        # see one token
        h = model.hidden_states(
            step_input if use_cache else ids, attention_mask, cache, skip_padding=step == 0
        )[:, -1]
        token = sample_next(model.lm_head(h), temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        ids = torch.cat([ids, token[:, None]], dim=1)  # (B, T + step)
        step_input = token[:, None]  # (B, 1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        if done.all():
            break
    return ids


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m gpt.generation", description="Continue a prompt with GPT-2."
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        default="gpt2",
        choices=PRESETS,
        help="a published size, from the download cache (downloaded when missing; default gpt2)",
    )
    source.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a folder of OpenAI's files, a .safetensors file or a folder holding one",
    )
    parser.add_argument("--prompt", required=True, help="the text to continue (not empty)")
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=50,
        help="at most this many tokens (default 50)",
    )
    parser.add_argument(
        "--temperature", type=nonnegative_float, default=0.0, help="0 = greedy (default)"
    )
    parser.add_argument(
        "--top-k", type=nonnegative_int, help="keep the k most likely tokens (0 or unset: off)"
    )
    parser.add_argument(
        "--top-p",
        type=probability,
        help="keep the fewest tokens holding this much probability, in (0, 1] (1 or unset: off)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("argument --prompt: is empty; give some text to continue")

    try:
        tokenizer = get_tokenizer()
        model = load_gpt2(
            args.checkpoint or args.model
        )  # a missing or bad checkpoint: one ValueError/OSError line
        prompt = tokenizer.encode(args.prompt)
        if max(prompt) >= model.config.vocab_size:
            raise ValueError(
                f"the prompt's GPT-2 token ids reach {max(prompt)} but "
                f"{args.checkpoint or args.model} "
                f"has a vocabulary of {model.config.vocab_size}; use a checkpoint with GPT-2's "
                f"(50257)"
            )
        out = generate(
            model,
            torch.tensor([prompt]),
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            EOS_ID,
            generator=torch.Generator().manual_seed(args.seed),
        )
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            "stopped by Ctrl-C; nothing was written, and no partial download is left"
        ) from None
    print(tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    run(main)
