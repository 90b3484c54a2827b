"""Training loops of chapter 8's SFT → DPO pipeline, and DPO's metrics over a whole split.

- `sft_loss`, `train_sft`: SFT on (prompt, chosen + EOS); only response tokens are targets.
- `dpo_step`, `dpo_evaluate`, `train_dpo`: eq. (38) from π_θ = π_SFT with π_ref = π_SFT frozen,
  through the fast step of `chapters.ch8_instruction_dpo.dpo_step` (the reference's log-probs and
  hidden states cached once, pairs packed one a row).
Batches are grouped by length and seeded (`preference_data.length_grouped_batches`); the optimiser
is AdamW with gradients clipped at norm 1. Both loops run through
`chapters.training.loop.train_epochs`, so a `scale`
(`chapters.ch8_instruction_dpo.scaled_run.Scale`) adds torchrun's processes, micro-batches, a
schedule, checkpoints, --resume and the saved models; without one they run as one process and save
nothing. The loops return plain dict rows (one per epoch or step) for tables and figures.
"""

import copy

import numpy as np
import torch

import gpt
from chapters.ch8_instruction_dpo.data import length_grouped_batches
from chapters.ch8_instruction_dpo.dpo_step import (
    autocast,
    dpo_batches,
    evaluation_batches,
    fast_dpo_loss,
    sequence_logprobs,
)
from chapters.ch8_instruction_dpo.reference_store import pairs_sha256
from chapters.ch8_instruction_dpo.scaled_run import Scale
from chapters.common.rows import packed_pairs_batch, rows_batch
from chapters.training.checkpoints import StopRequest, full_state, lr_schedule, tensors_sha256
from chapters.training.distributed import Dist, call, in_batch_order, rank_share, unwrapped, wrap
from chapters.training.loop import Run, train_epochs

# chapters.ch4_dpo.dpo_metrics' keys, and the mean token-level KL(π‖π_ref) over response tokens
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "kl",
)


def _fingerprint(scale: Scale, phase: str, start_model, train, **fields) -> dict:
    """What a checkpoint or saved model of this phase must match to be taken up by --resume (nothing
    to hash when the run saves nothing)."""
    if scale.folder is None:
        return {}
    return {
        **scale.fingerprint,
        "phase": phase,
        **fields,
        "pairs_sha256": pairs_sha256(train),
        "start_sha256": tensors_sha256(start_model.state_dict()),
    }


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _run(
    scale: Scale,
    phase: str,
    model,
    fingerprint: dict,
    *,
    lr: float,
    weight_decay: float,
    device,
    epochs: int,
    batches,
):
    """What both loops set up: the engine (DDP/FSDP2 or the plain model), AdamW, the schedule over
    epochs × batches an epoch, and the phase's Run."""
    engine = wrap(model, scale.dist, fsdp=scale.fsdp)
    fused = (
        not scale.fsdp or torch.device(device).type == "cuda"
    )  # FSDP2 on the CPU: AdamW's default kernels
    opt = torch.optim.AdamW(
        unwrapped(engine).parameters(), lr=lr, weight_decay=weight_decay, fused=fused
    )
    schedule = lr_schedule(opt, scale.warmup_steps, epochs * len(batches(1)), scale.lr_schedule)
    run = Run(
        checkpoint=scale.checkpoint(phase),
        fingerprint=fingerprint,
        resume=scale.resume,
        every=scale.save_every,
    )
    return engine, opt, schedule, run


def _finish(scale: Scale, phase: str, engine, model, history, fingerprint):
    """Save the phase's model (rank 0) and return a plain module holding its weights on every rank
    (under FSDP2 the trained one is sharded: its weights come back from the saved folder)."""
    if scale.folder is None and not scale.fsdp:
        return model
    state, _ = full_state(unwrapped(engine))  # every rank: FSDP2 gathers the shards
    scale.save_phase(phase, state, model.config, history, fingerprint)
    if scale.fsdp:
        return gpt.load_gpt2(scale.model_folder(phase)).to(scale.dist.device)
    return model


# ---------------------------------------------------------------- SFT


def sft_loss(model, batch):
    """Report §6.2, SFT: −(1/N) Σ log π(y_t | x, y_<t) over the N response tokens (EOS included);
    prompt and padding are not targets."""
    sums, _ = sequence_logprobs(model, batch)  # (R,) per-row sums over response tokens only
    return -sums.sum() / batch.targets.numel()


def sft_batch(pairs, idx, pad_id: int, device):
    """Rows prompt + chosen of pairs[idx] as a TokenBatch on `device`."""
    return rows_batch([pairs[i].prompt for i in idx], [pairs[i].chosen for i in idx], pad_id).to(
        device
    )


