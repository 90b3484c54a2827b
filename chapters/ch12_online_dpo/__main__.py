"""Chapter 12 (beyond the report, after §7): offline vs iterative vs online DPO at one labelling
budget, on bandit worlds where π* of eq. (36) is known exactly.

One budget of labelled pairs is spent three ways: offline (every pair sampled once from π_ref,
eq. (38) minimised), iterative (K rounds, each sampled from the current policy, eq. (38) on all
pairs so far; Xiong et al. 2024) and online (a fresh pair from the current policy at every step, one
gradient step on it; Guo et al. 2024). The labeller is Bradley–Terry on the true reward (eq. (23)).
Each result is measured exactly against π*, π_ref and the reward-vs-KL frontier, over many seeds.

Then the same question on chapter 8's miniature GPT-2 (`miniature_online`): online DPO with a
Sentence-BERT judge against offline DPO on the data set's pairs, at one number of labelled pairs.

    python3 -m chapters.ch12_online_dpo          # --seed, --seeds, --budget; ~3 min, one core
    python3 -m chapters.ch12_online_dpo --quick  # a short form (a tiny model); *_quick figures
    python3 -m chapters.ch12_online_dpo --full-miniature  # every training pair, base 6 epochs
    python3 -m chapters.ch12_online_dpo --no-miniature    # the exact worlds only, about 12 s
"""

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from chapters.ch8_instruction_dpo import data as pdata
from chapters.ch8_instruction_dpo.win_rates import SBERT, load_sbert
from chapters.ch12_online_dpo import miniature_online as mo
from chapters.ch12_online_dpo.experiment import compare_schedules, regulariser_sweep, schedules
from chapters.ch12_online_dpo.rounds import DT, bt_labeller, offline_dpo, preference_rounds
from chapters.ch12_online_dpo.worlds import WORLDS, World
from chapters.common import check_writable, one_thread
from chapters.common.figures import plt, save
from gpt.cli import nonnegative_int, positive_int, run, summary

ITERATIONS = 4  # the iterative schedule's rounds
ONLINE_LRS = (0.5, 2.0)  # the online schedule's constant step sizes
L2 = 1e-3  # the prior's weight, (l2/2)·‖θ − log π_ref‖²
L2S = (1e-2, 1e-3, 1e-4, 1e-5)  # the sweep over it
FULL = dict(budget=256, seeds=20, online_steps=20000)
QUICK = dict(budget=64, seeds=10, online_steps=5000)
BETAS = torch.logspace(-3, 3, 301, dtype=DT)  # the frontier's β grid
METRICS = {  # what the tables show: metric -> its header
    "kl_to_optimum": "KL(π‖π*)",
    "reward": "E[r*]",
    "kl_to_ref": "KL(π‖π_ref)",
    "rare_mass": "rare mass",
}
COLOURS = {"offline": "C0", "iterative": "C1", "online lr=0.5": "C2", "online lr=2": "C3"}


def _section(title):
    print(f"\n--- {title}")


def _final(stats: dict) -> tuple:
    """(mean, low, high, standard error) after the last round of {"mean", "low", "high"} lists."""
    mean, low, high = stats["mean"], stats["low"], stats["high"]
    mean, low, high = (v[-1] if isinstance(v, list) else v for v in (mean, low, high))
    return mean, low, high, (high - mean) / 1.96


def _interval(stats: dict, digits: int = 3) -> str:
    mean, low, high, _ = _final(stats)
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _difference(a: dict, b: dict) -> tuple:
    """a − b with its 95% interval, from two independent means' standard errors (Welch, normal)."""
    ma, _, _, sa = _final(a)
    mb, _, _, sb = _final(b)
    half = 1.96 * math.hypot(sa, sb)
    return ma - mb, ma - mb - half, ma - mb + half


def _sign(d: tuple, below: str, above: str, neither: str = "no difference at 95%") -> str:
    return below if d[2] < 0 else above if d[1] > 0 else neither


