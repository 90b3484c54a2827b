"""Chapter 8 (report §6.2, Figs. 3–4): the report's GPT-2 SFT → DPO experiment, done right, with SBERT win rates.

    python -m chapters.ch8_instruction_dpo --model gpt2-medium   # the report's model
    python -m chapters.ch8_instruction_dpo --model gpt2          # 124M, faster
    python -m chapters.ch8_instruction_dpo --checkpoint PATH     # local GPT-2 files
    python -m chapters.ch8_instruction_dpo --smoke               # whole pipeline, tiny random GPT-2, < 1 min

SFT on (prompt, chosen); DPO with reference = the SFT model (frozen) and the policy starting from it, each β
from the same start; evaluation on the held-out test split only, at each sampling temperature (β and
temperature are separate axes everywhere). The training loops live in `chapters.dpo_training`, the evaluation
in `chapters.win_rates`; this file holds the experiment: its settings and data checks, Figs. 3–4, the tables.
"""
import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from chapters import ChapterSkipped, plotting
from chapters import preference_data as pdata
from chapters.dpo_step import ReferenceCache
from chapters.dpo_training import train_dpo, train_sft
from chapters.win_rates import SBERT, generate_runs, load_sbert, score_runs
from gpt.cli import nonnegative_float, positive_float, positive_int, run
from gpt.config import PRESETS

REPO = Path(__file__).resolve().parent.parent
PROG = "python -m chapters.ch8_instruction_dpo"
BETAS = (0.1, 0.3, 0.7, 1.0)
TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0)
# (default, default with --smoke): a tiny random model needs a large learning rate to move in one or two epochs;
# a value given on the command line always wins
DEFAULTS = {"sft_epochs": (2, 1), "sft_lr": (5e-5, 1e-3), "dpo_epochs": (3, 2), "dpo_lr": (5e-6, 1e-3),
            "max_new_tokens": (64, 6), "n_boot": (1000, 200)}
SMOKE_SPLIT = {"train": 16, "validation": 4, "test": 4}  # at most this many entries of each split in a smoke run


# ---------------------------------------------------------------- figures and tables

def figure_training(epochs, betas, tag, suffix=""):
    """Like the report's Fig. 3: DPO loss (left) and token-level KL(π‖π_ref) over response tokens (right) per epoch."""
    plt = plotting.plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(betas)))
    for beta, color in zip(betas, colors):
        for split, style in (("train", "-"), ("validation", "--")):
            rows = [r for r in epochs if r["beta"] == beta and r["split"] == split]
            for ax, key in zip(axes, ("loss", "kl")):
                ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], style, marker="o", color=color,
                        label=f"β = {beta} ({split})")
    axes[0].axhline(math.log(2), color="grey", lw=0.8, ls=":", label="ln 2 (policy = reference)")
    axes[0].set(xlabel="epoch", ylabel="mean DPO loss, eq. (38)", title="DPO loss per epoch")
    axes[1].set(xlabel="epoch", ylabel="mean token-level KL(π‖π_ref) [nats]", title="KL over response tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{tag}: DPO from the SFT model, each β from the same start (epoch 0: validation before training)")
    plotting.save(fig, f"ch8_dpo_training{suffix}")


def figure_win_rates(rows, tag, suffix=""):
    """Like the report's Fig. 4: SBERT win rate vs sampling temperature, SFT and each DPO β, with 95% intervals."""
    plt = plotting.plt
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    names = list(dict.fromkeys(r["model"] for r in rows))
    for k, name in enumerate(names):
        rs = [r for r in rows if r["model"] == name]
        x = np.array([r["temperature"] for r in rs]) + 0.012 * (k - (len(names) - 1) / 2)
        y = np.array([r["win_rate"] for r in rs])
        err = np.array([[r["win_rate"] - r["ci_low"] for r in rs], [r["ci_high"] - r["win_rate"] for r in rs]])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, ls="--" if name == "SFT" else "-", label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="sampling temperature (0 = greedy)", ylabel="win rate vs rejected (SBERT cosine)",
           title=f"{tag}: win rate on the held-out test split (n = {rows[0]['n']}), 95% bootstrap CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    plotting.save(fig, f"ch8_win_rates{suffix}")


