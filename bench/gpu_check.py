"""A GPU check of chapter 8's DPO step, ready to run: gpt2-medium shape, bf16 autocast, against TRL
on the same GPU.

    python3 bench/gpu_check.py   # needs CUDA; about 3 min on one H100/H200, at most --budget-s

Random weights of the gpt2-medium shape (no weights can be downloaded), built and compared with the
helpers of bench/bench_dpo_step.py (the same tensors in transformers' GPT2LMHeadModel for TRL and in
gpt.GPT for ours).
1. bf16 against fp32: the DPO loss and its gradient on the same batches, chapter 8's fast step in
   bf16 autocast (as chapter 8 trains on a GPU) and the plain step in bf16, each against the plain
   step in fp32.
2. s / step, tokens / s and MFU of TRL's DPOTrainer (bf16=True) and of the fast step, on the same
   GPU, ours timed right after each of TRL's steps (bench_dpo_step.StepTimer). MFU = the FLOPs
   each method's algorithm performs on the real (non-padding) tokens / (s / step × the GPU's dense
   bf16 peak): 2 FLOPs per weight per token forward, 4 backward, the output head only where the
   method applies it, attention's T² term left out (< 5% at 256 tokens).
3. With 2+ GPUs: the fast step under DDP and under FSDP2 on 2 processes (NCCL), global batch 2 ×
--batch-size. Without CUDA it stops with one line. TRL rows need `trl` (and datasets, accelerate)
importable; else one line says they were skipped and the rest runs.
"""

import argparse
import copy
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dpo_step as cpu_bench  # noqa: E402 (its helpers import transformers and trl only when called)

from chapters.ch8_instruction_dpo import data as pdata  # noqa: E402
from chapters.ch8_instruction_dpo.dpo_step import (  # noqa: E402
    ReferenceCache,
    autocast,
    fast_dpo_loss,
    plain_dpo_loss,
)
from chapters.common.files import atomic_open  # noqa: E402
from chapters.common.rows import packed_pairs_batch  # noqa: E402
from chapters.training import distributed  # noqa: E402
from chapters.training.loop import _step  # noqa: E402
from gpt import GPT, GPTConfig, get_tokenizer  # noqa: E402
from gpt.cli import Unavailable, positive_float, positive_int, run, summary  # noqa: E402
from gpt.config import PRESETS  # noqa: E402
from gpt.tokenizer import EOS_ID  # noqa: E402

# dense bf16 tensor-core peak, FLOP/s, by a part of the device name (first match wins)
PEAKS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)


def bf16_peak(name: str, override=None):
    """The GPU's dense bf16 peak in FLOP/s from its name (None when unknown and not given in
    TFLOP/s).
    """
    if override:
        return override * 1e12
    return next((peak for part, peak in PEAKS if part.lower() in name.lower()), None)


def training_pairs(max_length: int, seed: int):
    """The data set's training pairs with a preference, as chapter 8 tokenizes them, and TRL's text
    rows of them."""
    entries = pdata.load()
    kept = [i for i in pdata.split(entries, seed)["train"] if pdata.has_preference(entries[i])]
    pairs = pdata.tokenize(entries, kept, get_tokenizer(), EOS_ID, max_length)
    return pairs, [
        {
            "prompt": pdata.format_prompt(entries[p.index]),
            "chosen": entries[p.index]["chosen"],
            "rejected": entries[p.index]["rejected"],
        }
        for p in pairs
    ]


def body_and_head(model):
    """(weights in the transformer blocks, weights of the tied output head): what the FLOP counts
    multiply."""
    return sum(p.numel() for p in model.transformer.h.parameters()), model.lm_head.weight.numel()


def flops_fast(pairs, body, head):
    """FLOPs of one fast step on `pairs`: policy forward + backward on prompt + chosen + rejected
    once, the head at the response positions (and once more, forward only, on the cached reference
    states for the KL).
    """
    tokens = sum(p.packed_length for p in pairs)
    response = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    return 6 * body * tokens + 6 * head * response + 2 * head * response