# ------------------------------------------------------------------------------ 1. labeller
def _labeller_section(world: World, seed: int, n: int = 20000) -> float:
    pairs = [(7, 0), (1, 2), (0, 1), (3, 4), (0, 7)]
    _section(
        f"1. the labeller, eq. (23): y_a ≻ y_b with probability σ(r*(y_a) − r*(y_b)); "
        f"{n} draws per pair, the {world.name} world's r*"
    )
    label = bt_labeller(world.rewards, torch.Generator().manual_seed(seed))
    print(f"  {'a':>2s} {'b':>2s} {'Δr*':>6s} {'frequency ± s.e.':>18s} {'σ(Δr*)':>8s} {'z':>6s}")
    worst = 0.0
    for a, b in pairs:
        wins = label(torch.full((n,), a), torch.full((n,), b))
        freq = wins.double().mean().item()
        gap = (world.rewards[a] - world.rewards[b]).item()
        p = 1 / (1 + math.exp(-gap))
        se = math.sqrt(p * (1 - p) / n)
        z = (freq - p) / se
        worst = max(worst, abs(z))
        print(f"  {a:2d} {b:2d} {gap:+6.2f} {freq:10.4f} ± {se:.4f} {p:8.4f} {z:+6.2f}")
    print(
        f"  every frequency within 4 standard errors of σ(Δr*): {worst < 4} (largest |z| = "
        f"{worst:.2f}); s.e. = √(σ(1 − σ)/n)"
    )
    return worst