def sft_evaluate(
    model, pairs, *, batch_size: int, device, pad_id: int, loss_fn=sft_loss, dist: Dist = None
) -> float:
    """Mean over length-sorted batches of `loss_fn` on (prompt, chosen) of `pairs`, without
    gradients; under
    torchrun each rank takes every N-th batch and the losses are gathered."""
    d = dist or Dist()
    model.eval()
    batches = length_grouped_batches(
        [len(p.prompt) + len(p.chosen) for p in pairs], batch_size, 0, shuffle=False
    )
    with torch.no_grad(), autocast(device):
        mine = [
            (call(model, loss_fn, sft_batch(pairs, idx, pad_id, device)).item(), kept)
            for idx, kept in rank_share(batches, d)
        ]
    mine = [loss for loss, kept in mine if kept]
    return float(np.mean(in_batch_order(d.gather(mine))))


def train_sft(
    model,
    train,
    val,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device,
    pad_id: int,
    loss_fn=sft_loss,
    label: str = "SFT",
    scale: Scale = None,
    weight=None,
    lr_flag: str = "--sft-lr",
) -> list:
    """Fine-tune `model` in place on (prompt, chosen); returns rows {epoch, train_loss,
    validation_loss}.

    `label` names the phase in progress bars, printed lines and saved files. `weight(idx)`: what
    `loss_fn` averages over in pairs idx, for micro-batches (default: response tokens, as
    `sft_loss`). `lr_flag`: the flag a divergence asks to lower.
    """
    scale, phase = scale or Scale(), label.lower().replace(" ", "_")
    fingerprint = _fingerprint(
        scale, phase, model, train, lr=lr, epochs=epochs, seed=seed, loss=_name(loss_fn)
    )
    done = scale.finished(phase, fingerprint)
    if done is not None:
        model.load_state_dict(gpt.load_gpt2(scale.model_folder(phase)).state_dict())
        print(f"{label}: finished by an earlier run; weights from {scale.model_folder(phase)}/")
        return done
    lengths = [len(p.prompt) + len(p.chosen) for p in train]

    def batches(epoch):
        return length_grouped_batches(lengths, batch_size, seed + epoch)

    trained = copy.deepcopy(model) if scale.fsdp else model  # FSDP2 shards what it trains
    engine, opt, schedule, run = _run(
        scale,
        phase,
        trained,
        fingerprint,
        lr=lr,
        weight_decay=0.1,
        device=device,
        epochs=epochs,
        batches=batches,
    )

    def step(m, idx):
        with autocast(device):
            loss = loss_fn(m, sft_batch(train, idx, pad_id, device))
        return loss, {"loss": loss.item()}

    def on_step(history, epoch, metrics):
        history["losses"].append(metrics["loss"])

    def on_epoch(history, epoch):
        val_loss = sft_evaluate(
            unwrapped(engine),
            val,
            batch_size=batch_size,
            device=device,
            pad_id=pad_id,
            loss_fn=loss_fn,
            dist=scale.dist,
        )
        history["rows"].append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(history["losses"])),
                "validation_loss": val_loss,
            }
        )
        history["losses"] = []
        print(
            f"{label} epoch {epoch}: train loss {history['rows'][-1]['train_loss']:.4f}, "
            f"validation loss {val_loss:.4f}"
        )

    with StopRequest() as stop:
        history = train_epochs(
            engine,
            opt,
            schedule,
            loss_fn=step,
            batches=batches,
            epochs=epochs,
            dist=scale.dist,
            weight=weight or (lambda idx: sum(len(train[i].chosen) for i in idx)),
            run=run,
            history={"rows": [], "losses": []},
            on_step=on_step,
            on_epoch=on_epoch,
            grad_accum=scale.grad_accum,
            stop=stop,
            desc=label,
            lr_flag=lr_flag,
        )
    trained = _finish(scale, phase, engine, trained, history["rows"], run.fingerprint)
    if trained is not model:
        model.load_state_dict(trained.state_dict())
    return history["rows"]


# ---------------------------------------------------------------- DPO


def dpo_step(policy, pairs, idx, cache, beta: float, device, pad_id: int):
    """Report eq. (38) on pairs[idx], packed, against the cached reference: (mean loss, `METRICS` of
    the batch)."""
    batch = packed_pairs_batch([pairs[i] for i in idx], pad_id).to(device)
    ref_chosen, ref_rejected, ref_hidden = cache.get(idx)
    return fast_dpo_loss(
        policy, batch, ref_chosen, ref_rejected, beta, ref_hidden, cache.head_weight
    )