def flops_plain(pairs, body, head):
    """FLOPs of one step of TRL's (the plain) algorithm: chosen and rejected rows apart (the prompt
    twice), the head at every position, policy forward + backward and reference forward."""
    tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    return 8 * (body + head) * tokens


def pair_tokens(pairs):
    """Tokens of the plain algorithm (prompt twice + both responses): the tokens / s unit of
    bench_dpo_step."""
    return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


def models(shape, seed, device):
    """(TRL's policy, TRL's reference, our policy, our reference) with identical weights; ours alone
    without transformers."""
    try:
        hf_ref = cpu_bench.random_hf_gpt2(shape, seed)
        hf_policy = cpu_bench.perturbed(hf_ref, seed + 1)
        ours = cpu_bench.as_ours(hf_policy), cpu_bench.as_ours(hf_ref)
    except ImportError:  # no transformers: our models only (TRL needs it anyway)
        hf_ref = hf_policy = None
        torch.manual_seed(seed)
        reference = GPT(GPTConfig.from_name(shape)).eval()
        policy = copy.deepcopy(reference)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        ours = policy, reference
    policy, reference = (m.to(device) for m in ours)
    return hf_policy, hf_ref, policy.requires_grad_(True), reference.requires_grad_(False)


def grad_vector(model):
    return torch.cat(
        [p.grad.double().flatten() for p in model.parameters()]
    )  # float64: sums of 3e8 terms


