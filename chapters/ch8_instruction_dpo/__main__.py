"""Chapter 8 (report §6.2, Figs. 3–4): the report's GPT-2 SFT → DPO experiment, done right, with
SBERT win rates.

    python -m chapters.ch8_instruction_dpo --model gpt2-medium  # the report's model
    python -m chapters.ch8_instruction_dpo --model gpt2         # 124M, faster
    python -m chapters.ch8_instruction_dpo --checkpoint PATH    # local GPT-2 files
    python -m chapters.ch8_instruction_dpo --miniature          # GPT-2 trained here (~6 min)
    python -m chapters.ch8_instruction_dpo --miniature --authors-setup  # the authors' pipeline
    python -m chapters.ch8_instruction_dpo --miniature --ladder # their mistakes fixed one by one
    python -m chapters.ch8_instruction_dpo --smoke              # tiny random GPT-2, < 1 min
    # DDP (or --fsdp) on 2 processes:
    torchrun --standalone --nproc_per_node 2 -m chapters.ch8_instruction_dpo --model gpt2-medium
    # after Ctrl-C: continue the run in --out
    python -m chapters.ch8_instruction_dpo --model gpt2-medium --resume

With no model named and no GPT-2 weights in the cache, the chapter runs the miniature
(`chapters.ch8_instruction_dpo.miniature`): a base model pretrained here on the training split's
texts, then the same pipeline. SFT on (prompt, chosen); DPO with reference = the SFT model (frozen)
and the policy starting from it, each β from the same start; evaluation on the held-out test split
only, at each sampling temperature (β and temperature are separate axes everywhere), with the mean
generated length and a length-controlled win rate (`chapters.ch8_instruction_dpo.length_control`).
The training loops live in `chapters.ch8_instruction_dpo.trainers`, the evaluation in
`chapters.ch8_instruction_dpo.win_rates`, the authors' mistakes in
`chapters.ch8_instruction_dpo.authors_setup`; this file holds the experiment: settings, data checks,
Figs. 3–4, tables. Processes, saved models, checkpoints, --resume and the schedule:
`chapters.ch8_instruction_dpo.scaled_run` (a plain run is its N = 1).
"""

import argparse
import copy
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

import gpt
from chapters.ch8_instruction_dpo import authors_setup as au
from chapters.ch8_instruction_dpo import data as pdata
from chapters.ch8_instruction_dpo import miniature, scaled_run
from chapters.ch8_instruction_dpo.figures import figure_ladder, figure_training, figure_win_rates
from chapters.ch8_instruction_dpo.length_control import add_length_columns
from chapters.ch8_instruction_dpo.trainers import sft_evaluate, sft_loss, train_dpo, train_sft
from chapters.ch8_instruction_dpo.win_rates import SBERT, generate_runs, load_sbert, score_runs
from chapters.common.files import atomic_open, check_writable
from chapters.common.runtime import ChapterSkipped, one_thread
from gpt import GPT, GPTConfig, get_tokenizer
from gpt.cli import nonnegative_float, nonnegative_int, positive_float, positive_int, run, summary
from gpt.config import PRESETS
from gpt.download import DownloadError
from gpt.tokenizer import EOS_ID

REPO = Path(__file__).resolve().parents[2]
PROG = "python -m chapters.ch8_instruction_dpo"
BETAS = (0.1, 0.3, 0.7, 1.0)
AUTHORS_BETAS = (
    0.3,
    0.7,
    1.0,
)  # their notebook's sweep: the default of --authors-setup and --ladder
TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0)
# (default, with --smoke, with --miniature): a tiny random model needs a large learning rate to move
# in one or two epochs; the miniature's values were chosen on the validation split (README, chapter
# 8); the command line wins
DEFAULTS = {
    "sft_epochs": (2, 1, 1),
    "sft_lr": (5e-5, 1e-3, 3e-4),
    "dpo_epochs": (3, 2, 2),
    "dpo_lr": (5e-6, 1e-3, 1e-4),
    "max_new_tokens": (64, 6, 64),
    "n_boot": (1000, 200, 1000),
    "max_length": (256, 256, 128),
    "base_epochs": (None, None, 6),
    "base_lr": (None, None, 2e-3),
}
SMOKE_SPLIT = {
    "train": 16,
    "validation": 4,
    "test": 4,
}  # at most this many entries of each split in a smoke run


