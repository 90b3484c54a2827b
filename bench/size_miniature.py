r"""Sizing chapter 8's miniature: base pretraining then SFT for one width/depth, on one thread,
measured.

    python3 bench/size_miniature.py --n-embd 128 --n-layer 2 --n-head 4 --base-epochs 6 \
        --base-lr 2e-3 --dropout 0.1

Prints one JSON line: the base model's validation loss per epoch, the SFT loss on the validation
split's chosen responses per SFT epoch (the number the size is chosen by, with the unigram baseline
beside it), and the CPU seconds of each stage. Only the training split is trained on; the test split
is not read.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from chapters.ch8_instruction_dpo import data as pdata  # noqa: E402
from chapters.ch8_instruction_dpo import miniature as mini  # noqa: E402
from chapters.ch8_instruction_dpo.trainers import sft_evaluate, train_sft  # noqa: E402
from gpt import get_tokenizer  # noqa: E402
from gpt.cli import nonnegative_float, positive_float, positive_int, run, summary  # noqa: E402
from gpt.tokenizer import EOS_ID  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python3 bench/size_miniature.py", description=summary(__doc__)
    )
    for name, default in (
        ("n-embd", 128),
        ("n-layer", 2),
        ("n-head", 4),
        ("base-epochs", 6),
        ("sft-epochs", 2),
    ):
        p.add_argument(f"--{name}", type=positive_int, default=default)
    p.add_argument("--base-lr", type=positive_float, default=2e-3)
    p.add_argument("--sft-lr", type=positive_float, default=3e-4)
    p.add_argument("--dropout", type=nonnegative_float, default=0.1)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    entries = pdata.load()
    split = pdata.split(entries, 0)
    vocab = mini.CompactVocab(get_tokenizer(), mini.training_texts(entries, split["train"]), EOS_ID)
    pairs = {
        k: pdata.tokenize(entries, split[k], vocab, vocab.eos, 128) for k in ("train", "validation")
    }
    config = dict(
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_positions=192,
        dropout=args.dropout,
    )
    start = time.process_time()
    model, base = mini.pretrain_base(
        vocab.size,
        pairs["train"],
        pairs["validation"],
        epochs=args.base_epochs,
        lr=args.base_lr,
        batch_size=mini.BASE_BATCH,
        seed=0,
        device="cpu",
        eos_id=vocab.eos,
        config=config,
    )
    base_cpu = time.process_time() - start
    before = sft_evaluate(model, pairs["validation"], batch_size=8, device="cpu", pad_id=vocab.eos)
    sft = train_sft(
        model,
        pairs["train"],
        pairs["validation"],
        epochs=args.sft_epochs,
        lr=args.sft_lr,
        batch_size=8,
        seed=0,
        device="cpu",
        pad_id=vocab.eos,
    )
    print(
        json.dumps(
            {
                **config,
                "base_epochs": args.base_epochs,
                "base_lr": args.base_lr,
                "sft_lr": args.sft_lr,
                "base_validation": [round(h["validation_loss"], 4) for h in base],
                "sft_validation_before": round(before, 4),
                "sft_validation": [round(h["validation_loss"], 4) for h in sft],
                "unigram_validation": round(
                    mini.unigram_loss(pairs["train"], pairs["validation"], vocab.size), 4
                ),
                "cpu_s_base": round(base_cpu, 1),
                "cpu_s_sft": round(time.process_time() - start - base_cpu, 1),
            }
        )
    )


if __name__ == "__main__":
    run(main)