# --------------------------------------------------------------------- 2. infinite data, K = 1
def _limit_section(worlds: dict, steps: int, seed: int, budget: int) -> dict:
    _section(
        "2. infinite data (each round's expected counts, no prior: l2 = 0): every schedule's fixed "
        "point is π*"
    )
    lr = 10.0
    marks = sorted({steps // 10, steps // 2, steps})
    after = ", ".join(map(str, marks))
    print(
        f"  max |π − π*|: offline (one Newton solve), iterative ({ITERATIONS} rounds, Newton "
        f"each), online (one step of size {lr:g} per expected pair; after {after} steps)"
    )
    errors, falling = {}, []
    for world in worlds.values():
        star = world.optimum
        args = (world.pi_ref, world.rewards, world.beta)
        offline = preference_rounds(*args, 100, 1, seed, l2=0.0, expected=True)[-1]
        iterative = preference_rounds(*args, 100, ITERATIONS, seed, l2=0.0, expected=True)[-1]
        online = preference_rounds(
            *args, steps, steps, seed, 1, lr=lr, l2=0.0, keep_pairs=False, expected=True
        )
        errs = [(p - star).abs().max().item() for p in (offline, iterative)]
        path = [(online[k - 1] - star).abs().max().item() for k in marks]
        errors[world.name] = errs + path[-1:]
        falling.append(all(a > b for a, b in zip(path, path[1:])))
        print(
            f"  {world.name:12s} offline {errs[0]:.1e}   iterative {errs[1]:.1e}   online "
            + " → ".join(f"{e:.1e}" for e in path)
            + f"   (π_ref: {(world.pi_ref - star).abs().max().item():.2f})"
        )
    online_errors = [e[2] for e in errors.values()]
    print(
        "  offline and iterative reach π* to < 1e-6: "
        f"{max(max(e[:2]) for e in errors.values()) < 1e-6}; online's error falls at every mark: "
        f"{all(falling)} (both worlds), to < 1e-6 after {steps} "
        f"steps: {max(online_errors) < 1e-6} (largest {max(online_errors):.1e})"
    )

    _section(
        "2b. K = 1 is offline DPO: preference_rounds(rounds=1) vs offline_dpo, same seed and budget"
    )
    gaps, firsts = [], []
    for world in worlds.values():
        args = (world.pi_ref, world.rewards, world.beta)
        for s in range(seed, seed + 3):
            (one,) = preference_rounds(*args, budget, 1, s)
            gaps.append((one - offline_dpo(*args, budget, s)).abs().max().item())
            first = preference_rounds(*args, budget, ITERATIONS, s)[0]
            share = budget // ITERATIONS + (budget % ITERATIONS > 0)
            firsts.append(torch.equal(first, offline_dpo(*args, share, s)))
    print(
        f"  {len(gaps)} runs (both worlds, seeds {seed}–{seed + 2}, {budget} pairs): max |Δπ| = "
        f"{max(gaps)}; identical bit for bit: {max(gaps) == 0}"
    )
    print(
        f"  iterative's first round = offline DPO on its share ({share} pairs): "
        f"{sum(firsts)} of {len(firsts)}"
    )
    return {"errors": errors, "k1_gap": max(gaps)}


# -------------------------------------------------------------------------------- 3. worlds
def _frontier_reward(front: dict, kl: float) -> float:
    """The frontier's E[r*] at KL(π‖π_ref) = kl (linear interpolation on the dense β grid)."""
    xs, ys = np.asarray(front["kl_to_ref"]), np.asarray(front["reward"])
    order = np.argsort(xs)
    return float(np.interp(kl, xs[order], ys[order]))


def _world_section(world: World, budget: int, seeds: int, seed: int) -> dict:
    star, ref = world.optimum, world.pi_ref
    best = int(world.rewards.argmax())
    _section(
        f"3. the {world.name} world: {len(ref)} responses, β = {world.beta:g}; best response "
        f"r* = {world.rewards[best]:g}, π_ref {ref[best]:.3f}, π* {star[best]:.3f}; rare "
        f"(π_ref < {world.rare_below:g}): {int(world.rare.sum())} responses, π_ref mass "
        f"{ref[world.rare].sum():.3f}"
    )
    result = compare_schedules(
        world, budget, seeds, ITERATIONS, ONLINE_LRS, L2, betas=BETAS, first_seed=seed
    )
    front = {k: v for k, v in result["frontier"].items()}
    print(
        f"  final policy, mean [95% interval] over {seeds} seeds; cost = labeller calls, labelled "
        "pairs, fits"
    )
    head = " ".join(f"{h:>22s}" for h in METRICS.values())
    print(f"  {'schedule':14s} {'calls':>5s} {'pairs':>5s} {'fits':>16s} {head} {'at ∞':>5s}")
    for name, m in (("π_ref", result["reference"]), ("π* (eq. (36))", result["optimum"])):
        cells = " ".join(f"{m[k]:22.3f}" for k in METRICS)
        print(f"  {name:14s} {'—':>5s} {'—':>5s} {'—':>16s} {cells} {'—':>5s}")
    for name, s in result["schedules"].items():
        fits = (
            f"{s['rounds']} Newton solve" + "s" * (s["rounds"] > 1)
            if name in ("offline", "iterative")
            else f"{s['rounds']} SGD steps"
        )
        cells = " ".join(f"{_interval(s['metrics'][k]):>22s}" for k in METRICS)
        print(
            f"  {name:14s} {s['labeller_calls']:5d} {s['pairs'][-1]:5d} {fits:>16s} {cells} "
            f"{s['at_infinity'][-1]:5.2f}"
        )
    print(
        "  (at ∞: the fraction of runs whose pairs leave eq. (38)'s unregularised minimiser at "
        f"infinity, where the prior l2 = {L2:g} alone sets how far a logit goes)"
    )
    print(
        f"  mass on the best response: π* {star[best]:.3f}; "
        + ", ".join(
            f"{n} {_interval(s['metrics']['best_mass'])}" for n, s in result["schedules"].items()
        )
    )
    print("  below the exact frontier (E[r*] of π*_β' at the same mean KL(π‖π_ref) − mean E[r*]):")
    gaps = {}
    for name, s in result["schedules"].items():
        kl, reward = _final(s["metrics"]["kl_to_ref"])[0], _final(s["metrics"]["reward"])[0]
        gaps[name] = _frontier_reward(front, kl) - reward
    print("    " + ", ".join(f"{n} {g:.3f}" for n, g in gaps.items()))
    print(
        f"    every point on or below it: {min(gaps.values()) > -1e-9} (the frontier is concave, "
        "so a mean of points below it lies below it)"
    )
    _verdict(world, result, gaps)
    result["frontier_gaps"] = gaps
    return result


def _verdict(world: World, result: dict, gaps: dict) -> None:
    s = result["schedules"]
    closest = min(s, key=lambda n: _final(s[n]["metrics"]["kl_to_optimum"])[0])
    print(f"  which wins in the {world.name} world, from the numbers above:")
    print(
        f"    closest to π* (lowest mean KL(π‖π*)): {closest}, "
        f"{_interval(s[closest]['metrics']['kl_to_optimum'])}"
    )
    kl_side, reward_side = {}, {}
    for name in s:
        if name == "offline":
            continue
        kl = _difference(
            s[name]["metrics"]["kl_to_optimum"], s["offline"]["metrics"]["kl_to_optimum"]
        )
        rw = _difference(s[name]["metrics"]["reward"], s["offline"]["metrics"]["reward"])
        kl_side[name] = _sign(kl, "closer", "farther", "no different")
        reward_side[name] = _sign(rw, "less", "more", "no different")
        print(
            f"    {name} − offline: KL(π‖π*) {kl[0]:+.3f} [{kl[1]:+.3f}, {kl[2]:+.3f}] → "
            f"{_sign(kl, 'closer to π*', 'farther from π*')}; "
            f"E[r*] {rw[0]:+.3f} [{rw[1]:+.3f}, {rw[2]:+.3f}] → "
            f"{_sign(rw, 'less reward', 'more reward')}"
        )

    def which(side, verdict):
        return ", ".join(n for n, v in side.items() if v == verdict) or "none"

    print(
        f"    vs offline, 95%: closer to π*: {which(kl_side, 'closer')}; no different: "
        f"{which(kl_side, 'no different')}; farther: {which(kl_side, 'farther')}"
    )
    star_kl = result["optimum"]["kl_to_ref"]
    for name, v in reward_side.items():
        if v != "more":
            continue
        kl_ref = _final(s[name]["metrics"]["kl_to_ref"])[0]
        print(
            f"    {name} has more E[r*] than offline, at KL(π‖π_ref) {kl_ref:.3f} (π*: "
            f"{star_kl:.3f}) and {gaps[name]:.3f} below the frontier (offline "
            f"{gaps['offline']:.3f}): "
            + f"KL {'above' if kl_ref > star_kl else 'below'} π*'s, "
            + ("further below" if gaps[name] > gaps["offline"] else "closer to")
            + " the frontier than offline"
        )


# --------------------------------------------------------------------------------- 4. prior
def _sweep_section(world: World, budget: int, seeds: int, seed: int) -> dict:
    online = max(ONLINE_LRS)
    _section(
        f"4. the prior's weight in the {world.name} world: final KL(π‖π*) [95%] per l2 "
        f"(offline, iterative, online lr={online:g})"
    )
    sweep = regulariser_sweep(world, L2S, budget, seeds, ITERATIONS, (online,), first_seed=seed)
    names = list(next(iter(sweep.values())))
    print(f"  {'l2':>6s} " + " ".join(f"{n:>22s}" for n in names) + "   closest to π*")
    winners = {}
    for l2, row in sweep.items():
        winners[l2] = min(row, key=lambda n: row[n]["kl_to_optimum"]["mean"])
        cells = " ".join(f"{_interval(row[n]['kl_to_optimum']):>22s}" for n in names)
        print(f"  {l2:6.0e} {cells}   {winners[l2]}")
    print(f"  {'l2':>6s} " + " ".join(f"{'E[r*] ' + n:>22s}" for n in names))
    for l2, row in sweep.items():
        print(f"  {l2:6.0e} " + " ".join(f"{_interval(row[n]['reward']):>22s}" for n in names))
    print(f"  {'l2':>6s} " + " ".join(f"{'KL(π‖π_ref) ' + n:>22s}" for n in names))
    for l2, row in sweep.items():
        print(f"  {l2:6.0e} " + " ".join(f"{_interval(row[n]['kl_to_ref']):>22s}" for n in names))
    star = world.optimum
    print(
        f"  (π*: E[r*] {(star * world.rewards).sum():.3f}, KL(π*‖π_ref) "
        f"{(star * (star / world.pi_ref).log()).sum():.3f})"
    )
    for l2, row in sweep.items():
        d = _difference(row["iterative"]["kl_to_optimum"], row["offline"]["kl_to_optimum"])
        print(
            f"  l2 = {l2:g}: iterative − offline KL(π‖π*) {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] → "
            f"{_sign(d, 'iterative closer', 'offline closer')}"
        )
    richest = {l2: max(row, key=lambda n: row[n]["reward"]["mean"]) for l2, row in sweep.items()}
    star_reward = (star * world.rewards).sum().item()
    over = [
        f"{n} at l2 = {l2:g} ({row[n]['reward']['mean']:.3f}, KL(π‖π_ref) "
        f"{row[n]['kl_to_ref']['mean']:.3f})"
        for l2, row in sweep.items()
        for n in names
        if row[n]["reward"]["mean"] > star_reward
    ]
    print(
        f"  mean E[r*] above π*'s own {star_reward:.3f} (overshoot: the prior too weak to stop a "
        f"logit seen only winning): {'; '.join(over) or 'none'}"
    )
    print(
        f"  closest to π* per l2: {', '.join(f'{l2:g} {w}' for l2, w in winners.items())}; "
        f"most E[r*]: {', '.join(f'{l2:g} {w}' for l2, w in richest.items())}"
    )
    print(
        "  the numbers move with l2: offline's KL(π‖π*) spans "
        + ", ".join(f"{row['offline']['kl_to_optimum']['mean']:.3f}" for row in sweep.values())
        + " and its E[r*] "
        + ", ".join(f"{row['offline']['reward']['mean']:+.3f}" for row in sweep.values())
        + f" over l2 = {', '.join(f'{l2:g}' for l2 in sweep)}: where the data leave the "
        "minimiser at ∞, l2 alone sets how far the rare responses' logits go"
    )
    return sweep


# ----------------------------------------------------------------------------- 5. miniature
def _miniature_section(args) -> dict:
    """Online DPO with an SBERT judge vs offline DPO on chapter 8's miniature (`miniature_online`).

    A missing data set or SBERT model is one line, and the chapter goes on without this part."""
    mode = "quick" if args.quick else "full" if args.full_miniature else "main"
    settings = {"quick": mo.QUICK, "full": mo.FULL, "main": mo.Settings()}[mode]
    settings = replace(settings, seed=args.seed)
    what = {
        "quick": "--quick: a tiny model, 16 pairs; its numbers mean nothing",
        "full": "--full-miniature",
        "main": "the main job's budget; --full-miniature for every training pair",
    }[mode]
    _section(
        "5. the miniature: online DPO with a Sentence-BERT judge vs offline DPO on the data "
        f"set's pairs, at one number of labelled pairs ({what})"
    )
    where = Path(args.data) if args.data else pdata.CACHE
    if not where.is_file():  # no download here: chapter 8 fetches it
        print(
            f"  skipped: no data set at {where} (python -m chapters.ch8_instruction_dpo downloads "
            "it into data/; or pass --data PATH)"
        )
        return None
    started = time.perf_counter()
    try:
        entries = pdata.load(args.data)
        sbert = load_sbert(SBERT, "cpu")
    except (ValueError, ImportError, OSError) as e:
        print(f"  skipped: {str(e).splitlines()[0]}")
        return None
    loading = time.perf_counter() - started
    result = mo.compare_on_miniature(entries, sbert, settings)
    result["seconds"] = {"loading data and SBERT": loading, **result["seconds"]}
    _print_miniature(result)
    suffix = {"quick": "_quick", "full": "_full", "main": ""}[mode]
    _miniature_figure(result, f"ch12_miniature{suffix}")
    return result


def _signed(d: tuple) -> str:
    return f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"


def _print_miniature(r: dict) -> None:
    st, n, rounds = r["settings"], r["budget"], r["online_rows"]
    cfg, sizes, B = st.config, r["sizes"], st.batch_size
    judged, ties = sum(x["pairs"] for x in rounds), sum(x["ties"] for x in rounds)
    print(
        f"  model: chapter 8's miniature, {cfg['n_embd']} wide × {cfg['n_layer']} layers; base "
        f"{st.base_epochs} epoch(s) at lr {st.base_lr:g}, SFT {st.sft_epochs} epoch at lr "
        f"{st.sft_lr:g}; eq. (38) with β = {st.beta:g}, AdamW lr {st.lr:g}, clip 1, batches of "
        f"{B}; every arm starts at π_SFT with π_ref = π_SFT frozen"
    )
    print(
        f"  data: {sizes['train']}/{sizes['validation']}/{sizes['test']} preference pairs "
        f"(train/validation/test); N = {n} training prompts drawn (seed {st.seed}), the same N "
        "for every arm"
    )
    for name, steps in r["offline_steps"].items():
        print(f"  {name}: the data set's {n} (chosen, rejected) pairs, {len(steps)} steps")
    print(
        f"  online: {len(rounds)} rounds of {B} prompts: 2 samples each from the current policy "
        f"(temperature {st.sample_temperature:g}, ≤ {st.max_new_tokens} new tokens, one batched "
        "KV-cache generate call a round), the SBERT judge prefers the one closer to the chosen "
        f"response; {judged} pairs judged, {ties} ties (no preference: left out), one step a round"
    )
    print(f"  labelled pairs: offline {n}, online {judged}; equal: {judged == n}")
    q = max(1, len(rounds) // 4)

    def avg(rows, key):
        return float(np.mean([x[key] for x in rows if key in x]))

    print(
        f"  online, first {q} vs last {q} rounds: judge score (mean cosine of the samples to the "
        f"chosen response) {avg(rounds[:q], 'cosine'):.3f} → {avg(rounds[-q:], 'cosine'):.3f}; "
        f"sample length {avg(rounds[:q], 'sample_length'):.1f} → "
        f"{avg(rounds[-q:], 'sample_length'):.1f} tokens; eq. (38) loss "
        f"{avg(rounds[:q], 'loss'):.3f} → {avg(rounds[-q:], 'loss'):.3f} (first step "
        f"{rounds[0]['loss']:.6f}, ln 2 = {math.log(2):.6f}: policy = reference); the policy's "
        "implicit reward agrees with the judge on the fresh pairs (before their step) "
        f"{avg(rounds[:q], 'rewards/accuracies'):.3f} → "
        f"{avg(rounds[-q:], 'rewards/accuracies'):.3f} (0.5: a coin; a tie counts as a miss)"
    )
    print(
        f"  held-out test prompts (n = {sizes['test']}), chapter 8's evaluation: SBERT win rate "
        "(tie ½) [95% bootstrap], length-controlled (LC), mean length in GPT-2 tokens, mean "
        "cosine to the chosen response (the online judge's score); KL(π‖π_SFT) per response on "
        "the temperature-1 samples ± s.e."
    )
    print(
        f"  {'model':14s} {'T':>4s} {'win rate [95%]':>20s} {'LC':>6s} {'length':>7s} "
        f"{'cos→chosen':>10s} {'KL(π‖π_SFT)':>14s}"
    )
    for w in r["win_rows"]:
        kl = (
            f"{w['sequence_kl']:.3f} ± {w['sequence_kl_se']:.3f}"
            if w["sequence_kl"] == w["sequence_kl"]  # not NaN
            else ""
        )
        print(
            f"  {w['model']:14s} {w['temperature']:4.2f} {w['win_rate']:7.3f} "
            f"[{w['ci_low']:.3f}, {w['ci_high']:.3f}] {w['lc_win_rate']:6.3f} "
            f"{w['mean_length']:7.1f} {w['cos_chosen']:10.3f} {kl:>14s}"
        )
    print(
        f"  validation pairs of the data set (n = {sizes['validation']}): eq. (38) loss, reward "
        "accuracy, token-level KL(π‖π_SFT) on their responses (chapter 8's Fig. 3 measures)"
    )
    for name, v in r["validation"].items():
        print(
            f"  {name:14s} loss {v['loss']:.4f}  accuracy {v['rewards/accuracies']:.3f}  "
            f"token KL {v['kl']:.4f}"
        )
    for key, what in (
        ("score", "win rate"),
        ("sim_chosen", "cosine to the chosen response (the online judge's score)"),
    ):
        print(f"  {what}, differences on the same test prompts [95% paired bootstrap]:")
        for pair, by_temp in r["differences"][key].items():
            cells = "; ".join(
                f"T = {t:g}: {_signed(d)} → {_sign(d, 'lower', 'higher', 'no difference')}"
                for t, d in by_temp.items()
            )
            print(f"    {pair}: {cells}")
    seconds = r["seconds"]
    print(
        "  time (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
        + f"; total {sum(seconds.values()):.0f}"
    )


def _miniature_figure(r: dict, name: str):
    st, rounds = r["settings"], r["online_rows"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    x = np.cumsum([x["pairs"] for x in rounds])
    cos = np.array([x["cosine"] for x in rounds])
    window = max(1, len(rounds) // 8)
    smooth = np.convolve(cos, np.ones(window) / window, mode="valid")
    axes[0].plot(x, cos, "o", ms=3, color="C3", alpha=0.5, label="each round (B prompts × 2)")
    axes[0].plot(x[window - 1 :], smooth, color="C3", lw=2, label=f"mean of {window} rounds")
    axes[0].set(
        xlabel="labelled pairs so far",
        ylabel="mean SBERT cosine to the chosen response",
        title="online DPO: its samples, as the judge scores them",
    )
    axes[0].legend(fontsize=8)
    models = list(dict.fromkeys(w["model"] for w in r["win_rows"]))
    temps = list(st.temperatures)
    width = 0.8 / len(models)
    for k, model in enumerate(models):
        rows = [w for w in r["win_rows"] if w["model"] == model]
        pos = np.arange(len(temps)) + (k - (len(models) - 1) / 2) * width
        wins = np.array([w["win_rate"] for w in rows])
        err = [wins - [w["ci_low"] for w in rows], [w["ci_high"] for w in rows] - wins]
        axes[1].bar(pos, wins, width, color=f"C{k}", label=model, alpha=0.8)
        axes[1].errorbar(pos, wins, yerr=err, fmt="none", color="black", capsize=3, lw=1)
    axes[1].axhline(0.5, color="gray", lw=0.8, ls="--")
    axes[1].set_xticks(np.arange(len(temps)), [f"T = {t:g}" for t in temps])
    axes[1].set(
        ylabel="SBERT win rate vs the rejected response",
        ylim=(0, 1),
        title=f"held-out test prompts (n = {r['sizes']['test']}), 95% bootstrap",
    )
    axes[1].legend(fontsize=8, loc="upper right")
    for k, model in enumerate(models):
        w = next(w for w in r["win_rows"] if w["model"] == model and w["temperature"] == 1.0)
        axes[2].errorbar(
            [w["sequence_kl"]],
            [w["win_rate"]],
            xerr=[[1.96 * w["sequence_kl_se"]]],
            yerr=[[w["win_rate"] - w["ci_low"]], [w["ci_high"] - w["win_rate"]]],
            fmt="o",
            color=f"C{k}",
            capsize=3,
            label=f"{model} ({w['mean_length']:.1f} tokens)",
        )
    axes[2].axhline(0.5, color="gray", lw=0.8, ls="--")
    axes[2].set(
        xlabel="KL(π ‖ π_SFT) per response, nats (T = 1 test samples)",
        ylabel="win rate at T = 1",
        title="win rate against distance from SFT",
    )
    axes[2].legend(fontsize=8, title="mean length at T = 1", title_fontsize=8)
    fig.suptitle(
        f"Chapter 12 on chapter 8's miniature: {r['budget']} labelled pairs each, online (SBERT "
        f"judge) vs offline (the data set's pairs), β = {st.beta:g}"
    )
    fig.tight_layout()
    return save(fig, name)


# -------------------------------------------------------------------------------- figures
def _legend_below(fig, ax, ncol):
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))


def _kl_figure(results: dict, worlds: dict, name: str):
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 5.0))
    for ax, (key, result) in zip(np.atleast_1d(axes), results.items()):
        start = result["reference"]["kl_to_optimum"]
        ax.plot([0], [start], "x", color="gray", ms=9, label="π_ref (the start)")
        for sched, s in result["schedules"].items():
            m = s["metrics"]["kl_to_optimum"]
            x = [0] + s["pairs"]
            mean, low, high = ([start] + m[k] for k in ("mean", "low", "high"))
            colour = COLOURS.get(sched)
            if s["rounds"] == 1:
                ax.errorbar(
                    x[-1:],
                    mean[-1:],
                    yerr=[[mean[-1] - low[-1]], [high[-1] - mean[-1]]],
                    fmt="o",
                    ms=7,
                    color=colour,
                    capsize=4,
                    zorder=3,
                    label=f"{sched} (1 labeller call)",
                )
                continue
            few = s["rounds"] <= 16
            ax.plot(
                x,
                mean,
                marker="o" if few else None,
                lw=1.6 if few else 1.0,
                color=colour,
                label=f"{sched} ({s['rounds']} labeller calls)",
            )
            ax.fill_between(x, low, high, color=colour, alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set(
            xlabel="labelled pairs so far",
            ylabel="KL(π ‖ π*)  (log scale)",
            title=f"{result['world']} world (β = {worlds[key].beta:g}, {result['budget']} pairs)",
        )
    fig.suptitle(
        f"Chapter 12: distance to π* as labels are spent (mean and 95% band over "
        f"{next(iter(results.values()))['seeds']} seeds, l2 = {L2:g})"
    )
    _legend_below(fig, np.atleast_1d(axes)[0], 5)
    return save(fig, name)


def _frontier_figure(results: dict, name: str):
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 5.0))
    for ax, result in zip(np.atleast_1d(axes), results.values()):
        opt, ref = result["optimum"], result["reference"]
        finals = {
            sched: (_final(s["metrics"]["kl_to_ref"]), _final(s["metrics"]["reward"]))
            for sched, s in result["schedules"].items()
        }
        right = 1.15 * max([opt["kl_to_ref"]] + [kl[2] for kl, _ in finals.values()])
        front = result["frontier"]
        shown = [i for i, kl in enumerate(front["kl_to_ref"]) if kl <= right]
        ax.plot(
            [front["kl_to_ref"][i] for i in shown],
            [front["reward"][i] for i in shown],
            color="black",
            lw=1.2,
            label="exact frontier: π*_β' for every β'",
        )
        ax.plot(ref["kl_to_ref"], ref["reward"], "x", color="gray", ms=9, label="π_ref")
        for sched, (kl, rw) in finals.items():
            ax.errorbar(
                [kl[0]],
                [rw[0]],
                xerr=[[kl[0] - kl[1]], [kl[2] - kl[0]]],
                yerr=[[rw[0] - rw[1]], [rw[2] - rw[0]]],
                fmt="o",
                color=COLOURS.get(sched),
                capsize=3,
                label=f"{sched}, final policy",
            )
        ax.plot(
            opt["kl_to_ref"],
            opt["reward"],
            "*",
            color="black",
            mfc="none",
            ms=15,
            zorder=4,
            label="π* (the world's β)",
        )
        ax.set_xlim(-0.03 * right, right)
        ax.set(
            xlabel="KL(π ‖ π_ref)",
            ylabel="E_π[r*]",
            title=f"{result['world']} world: mean ± 95% over {result['seeds']} seeds",
        )
    fig.suptitle("Chapter 12: where each schedule's final policy lands against the exact frontier")
    _legend_below(fig, np.atleast_1d(axes)[0], 4)
    return save(fig, name)