# ---------------------------------------------------------------- tables


def write_csv(path, rows):
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(out: Path, sft_history, steps, epochs, win_rows, generations, test, entries):
    """Tables: SFT and DPO metrics, win rates (CSV and Markdown), every generation, and readable
    examples."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sft_epochs.csv", sft_history)
    write_csv(out / "dpo_steps.csv", steps)
    write_csv(out / "dpo_epochs.csv", epochs)
    write_csv(out / "win_rates.csv", win_rows)
    temps = list(dict.fromkeys(r["temperature"] for r in win_rows))
    lines = [
        "Win rate (95% CI) / length-controlled win rate / mean generated length [GPT-2 tokens]\n",
        "| model | " + " | ".join(f"T = {t}" for t in temps) + " |",
        "|---|" + "---:|" * len(temps),
    ]
    for name in dict.fromkeys(r["model"] for r in win_rows):
        cells = [
            f"{r['win_rate']:.3f} ({r['ci_low']:.2f}–{r['ci_high']:.2f}) / {r['lc_win_rate']:.3f} "
            f"/ {r['mean_length']:.1f}"
            for r in win_rows
            if r["model"] == name
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    with atomic_open(out / "win_rates.md") as f:
        f.write("\n".join(lines) + "\n")
    with atomic_open(out / "generations.jsonl") as f:
        f.writelines(json.dumps(g) + "\n" for g in generations)
    md = ["# Examples (test split, greedy decoding)\n"]
    for p in test[:10]:
        e = entries[p.index]
        md += [
            f"## entry {p.index}: {e['instruction']}",
            f"input: {e['input'] or '(none)'}",
            "",
            f"- chosen: {e['chosen']}",
            f"- rejected: {e['rejected']}",
        ]
        md += [
            f"- **{g['model']}**: {g['generated']!r} (win {g['score']})"
            for g in generations
            if g["index"] == p.index and g["temperature"] == 0.0
        ]
        md.append("")
    with atomic_open(out / "examples.md") as f:
        f.write("\n".join(md))
    print(
        f"tables: {out}/ (sft_epochs.csv, dpo_steps.csv, dpo_epochs.csv, win_rates.csv, "
        f"win_rates.md, generations.jsonl, examples.md)"
    )


# ------------------------------------------------------------ the model, the data, the command line


def load_model(args):
    """The starting GPT-2: a tiny random one for --smoke, else the weights by name or path.

    Weights this machine cannot download skip the chapter (one line); a wrong path or a corrupt file
    is an error.
    """
    if args.smoke:
        torch.manual_seed(args.seed)
        return GPT(
            GPTConfig.tiny(vocab_size=50257, n_positions=256, n_embd=16, n_layer=2, n_head=2)
        )
    try:
        return gpt.load_gpt2(args.checkpoint or args.model)
    except DownloadError as e:
        raise ChapterSkipped(str(e).strip().splitlines()[0]) from None


def smallest_runnable_data_set() -> int:
    """The fewest entries (with distinct prompts) whose seeded 85/5/10 split gives each of train,
    validation and test at least one."""
    return next(n for n in range(1, 1000) if all(pdata.split(distinct_prompts(n)).values()))


def distinct_prompts(n: int) -> list:
    """n entries with n different prompts, as far as `pdata.split` looks."""
    return [{"instruction": f"{i}"} for i in range(n)]


def prepare_pairs(entries, tokenizer, eos_id, args):
    """Split, tokenize and filter: SFT pairs (every pair that fits in --max-length) and
    DPO/evaluation pairs (those with chosen ≠ rejected), per split. Refuses, in one line, a data set
    that leaves a split without a usable pair."""
    split = pdata.split(entries, args.seed)
    same = [i for i, e in enumerate(entries) if not pdata.has_preference(e)]
    print(
        f"data: {len(entries)} entries, split "
        f"{len(split['train'])}/{len(split['validation'])}/{len(split['test'])} "
        f"(train/validation/test, seed {args.seed}); {len(same)} with chosen == rejected {same}: "
        f"kept for SFT, left out of DPO and evaluation (no preference to learn or judge)"
    )
    if args.smoke:
        split = {k: v[: SMOKE_SPLIT[k]] for k, v in split.items()}
    sft_pairs = {
        k: pdata.tokenize(entries, v, tokenizer, eos_id, args.max_length) for k, v in split.items()
    }
    pairs = {
        k: [p for p in v if pdata.has_preference(entries[p.index])] for k, v in sft_pairs.items()
    }
    print(
        f"pairs after dropping those longer than {args.max_length} tokens: SFT "
        f"{len(sft_pairs['train'])}/"
        f"{len(sft_pairs['validation'])}, DPO {len(pairs['train'])}/{len(pairs['validation'])}, "
        f"test {len(pairs['test'])}"
    )
    empty = [k for k, v in pairs.items() if not v]
    if empty:
        n = sum(map(len, split.values()))
        too_long = n - sum(map(len, sft_pairs.values()))
        identical = sum(map(len, sft_pairs.values())) - sum(map(len, pairs.values()))
        raise ValueError(
            f"no usable preference pair in the {' and '.join(empty)} split: of {n} entries"
            f"{' (--smoke keeps at most 16/4/4)' if args.smoke else ''} {identical} have chosen == "
            f"rejected and {too_long} are longer than --max-length {args.max_length} tokens, "
            f"leaving "
            f"{'/'.join(str(len(v)) for v in pairs.values())} (train/validation/test); chapter 8 "
            f"needs one usable pair "
            f"in each split, so at least {smallest_runnable_data_set()} entries with chosen ≠ "
            f"rejected that fit"
        )
    return sft_pairs, pairs


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=summary(__doc__))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", choices=list(PRESETS), help="GPT-2 by name (default gpt2-medium "
                     "when its weights are cached, else --miniature)")
    src.add_argument("--checkpoint", help="local GPT-2 weights: a folder of OpenAI's files or a "
                     ".safetensors file/folder")
    src.add_argument("--smoke", action="store_true",
                     help="the whole pipeline on a tiny random GPT-2 (numbers mean nothing)")
    src.add_argument("--miniature", action="store_true",
                     help="a GPT-2-architecture base model trained here first")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--authors-setup", action="store_true",
                     help="the report authors' pipeline, every mistake on")
    how.add_argument("--ladder", action="store_true",
                     help="from the authors' setup to ours, one fix at a time")
    p.add_argument("--ladder-temperature", type=nonnegative_float, default=0.0,
                   help="the ladder's sampling temperature")
    p.add_argument("--data", help="path of instruction-data-with-preference.json (default: data/, "
                   "downloaded once)")
    p.add_argument("--out", help="folder for tables and generations (default runs/ch8_<model>)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed, 0 or more")
    p.add_argument("--betas", type=positive_float, nargs="+",
                   help=f"DPO β values (> 0: the KL weight), each from the SFT start (default "
                   f"{' '.join(map(str, BETAS))}; "
                   f"{' '.join(map(str, AUTHORS_BETAS))} with --authors-setup or --ladder)")
    p.add_argument("--temperatures", type=nonnegative_float, nargs="+", default=list(TEMPERATURES),
                   help="sampling temperatures (>= 0; 0 = greedy)")
    for name, kind, what in (
        ("sft-epochs", positive_int, "SFT epochs"),
        ("sft-lr", positive_float, "SFT learning rate"),
        ("dpo-epochs", positive_int, "DPO epochs per β"),
        ("dpo-lr", positive_float, "DPO learning rate"),
        ("max-new-tokens", positive_int, "tokens generated per test prompt"),
        ("n-boot", positive_int, "bootstrap resamples for the 95%% intervals"),
        ("max-length", positive_int, "longest prompt + response kept, in tokens"),
        ("base-epochs", positive_int, "--miniature: base-model epochs"),
        ("base-lr", positive_float, "--miniature: base-model learning rate"),
    ):
        full, smoke, mini = DEFAULTS[name.replace("-", "_")]
        given = "; ".join(
            f"{v:g}{w}"
            for v, w in ((full, ""), (smoke, " with --smoke"), (mini, " with --miniature"))
            if v is not None
        )
        p.add_argument(f"--{name}", type=kind, help=f"{what} (default {given})")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--eval-batch-size", type=positive_int, default=16)
    p.add_argument("--sbert", default=SBERT, help="sentence-transformers model for win rates")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    scaled_run.add_arguments(p)
    args = p.parse_args(argv)
    if not (args.model or args.checkpoint or args.smoke or args.miniature):
        args.miniature = not miniature.weights_cached("gpt2-medium")
        args.model = None if args.miniature else "gpt2-medium"
        if args.miniature:
            print(
                "no GPT-2 weights in the cache (python -m gpt.download gpt2-medium, or "
                "--model/--checkpoint): "
                "running the miniature, a GPT-2-architecture model trained here"
            )
    for key, values in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, values[2 if args.miniature else 1 if args.smoke else 0])
    if args.betas is None:
        args.betas = list(AUTHORS_BETAS if args.authors_setup or args.ladder else BETAS)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(
            f"--device {args.device}: this machine has no CUDA GPU (torch.cuda.is_available() is "
            f"False); use cpu"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        p.error(
            f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 "
            f"...)"
        )
    args.setup = au.AuthorsSetup.authors() if args.authors_setup else au.AuthorsSetup()
    args.tag = (
        "smoke"
        if args.smoke
        else "miniature"
        if args.miniature
        else Path(args.checkpoint or args.model).name
    )
    args.out = Path(
        args.out or REPO / "runs" / f"ch8_{args.tag}{'_authors' if args.authors_setup else ''}"
    )
    # figures: plots/ch8_*_miniature.png (committed), *_smoke.png (never over the real ones), *.png
    # for real weights
    args.suffix = {"smoke": "_smoke", "miniature": "_miniature"}.get(args.tag, "") + (
        "_authors" if args.authors_setup else ""
    )
    return args


def experiment(
    args,
    base,
    data: dict,
    setup: au.AuthorsSetup,
    sbert,
    temperatures,
    scale,
    keep_base=False,
    sft=None,
) -> dict:
    """Report §6.2's pipeline from the `base` model: SFT, DPO at each β, win rates, with `setup`'s
    mistakes on.

    `data` holds entries, sft_pairs, pairs, tokenizer, eos. The SFT model is trained from `base` (in
    place unless `keep_base`), or taken as given in `sft` = (model, history). Training, evaluation
    and sampling run on `scale`'s ranks; rank 0 alone scores with SBERT. Returns the tables' rows
    and the SFT model (None on the other ranks).
    """
    eos, tok, d = data["eos"], data["tokenizer"], scale.dist
    loop = dict(
        batch_size=args.batch_size, seed=args.seed, device=args.device, pad_id=eos, scale=scale
    )
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size, seed=args.seed,
               device=args.device, eos_id=eos, tokenizer=tok)
    sft_pairs, pairs, entries = data["sft_pairs"], data["pairs"], data["entries"]

    # 1. SFT on (prompt, chosen + EOS); prompt and padding are not targets (the authors': they are)
    if sft is None:
        model = copy.deepcopy(base) if keep_base else base
        torch.manual_seed(args.seed)
        history = train_sft(
            model,
            sft_pairs["train"],
            sft_pairs["validation"],
            epochs=args.sft_epochs,
            lr=args.sft_lr,
            loss_fn=au.authors_sft_loss if setup.sft_all_tokens else sft_loss,
            **loop,
        )
        miniature.disable_dropout(model.eval()).requires_grad_(False)  # the SFT model is now frozen
        held_out = {
            k: sft_evaluate(
                model,
                sft_pairs[k],
                batch_size=args.batch_size,
                device=args.device,
                pad_id=eos,
                dist=d,
            )
            for k in ("validation", "test")
        }
        unigram = {
            k: miniature.unigram_loss(sft_pairs["train"], sft_pairs[k], model.config.vocab_size)
            for k in held_out
        }
        print(
            "SFT loss on held-out chosen responses (nats/token): "
            + ", ".join(f"{k} {held_out[k]:.4f} (unigram {unigram[k]:.4f})" for k in held_out)
        )
        sft = model, history
    model, history = sft

    # 2. DPO: reference log-probs and hidden states cached once; each β from the same SFT weights
    # (the authors':
    # reference = base model, one policy trained β after β)
    reference = base if setup.reference_base else model
    if setup.reference_grad:
        reference = copy.deepcopy(reference).requires_grad_(
            True
        )  # their reference is run without no_grad
    caches = scale.reference_caches(
        reference,
        {k: pairs[k] for k in ("train", "validation")},
        eos,
        args.batch_size,
        args.max_length,
        seed=args.seed,
    )  # the train cache in DPO's first-epoch batches
    step = au.make_dpo_step(setup, reference)
    indices = au.evaluation_indices(
        len(entries), [p.index for p in pairs["test"]], setup, args.seed
    )
    evaluated = (
        pairs["test"]
        if not setup.eval_whole_data
        else pdata.tokenize(entries, indices, tok, eos, args.max_length)
    )
    runs = scaled_run.sharded_runs(generate_runs, d, "SFT", model, evaluated, temperatures, **gen)
    start, steps, epochs = model, [], []
    for beta in args.betas:
        same = (
            start is model and not setup.reference_base
        )  # policy = reference at the first step: ln 2 and 0
        policy, s, e = train_dpo(
            start,
            pairs["train"],
            pairs["validation"],
            caches,
            beta,
            epochs=args.dpo_epochs,
            lr=args.dpo_lr,
            step=step,
            **loop,
        )
        runs += scaled_run.sharded_runs(
            generate_runs,
            d,
            f"DPO β={beta}",
            policy.requires_grad_(False),
            evaluated,
            temperatures,
            **gen,
        )
        start = policy if setup.continue_beta else model  # else one policy in memory at a time
        steps += s
        epochs += e
        print(
            f"eq. (38) at the first DPO step: loss {s[0]['loss']:.6f} vs ln 2 = {math.log(2):.6f}, "
            f"reward accuracy {s[0]['rewards/accuracies']:.2f} "
            f"({'policy = reference' if same else 'policy ≠ reference'})"
        )

    # 3. evaluation: every model at every temperature (generated above), SBERT win rate with ties ½
    # (theirs: 0)
    if not d.main:
        return None
    win_rows, generations = score_runs(
        runs,
        evaluated,
        entries,
        sbert,
        n_boot=args.n_boot,
        seed=args.seed,
        tie=0.0 if setup.tie_loses else 0.5,
    )
    win_rows = add_length_columns(
        win_rows, generations, entries, lambda text: len(data["gpt2"].encode(text))
    )
    for r in win_rows:
        print(
            f"{r['model']:>12} temperature {r['temperature']:4.2f}: mean length "
            f"{r['mean_length']:5.1f} tokens, "
            f"length-controlled win rate {r['lc_win_rate']:.3f} (raw {r['win_rate']:.3f})"
        )
    return dict(
        sft_history=history,
        steps=steps,
        epochs=epochs,
        win_rows=win_rows,
        generations=generations,
        evaluated=evaluated,
        sft=sft,
    )


def ladder_row(name, setup, result, betas, temperature) -> dict:
    """One rung of the ladder: the last β's numbers (the authors evaluated only the last model)."""
    last = f"DPO β={betas[-1]}"
    val = [e for e in result["epochs"] if e["beta"] == betas[-1] and e["split"] == "validation"][-1]
    train = [e for e in result["epochs"] if e["beta"] == betas[-1] and e["split"] == "train"][-1]
    win = next(
        r for r in result["win_rows"] if r["model"] == last and r["temperature"] == temperature
    )
    sft = next(
        r for r in result["win_rows"] if r["model"] == "SFT" and r["temperature"] == temperature
    )
    return {
        "rung": name,
        "mistakes_on": " ".join(setup.on) or "none",
        "first_loss": result["steps"][0]["loss"],
        "train_loss": train["loss"],
        "validation_loss": val["loss"],
        "validation_accuracy": val["rewards/accuracies"],
        "validation_kl": val["kl"],
        "mean_length": win["mean_length"],
        "win_rate": win["win_rate"],
        "ci_low": win["ci_low"],
        "ci_high": win["ci_high"],
        "lc_win_rate": win["lc_win_rate"],
        "sft_win_rate": sft["win_rate"],
        "n": win["n"],
    }


