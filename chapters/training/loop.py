"""The one training loop under chapter 8's SFT and DPO: global batches, each rank's share,
micro-batches, resume.

    history = train_epochs(engine, optimizer, schedule, batches=..., weight=..., epochs=3, dist=d,
                           run=Run(checkpoint=out / "sft.pt", fingerprint=settings,
                           resume=args.resume), ...)

Each epoch's global batches are the same on every rank (`batches(epoch)`, seeded). For each, rank r
runs its share (`chapters.distributed.shard`) in `grad_accum` micro-batches, backward on each
micro-batch's mean loss times its `loss_scale`, gradients exchanged after the last; then the
gradient norm is clipped at 1, AdamW steps, the schedule steps. The step's metrics are weighted
means over the whole global batch. A stop request (Ctrl-C, SIGTERM), the end of each epoch, and
every `Run.every` steps write a checkpoint (`chapters.training.checkpoints`); `Run.resume` continues
one with the same loss sequence as a run never stopped, or with another learning rate.

A step whose loss or gradient norm is not finite stops the run before its update (`Diverged`, one
line: the phase, the step, the value, the learning rate to lower), and nothing is written after it.
The weights that gave it came from the update before, so a checkpoint due after an update (every
`Run.every` steps, at an epoch's end) is written only once the next step's loss and gradient norm
are finite: the newest checkpoint is always one that --resume at a lower learning rate can go on
from. (A stop's checkpoint and the last epoch's are written at once: no step follows.)
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from chapters.training.checkpoints import (
    full_state,
    load_full_state,
    load_training_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from chapters.training.distributed import (
    Dist,
    gradient_sync,
    loss_scale,
    micro_batches,
    shard,
    unwrapped,
)


@dataclass
class Run:
    """Where a loop's checkpoint goes (None: nowhere), what a resumed one must match, and how to say
    resume."""

    checkpoint: Path = None
    fingerprint: dict = None
    resume: bool = False
    # also a checkpoint after every this many steps (0: only at stops and epoch ends), written once
    # the next step's loss and gradient norm are finite
    every: int = 0
    hint: str = "run the same command again with --resume"


class Diverged(ValueError):
    """A training step's loss or gradient norm is not finite (a learning rate too high, most
    often). Raised before the step's update: the model and the last checkpoint are left as the last
    finite step made them. `gpt.cli.run` prints it as one line `error: ...`."""


def gradient_norm(params) -> torch.Tensor:
    """The 2-norm of every gradient of `params` together (those without a gradient left out); the
    gradients are left as they are."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def check_finite(phase: str, where: str, loss: float, grad_norm: float, lower: str, then: str = ""):
    """Raise `Diverged` unless both `loss` and `grad_norm` are finite: one line naming the phase,
    the step (`where`), the values, what to lower and (`then`) how to go on."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    raise Diverged(
        f"{phase} diverged at {where}: loss {loss:.4g}, gradient norm {grad_norm:.4g}; stopped "
        f"before the update, nothing saved after it; lower {lower}{then}"
    )


def _base_lrs(optimizer) -> list:
    """Each parameter group's learning rate before any schedule factor."""
    return [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]


def _set_base_lrs(optimizer, schedule, lrs: list):
    """Give a resumed optimizer (and its schedule) this run's learning rates, at the schedule's
    current factor."""
    if schedule is not None:
        schedule.base_lrs = list(lrs)
    for i, (group, lr) in enumerate(zip(optimizer.param_groups, lrs)):
        if schedule is not None:
            group["initial_lr"] = lr
            group["lr"] = lr * schedule.lr_lambdas[i](schedule.last_epoch)
        else:
            group["lr"] = lr
    if schedule is not None:
        schedule._last_lr = [g["lr"] for g in optimizer.param_groups]