def write_csv(path, rows):
    with plotting.atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(out: Path, sft_history, steps, epochs, win_rows, generations, test, entries):
    """Tables: SFT and DPO metrics, win rates (CSV and Markdown), every generation, and readable examples."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sft_epochs.csv", sft_history)
    write_csv(out / "dpo_steps.csv", steps)
    write_csv(out / "dpo_epochs.csv", epochs)
    write_csv(out / "win_rates.csv", win_rows)
    temps = list(dict.fromkeys(r["temperature"] for r in win_rows))
    lines = ["| model | " + " | ".join(f"T = {t}" for t in temps) + " |", "|---|" + "---:|" * len(temps)]
    for name in dict.fromkeys(r["model"] for r in win_rows):
        cells = [f"{r['win_rate']:.3f} ({r['ci_low']:.2f}–{r['ci_high']:.2f})" for r in win_rows if r["model"] == name]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    with plotting.atomic_open(out / "win_rates.md") as f:
        f.write("\n".join(lines) + "\n")
    with plotting.atomic_open(out / "generations.jsonl") as f:
        f.writelines(json.dumps(g) + "\n" for g in generations)
    md = ["# Examples (test split, greedy decoding)\n"]
    for p in test[:10]:
        e = entries[p.index]
        md += [f"## entry {p.index}: {e['instruction']}", f"input: {e['input'] or '(none)'}", "",
               f"- chosen: {e['chosen']}", f"- rejected: {e['rejected']}"]
        md += [f"- **{g['model']}**: {g['generated']!r} (win {g['score']})" for g in generations
               if g["index"] == p.index and g["temperature"] == 0.0]
        md.append("")
    with plotting.atomic_open(out / "examples.md") as f:
        f.write("\n".join(md))
    print(f"tables: {out}/ (sft_epochs.csv, dpo_steps.csv, dpo_epochs.csv, win_rates.csv, win_rates.md, "
          "generations.jsonl, examples.md)")


# ---------------------------------------------------------------- the model, the data, the command line

def load_model(args):
    """The starting GPT-2: a tiny random one for --smoke, else the weights by name or path.

    Weights this machine cannot download skip the chapter (one line); a wrong path or a corrupt file is an error.
    """
    from gpt import GPT, GPTConfig, load_gpt2
    from gpt.download import DownloadError
    if args.smoke:
        torch.manual_seed(args.seed)
        return GPT(GPTConfig.tiny(vocab_size=50257, n_positions=256, n_embd=16, n_layer=2, n_head=2))
    try:
        return load_gpt2(args.checkpoint or args.model)
    except DownloadError as e:
        raise ChapterSkipped(str(e).strip().splitlines()[0]) from None


def smallest_runnable_data_set() -> int:
    """The fewest entries whose seeded 85/5/10 split gives each of train, validation and test at least one."""
    return next(n for n in range(1, 1000) if all(pdata.split(n).values()))


def prepare_pairs(entries, tokenizer, eos_id, args):
    """Split, tokenize and filter: SFT pairs (every pair that fits in --max-length) and DPO/evaluation pairs (those
    with chosen ≠ rejected), per split. Refuses, in one line, a data set that leaves a split without a usable pair."""
    split = pdata.split(len(entries), args.seed)
    same = [i for i, e in enumerate(entries) if not pdata.has_preference(e)]
    print(f"data: {len(entries)} entries, split {len(split['train'])}/{len(split['validation'])}/{len(split['test'])} "
          f"(train/validation/test, seed {args.seed}); {len(same)} with chosen == rejected {same}: kept for SFT, "
          "left out of DPO and evaluation (no preference to learn or judge)")
    if args.smoke:
        split = {k: v[:SMOKE_SPLIT[k]] for k, v in split.items()}
    sft_pairs = {k: pdata.tokenize(entries, v, tokenizer, eos_id, args.max_length) for k, v in split.items()}
    pairs = {k: [p for p in v if pdata.has_preference(entries[p.index])] for k, v in sft_pairs.items()}
    print(f"pairs after dropping those longer than {args.max_length} tokens: SFT {len(sft_pairs['train'])}/"
          f"{len(sft_pairs['validation'])}, DPO {len(pairs['train'])}/{len(pairs['validation'])}, test {len(pairs['test'])}")
    empty = [k for k, v in pairs.items() if not v]
    if empty:
        n = sum(map(len, split.values()))
        too_long = n - sum(map(len, sft_pairs.values()))
        identical = sum(map(len, sft_pairs.values())) - sum(map(len, pairs.values()))
        raise ValueError(
            f"no usable preference pair in the {' and '.join(empty)} split: of {n} entries"
            f"{' (--smoke keeps at most 16/4/4)' if args.smoke else ''} {identical} have chosen == "
            f"rejected and {too_long} are longer than --max-length {args.max_length} tokens, leaving "
            f"{'/'.join(str(len(v)) for v in pairs.values())} (train/validation/test); chapter 8 needs one usable pair "
            f"in each split, so at least {smallest_runnable_data_set()} entries with chosen ≠ rejected that fit")
    return sft_pairs, pairs


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="gpt2-medium", choices=list(PRESETS), help="GPT-2 by name (default gpt2-medium)")
    src.add_argument("--checkpoint", help="local GPT-2 weights: a folder of OpenAI's files or a .safetensors file/folder")
    src.add_argument("--smoke", action="store_true", help="the whole pipeline on a tiny random GPT-2 (numbers mean nothing)")
    p.add_argument("--data", help="path of instruction-data-with-preference.json (default: data/, downloaded once)")
    p.add_argument("--out", help="folder for tables and generations (default runs/ch8_<model>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--betas", type=positive_float, nargs="+", default=list(BETAS),
                   help="DPO β values (> 0: the KL weight), each from the SFT start")
    p.add_argument("--temperatures", type=nonnegative_float, nargs="+", default=list(TEMPERATURES),
                   help="sampling temperatures (>= 0; 0 = greedy)")
    for name, kind, what in (("sft-epochs", positive_int, "SFT epochs"),
                             ("sft-lr", positive_float, "SFT learning rate"),
                             ("dpo-epochs", positive_int, "DPO epochs per β"),
                             ("dpo-lr", positive_float, "DPO learning rate"),
                             ("max-new-tokens", positive_int, "tokens generated per test prompt"),
                             ("n-boot", positive_int, "bootstrap resamples for the 95%% intervals")):
        full, smoke = DEFAULTS[name.replace("-", "_")]
        p.add_argument(f"--{name}", type=kind, help=f"{what} (default {full:g}; {smoke:g} with --smoke)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--eval-batch-size", type=positive_int, default=16)
    p.add_argument("--max-length", type=positive_int, default=256, help="longest prompt + response kept, in tokens")
    p.add_argument("--sbert", default=SBERT, help="sentence-transformers model for win rates")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for key, (full, smoke) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA GPU (torch.cuda.is_available() is False); use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        p.error(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    args.tag = "smoke" if args.smoke else Path(args.checkpoint or args.model).name  # names the run's folder
    args.out = Path(args.out or REPO / "runs" / f"ch8_{args.tag}")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = load_model(args).to(args.device)  # first: no weights -> one line, at once
    context = model.config.n_positions
    if args.max_length > context:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's context of {context} tokens; "
                         f"give at most {context}")
    try:
        entries = pdata.load(args.data)
    except pdata.DownloadError as e:
        raise ChapterSkipped(str(e)) from None
    except ValueError as e:  # malformed: one line, the first three bad entries named
        head, *bad = str(e).splitlines()
        raise ValueError(" ".join([head, "; ".join(bad[:3])] + [f"; and {len(bad) - 3} more"] * (len(bad) > 3))) from None
    from gpt import get_tokenizer
    from gpt.tokenizer import EOS_ID
    tokenizer = get_tokenizer()
    if args.smoke:
        print("SMOKE RUN: a tiny random GPT-2 and a few dozen pairs; the pipeline runs end to end, its numbers mean nothing")
    sft_pairs, pairs = prepare_pairs(entries, tokenizer, EOS_ID, args)
    longest = max(len(p.prompt) for p in pairs["test"])
    if longest + args.max_new_tokens > context:
        raise ValueError(f"the longest test prompt ({longest} tokens) + --max-new-tokens {args.max_new_tokens} exceeds "
                         f"the model's context of {context}; lower --max-new-tokens or --max-length")
    sbert = load_sbert(args.sbert, args.device)  # now, not after hours of training
    suffix = "_smoke" if args.smoke else ""  # the smoke run's meaningless figures never replace the real ones
    plotting.check_writable()
    plotting.check_writable(args.out, "tables")
    loop = dict(batch_size=args.batch_size, seed=args.seed, device=args.device, pad_id=EOS_ID)
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size, seed=args.seed, device=args.device,
               eos_id=EOS_ID, tokenizer=tokenizer)

    # 1. SFT on (prompt, chosen + EOS); prompt and padding are not targets
    sft_history = train_sft(model, sft_pairs["train"], sft_pairs["validation"], epochs=args.sft_epochs,
                            lr=args.sft_lr, **loop)
    model.eval()
    model.requires_grad_(False)  # the SFT model is now the frozen reference

    # 2. DPO: reference log-probs and hidden states cached once; each β from the same SFT weights
    caches = {k: ReferenceCache(model, pairs[k], EOS_ID, args.batch_size) for k in ("train", "validation")}
    runs = generate_runs("SFT", model, pairs["test"], args.temperatures, **gen)  # test split only
    steps, epochs = [], []
    for beta in args.betas:
        policy, s, e = train_dpo(model, pairs["train"], pairs["validation"], caches, beta, epochs=args.dpo_epochs,
                                 lr=args.dpo_lr, **loop)
        runs += generate_runs(f"DPO β={beta}", policy.requires_grad_(False), pairs["test"], args.temperatures, **gen)
        del policy  # one policy in memory at a time
        steps += s
        epochs += e
        print(f"eq. (38) at the first DPO step (policy = reference): loss {s[0]['loss']:.6f} vs ln 2 = "
              f"{math.log(2):.6f}, reward accuracy {s[0]['rewards/accuracies']:.2f} (0: no implicit reward yet)")

    # 3. evaluation: every model at every temperature (generated above), SBERT win rate with ties ½
    win_rows, generations = score_runs(runs, pairs["test"], entries, sbert, n_boot=args.n_boot, seed=args.seed)

    write_outputs(args.out, sft_history, steps, epochs, win_rows, generations, pairs["test"], entries)  # tables first
    tag = "SMOKE RUN (meaningless)" if args.smoke else args.tag
    figure_training(epochs, args.betas, tag, suffix)
    figure_win_rates(win_rows, tag, suffix)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run(main)
