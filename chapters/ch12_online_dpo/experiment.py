"""Offline vs iterative vs online DPO at one labelling budget, over seeds, on the exact worlds.

Every schedule labels `budget` pairs (2·budget policy samples); they differ in how many times the
labeller is called back (1, `iterations` or `budget` rounds) and in which policy samples the pairs.
Per round: the mean over seeds of each metric of `worlds.policy_metrics`, with a 95% normal
interval mean ± 1.96·sd/√n, and the fraction of runs whose data so far leave the unregularised DPO
minimiser at infinity (`rounds.minimiser_at_infinity`), where the prior's l2 decides the answer.
"""

import math
import time

import torch

from chapters.ch12_online_dpo.rounds import DT, minimiser_at_infinity, run_rounds
from chapters.ch12_online_dpo.worlds import WORLDS, World, frontier, policy_metrics


def schedules(budget: int, iterations: int = 4, online_lrs=(0.5, 2.0)) -> dict:
    """The ways to spend `budget` pairs, by name, as keyword arguments of `preference_rounds`.

    "offline": one round from π_ref, DPO to convergence. "iterative": `iterations` rounds sampled
    from the current policy, DPO to convergence on all pairs so far. "online lr=η" for each η:
    `budget` rounds of one fresh pair, one gradient step of size η on it alone (Guo et al. 2024 at
    batch size 1; a constant step trades exploration against noise, hence more than one η).
    """
    out = {"offline": {"rounds": 1}, "iterative": {"rounds": iterations}}
    for lr in online_lrs:
        out[f"online lr={lr:g}"] = {
            "rounds": budget,
            "steps_per_round": 1,
            "keep_pairs": False,
            "lr": lr,
        }
    return out


def mean_interval(values: torch.Tensor) -> dict:
    """Mean over axis 0 (seeds) with the 95% interval mean ± 1.96·sd/√n, as lists of floats."""
    mean = values.mean(0)
    n = values.shape[0]
    half = 1.96 * values.std(0) / math.sqrt(n) if n > 1 else torch.zeros_like(mean)
    return {"mean": mean.tolist(), "low": (mean - half).tolist(), "high": (mean + half).tolist()}


def compare_schedules(
    world: World,
    budget: int = 256,
    seeds: int = 10,
    iterations: int = 4,
    online_lrs=(0.5, 2.0),
    l2: float = 1e-3,
    betas: torch.Tensor = None,
    first_seed: int = 0,
) -> dict:
    """Each schedule of `schedules` on `world` for seeds first_seed … first_seed + seeds − 1:
    per-round means, intervals.

    Returns {"world", "budget", "seeds", "l2", "optimum" and "reference" (policy_metrics of π*
    and π_ref), "frontier" (`worlds.frontier` over betas, default 61 values from 10^-1.5 to
    10^1.5), "schedules": {name: {"rounds", "pairs" (labelled so far, per round), "labeller_calls",
    "metrics": {metric: {"mean", "low", "high"}, per round}, "at_infinity" (fraction of runs, per
    round)}}, "seconds"}.
    """
    start = time.perf_counter()
    betas = torch.logspace(-1.5, 1.5, 61, dtype=DT) if betas is None else betas
    out = {
        "world": world.name,
        "budget": budget,
        "seeds": seeds,
        "l2": l2,
        "optimum": policy_metrics(world.optimum, world),
        "reference": policy_metrics(world.pi_ref, world),
        "frontier": {k: v.tolist() for k, v in frontier(world, betas).items()},
        "schedules": {},
    }
    for name, kwargs in schedules(budget, iterations, online_lrs).items():
        runs, infinite = [], []
        for seed in range(first_seed, first_seed + seeds):
            policies, data = run_rounds(
                world.pi_ref, world.rewards, world.beta, budget, seed=seed, l2=l2, **kwargs
            )
            runs.append([policy_metrics(pi, world) for pi in policies])
            infinite.append([float(minimiser_at_infinity(counts)) for counts in data])
        rounds = kwargs["rounds"]
        sizes = torch.tensor([budget // rounds + (k < budget % rounds) for k in range(rounds)])
        metrics = {
            m: mean_interval(torch.tensor([[r[m] for r in run] for run in runs], dtype=DT))
            for m in runs[0][0]
        }  # each (seeds, rounds) -> per-round lists
        out["schedules"][name] = {
            "rounds": rounds,
            "pairs": sizes.cumsum(0).tolist(),
            "labeller_calls": rounds,
            "metrics": metrics,
            "at_infinity": torch.tensor(infinite, dtype=DT).mean(0).tolist(),
        }
    out["seconds"] = time.perf_counter() - start
    return out


def run_experiment(
    budget: int = 256,
    seeds: int = 10,
    iterations: int = 4,
    online_lrs=(0.5, 2.0),
    l2: float = 1e-3,
    first_seed: int = 0,
) -> dict:
    """`compare_schedules` on every world of `worlds.WORLDS`: {world key: its result}."""
    return {
        key: compare_schedules(
            make(), budget, seeds, iterations, online_lrs, l2, first_seed=first_seed
        )
        for key, make in WORLDS.items()
    }


def regulariser_sweep(
    world: World,
    l2s=(1e-2, 1e-3, 1e-4, 1e-5),
    budget: int = 256,
    seeds: int = 10,
    iterations: int = 4,
    online_lrs=(),
    first_seed: int = 0,
) -> dict:
    """Offline and iterative DPO's (and online DPO's at each of `online_lrs`) final metrics per
    prior weight: {l2: {schedule: {metric: …}}}.

    Where the data leave the unregularised minimiser at infinity (a response seen only winning or
    only losing), l2 alone decides how far its logit goes; this shows how much the verdict rests
    on it. Each metric is {"mean", "low", "high"} after the last round.
    """
    out = {}
    for l2 in l2s:
        result = compare_schedules(
            world, budget, seeds, iterations, online_lrs=online_lrs, l2=l2, first_seed=first_seed
        )
        out[l2] = {
            name: {m: {k: v[-1] for k, v in iv.items()} for m, iv in s["metrics"].items()}
            for name, s in result["schedules"].items()
        }
    return out
