"""Text generation: greedy, temperature, top-k and top-p sampling, with a KV cache; its command line is `main`:

    python -m gpt.generation --model gpt2 --prompt "The meaning of life is"
"""
import argparse

import torch

from gpt.checkpoint import load_gpt2
from gpt.model import GPT, KVCache
from gpt.tokenizer import EOS_ID, get_tokenizer


def left_pad(sequences, pad_id: int):
    """Stack token lists of different lengths, padding on the left: (input_ids, attention_mask), each (B, T)."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids, mask


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row of `logits` (B, V): argmax when temperature is 0, else sample. Returns (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPT, input_ids, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None, eos_id=None,
             use_cache=True, attention_mask=None, generator=None):
    """Continue each row of `input_ids` (B, T) by up to `max_new_tokens` tokens; returns (B, T + new).

    Batched prompts of different lengths come left-padded with their `attention_mask` (see `left_pad`).
    A row stops at its first `eos_id`; after that it is filled with `eos_id`, and generation ends when
    every row has stopped. `temperature=0` is greedy; `generator` seeds the sampling.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    B, T = input_ids.shape
    if T + max_new_tokens > model.config.n_positions:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new ones exceeds the context of "
                         f"{model.config.n_positions}; shorten the prompt or ask for fewer tokens")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: plain causal attention is faster
    cache = KVCache(model.config, B, T + max_new_tokens, input_ids.device, model.lm_head.weight.dtype) if use_cache else None
    ids, step_input = input_ids, input_ids
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        h = model.hidden_states(step_input if use_cache else ids, attention_mask, cache)[:, -1]  # (B, C)
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
    parser = argparse.ArgumentParser(prog="python -m gpt.generation", description="Continue a prompt with GPT-2.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="gpt2", help="gpt2, gpt2-medium, gpt2-large or gpt2-xl (default gpt2)")
    source.add_argument("--checkpoint", help="a folder of OpenAI's files, a .safetensors file or a folder holding one")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = get_tokenizer()
    try:
        model = load_gpt2(args.checkpoint or args.model)
        prompt = torch.tensor([tokenizer.encode(args.prompt)])
        out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, EOS_ID,
                       generator=torch.Generator().manual_seed(args.seed))
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