def _step(engine, loss_fn, idx, weight, d: Dist, grad_accum: int) -> dict:
    """Forward and backward of global batch `idx`: this rank's share in micro-batches. Returns each
    metric's mean over the whole batch: Σ w·m / Σ w over the micro-batches of every rank, w =
    weight(micro-batch), or the weight a metric brings along as (value, weight) (a mean over tokens,
    say)."""
    total = weight(idx)
    parts = micro_batches(shard(idx, d.rank, d.world), grad_accum)
    sums, keys = {}, None
    for k, part in enumerate(parts):
        # a rank left without pairs (a batch smaller than N·K) still runs one pair at weight 0: DDP
        # and FSDP need every rank in every exchange, and 0 · gradient adds nothing
        use, w = (part, weight(part)) if part else (list(idx[:1]), 0.0)
        with gradient_sync(engine, last=k == len(parts) - 1):
            loss, metrics = engine(loss_fn, use)
            (loss * loss_scale(w, total, d.world)).backward()
        keys = keys or list(metrics)  # the step's own order (the same on every rank)
        for key in keys:
            value, w_key = metrics[key] if isinstance(metrics[key], tuple) else (metrics[key], w)
            w_key = w_key if part else 0.0
            sums[key] = [a + b for a, b in zip(sums.get(key, (0.0, 0.0)), (w_key * value, w_key))]
    reduced = d.sum([x for key in keys for x in sums[key]])
    return {key: reduced[2 * i] / reduced[2 * i + 1] for i, key in enumerate(keys)}


