"""Chapter 8's DPO against TRL's DPOTrainer: the same SFT model, pairs, batches and optimiser, step
by step.

    python3 -m venv --system-site-packages /tmp/benchvenv
    /tmp/benchvenv/bin/pip install trl==1.16.0
    /tmp/benchvenv/bin/python bench/trl_crosscheck.py     # β 0.1, the miniature's 2 DPO epochs
    /tmp/benchvenv/bin/python bench/trl_crosscheck.py --beta 1.0 --epochs 1
    /tmp/benchvenv/bin/python bench/trl_crosscheck.py --sft runs/ch8_miniature/models/sft

The model is chapter 8's miniature SFT model (3 084-token vocabulary, tied head; data from
`miniature.miniature_data`): `--sft FOLDER`, else chapter 11's `miniature_sft`, which takes the one
`python -m chapters.ch8_instruction_dpo --miniature` saved in runs/ch8_miniature/models/sft/ when
its settings match and otherwise trains base + SFT with chapter 8's functions and settings (about
2.5 min on one thread). It is written to OUT/sft/ in the hub layout
(`chapters.training.checkpoints.save_gpt2`), read by `transformers.GPT2LMHeadModel` for TRL and by
`gpt.load_gpt2` for chapter 8.

TRL's `DPOTrainer` gets the chapter's token ids as they are (prompt, chosen + EOS, rejected + EOS:
its `_prepare_dataset` is bypassed, so no text is tokenised twice) and the chapter's batches in
their order (`dpo_batches`, epoch after epoch, through a `batch_sampler`); the reference is the SFT
model, run live on each batch as TRL does by default; dropout off; AdamW (fused, as both use it)
with the chapter's lr, betas (0.9, 0.999), eps 1e-8 and weight decay 0; gradients clipped at norm 1;
a constant learning rate (TRL's default is linear decay; chapter 8's default is constant); float32.
Chapter 8 runs `trainers.train_dpo` unchanged: reference log-probs cached once, pairs packed one a
row. Both run on one thread, as the chapter's miniature does.

Printed: per step, each logged metric of both (loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins) and the largest difference (absolute, relative above 1); each
phase's wall time; and last `max difference over N steps: X (metrics), Y (weights)`, Y the largest
|Δ| over every weight after the last step (Hugging Face names mapped to ours by gpt.checkpoint's
table). trl is not a project dependency: it lives in the bench's own virtual environment.
"""

import argparse
import inspect
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import gpt  # noqa: E402
from chapters.ch8_instruction_dpo import miniature  # noqa: E402
from chapters.ch8_instruction_dpo.__main__ import DEFAULTS  # noqa: E402
from chapters.ch8_instruction_dpo.dpo_step import dpo_batches  # noqa: E402
from chapters.ch8_instruction_dpo.scaled_run import Scale  # noqa: E402
from chapters.ch8_instruction_dpo.trainers import train_dpo  # noqa: E402
from chapters.ch11_dpo_pitfalls.miniature_runs import miniature_sft  # noqa: E402
from chapters.common.runtime import one_thread  # noqa: E402
from chapters.training.checkpoints import save_gpt2  # noqa: E402
from gpt.checkpoint import name_map  # noqa: E402
from gpt.cli import nonnegative_int, positive_float, positive_int, run, summary  # noqa: E402
from gpt.tokenizer import bpe_files_dir  # noqa: E402

MINIATURE = {k: v[2] for k, v in DEFAULTS.items()}  # the chapter's --miniature column
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
SHORT = {"loss": "loss", "rewards/chosen": "r̂_w", "rewards/rejected": "r̂_l",
         "rewards/accuracies": "acc", "rewards/margins": "margin"}  # fmt: skip


def difference(a: float, b: float) -> float:
    """|a − b|, relative to the larger magnitude where that is above 1."""
    return abs(a - b) / max(1.0, abs(a), abs(b))


# ---------------------------------------------------------------- data and the SFT model


def sft_folder(args, data) -> tuple:
    """(the folder of the SFT model in the hub layout, where it came from): `--sft`, else chapter
    11's `miniature_sft` (the one chapter 8's `--miniature` saved, when its settings match; else
    trained with chapter 8's functions and settings), written to OUT/sft/ for transformers."""
    if args.sft is not None:
        return Path(args.sft), "--sft"
    model, origin = miniature_sft(data, args.seed)
    save_gpt2(model.state_dict(), model.config, Path(args.out) / "sft")
    return Path(args.out) / "sft", origin


# ---------------------------------------------------------------- TRL


def hf_tokenizer():
    """GPT-2's tokenizer for TRL's `processing_class` (it tokenises nothing here: the ids are given;
    the collator pads with the miniature's EOS)."""
    from transformers import GPT2TokenizerFast

    folder = bpe_files_dir()
    tok = GPT2TokenizerFast(vocab=str(folder / "encoder.json"), merges=str(folder / "vocab.bpe"))
    tok.pad_token = tok.eos_token
    return tok