def bf16_against_fp32(policy, reference, pairs, batches, beta, device):
    """Loss and gradient of the fast step (bf16 autocast) and of the plain step in bf16, each
    against fp32."""
    print("\n## 1. bf16 autocast against fp32 (same weights, same batches)")
    print(
        "| batch | fp32 loss | fast bf16 − fp32 | plain bf16 − fp32 | ‖Δ∇‖/‖∇‖ fast bf16 | "
        "‖Δ∇‖/‖∇‖ plain bf16 | cos(∇ fast bf16, ∇ fp32) |\n|---:|---:|---:|---:|---:|---:|---:|"
    )
    for b, idx in enumerate(batches):
        chunk = [pairs[i] for i in idx]

        def grads(step):
            policy.zero_grad(set_to_none=True)
            loss = step()
            loss.backward()
            return loss.item(), grad_vector(policy)

        fp32_loss, g32 = grads(lambda: plain_dpo_loss(policy, reference, chunk, EOS_ID, beta))

        def plain_bf16():
            with autocast(device):
                return plain_dpo_loss(policy, reference, chunk, EOS_ID, beta)

        plain_loss, g_plain = grads(plain_bf16)
        cache = ReferenceCache(reference, chunk, EOS_ID, len(chunk))
        c, r, h = cache.get(list(range(len(chunk))))
        fast_loss, g_fast = grads(
            lambda: fast_dpo_loss(
                policy,
                packed_pairs_batch(chunk, EOS_ID).to(device),
                c,
                r,
                beta,
                h,
                cache.head_weight,
            )[0]
        )

        def rel(g):
            return ((g - g32).norm() / g32.norm()).item()

        cos = torch.nn.functional.cosine_similarity(g_fast, g32, dim=0).item()
        print(
            f"| {b} | {fp32_loss:.6f} | {fast_loss - fp32_loss:+.2e} | "
            f"{plain_loss - fp32_loss:+.2e} | {rel(g_fast):.2e} | {rel(g_plain):.2e} | {cos:.6f} |"
        )
    policy.zero_grad(set_to_none=True)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timing(hf_policy, hf_ref, policy, reference, pairs, rows, args, peak):
    """TRL's DPOTrainer and the fast step, ours right after each of TRL's steps; s / step, tokens /
    s, MFU."""
    print(
        f"\n## 2. one GPU: s / step, tokens / s and MFU (batch {args.batch_size}, {args.steps} "
        f"timed steps after {args.warmup} warm-up)"
    )
    body, head = body_and_head(policy)
    n_steps = args.warmup + args.steps
    batches = pdata.length_grouped_batches(
        [p.packed_length for p in pairs], args.batch_size, args.seed
    )[:n_steps]
    used = sorted({i for b in batches for i in b})
    where = {i: k for k, i in enumerate(used)}
    cache = ReferenceCache(reference, [pairs[i] for i in used], EOS_ID, args.batch_size)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, fused=True)

    def fast_step(idx):
        c, r, h = cache.get([where[i] for i in idx])
        loss, _ = fast_dpo_loss(
            policy,
            packed_pairs_batch([pairs[i] for i in idx], EOS_ID).to(args.device),
            c,
            r,
            args.beta,
            h,
            cache.head_weight,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()

    rows_out = []
    timed = [pairs[i] for b in batches[args.warmup :] for i in b]
    try:
        import trl  # noqa: F401

        if hf_policy is None:
            raise ImportError("transformers is not importable")
    except ImportError as err:
        print(
            f"TRL: not importable here ({err}); its row is skipped (pip install trl==1.16.0 "
            f"datasets accelerate)"
        )
        times = []
        for idx in batches:
            sync(args.device)
            t = time.perf_counter()
            fast_step(idx)
            sync(args.device)
            times.append(time.perf_counter() - t)
        results = {"fast step": times[args.warmup :]}
    else:
        settings = SimpleNamespace(
            batch_size=args.batch_size,
            max_length=args.max_length,
            beta=args.beta,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            trl_gradient_checkpointing=False,
        )
        with tempfile.TemporaryDirectory() as out:
            trainer = cpu_bench.trl_trainer(
                hf_policy.to(args.device), hf_ref.to(args.device), rows, settings, n_steps, out
            )
            timer = cpu_bench.StepTimer([("fast step", fast_step, batches)], args.device)
            trainer.add_callback(timer)
            trainer.train()
        results = {name: ts[args.warmup :] for name, ts in timer.times.items()}
        per_pair = args.batch_size / len(
            pairs
        )  # TRL's sampler draws its own batches: the data set's mean pair
        rows_out.append(
            (
                "TRL DPOTrainer",
                statistics.mean(results["TRL DPOTrainer"]),
                pair_tokens(pairs) * per_pair,
                flops_plain(pairs, body, head) * per_pair,
            )
        )
    rows_out.append(
        (
            "fast step",
            statistics.mean(results["fast step"]),
            pair_tokens(timed) / args.steps,
            flops_fast(timed, body, head) / args.steps,
        )
    )
    print(
        "| method | s / step | tokens / s | TFLOP / step | TFLOP/s | MFU "
        "|\n|---|---:|---:|---:|---:|---:|"
    )
    for name, s, tokens, flops in rows_out:
        mfu = f"{flops / s / peak:.1%}" if peak else "n/a (unknown peak: --peak-tflops)"
        print(
            f"| {name} | {s:.3f} | {tokens / s:.0f} | {flops / 1e12:.2f} | {flops / s / 1e12:.1f} "
            f"| {mfu} |"
        )


def _ddp_worker(rank, world, port, args, pairs, out):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    d = distributed.init("cuda")
    torch.manual_seed(args.seed)
    reference = GPT(GPTConfig.from_name(args.shape)).to(d.device).eval().requires_grad_(False)
    n_steps, B = args.warmup + args.steps, world * args.batch_size
    batches = pdata.length_grouped_batches([p.packed_length for p in pairs], B, args.seed)[:n_steps]
    used = sorted({i for b in batches for i in b})
    where = {i: k for k, i in enumerate(used)}
    cache = ReferenceCache(reference, [pairs[i] for i in used], EOS_ID, args.batch_size)

    def loss_fn(model, idx):
        c, r, h = cache.get([where[i] for i in idx])
        return fast_dpo_loss(
            model,
            packed_pairs_batch([pairs[i] for i in idx], EOS_ID).to(d.device),
            c,
            r,
            args.beta,
            h,
            cache.head_weight,
        )

    lines = []
    for name, fsdp in (("DDP", False), ("FSDP2", True)):
        policy = copy.deepcopy(reference).requires_grad_(True)
        engine = distributed.wrap(policy, d, fsdp=fsdp)
        opt = torch.optim.AdamW(distributed.unwrapped(engine).parameters(), lr=args.lr)
        times, losses = [], []
        for idx in batches:
            torch.cuda.synchronize()
            t = time.perf_counter()
            metrics = _step(engine, loss_fn, idx, len, d, grad_accum=1)
            torch.nn.utils.clip_grad_norm_(distributed.unwrapped(engine).parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            losses.append(metrics["loss"])
        s = statistics.mean(times[args.warmup :])
        tokens = pair_tokens([pairs[i] for b in batches[args.warmup :] for i in b]) / args.steps
        lines.append(
            f"| {name}, {world} GPUs, global batch {B} | {s:.3f} | {tokens / s:.0f} | "
            f"{losses[0]:.6f} → {losses[-1]:.6f} |"
        )
        del engine, policy, opt
        torch.cuda.empty_cache()
    if d.main:
        with atomic_open(out) as f:  # a run cut short leaves no partial table
            f.write("\n".join(lines))
    distributed.close(d)


def two_gpus(args, pairs):
    """The fast step on 2 processes (NCCL), DDP then FSDP2, rank 0's table lines."""
    import torch.multiprocessing as mp

    print(
        f"\n## 3. {torch.cuda.device_count()} GPUs: the fast step on 2 processes, "
        f"{args.batch_size} pairs a GPU"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "lines.md")
        mp.spawn(_ddp_worker, args=(2, port, args, pairs, out), nprocs=2, join=True)
        print("| run | s / step | tokens / s | loss, first → last step |\n|---|---:|---:|---|")
        print(Path(out).read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=summary(__doc__))
    p.add_argument("--shape", default="gpt2-medium", choices=list(PRESETS))
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, default=256)
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps per method")
    p.add_argument("--warmup", type=positive_int, default=3)
    p.add_argument(
        "--check-batches",
        type=positive_int,
        default=3,
        help="batches of the bf16-vs-fp32 comparison",
    )
    p.add_argument("--beta", type=positive_float, default=0.1)
    p.add_argument("--lr", type=positive_float, default=5e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--peak-tflops",
        type=positive_float,
        help="the GPU's dense bf16 peak, when its name is not known",
    )
    p.add_argument(
        "--budget-s",
        type=positive_float,
        default=450,
        help="skip the sections that would start later",
    )
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: a dry run of the script's paths (use --shape gpt2 --steps 1); its numbers mean "
        "nothing",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Unavailable(
            "no CUDA GPU here (torch.cuda.is_available() is False); run bench/gpu_check.py on a "
            "machine with one (bench/bench_dpo_step.py is the CPU comparison)"
        )
    start = time.perf_counter()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (dry run)"
    peak = bf16_peak(name, args.peak_tflops)
    print(
        f"# GPU check: {name} × {torch.cuda.device_count()}, bf16 peak "
        f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}, torch {torch.__version__}, shape "
        f"{args.shape}"
    )
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in section 1
    pairs, rows = training_pairs(args.max_length, args.seed)
    hf_policy, hf_ref, policy, reference = models(args.shape, args.seed, args.device)
    print(f"{len(pairs)} training pairs; models ready after {time.perf_counter() - start:.0f} s")
    check = pdata.length_grouped_batches(
        [p.packed_length for p in pairs], args.batch_size, args.seed + 7
    )
    bf16_against_fp32(policy, reference, pairs, check[: args.check_batches], args.beta, args.device)

    def within_budget(section):
        if time.perf_counter() - start < args.budget_s:
            return True
        print(
            f"\n{section}: skipped, {time.perf_counter() - start:.0f} s used of --budget-s "
            f"{args.budget_s:g}"
        )
        return False

    if within_budget("## 2. one GPU"):
        timing(hf_policy, hf_ref, policy, reference, pairs, rows, args, peak)
    del hf_policy, hf_ref, policy, reference
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if args.device == "cuda" and torch.cuda.device_count() >= 2 and within_budget("## 3. 2 GPUs"):
        two_gpus(args, pairs)
    elif torch.cuda.device_count() < 2:
        print(f"\n## 3. 2 GPUs: skipped, this machine has {torch.cuda.device_count()}")
    print(f"\ndone in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run(main)
