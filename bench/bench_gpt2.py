"""The hand-written GPT-2 against transformers.GPT2LMHeadModel holding the same weights, in one
process.

    python bench/bench_gpt2.py            # 124M shape, random weights
    python bench/bench_gpt2.py --repeats 9
    python bench/bench_gpt2.py --isa avx2 # torch, oneDNN and MKL held to AVX2 (bench/machine.py)
    python bench/bench_gpt2.py --profile  # + torch.profiler's top operators of our three measures

Three measures, each checked first (same logits, same greedy tokens), then timed with both sides
interleaved (ours, theirs, ours, ...; the first of each pair alternates) so that both see the same
machine load: forward: logits for a (4, 256) batch. Generation, batch 1: greedy, a 32-token prompt,
64 new tokens. Generation, batched: greedy, 16 prompts of 20-60 tokens, left-padded, 48 new tokens.
KV cache on both sides. Prints each side's median time and the median of the per-pair ratios.

Beside them, what the machine can do (bench/machine.py: its instruction sets, the fp32 matmul peak
and the memory bandwidth, measured at the start and at the end of the run, the better of the two
kept), and each measure as a fraction of it: the forward and batched generation in FLOP/s of the
model's products on the real tokens against the peak, batch-1 generation in bytes/s (every weight
once a token, plus the KV cache) against the bandwidth.
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
from bench import machine  # noqa: E402
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


def top_operators(fn, rows=12):
    """torch.profiler's table of the operators taking the most time in one call of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed pairs per measure (default 5)"
    )
    machine.add_isa_argument(parser)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the timings, torch.profiler's top operators for one call of each of ours",
    )
    args = parser.parse_args(argv)
    machine.select_isa(args.isa, argv)
    limits = machine.measure()
    print(limits.report())
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # the 124M shape
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_gpt2(folder)
    cfg = ours.config
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; weights identical (loaded "
        f"from save_pretrained); median of {args.repeats} interleaved pairs"
    )
    lines, profiled = [], []  # each measure's line is printed at once, its fractions at the end

    x = torch.randint(0, 50257, (4, 256))
    with torch.inference_mode():
        assert (ours(x) - hf(x).logits).abs().max() < 1e-3
        t_ours, t_hf, ratio = interleaved(lambda: ours(x), lambda: hf(x).logits, args.repeats)
    flops = machine.causal_forward_flops(cfg, 4, 256)
    lines.append(
        (
            f"forward (4, 256):  ours {t_ours:.3f} s   transformers {t_hf:.3f} s   "
            f"time ratio ours/transformers {1 / ratio:.2f}x",
            flops,
            "flops",
            t_ours,
            t_hf,
        )
    )
    print(lines[-1][0])
    profiled.append(("forward (4, 256)", lambda: ours(x)))

    n = 64
    prompt = torch.randint(0, 50257, (1, 32))
    with torch.inference_mode():
        pair = greedy_pair(ours, hf, prompt, torch.ones_like(prompt), n)
        t_ours, t_hf, ratio = interleaved(*pair, args.repeats)
    lines.append(
        (
            f"greedy generation (1 x 32 prompt, {n} new):  ours {n / t_ours:.1f} tokens/s   "
            f"transformers {n / t_hf:.1f} tokens/s   speed ratio ours/transformers {ratio:.2f}x",
            machine.decode_bytes(cfg, 32, n),
            "bytes",
            t_ours,
            t_hf,
        )
    )
    print(lines[-1][0])
    profiled.append((f"greedy generation, batch 1, {n} new", pair[0]))

    n, g = 48, torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 61, (16,), generator=g).tolist()
    ids, mask = left_pad(
        [torch.randint(0, 50257, (k,), generator=g).tolist() for k in lengths], pad_id=0
    )
    with torch.inference_mode():
        pair = greedy_pair(ours, hf, ids, mask, n)
        t_ours, t_hf, ratio = interleaved(*pair, args.repeats)
    lines.append(
        (
            f"batched greedy generation (16 prompts of {min(lengths)}-{max(lengths)} tokens, "
            f"left-padded, {n} new):  "
            f"ours {16 * n / t_ours:.1f} tokens/s   transformers {16 * n / t_hf:.1f} tokens/s   "
            f"speed ratio ours/transformers {ratio:.2f}x",
            machine.decode_flops(cfg, lengths, n),
            "flops",
            t_ours,
            t_hf,
        )
    )
    print(lines[-1][0])
    profiled.append((f"batched greedy generation, 16 rows, {n} new", pair[0]))

    limits = limits.best_with(machine.measure())
    print(limits.report().splitlines()[1] + " (the better of the run's start and end)")
    for text, work, unit, t_ours, t_hf in lines:
        print(text.split(":  ")[0] + ":")
        if unit == "flops":
            print(
                f"    {work / 1e9:.1f} GFLOP counted: ours {limits.flops(work / t_ours)}; "
                f"transformers {limits.flops(work / t_hf)}"
            )
        else:
            print(
                f"    {work / 1e9:.2f} GB read (weights once a token + KV cache): ours "
                f"{limits.bytes(work / t_ours)}; transformers {limits.bytes(work / t_hf)}"
            )
    if args.profile:
        for name, fn in profiled:
            with torch.inference_mode():
                fn()
                print(f"\nprofile of ours, {name}:\n{top_operators(fn)}")


if __name__ == "__main__":
    run(main)