def run_ladder(args, base, data, sbert, scale) -> list:
    """`authors_setup.ladder()`: the pipeline once per rung (SFT trained once per SFT loss), one row
    each."""
    rows, sft_models = [], {}
    for name, setup in au.ladder():
        print(f"\n--- ladder: {name} (mistakes on: {', '.join(setup.on) or 'none'})")
        result = experiment(
            args,
            base,
            data,
            setup,
            sbert,
            [args.ladder_temperature],
            scale,
            keep_base=True,
            sft=sft_models.get(setup.sft_all_tokens),
        )
        sft_models[setup.sft_all_tokens] = result["sft"]
        rows.append(ladder_row(name, setup, result, args.betas, args.ladder_temperature))
    return rows


def check_paths(args):
    """Every path of the command line, judged in its first second (nothing loaded, nothing
    written): the weights, the data file, the figures' and the tables' folders. ValueError or
    PermissionError, one line naming the flag."""
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise ValueError(f"--checkpoint {args.checkpoint}: no such file or folder")
    if args.data is not None:
        try:
            pdata.data_file(args.data)
        except ValueError as err:
            raise ValueError(f"--data: {err}") from None
    check_writable()
    scaled_run.check_out_folder(args.out)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_paths(args)
    except (ValueError, OSError):
        if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 says it, once
            raise SystemExit(2) from None
        raise
    scale = scaled_run.start(
        args, alone="--ladder" if args.ladder else "--authors-setup" if args.authors_setup else None
    )
    try:
        if (
            args.miniature or args.smoke
        ):  # small matrices: one thread is faster on a shared CPU, and float sums
            with one_thread():  # repeat whatever the core count (byte-identical figures)
                return _main(args, scale)
        return _main(args, scale)
    except (ValueError, OSError, ChapterSkipped):
        if not scale.dist.main:  # every rank meets the same bad input: rank 0 says it, once
            raise SystemExit(2) from None
        raise
    finally:
        scale.close()