def train_epochs(
    engine,
    optimizer,
    schedule,
    *,
    loss_fn,
    batches,
    weight,
    epochs: int,
    dist: Dist,
    run: Run = None,
    history=None,
    on_begin=None,
    on_step=None,
    on_epoch=None,
    grad_accum: int = 1,
    stop=None,
    clip: float = 1.0,
    desc: str = "train",
    progress: bool = True,
    lr_flag: str = None,
):
    """Train the model in `engine` (`chapters.distributed.wrap`'s module) on loss_fn(model, idx) ->
    (mean loss of pairs idx, metrics), for `epochs`.

    batches(epoch) -> the global batches (lists of indices) of that epoch, 1-based; weight(idx) ->
    what the mean loss of idx averages over (pairs, tokens). Callbacks fill `history` (rows,
    JSON-like): on_begin(history) before the first step of a fresh run, on_step(history, epoch,
    metrics) after each step, on_epoch(history, epoch) after each epoch (on every rank: evaluations
    are sharded). `clip` None: no gradient clipping. Returns `history`, restored first when
    resuming.

    A non-finite loss or gradient norm raises `Diverged` before that step's update, naming `desc`
    and `lr_flag` (the command-line flag of the learning rate, e.g. "--dpo-lr"). A resumed run may
    have another learning rate than the checkpoint's (the fingerprint's "lr" may differ): lower it
    after a divergence and resume from the last finite checkpoint.
    """
    run = run or Run()
    objective = unwrapped(engine)
    params = [p for p in objective.parameters() if p.requires_grad]
    epoch, start = 1, 0
    if run.resume and run.checkpoint is not None and Path(run.checkpoint).is_file():
        state = load_training_checkpoint(run.checkpoint, run.fingerprint, may_differ=("lr",))
        lrs = _base_lrs(optimizer)  # this run's, before the checkpoint's replace them
        load_full_state(objective, optimizer, state["model"], state["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(state["schedule"])
        saved_lrs = _base_lrs(optimizer)
        if saved_lrs != lrs:
            _set_base_lrs(optimizer, schedule, lrs)
        set_rng_state(state["rng"][dist.rank % len(state["rng"])])
        epoch, start, history = (
            state["position"]["epoch"],
            state["position"]["batch"],
            state["history"],
        )
        if dist.main:
            print(
                f"{desc}: resumed from {run.checkpoint} at epoch {epoch}, batch {start + 1}"
                + (
                    f", learning rate {lrs[0]:g} (the checkpoint's: {saved_lrs[0]:g})"
                    if saved_lrs != lrs
                    else ""
                )
            )
    elif on_begin is not None:
        on_begin(history)

    def save(position, rngs=None):
        """Write the checkpoint of `position`; `rngs`: every rank's RNG states when it became due
        (default: now)."""
        if run.checkpoint is None:
            return
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # FSDP2: a shard
        if dist.any(not all(bool(torch.isfinite(p).all()) for p in local)):
            # finite steps can still carry a weight past float's range: keep the last checkpoint
            what, then = lower()
            raise Diverged(
                f"{desc} diverged: a weight is not finite after step {steps_done} of this run; "
                f"checkpoint not written; lower {what}{then}"
            )
        model_state, optim_state = full_state(
            objective, optimizer
        )  # every rank: FSDP gathers the shards
        rngs = rngs or dist.gather(rng_state())
        if dist.main:
            save_checkpoint(
                run.checkpoint,
                fingerprint=run.fingerprint,
                model_state=model_state,
                optim_state=optim_state,
                schedule=schedule,
                position=position,
                history=history,
                rng=rngs,
            )
        dist.barrier()

    def lower():
        """What to lower and how to go on, for `Diverged`'s line."""
        newest = run.checkpoint is not None and Path(run.checkpoint).is_file()
        then = (
            f" and {run.hint}: it continues from {run.checkpoint}" if newest else " and run again"
        )
        return f"{lr_flag or 'the learning rate'} (now {_base_lrs(optimizer)[0]:g})", then

    def due(position):
        """A checkpoint of the state now, written once the next step has checked its weights (the
        weights, the optimizer and the history stay as they are until then; the RNG states are
        taken now)."""
        return (position, dist.gather(rng_state())) if run.checkpoint is not None else None

    steps_done, pending = 0, None
    for epoch in range(epoch, epochs + 1):
        objective.train()
        epoch_batches = batches(epoch)
        bar = tqdm(
            range(start, len(epoch_batches)),
            desc=f"{desc} epoch {epoch}/{epochs}",
            leave=False,
            disable=not (dist.main and progress),
            initial=start,
            total=len(epoch_batches),
        )
        for b in bar:
            metrics = _step(engine, loss_fn, epoch_batches[b], weight, dist, grad_accum)
            norm = (
                torch.nn.utils.clip_grad_norm_(params, clip)
                if clip is not None
                else gradient_norm(params)
            )
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2
            loss = metrics.get("loss", 0.0)  # the mean over the global batch, every rank's
            if not (math.isfinite(loss) and math.isfinite(norm)):
                bar.close()
                where = f"batch {b + 1} of {len(epoch_batches)} in epoch {epoch}"
                check_finite(desc, where, loss, norm, *lower())
            if pending is not None:  # its weights gave a finite loss and gradient norm: write it
                save(*pending)
                pending = None
            optimizer.step()
            if schedule is not None:
                schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(history, epoch, metrics)
            steps_done += 1
            if stop is not None and dist.any(stop.requested):
                save({"epoch": epoch, "batch": b + 1})
                where = f"after batch {b + 1} of {len(epoch_batches)} in epoch {epoch}"
                if not dist.main:
                    raise SystemExit(130)  # rank 0 says it, once
                raise KeyboardInterrupt(
                    f"{stop.signal or 'stop'} {where} of {desc}: checkpoint {run.checkpoint}; "
                    f"{run.hint}"
                    if run.checkpoint
                    else f"{stop.signal} {where} of {desc}"
                )
            if run.every and steps_done % run.every == 0 and b + 1 < len(epoch_batches):
                pending = due({"epoch": epoch, "batch": b + 1})
        start = 0
        if on_epoch is not None:
            on_epoch(history, epoch)
        if epoch < epochs:
            pending = due({"epoch": epoch + 1, "batch": 0})
        else:
            save({"epoch": epoch + 1, "batch": 0})
    objective.eval()
    return history
