"""Time per DPO step: chapter 8's fast step vs TRL's DPOTrainer vs a plain loop, on identical
weights and data.

    python3 -m venv --system-site-packages /tmp/benchvenv
    /tmp/benchvenv/bin/pip install trl==1.16.0
    # CPU, gpt2 (124M) shape, float32:
    /tmp/benchvenv/bin/python bench/bench_dpo_step.py
    # GPU, bf16 autocast:
    /tmp/benchvenv/bin/python bench/bench_dpo_step.py --shape gpt2-medium --device cuda
    # CPU, torch, oneDNN and MKL held to AVX2:
    /tmp/benchvenv/bin/python bench/bench_dpo_step.py --isa avx2

Random weights of the GPT-2 shape (the same tensors in transformers' GPT2LMHeadModel for TRL and in
gpt.GPT for ours, through gpt.load_gpt2), 8 pairs a batch from the instruction-preference data set's
training split, prompts in chapter 8's format, sequences up to 256 tokens, AdamW. Each method runs
`--warmup` untimed steps and then `--steps` timed ones; a step is forward, backward and optimizer
update. Before timing, TRL's per-batch losses are compared with ours on the same pairs (policy ≠
reference). trl is not a project dependency: it lives in the bench's own virtual environment (the
command above; it keeps the system's torch).

On the CPU, beside the table: what the machine can do (bench/machine.py: instruction sets, fp32
matmul peak, memory bandwidth; measured at the start and at the end, the better kept), and each
method's FLOP/s as a fraction of the peak, counting its own products on the real tokens
(bench/machine.py says what is counted: TRL and the plain loop run the prompt twice, the head at
every position and the reference's forward every step; the fast step none of these).
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import machine  # noqa: E402
from chapters.ch8_instruction_dpo import data as pdata  # noqa: E402
from chapters.ch8_instruction_dpo.dpo_step import (  # noqa: E402
    ReferenceCache,
    autocast,
    fast_dpo_loss,
    plain_dpo_loss,
)
from chapters.common.rows import packed_pairs_batch, unpacked_pairs_batch  # noqa: E402
from gpt import get_tokenizer, load_gpt2  # noqa: E402
from gpt.cli import nonnegative_int, positive_float, positive_int, run, summary  # noqa: E402
from gpt.config import PRESETS  # noqa: E402
from gpt.tokenizer import EOS_ID, bpe_files_dir  # noqa: E402


def random_hf_gpt2(shape, seed):
    """transformers' GPT2LMHeadModel of `shape` with GPT-2's random initialisation, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        **PRESETS[shape],
        vocab_size=50257,
        n_positions=1024,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


def as_ours(hf_model):
    """The same weights in gpt.GPT, through save_pretrained and the project's own loader."""
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        return load_gpt2(folder)


def perturbed(hf_model, seed, scale=1e-3):
    """A policy a few updates away from the reference: a copy with small seeded noise on every
    weight.
    """
    model = copy.deepcopy(hf_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def hf_tokenizer():
    from transformers import GPT2TokenizerFast

    folder = bpe_files_dir()
    tok = GPT2TokenizerFast(vocab=str(folder / "encoder.json"), merges=str(folder / "vocab.bpe"))
    tok.pad_token = tok.eos_token
    return tok


def trl_trainer(policy, reference, rows, args, max_steps, out):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        beta=args.beta,
        learning_rate=args.lr,
        max_steps=max_steps,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=args.device == "cpu",
        bf16=args.device == "cuda",
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=args.trl_gradient_checkpointing,
    )
    return DPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=hf_tokenizer(),
    )


class StepTimer:
    """A transformers TrainerCallback: times each of TRL's optimizer steps, then one step of each of
    ours."""

    def __init__(self, ours, device):
        self.ours, self.device, self._t = ours, device, None
        self.times = {"TRL DPOTrainer": [], **{name: [] for name, _, _ in ours}}

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def _now(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, *a, **k):
        self._t = self._now()

    def on_step_end(self, *a, **k):
        self.times["TRL DPOTrainer"].append(self._now() - self._t)
        for name, step, batches in self.ours:
            t = self._now()
            step(batches[len(self.times[name])])
            self.times[name].append(self._now() - t)