def _main(args, scale):
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = (
        None if args.miniature else load_model(args).to(args.device)
    )  # first: no weights -> one line, at once
    context = miniature.CONFIG["n_positions"] if args.miniature else model.config.n_positions
    if args.max_length > context:
        raise ValueError(
            f"--max-length {args.max_length} exceeds the model's context of {context} tokens; "
            f"give at most {context}"
        )
    try:
        entries = pdata.load(args.data)
    except pdata.DownloadError as e:
        raise ChapterSkipped(str(e)) from None
    except ValueError as e:  # malformed: one line, the first three bad entries named
        head, *bad = str(e).splitlines()
        raise ValueError(
            " ".join([head, "; ".join(bad[:3])] + [f"; and {len(bad) - 3} more"] * (len(bad) > 3))
        ) from None
    tokenizer = get_tokenizer()
    data = {"entries": entries, "gpt2": tokenizer, "tokenizer": tokenizer, "eos": EOS_ID}
    if (
        args.miniature
    ):  # GPT-2's tokenizer, the model's vocabulary cut to the training split's tokens
        vocab = miniature.CompactVocab(
            tokenizer,
            miniature.training_texts(entries, pdata.split(entries, args.seed)["train"]),
            EOS_ID,
        )
        data.update(tokenizer=vocab, eos=vocab.eos)
        print(
            f"miniature: GPT-2 tokens seen >= {miniature.MIN_COUNT} times in the training split: "
            f"{vocab.size - 1} of 50257, + UNK; model {miniature.CONFIG}"
        )
    if args.smoke:
        print(
            "SMOKE RUN: a tiny random GPT-2 and a few dozen pairs; the pipeline runs end to end, "
            "its numbers mean nothing"
        )
    data["sft_pairs"], data["pairs"] = prepare_pairs(entries, data["tokenizer"], data["eos"], args)
    longest = max(len(p.prompt) for p in data["pairs"]["test"])
    if longest + args.max_new_tokens > context:
        raise ValueError(
            f"the longest test prompt ({longest} tokens) + --max-new-tokens {args.max_new_tokens} "
            f"exceeds the model's context of {context}; lower --max-new-tokens or --max-length"
        )
    # the folders were judged at the start (check_paths); the run folder is now this run's alone,
    # before SBERT's seconds of loading
    scale.hold(args.out)
    sbert = (
        load_sbert(args.sbert, args.device) if scale.dist.main else None
    )  # now, not after hours of training
    scale.begin()
    if (
        args.miniature
    ):  # stage 1: the base model, from random weights, on the training split's texts
        model, base_history = miniature.pretrain_base(
            data["tokenizer"].size,
            data["sft_pairs"]["train"],
            data["sft_pairs"]["validation"],
            epochs=args.base_epochs,
            lr=args.base_lr,
            batch_size=miniature.BASE_BATCH,
            seed=args.seed,
            device=args.device,
            eos_id=data["eos"],
            scale=scale,
        )
    tag = {"smoke": "SMOKE RUN (meaningless)"}.get(args.tag, args.tag) + (
        " (authors' setup)" if args.authors_setup else ""
    )
    if args.ladder:
        rows = run_ladder(args, model, data, sbert, scale)
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(args.out / "ladder.csv", rows)
        print(f"table: {args.out / 'ladder.csv'}")
        figure_ladder(rows, args.betas[-1], args.ladder_temperature, tag, args.suffix)
    else:
        result = experiment(
            args,
            model,
            data,
            args.setup,
            sbert,
            args.temperatures,
            scale,
            keep_base=args.setup.reference_base,
        )
        if result is None:  # not rank 0: it trained and sampled its share; rank 0 writes every file
            return
        write_outputs(
            args.out,
            result["sft_history"],
            result["steps"],
            result["epochs"],
            result["win_rows"],
            result["generations"],
            result["evaluated"],
            entries,
        )  # tables first
        figure_training(result["epochs"], args.betas, tag, args.suffix)
        count = data["gpt2"].encode
        lengths = {
            k: float(np.mean([len(count(entries[p.index][k])) for p in result["evaluated"]]))
            for k in ("chosen", "rejected")
        }
        figure_win_rates(result["win_rows"], tag, args.suffix, reference_lengths=lengths)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run(main)
