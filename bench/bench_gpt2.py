"""The hand-written GPT-2 against transformers.GPT2LMHeadModel holding the same weights, in one process.

    python bench/bench_gpt2.py            # 124M shape, random weights
    python bench/bench_gpt2.py --repeats 5

Prints the median time of each side and the ratio. Forward: logits for a (4, 256) batch.
Generation: greedy, batch 1, a 32-token prompt, 64 new tokens, KV cache on both sides.
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


def median_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # the 124M shape
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_gpt2(folder)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; weights identical (loaded from save_pretrained)")

    x = torch.randint(0, 50257, (4, 256))
    with torch.inference_mode():
        assert (ours(x) - hf(x).logits).abs().max() < 1e-3
        t_ours = median_seconds(lambda: ours(x), args.repeats)
        t_hf = median_seconds(lambda: hf(x).logits, args.repeats)
    print(f"forward (4, 256):  ours {t_ours:.3f} s   transformers {t_hf:.3f} s   time ratio ours/transformers {t_ours / t_hf:.2f}x")

    prompt = torch.randint(0, 50257, (1, 32))
    n = 64
    ours_gen = lambda: generate(ours, prompt, n, temperature=0)
    hf_gen = lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(ours_gen(), hf_gen())
        g_ours = median_seconds(ours_gen, args.repeats)
        g_hf = median_seconds(hf_gen, args.repeats)
    print(f"greedy generation (1 x 32 prompt, {n} new):  ours {n / g_ours:.1f} tokens/s   "
          f"transformers {n / g_hf:.1f} tokens/s   speed ratio ours/transformers {g_hf / g_ours:.2f}x")


if __name__ == "__main__":
    main()