# ------------------------------------------------------------------------------------ main
def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"python3 -m {__package__}", description=summary(__doc__))
    parser.add_argument("--quick", action="store_true", help="a short form of the same run")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="the first seed of the runs (default 0)")
    parser.add_argument("--seeds", type=positive_int, default=None,
                        help=f"runs per schedule, at least 2 (default {FULL['seeds']}, --quick "
                        f"{QUICK['seeds']})")
    parser.add_argument("--budget", type=positive_int, default=None,
                        help=f"labelled pairs per schedule, at least {ITERATIONS} (default "
                        f"{FULL['budget']}, --quick {QUICK['budget']})")
    parser.add_argument("--full-miniature", action="store_true",
                        help="section 5 at full size: every training pair, the base model's 6 "
                        "epochs (minutes)")
    parser.add_argument("--no-miniature", action="store_true",
                        help="leave out section 5 (the GPT-2 miniature)")
    parser.add_argument("--data", help="section 5's instruction-data-with-preference.json "
                        "(default: data/'s copy)")
    args = parser.parse_args(argv)
    if args.full_miniature and (args.quick or args.no_miniature):
        parser.error("argument --full-miniature: not with --quick or --no-miniature")
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in (("budget", args.budget), ("seeds", args.seeds)) if v})
    if cfg["seeds"] < 2:
        parser.error(f"argument --seeds: must be at least 2 for an interval, got {cfg['seeds']}")
    worlds = {key: make() for key, make in WORLDS.items()}
    hidden = worlds["hidden_best"]
    # the library's own check, before any work: budget < rounds and the like are one line
    preference_rounds(hidden.pi_ref, hidden.rewards, hidden.beta, cfg["budget"], ITERATIONS, 0, 1)
    check_writable()
    started = time.perf_counter()
    quick = "_quick" if args.quick else ""  # --quick never writes over the committed figures
    lrs = ", ".join(f"{lr:g}" for lr in ONLINE_LRS)
    with one_thread():  # (Y,) tensors: extra threads only add overhead on a shared CPU
        print(
            f"settings: budget {cfg['budget']} labelled pairs per schedule; seeds {args.seed}–"
            f"{args.seed + cfg['seeds'] - 1} ({cfg['seeds']} runs each); iterative: {ITERATIONS} "
            f"rounds; online: 1 pair, 1 step per round, lr ∈ {{{lrs}}}; prior l2 = {L2:g}; 95% "
            "intervals = mean ± 1.96·sd/√n"
        )
        print(
            "schedules: "
            + "; ".join(
                f"{n}: {k['rounds']} round(s)"
                for n, k in schedules(cfg["budget"], ITERATIONS, ONLINE_LRS).items()
            )
        )
        worst = _labeller_section(hidden, args.seed)
        limit = _limit_section(worlds, cfg["online_steps"], args.seed, cfg["budget"])
        results = {
            key: _world_section(world, cfg["budget"], cfg["seeds"], args.seed)
            for key, world in worlds.items()
        }
        sweep = _sweep_section(hidden, cfg["budget"], cfg["seeds"], args.seed)
        _section("figures")
        _kl_figure(results, worlds, f"ch12_kl_to_optimum{quick}")
        _frontier_figure(results, f"ch12_frontier{quick}")
        miniature = None if args.no_miniature else _miniature_section(args)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    return {
        "labeller_worst_z": worst,
        "limit": limit,
        "worlds": results,
        "sweep": sweep,
        "miniature": miniature,
    }


if __name__ == "__main__":
    run(main)
