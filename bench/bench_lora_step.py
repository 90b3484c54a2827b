"""Time per DPO step at GPT-2 124M's shape: full fine-tuning against LoRA (rank 8 on attention), in
one run, on chapter 8's fast step; TRL's DPOTrainer with a PEFT LoRA beside them when trl and peft
are importable.

    python3 bench/bench_lora_step.py                        # --steps 3 --warmup 1, batch 4, CPU
    python3 bench/bench_lora_step.py --steps 1 --warmup 0   # a quick look
    /tmp/benchvenv/bin/python bench/bench_lora_step.py      # + TRL/PEFT (trl, peft in that venv)
    python3 bench/bench_lora_step.py --isa avx2             # torch, oneDNN, MKL held to AVX2
    python3 bench/bench_lora_step.py --profile              # + torch.profiler's top operators

Random weights of `GPTConfig.from_name(--shape)`, float32, pairs from the instruction-preference
data set's training split (chapter 8's prompt format, up to --max-length tokens), batches grouped by
length and seeded as chapter 8's DPO. The reference's log-probs and hidden states are cached once
(`ReferenceCache`); the policy starts at the reference. A step is forward (pairs packed), eq. (38)
with the token-level KL, backward, gradient clipping at 1 and AdamW (fused, as chapter 8's). The
full policy trains every weight; the LoRA policy (`gpt.lora.add_lora`, rank 8, alpha 16 on
attn.c_attn and attn.c_proj) only its adapters. The two alternate step by step, so that a shared
machine's load falls on both alike; each runs --warmup untimed steps, then --steps timed ones.
Memory: the training state (gradients + AdamW's two moments of the trainable weights, counted) and
the rise of peak resident memory during each timed step (the kernel's VmHWM, reset before it).
Beside the table, what the machine can do (bench/machine.py: instruction sets, fp32 matmul peak,
memory bandwidth; at the start and at the end, the better kept) and each method's FLOP/s as a
fraction of the peak, its products counted on the real tokens (a LoRA step's frozen weights get no
weight gradient: bench/machine.py's `step_flops`).
"""

import argparse
import copy
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import machine  # noqa: E402
from chapters.ch8_instruction_dpo import data as pdata  # noqa: E402
from chapters.ch8_instruction_dpo.dpo_step import ReferenceCache, fast_dpo_loss  # noqa: E402
from chapters.ch11_dpo_pitfalls.lora_reference import peak_memory  # noqa: E402
from chapters.common.rows import packed_pairs_batch  # noqa: E402
from gpt import GPT, GPTConfig, get_tokenizer  # noqa: E402
from gpt.cli import nonnegative_int, positive_float, positive_int, run, summary  # noqa: E402
from gpt.config import PRESETS  # noqa: E402
from gpt.lora import add_lora  # noqa: E402
from gpt.tokenizer import EOS_ID  # noqa: E402

TARGETS = ("attn.c_attn", "attn.c_proj")


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def state_mib(model) -> float:
    """Gradients and AdamW's two moments of the trainable weights, float32: 3 × 4 bytes each."""
    return 12 * trainable(model) / 2**20


