"""Chapter 8 in miniature: a GPT-2-architecture model trained here from random weights, the *base*
of §6.2's pipeline.

GPT-2's weights cannot be downloaded where this project is built, so `python -m
chapters.ch8_instruction_dpo --miniature` pretrains its own base model: `gpt.GPT` on the training
split's texts, each prompt with its chosen and with its rejected response, so that the base model
knows both styles as a pretrained model does. Then the chapter runs the report's SFT → DPO pipeline
on it unchanged.

The vocabulary: GPT-2's tokenizer (`gpt.get_tokenizer()`) splits the text, but the model's embedding
table holds only the GPT-2 tokens seen at least `MIN_COUNT` times in the training split (about 3 100
of 50 257), renumbered, plus one UNK for every other token. With 50 257 rows the tied output head
would cost 12× the compute of the rest of such a small model, and a token the training split never
shows keeps its random embedding anyway. Held-out text that uses other tokens reads them as UNK;
`CompactVocab.decode` drops UNK from generations.
"""

from collections import Counter

import numpy as np
import torch

from chapters.ch8_instruction_dpo import data as pdata
from chapters.ch8_instruction_dpo.trainers import train_sft
from gpt import GPT, GPTConfig, get_tokenizer
from gpt.download import SOURCES, cached
from gpt.tokenizer import EOS_ID

# a token seen once in training becomes UNK, so that UNK itself is trained (1.4% of training tokens)
MIN_COUNT = 2
# the miniature's size (chosen by `bench/size_miniature.py` on the validation split, see README's
# chapter 8)
CONFIG = dict(n_embd=128, n_layer=2, n_head=4, n_positions=192, dropout=0.1)
BASE_BATCH = 16  # documents per base-model step


class CompactVocab:
    """GPT-2's tokenizer with a smaller id space: the GPT-2 ids seen >= `min_count` times in
    `texts`, then UNK.

    Compact ids follow GPT-2's order; `unk` is the last id. `encode(text)` and `decode(ids)` make it
    a drop-in tokenizer for `preference_data.tokenize` and for decoding generations (UNK is
    dropped).
    """

    def __init__(self, tokenizer, texts, eos_id: int, min_count: int = MIN_COUNT):
        counts = Counter(t for text in texts for t in tokenizer.encode(text))
        counts[eos_id] += min_count  # EOS ends every response: always in the vocabulary
        self.tokenizer = tokenizer
        self.gpt2_ids = sorted(
            t for t, c in counts.items() if c >= min_count
        )  # compact id -> GPT-2 id
        self.index = {t: i for i, t in enumerate(self.gpt2_ids)}  # GPT-2 id -> compact id
        self.unk = len(self.gpt2_ids)
        self.eos = self.index[eos_id]
        self.size = len(self.gpt2_ids) + 1

    def encode(self, text: str) -> list:
        return [self.index.get(t, self.unk) for t in self.tokenizer.encode(text)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([self.gpt2_ids[i] for i in ids if i != self.unk])


def training_texts(entries, indices) -> list:
    """The texts the vocabulary is counted on: each training entry's prompt, chosen and rejected
    response."""
    return [
        text
        for i in indices
        for text in (pdata.format_prompt(entries[i]), entries[i]["chosen"], entries[i]["rejected"])
    ]


def miniature_data(seed: int = 0, path=None, max_length: int = 128) -> dict:
    """The data set as `--miniature` reads it: the seeded split by prompt, the compact vocabulary
    (counted on the training split), SFT pairs (every pair within `max_length` tokens) and DPO
    pairs (chosen ≠ rejected) per split, as token ids. Keys: entries, vocab, gpt2 (GPT-2's
    tokenizer), eos, sft_pairs, pairs. A missing data file that cannot be downloaded raises
    `pdata.DownloadError`."""
    entries = pdata.load(path)
    split = pdata.split(entries, seed)
    gpt2 = get_tokenizer()
    vocab = CompactVocab(gpt2, training_texts(entries, split["train"]), EOS_ID)
    sft_pairs = {
        k: pdata.tokenize(entries, v, vocab, vocab.eos, max_length) for k, v in split.items()
    }
    pairs = {
        k: [p for p in v if pdata.has_preference(entries[p.index])] for k, v in sft_pairs.items()
    }
    return dict(
        entries=entries, vocab=vocab, gpt2=gpt2, eos=vocab.eos, sft_pairs=sft_pairs, pairs=pairs
    )


def base_documents(pairs, eos_id: int) -> list:
    """The base model's training texts as `Pair`s whose prompt is one EOS (GPT-2's document
    separator) and whose `chosen` is a whole document, prompt + response + EOS: one document with
    the chosen response, one with the rejected, so every token of both is a next-token target
    (`dpo_training.train_sft` trains on them unchanged)."""
    return [
        pdata.Pair(p.index, [eos_id], p.prompt + response, [])
        for p in pairs
        for response in (p.chosen, p.rejected)
    ]


def unigram_loss(train_pairs, eval_pairs, vocab_size: int) -> float:
    """Baseline for the SFT loss: mean −log q(y_t) over `eval_pairs`' chosen tokens, q the add-one
    unigram distribution of `train_pairs`' chosen tokens (EOS included), in nats per token."""
    counts = np.ones(vocab_size)
    for p in train_pairs:
        np.add.at(counts, p.chosen, 1)
    logq = np.log(counts / counts.sum())
    return float(-np.mean([logq[t] for p in eval_pairs for t in p.chosen]))


def weights_cached(name: str) -> bool:
    """Whether GPT-2 `name`'s weights are in the download cache (from any source): no download is
    tried."""
    return any(cached(name, source) for source in SOURCES)


def pretrain_base(
    vocab_size: int,
    train_pairs,
    val_pairs,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device,
    eos_id: int,
    config: dict = None,
    scale=None,
):
    """Stage 1, the base model: `gpt.GPT` from random weights (seeded), next-token loss on every
    token of the training split's documents (`base_documents`), validation loss per epoch. Returns
    (model, history rows). `scale` (`chapters.ch8_instruction_dpo.scaled_run.Scale`): processes,
    saving and --resume as for SFT (phase "base").
    """
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, **(config or CONFIG))).to(device)
    history = train_sft(
        model,
        base_documents(train_pairs, eos_id),
        base_documents(val_pairs, eos_id),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
        pad_id=eos_id,
        label="base",
        scale=scale,
        lr_flag="--base-lr",
    )
    return model.eval(), history


def disable_dropout(model):
    """Dropout off for DPO (as TRL's DPOTrainer does by default): the policy's first step then reads
    exactly what the reference cache read, so eq. (38) starts at ln 2. The miniature uses dropout in
    pretraining and SFT only."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(
            getattr(module, "dropout", None), float
        ):  # attention dropout is a rate, not a module
            module.dropout = 0.0
    return model