def hf_model(folder, eos: int, dtype=torch.float32):
    """transformers' GPT2LMHeadModel from the hub-layout folder; dropout off, the miniature's
    EOS."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(
        folder,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        dtype=dtype,
    )


def run_trl(folder, train, batches, eos: int, args) -> tuple:
    """TRL's DPOTrainer on `train`'s token ids in `batches` (lists of indices, one per step).
    Returns (per-step metrics from TRL's own log, the trained policy, seconds to build the trainer,
    seconds to train)."""
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class InOrderDPOTrainer(DPOTrainer):
        """DPOTrainer given token ids as they are and batches in a fixed order."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # already prompt_ids / chosen_ids / rejected_ids, each response ending with EOS
            return dataset

        def get_train_dataloader(self):
            return DataLoader(
                self.train_dataset, batch_sampler=batches, collate_fn=self.data_collator
            )

    t0 = time.perf_counter()
    rows = [
        {"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in train
    ]
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=len(batches),
            beta=args.beta,
            loss_type=["sigmoid"],
            label_smoothing=0.0,
            max_length=args.max_length,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch_fused",
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            weight_decay=0.0,
            max_grad_norm=1.0,
            gradient_accumulation_steps=1,
            gradient_checkpointing=False,
            disable_dropout=True,
            precompute_ref_log_probs=False,
            bf16=False,
            fp16=False,
            use_cpu=True,
            seed=args.seed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = InOrderDPOTrainer(
            model=hf_model(folder, eos, args.dtype),
            ref_model=hf_model(folder, eos, args.dtype),
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=hf_tokenizer(),
            data_collator=DataCollatorForPreference(pad_token_id=eos, max_length=args.max_length),
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        t1 = time.perf_counter()
        trainer.train()
        t2 = time.perf_counter()
    logs = [row for row in trainer.state.log_history if "rewards/chosen" in row]
    if [row["step"] for row in logs] != list(range(1, len(batches) + 1)):
        raise RuntimeError("TRL did not log every step once")
    return [{k: row[k] for k in METRICS} for row in logs], trainer.model, t1 - t0, t2 - t1


# ---------------------------------------------------------------- comparisons


def weights_difference(hf, ours) -> dict:
    """max |Δ| between our GPT and its Hugging Face counterpart (Conv1D weights turned): over every
    weight ("all"), over the attention key biases alone (the middle third of each c_attn.bias), and
    over every other weight."""
    hf_state, our_state = hf.state_dict(), ours.state_dict()
    C, seen = ours.config.n_embd, set()
    worst = {"all": 0.0, "key biases": 0.0, "all but the key biases": 0.0}
    for hub_name, (name, turn) in name_map("hf", ours.config.n_layer).items():
        t = hf_state["transformer." + hub_name]
        d = ((t.T if turn == ".T" else t) - our_state[name]).abs()
        if name.endswith("attn.c_attn.bias"):  # q, k, v biases, C each
            worst["key biases"] = max(worst["key biases"], d[C : 2 * C].max().item())
            d = torch.cat([d[:C], d[2 * C :]])
        worst["all but the key biases"] = max(worst["all but the key biases"], d.max().item())
        seen.add(name)
    worst["all"] = max(worst["key biases"], worst["all but the key biases"])
    missing = {n for n, _ in ours.named_parameters()} - seen - {"lm_head.weight"}
    if missing or ours.lm_head.weight is not ours.transformer.wte.weight:
        raise RuntimeError(f"weights not compared: {sorted(missing)} (or the head is not tied)")
    return worst


def print_table(trl, ours, every: int):
    head = " | ".join(f"{SHORT[k]} TRL | {SHORT[k]} ch8" for k in METRICS)
    print(f"| step | {head} | max diff |")
    print("|---:|" + "---:|" * (2 * len(METRICS) + 1))
    worst = 0.0
    for i, (a, b) in enumerate(zip(trl, ours), 1):
        d = max(difference(a[k], b[k]) for k in METRICS)
        worst = max(worst, d)
        if every <= 1 or i % every == 0 or i in (1, len(trl)):
            cells = " | ".join(f"{a[k]:.6f} | {b[k]:.6f}" for k in METRICS)
            print(f"| {i} | {cells} | {d:.1e} |")
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--beta", type=positive_float, default=0.1)
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=MINIATURE["dpo_epochs"],
        help="DPO epochs (the miniature's 2 by default; one epoch is about 118 steps)",
    )
    parser.add_argument("--lr", type=positive_float, default=MINIATURE["dpo_lr"])
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-length", type=positive_int, default=MINIATURE["max_length"])
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument(
        "--sft",
        help="a folder holding the miniature SFT model in the hub layout (default: the one chapter "
        "8's --miniature saved, when its settings match, else trained here)",
    )
    parser.add_argument(
        "--out",
        default=str(REPO / "runs" / "trl_crosscheck"),
        help="where the SFT model is written for transformers (OUT/sft/)",
    )
    parser.add_argument(
        "--every",
        type=positive_int,
        default=1,
        help="print every N-th step (first and last always)",
    )
    parser.add_argument("--tolerance", type=positive_float, default=1e-4)
    parser.add_argument(
        "--float64",
        action="store_true",
        help="both in float64 (TRL's fused LM head still takes its log-softmax in float32)",
    )
    args = parser.parse_args(argv)
    args.dtype = torch.float64 if args.float64 else torch.float32
    with one_thread():
        return crosscheck(args)


def crosscheck(args):
    times = {}
    t = time.perf_counter()
    data = miniature.miniature_data(args.seed, max_length=args.max_length)
    vocab, pairs = data["vocab"], data["pairs"]
    folder, origin = sft_folder(args, data)
    times["data + SFT model"] = time.perf_counter() - t
    sft = miniature.disable_dropout(gpt.load_gpt2(folder).eval()).requires_grad_(False)
    if sft.config.vocab_size != vocab.size:
        raise ValueError(
            f"{folder}: vocabulary of {sft.config.vocab_size} tokens, the miniature's (seed "
            f"{args.seed}) has {vocab.size}; pass --sft with the miniature's SFT model"
        )
    sft = sft.to(args.dtype)  # train_dpo's copy and the reference cache follow its dtype
    train, val = pairs["train"], pairs["validation"]
    epoch_batches = dpo_batches(train, args.batch_size, args.seed)  # train_dpo's, epochs 1-based
    batches = [b for e in range(1, args.epochs + 1) for b in epoch_batches(e)]
    print(
        f"SFT model: {folder} ({origin}); vocabulary {vocab.size}, {sft.config.n_layer} layers × "
        f"{sft.config.n_embd}, tied head\n{len(train)} training pairs, batch {args.batch_size}, "
        f"{args.epochs} epoch(s) = {len(batches)} steps; β {args.beta}, lr {args.lr:g}, "
        f"max length {args.max_length}; {str(args.dtype).removeprefix('torch.')}, torch threads "
        f"{torch.get_num_threads()}"
    )
    with torch.no_grad():
        p = train[0]
        ids = torch.tensor([p.prompt + p.chosen])
        hf_logits = hf_model(folder, vocab.eos).eval()(ids, attention_mask=torch.ones_like(ids))
        gap = (hf_logits.logits - sft(ids)).abs().max().item()
    print(f"exported model: max |logits(GPT2LMHeadModel) − logits(gpt.GPT)| = {gap:.1e}")

    # chapter 8: train_dpo as the chapter calls it, the train cache in the first epoch's batches
    t = time.perf_counter()
    caches = Scale().reference_caches(
        sft, {"train": train, "validation": val}, vocab.eos, args.batch_size, args.max_length,
        seed=args.seed,
    )  # fmt: skip
    times["ch8 reference cache"] = time.perf_counter() - t
    t = time.perf_counter()
    quiet = {"progress": False} if "progress" in inspect.signature(train_dpo).parameters else {}
    policy, steps, _ = train_dpo(
        sft, train, val, caches, args.beta, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed, device="cpu", pad_id=vocab.eos, **quiet,
    )  # fmt: skip
    times["ch8 train_dpo (its validation passes included)"] = time.perf_counter() - t
    ours = [{k: s[k] for k in METRICS} for s in steps]

    trl, trl_policy, build, train_time = run_trl(folder, train, batches, vocab.eos, args)
    times["TRL DPOTrainer(...) (data, models)"] = build
    times["TRL trainer.train()"] = train_time

    print()
    worst = print_table(trl, ours, args.every)
    for k in METRICS:
        d = max(difference(a[k], b[k]) for a, b in zip(trl, ours))
        print(f"{k}: max difference {d:.1e}")
    print("\n| phase | wall s |\n|---|---:|")
    for name, s in times.items():
        print(f"| {name} | {s:.1f} |")
    ours_ms = times["ch8 train_dpo (its validation passes included)"] / len(batches) * 1000
    print(
        f"per step: chapter 8 {ours_ms:.0f} ms (with its validation passes), TRL "
        f"{train_time / len(batches) * 1000:.0f} ms (with its live reference forward)"
    )
    weights = weights_difference(trl_policy, policy)
    print(
        "weights after the last step, max |Δ|: "
        + ", ".join(f"{k} {v:.1e}" for k, v in weights.items())
        + " (a key bias changes no output, so its exact gradient is 0: what moves it is rounding "
        "noise that AdamW divides by √v + 1e-8, different in each implementation; "
        "tests/test_trl_crosscheck.py)"
    )
    within = worst <= args.tolerance and weights["all"] <= args.tolerance
    print(f"{'within' if within else 'OUTSIDE'} {args.tolerance:g}")
    print(
        f"max difference over {len(batches)} steps: {worst:.1e} (metrics), {weights['all']:.1e} "
        "(weights)"
    )


if __name__ == "__main__":
    run(main)