def make_step(policy, pairs, cache, where, args):
    """One training step of `policy` on pairs idx: (time in s, loss, peak rise in MiB)."""
    opt = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=args.lr, fused=True
    )

    def step(idx):
        c, r, h = cache.get([where[i] for i in idx])
        with peak_memory() as memory:
            t = time.perf_counter()
            batch = packed_pairs_batch([pairs[i] for i in idx], EOS_ID)
            loss, _ = fast_dpo_loss(policy, batch, c, r, args.beta, h, cache.head_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t
        return seconds, loss.item(), memory["mib"]

    return step


def trl_peer(args, pairs, entries, batches, ours):
    """TRL's DPOTrainer with a PEFT LoRA of the same rank, alpha and layers, on a transformers GPT-2
    of the same shape; after each of its steps, one of `ours` (so both see the same load). Returns
    {name: [seconds]}."""
    from bench_dpo_step import StepTimer, hf_tokenizer, random_hf_gpt2
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    rows = [
        {
            "prompt": pdata.format_prompt(entries[p.index]),
            "chosen": entries[p.index]["chosen"],
            "rejected": entries[p.index]["rejected"],
        }
        for p in pairs
    ]
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_length=args.max_length,
            beta=args.beta,
            learning_rate=args.lr,
            max_steps=args.warmup + args.steps,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            gradient_checkpointing=False,  # as ours: no recomputed activations
        )
        lora = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=0.0,
            target_modules=list(TARGETS),
            fan_in_fan_out=True,  # transformers' GPT-2 keeps its weights as (in, out) Conv1D
            bias="none",
            task_type="CAUSAL_LM",
        )
        trainer = DPOTrainer(
            model=random_hf_gpt2(args.shape, args.seed),
            ref_model=None,  # TRL's reference for a PEFT model: the adapter switched off
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=hf_tokenizer(),
            peft_config=lora,
        )
        peft_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        name, step = ours
        timer = StepTimer([(name, lambda idx: step(idx)[0], batches)], "cpu")
        trainer.add_callback(timer)
        trainer.train()
    return {
        f"TRL DPOTrainer + PEFT LoRA ({peft_trainable:,} trainable)": timer.times["TRL DPOTrainer"][
            args.warmup :
        ],
        f"{name} (beside TRL)": timer.times[name][args.warmup :],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--shape", default="gpt2", choices=list(PRESETS))
    parser.add_argument("--batch-size", type=positive_int, default=4, help="pairs a step")
    parser.add_argument("--max-length", type=positive_int, default=256)
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per method")
    parser.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed steps first")
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--alpha", type=positive_float, default=16.0)
    parser.add_argument("--beta", type=positive_float, default=0.1)
    parser.add_argument("--lr", type=positive_float, default=5e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-trl", action="store_true", help="leave TRL/PEFT out even when importable"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the timings, torch.profiler's top operators for one more step of each method",
    )
    machine.add_isa_argument(parser)
    args = parser.parse_args(argv)
    machine.select_isa(args.isa, argv)
    started = time.perf_counter()
    limits = machine.measure()
    print(limits.report())
    n_steps = args.warmup + args.steps

    entries = pdata.load()
    train = pdata.split(entries, args.seed)["train"]
    train = [i for i in train if pdata.has_preference(entries[i])]
    pairs = pdata.tokenize(entries, train, get_tokenizer(), EOS_ID, args.max_length)
    batches = pdata.length_grouped_batches(
        [p.packed_length for p in pairs], args.batch_size, args.seed + 1
    )[:n_steps]
    used = sorted({i for b in batches for i in b})
    where = {i: k for k, i in enumerate(used)}
    print(
        f"shape {args.shape}, random weights, float32, CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; batch {args.batch_size} pairs, "
        f"{statistics.mean(pairs[i].packed_length for i in used):.0f} tokens a packed pair"
    )

    torch.manual_seed(args.seed)
    model = GPT(GPTConfig.from_name(args.shape)).eval().requires_grad_(False)
    t = time.perf_counter()
    cache = ReferenceCache(  # in the steps' own batches, as chapter 8 builds its training cache
        model, [pairs[i] for i in used], EOS_ID, batches=[[where[i] for i in b] for b in batches]
    )
    cache_s = (time.perf_counter() - t) / len(used)
    full = copy.deepcopy(model).requires_grad_(True)
    lora = add_lora(
        model, args.rank, args.alpha, TARGETS
    )  # in place: the cache holds the reference
    methods = {
        "full fine-tuning": (full, make_step(full, pairs, cache, where, args)),
        f"LoRA r={args.rank} on attention": (lora, make_step(lora, pairs, cache, where, args)),
    }
    results = {name: [] for name in methods}
    for k in range(n_steps):  # alternate: each step of one method, then the other's
        for name, (_, step) in methods.items():
            results[name].append(step(batches[k]))
    ln2 = math.log(2)
    for name, rows in results.items():
        print(
            f"{name}: first step loss {rows[0][1]:.7f}, |loss − ln 2| = {abs(rows[0][1] - ln2):.1e}"
            " (policy = reference)"
        )

    times = {name: [r[0] for r in rows[args.warmup :]] for name, rows in results.items()}
    have_peer = all(importlib.util.find_spec(m) for m in ("trl", "peft", "datasets"))
    if args.no_trl or not have_peer:
        print(
            "TRL/PEFT peer: skipped ("
            + ("--no-trl" if args.no_trl else "trl, peft or datasets not importable")
            + "; not project requirements)"
        )
    else:
        name = f"LoRA r={args.rank} on attention"
        times.update(trl_peer(args, pairs, entries, batches, (name, methods[name][1])))

    cfg, timed = model.config, [i for b in batches[args.warmup :] for i in b]
    sizes = [(len(pairs[i].prompt), len(pairs[i].chosen), len(pairs[i].rejected)) for i in timed]
    lora_shapes = [(cfg.n_embd, 3 * cfg.n_embd), (cfg.n_embd, cfg.n_embd)]  # TARGETS' (in, out)
    flops = {  # per step, on the timed batches (bench/machine.py)
        "full fine-tuning": machine.fast_step_flops(cfg, sizes) / args.steps,
        f"LoRA r={args.rank} on attention": machine.fast_step_flops(
            cfg, sizes, args.rank, lora_shapes
        )
        / args.steps,
    }
    for name in list(times):
        if name.startswith("TRL DPOTrainer"):  # its own sampler: the data set's mean pair
            every = [(len(p.prompt), len(p.chosen), len(p.rejected)) for p in pairs]
            flops[name] = (
                machine.plain_step_flops(cfg, every, args.rank, lora_shapes)
                * args.batch_size
                / len(pairs)
            )
        elif name.endswith("(beside TRL)"):
            flops[name] = flops[f"LoRA r={args.rank} on attention"]
    limits = limits.best_with(machine.measure())
    print(limits.report().splitlines()[1] + " (the better of the run's start and end)")
    full_s = statistics.mean(times["full fine-tuning"])
    print(
        f"\nreference cache: {cache_s * 1000:.0f} ms a pair, built once\n"
        "| method | trainable parameters | s / step (mean of timed) | full's s / step ÷ this | "
        "gradients + AdamW state [MiB] | peak rise in a step [MiB] | GFLOP / step | GFLOP/s | "
        "of the peak |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for name, ts in times.items():
        s = statistics.mean(ts)
        model_of = methods.get(name, (None,))[0]
        count = f"{trainable(model_of):,}" if model_of is not None else ""
        state = f"{state_mib(model_of):.1f}" if model_of is not None else ""
        peak = f"{max(r[2] for r in results[name][args.warmup :]):.0f}" if name in results else ""
        work = flops[name]
        print(
            f"| {name} | {count} | {s:.2f} | {full_s / s:.2f}× | {state} | {peak} | "
            f"{work / 1e9:.0f} | {work / s / 1e9:.1f} | {work / s / limits.peak:.0%} |"
        )
    print(
        f"({args.steps} timed steps after {args.warmup} warm-up each, alternating; "
        f"{time.perf_counter() - started:.0f} s in all; load average at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; FLOPs: 2·m·n·k a product, full "
        f"fine-tuning's backward 2× forward, bench/machine.py)"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, (_, step) in methods.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(batches[-1])
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
            print(f"\nprofile, one step of {name}:\n{table}")


if __name__ == "__main__":
    run(main)
