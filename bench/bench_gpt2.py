"""The hand-written GPT-2 against transformers.GPT2LMHeadModel holding the same weights, in one
process.

    python bench/bench_gpt2.py            # 124M shape, random weights
    python bench/bench_gpt2.py --repeats 9

Three measures, each checked first (same logits, same greedy tokens), then timed with both sides
interleaved (ours, theirs, ours, ...; the first of each pair alternates) so that both see the same
machine load: forward: logits for a (4, 256) batch. Generation, batch 1: greedy, a 32-token prompt,
64 new tokens. Generation, batched: greedy, 16 prompts of 20-60 tokens, left-padded, 48 new tokens.
KV cache on both sides. Prints each side's median time and the median of the per-pair ratios.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpt import generate  # noqa: E402
from gpt.checkpoint import load_gpt2  # noqa: E402
from gpt.cli import positive_int, run, summary  # noqa: E402
from gpt.generation import left_pad  # noqa: E402


def interleaved(ours, theirs, repeats):
    """(median seconds of ours, of theirs, median of the per-pair ratios theirs/ours), after one
    warm-up each."""
    ours(), theirs()
    t_ours, t_theirs = [], []
    for i in range(repeats):
        for fn, times in [(ours, t_ours), (theirs, t_theirs)][:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return (
        statistics.median(t_ours),
        statistics.median(t_theirs),
        statistics.median(b / a for a, b in zip(t_ours, t_theirs)),
    )


def greedy_pair(ours, hf, ids, mask, n):
    """Greedy generation of `n` new tokens on both sides, the same tokens checked first."""

    def ours_gen():
        return generate(ours, ids, n, temperature=0, attention_mask=mask)

    def hf_gen():
        return hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    assert torch.equal(ours_gen(), hf_gen()), "greedy tokens differ from transformers'"
    return ours_gen, hf_gen


def main(argv=None):
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed pairs per measure (default 5)"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # the 124M shape
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_gpt2(folder)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; weights identical (loaded "
        f"from "
        f"save_pretrained); median of {args.repeats} interleaved pairs"
    )

    x = torch.randint(0, 50257, (4, 256))
    with torch.inference_mode():
        assert (ours(x) - hf(x).logits).abs().max() < 1e-3
        t_ours, t_hf, ratio = interleaved(lambda: ours(x), lambda: hf(x).logits, args.repeats)
    print(
        f"forward (4, 256):  ours {t_ours:.3f} s   transformers {t_hf:.3f} s   "
        f"time ratio ours/transformers {1 / ratio:.2f}x"
    )

    n = 64
    prompt = torch.randint(0, 50257, (1, 32))
    with torch.inference_mode():
        t_ours, t_hf, ratio = interleaved(
            *greedy_pair(ours, hf, prompt, torch.ones_like(prompt), n), args.repeats
        )
    print(
        f"greedy generation (1 x 32 prompt, {n} new):  ours {n / t_ours:.1f} tokens/s   "
        f"transformers {n / t_hf:.1f} tokens/s   speed ratio ours/transformers {ratio:.2f}x"
    )

    n, g = 48, torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 61, (16,), generator=g).tolist()
    ids, mask = left_pad(
        [torch.randint(0, 50257, (k,), generator=g).tolist() for k in lengths], pad_id=0
    )
    with torch.inference_mode():
        t_ours, t_hf, ratio = interleaved(*greedy_pair(ours, hf, ids, mask, n), args.repeats)
    print(
        f"batched greedy generation (16 prompts of {min(lengths)}-{max(lengths)} tokens, "
        f"left-padded, {n} new):  "
        f"ours {16 * n / t_ours:.1f} tokens/s   transformers {16 * n / t_hf:.1f} tokens/s   "
        f"speed ratio ours/transformers {ratio:.2f}x"
    )


if __name__ == "__main__":
    run(main)