def dpo_evaluate(
    policy,
    pairs,
    cache,
    beta: float,
    *,
    batch_size: int,
    device,
    pad_id: int,
    step=dpo_step,
    dist: Dist = None,
) -> dict:
    """`METRICS` of `policy` over all of `pairs` (no gradients), averaged per pair; under torchrun
    each rank takes every N-th batch and the sums run over the gathered batches in their order."""
    d = dist or Dist()
    policy.eval()
    batches = evaluation_batches(
        pairs, batch_size
    )  # a default-built cache's order: epoch 0 is exact too
    with torch.no_grad():
        mine = [
            (len(idx), call(policy, step, pairs, idx, cache, beta, device, pad_id)[1], kept)
            for idx, kept in rank_share(batches, d)
        ]
    mine = [(size, m) for size, m, kept in mine if kept]
    totals, n = dict.fromkeys(METRICS, 0.0), 0
    for size, m in in_batch_order(d.gather(mine)):
        for k in METRICS:
            totals[k] += m[k] * size
        n += size
    return {k: v / n for k, v in totals.items()}


def train_dpo(
    sft_model,
    train,
    val,
    caches,
    beta: float,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device,
    pad_id: int,
    step=dpo_step,
    scale: Scale = None,
    lr_flag: str = "--dpo-lr",
):
    """Report eq. (38) minimised from π_θ = π_SFT with π_ref = π_SFT frozen (`caches` "train" and
    "validation" hold it); returns the policy, one row per step and rows per epoch (epoch 0:
    validation before training).

    A train cache built in `first_epoch_batches(train, batch_size, seed)`
    (`Scale.reference_caches(..., seed=)`) makes the first step exact when the policy starts at the
    reference: loss ln 2, every margin 0. `lr_flag`: the flag a divergence asks to lower.
    """
    scale, phase = scale or Scale(), f"dpo_beta_{beta:g}"
    fingerprint = _fingerprint(
        scale, phase, sft_model, train, beta=beta, lr=lr, epochs=epochs, seed=seed, step=_name(step)
    )
    done = scale.finished(phase, fingerprint)
    if done is not None:
        print(f"DPO β={beta}: finished by an earlier run; policy from {scale.model_folder(phase)}/")
        return gpt.load_gpt2(scale.model_folder(phase)).to(device), done["steps"], done["epochs"]
    policy = copy.deepcopy(sft_model).requires_grad_(
        True
    )  # every β starts from the same SFT weights
    batches = dpo_batches(
        train, batch_size, seed
    )  # the train cache's order too (`first_epoch_batches`)
    engine, opt, schedule, run = _run(
        scale,
        phase,
        policy,
        fingerprint,
        lr=lr,
        weight_decay=0.0,
        device=device,
        epochs=epochs,
        batches=batches,
    )
    settings = dict(batch_size=batch_size, device=device, pad_id=pad_id, step=step, dist=scale.dist)
    objective = unwrapped(engine)

    def on_begin(history):
        history["epochs"].append(
            {
                "beta": beta,
                "epoch": 0,
                "split": "validation",
                **dpo_evaluate(objective, val, caches["validation"], beta, **settings),
            }
        )

    def on_step(history, epoch, metrics):
        history["steps"].append(
            {"beta": beta, "epoch": epoch, "step": len(history["steps"]) + 1, **metrics}
        )

    def on_epoch(history, epoch):
        t = {
            "beta": beta,
            "epoch": epoch,
            "split": "train",
            **{
                k: float(np.mean([s[k] for s in history["steps"] if s["epoch"] == epoch]))
                for k in METRICS
            },
        }
        v = {
            "beta": beta,
            "epoch": epoch,
            "split": "validation",
            **dpo_evaluate(objective, val, caches["validation"], beta, **settings),
        }
        history["epochs"] += [t, v]
        print(
            f"DPO β={beta} epoch {epoch}: train loss {t['loss']:.4f} acc "
            f"{t['rewards/accuracies']:.3f} "
            f"KL {t['kl']:.4f} | validation loss {v['loss']:.4f} acc {v['rewards/accuracies']:.3f} "
            f"margin {v['rewards/margins']:.3f} KL {v['kl']:.4f}"
        )

    def loss_fn(model, idx):
        loss, metrics = step(model, train, idx, caches["train"], beta, device, pad_id)
        if (
            "kl" in metrics
        ):  # a mean over response tokens: micro-batches weigh in by their tokens, not their pairs
            metrics["kl"] = (
                metrics["kl"],
                sum(len(train[i].chosen) + len(train[i].rejected) for i in idx),
            )
        return loss, metrics

    with StopRequest() as stop:
        history = train_epochs(
            engine,
            opt,
            schedule,
            loss_fn=loss_fn,
            batches=batches,
            weight=len,
            epochs=epochs,
            dist=scale.dist,
            run=run,
            history={"steps": [], "epochs": []},
            on_begin=on_begin,
            on_step=on_step,
            on_epoch=on_epoch,
            grad_accum=scale.grad_accum,
            stop=stop,
            desc=f"DPO β={beta}",
            lr_flag=lr_flag,
        )
    policy = _finish(scale, phase, engine, policy, history, run.fingerprint)
    policy.eval()
    return policy, history["steps"], history["epochs"]
