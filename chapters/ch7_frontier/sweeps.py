"""Independent runs from π_ref on the frontier task, side by side: chapter 7's method sweeps and
chapter 10's variants.

A `Sweep` is one run (DPO at one β, PPO at one β, a chapter-10 variant, ...); each trains a copy of
π_ref with its own seed, so the runs are independent. `SweepPool(shared, workers)` trains them on
`workers` forked processes (one torch thread each, as a serial run under
`chapters.common.one_thread`) and evaluates every checkpoint exactly by enumeration; results come
back in the order the sweeps were given, the same numbers bit for bit whatever the worker count.
What must stay in one order is a generator shared across runs: chapter 7's sampled KL estimates draw
from one, so `sampled_rows` runs them in the calling process, checkpoint after checkpoint, in the
order of a serial run.
"""

import copy
import multiprocessing
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from chapters.ch2_reward_model.reward_head import RewardModel
from chapters.ch7_frontier.rlhf import ppo_checkpoints
from chapters.ch7_frontier.task import (
    enumerate_logprobs,
    exact_reward_and_kl,
    sampled_kl,
    true_reward_fn,
)
from chapters.training import finetune


@dataclass
class Sweep:
    """One run from π_ref: offline when `loss_fn(policy, batch)` is given (cfg's steps, batch_size,
    lr, checkpoints), else PPO with KL coefficient `beta` (cfg's ppo_checkpoints) against the reward
    model with weights `rm_state` (`reward_model_state(rm)`; r* when None). `keep_logp`: keep the
    last checkpoint's log π."""

    method: str
    setting: str
    seed: int
    loss_fn: object = None
    beta: float = None
    rm_state: dict = None
    keep_logp: bool = False


class Checkpoint(NamedTuple):
    """One checkpoint of a sweep: its step, weights (numpy arrays), log π (P, Y) when kept, exact
    E[r*] and KL."""

    step: int
    state: dict
    logp: np.ndarray | None
    reward: float
    kl: float


_SHARED = {}  # a worker's copy of the task: cfg, ref, data, prompts, logp_ref, rewards


def _to_numpy(state: dict) -> dict:
    """Tensors as numpy arrays, which go between processes as plain bytes (torch's tensor pickling
    would hold a shared-memory file descriptor per tensor, thousands of them over a sweep)."""
    return {k: v.numpy() for k, v in state.items()}


def _to_torch(state: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in state.items()}


def _share(shared: dict, threads: int = None):
    _SHARED.clear()
    _SHARED.update(shared)
    if threads is not None:
        torch.set_num_threads(threads)


def train_and_enumerate(sweep: Sweep) -> list:
    """Train one sweep; at each checkpoint, the exact E[r*] and KL by enumeration. Returns
    [Checkpoint]."""
    s = _SHARED
    cfg, ref, out = s["cfg"], s["ref"], []

    def exact(step, policy, last):
        logp = enumerate_logprobs(policy, s["prompts"])
        reward, kl = exact_reward_and_kl(logp, s["logp_ref"], s["rewards"])
        out.append(
            Checkpoint(
                step,
                _to_numpy(copy.deepcopy(policy.state_dict())),
                logp.numpy() if sweep.keep_logp and last else None,
                reward,
                kl,
            )
        )

    if sweep.loss_fn is not None:
        policy = copy.deepcopy(ref).requires_grad_(True)
        _, saved = finetune(
            policy,
            sweep.loss_fn,
            s["data"],
            cfg["steps"],
            cfg["batch_size"],
            cfg["lr"],
            torch.Generator().manual_seed(sweep.seed),
            checkpoints=cfg["checkpoints"],
            progress=False,
        )
        for i, (step, state) in enumerate(saved):
            policy.load_state_dict(state)
            exact(step, policy, i == len(saved) - 1)
        return out
    reward_fn = true_reward_fn
    if sweep.rm_state is not None:
        rm = RewardModel(copy.deepcopy(ref))
        rm.load_state_dict(_to_torch(sweep.rm_state))
        rm.eval().requires_grad_(False)
        reward_fn = lambda ids, mask, response_mask: rm(ids, mask)  # noqa: E731
    for step, policy in ppo_checkpoints(
        ref,
        reward_fn,
        s["prompts"],
        sweep.beta,
        cfg["ppo_checkpoints"],
        sweep.seed,
        f"{sweep.method} {sweep.setting}",
        progress=False,
    ):
        exact(step, policy, step == max(cfg["ppo_checkpoints"]))
    return out


def sampled_rows(
    sweep: Sweep, results: list, ref, prompts, per_prompt: int, generator: torch.Generator
) -> list:
    """Chapter 7's table rows of one sweep: each checkpoint's exact E[r*] and KL beside the sampled
    KL estimates (`sampled_kl`), drawn from `generator` here, in the calling process, checkpoint
    after checkpoint."""
    policy, rows = copy.deepcopy(ref), []
    for c in results:
        policy.load_state_dict(_to_torch(c.state))
        tok, tok_se, ratio, ratio_se = sampled_kl(policy, ref, prompts, per_prompt, generator)
        rows.append(dict(
            method=sweep.method, setting=sweep.setting, step=c.step, reward=c.reward, kl=c.kl,
            kl_per_token=tok, kl_per_token_se=tok_se, kl_log_ratio=ratio, kl_log_ratio_se=ratio_se,
        ))
    return rows


def reward_model_state(rm: RewardModel) -> dict:
    """A reward model's weights in the form a `Sweep` carries them."""
    return _to_numpy(rm.state_dict())


class SweepPool:
    """`workers` forked processes that train sweeps, each on as many torch threads as the caller has
    (one under `chapters.common.one_thread`); workers = 1 trains them in this process, lazily, as
    they are asked for.

        # shared: cfg, ref, data, prompts, logp_ref, rewards
        with SweepPool(shared, workers=2) as pool:
            results = pool.run(sweeps)  # train_and_enumerate(sweep) of each, in the order given
    """

    def __init__(self, shared: dict, workers: int):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.pool = None
        if workers > 1:
            self.pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_share, initargs=(shared, torch.get_num_threads())
            )
        else:
            _share(shared)

    def run(self, sweeps):
        """Start the sweeps (all at once on the pool); iterate over their results in the order
        given.
        """
        sweeps = list(sweeps)
        return (
            self.pool.imap(train_and_enumerate, sweeps)
            if self.pool
            else map(train_and_enumerate, sweeps)
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()
        _SHARED.clear()