def main(argv=None):
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--shape", default="gpt2", choices=list(PRESETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-length", type=positive_int, default=256)
    parser.add_argument("--steps", type=positive_int, default=4, help="timed steps per method")
    parser.add_argument("--warmup", type=nonnegative_int, default=1)
    parser.add_argument(
        "--check-batches",
        type=nonnegative_int,
        default=3,
        help="batches whose TRL and fast losses are compared",
    )
    parser.add_argument("--beta", type=positive_float, default=0.1)
    parser.add_argument("--lr", type=positive_float, default=5e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="TRL's default; off unless given, since no other method here recomputes activations",
    )
    machine.add_isa_argument(parser)
    args = parser.parse_args(argv)
    machine.select_isa(args.isa, argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: this machine has no CUDA GPU (torch.cuda.is_available() is False); use "
            "cpu"
        )
    dev = args.device
    limits = machine.measure() if dev == "cpu" else None
    if limits:
        print(limits.report())

    entries = pdata.load()
    train = pdata.split(entries, args.seed)["train"]
    train = [i for i in train if pdata.has_preference(entries[i])]
    pairs = pdata.tokenize(entries, train, get_tokenizer(), EOS_ID, args.max_length)
    rows = [
        {
            "prompt": pdata.format_prompt(entries[p.index]),
            "chosen": entries[p.index]["chosen"],
            "rejected": entries[p.index]["rejected"],
        }
        for p in pairs
    ]
    n_steps = args.warmup + args.steps
    print(
        f"{len(pairs)} training pairs, batch {args.batch_size}, max length {args.max_length}, "
        f"shape {args.shape}, "
        f"device {dev}, torch threads {torch.get_num_threads()}"
    )

    hf_ref = random_hf_gpt2(args.shape, args.seed)
    hf_policy = perturbed(hf_ref, args.seed + 1)
    ref, policy = as_ours(hf_ref), as_ours(hf_policy)
    with torch.no_grad():
        ids = torch.tensor([pairs[0].prompt + pairs[0].chosen])
        print(
            f"identical weights: max |logits(TRL's model) - logits(ours)| = "
            f"{(hf_policy(ids).logits - policy(ids)).abs().max().item():.2e}"
        )
    hf_ref.to(dev), ref.to(dev), hf_policy.to(dev), policy.to(dev)
    ref.requires_grad_(False)

    # --- equality: TRL's per-batch losses vs the fast step's, same pairs, same weights
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(hf_policy, hf_ref, rows, args, n_steps, out)
        ds = trainer.train_dataset
        worst_ids, worst = 0, 0.0
        for b in range(args.check_batches):
            idx = list(range(b * args.batch_size, (b + 1) * args.batch_size))
            for i in idx:  # TRL tokenized the same texts into the same ids
                p = pairs[i]
                same = (
                    ds[i]["prompt_ids"] == p.prompt
                    and ds[i]["chosen_ids"] == p.chosen
                    and ds[i]["rejected_ids"] == p.rejected
                )
                worst_ids += not same
            batch = trainer.data_collator([ds[i] for i in idx])
            batch = {k: v.to(dev) for k, v in batch.items()}
            with torch.no_grad():
                trl_loss = trainer.compute_loss(trainer.model, batch).item()
                cache = ReferenceCache(
                    ref, [pairs[i] for i in idx], EOS_ID, args.batch_size, keep_hidden=False
                )
                c, r, _ = cache.get(list(range(len(idx))))
                ours, _ = fast_dpo_loss(
                    policy,
                    packed_pairs_batch([pairs[i] for i in idx], EOS_ID).to(dev),
                    c,
                    r,
                    args.beta,
                )
            worst = max(worst, abs(trl_loss - ours.item()))
            print(
                f"batch {b}: TRL loss {trl_loss:.7f}, fast step {ours.item():.7f}, |Δ| = "
                f"{abs(trl_loss - ours.item()):.1e}"
            )
        print(
            f"token ids differing from TRL's tokenization: {worst_ids} pairs; max |Δ loss| = "
            f"{worst:.1e} "
            f"({'within' if worst <= 1e-5 else 'OUTSIDE'} 1e-5)"
        )

        # --- our two steps share one policy and optimizer (weights do not change the time) and run
        # inside TRL's
        # training loop, right after each of its steps, so that the shared machine's load falls on
        # all three alike
        train_policy = copy.deepcopy(policy).requires_grad_(True)
        opt = torch.optim.AdamW(
            train_policy.parameters(), lr=args.lr, fused=True
        )  # as TRL's default optim

        def plain_step(
            idx,
        ):  # policy and reference forward each step, chosen and rejected apart, full logits
            with autocast(dev):
                loss = plain_dpo_loss(train_policy, ref, [pairs[i] for i in idx], EOS_ID, args.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(train_policy.parameters(), 1.0)  # as TRL's max_grad_norm
            opt.step()

        # the fast step: cached reference (built once, timed apart), packed pairs, head at response
        # positions only
        fast_batches = pdata.length_grouped_batches(
            [p.packed_length for p in pairs], args.batch_size, args.seed
        )[:n_steps]
        used = sorted({i for b in fast_batches for i in b})
        where = {i: k for k, i in enumerate(used)}
        t = time.perf_counter()
        cache = ReferenceCache(ref, [pairs[i] for i in used], EOS_ID, args.batch_size)
        cache_per_pair = (time.perf_counter() - t) / len(used)

        def fast_step(idx, layout=packed_pairs_batch):
            c, r, h = cache.get([where[i] for i in idx])
            loss, _ = fast_dpo_loss(
                train_policy,
                layout([pairs[i] for i in idx], EOS_ID).to(dev),
                c,
                r,
                args.beta,
                h,
                cache.head_weight,
            )  # with the token-level KL, as chapter 8 trains
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(train_policy.parameters(), 1.0)  # as TRL's max_grad_norm
            opt.step()

        def rows_step(
            idx,
        ):  # the fast step without prompt reuse: chosen and rejected as separate rows of one batch
            fast_step(idx, unpacked_pairs_batch)

        g = torch.Generator().manual_seed(args.seed)
        plain_batches = (
            torch.randperm(len(pairs), generator=g)[: n_steps * args.batch_size]
            .view(n_steps, -1)
            .tolist()
        )
        steps = [("plain loop", plain_step, plain_batches)] * (not args.skip_plain) + [
            ("fast step, no prompt reuse", rows_step, fast_batches),
            ("fast step", fast_step, fast_batches),
        ]
        timer = StepTimer(steps, dev)
        trainer.add_callback(timer)
        # TRL's own sampler, collator and optimizer; each optimizer step timed by the callback
        trainer.train()
    results = {name: ts[args.warmup :] for name, ts in timer.times.items()}
    steps_per_epoch = len(pairs) / args.batch_size
    results["fast step + cache (1 epoch)"] = [
        statistics.mean(results["fast step"]) + cache_per_pair * len(pairs) / steps_per_epoch
    ]

    def pair_tokens(idx):
        return statistics.mean(
            2 * len(pairs[i].prompt) + len(pairs[i].chosen) + len(pairs[i].rejected) for i in idx
        )

    def timed_pairs(batches):
        return [i for b in batches[args.warmup :] for i in b]

    per_pair = {
        "TRL DPOTrainer": pair_tokens(
            range(len(pairs))
        ),  # its sampler's batches: the data set's mean
        "plain loop": pair_tokens(timed_pairs(plain_batches)),
    }
    for name in ("fast step, no prompt reuse", "fast step", "fast step + cache (1 epoch)"):
        per_pair[name] = pair_tokens(timed_pairs(fast_batches))
    cfg = policy.config

    def sizes(idx):
        return [(len(pairs[i].prompt), len(pairs[i].chosen), len(pairs[i].rejected)) for i in idx]

    flops = {  # per step, each method's own products on the real tokens (bench/machine.py)
        "TRL DPOTrainer": machine.plain_step_flops(cfg, sizes(range(len(pairs))))
        * args.batch_size
        / len(pairs),  # its sampler's batches: the data set's mean pair
        "plain loop": machine.plain_step_flops(cfg, sizes(timed_pairs(plain_batches)))
        / args.steps,
        "fast step, no prompt reuse": machine.unpacked_step_flops(
            cfg, sizes(timed_pairs(fast_batches))
        )
        / args.steps,
        "fast step": machine.fast_step_flops(cfg, sizes(timed_pairs(fast_batches))) / args.steps,
    }
    if limits:
        limits = limits.best_with(machine.measure())
        print(limits.report().splitlines()[1] + " (the better of the run's start and end)")
    print(
        f"\nreference cache: {cache_per_pair * 1000:.0f} ms a pair, built once for all epochs and "
        f"all β"
    )
    trl = statistics.mean(results["TRL DPOTrainer"])
    trl_rate = args.batch_size * per_pair["TRL DPOTrainer"] / trl
    print(
        "| method | s / step | tokens a pair in the timed batches | tokens / s | TRL's s / step ÷ "
        "this | tokens / s ÷ TRL's | GFLOP / step | GFLOP/s | of the peak |"
        "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for name, ts in results.items():
        s = statistics.mean(ts)
        rate = args.batch_size * per_pair[name] / s
        work = flops.get(name)
        counted = (
            f"{work / 1e9:.0f} | {work / s / 1e9:.1f} | "
            + (f"{work / s / limits.peak:.0%}" if limits else "")
            if work
            else " |  | "
        )
        print(
            f"| {name} | {s:.2f} | {per_pair[name]:.1f} | {rate:.0f} | {trl / s:.2f}× | "
            f"{rate / trl_rate:.2f}× | {counted} |"
        )
    print(
        f"({args.steps} timed steps after {args.warmup} warm-up, ours right after each of TRL's; "
        f"tokens a pair: "
        f"prompt twice + both responses, TRL's batches taken at the data set's mean; TRL gradient "
        f"checkpointing "
        f"{'on' if args.trl_gradient_checkpointing else 'off'}; FLOPs: 2·m·n·k a product, backward "
        f"2× forward, attention over the pairs the mask allows, bench/machine.py)"
    )


if __name__ == "__main__":
    run(main)
