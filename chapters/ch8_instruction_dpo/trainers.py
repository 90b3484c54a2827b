"""Training loops of chapter 8's SFT → DPO pipeline, and DPO's metrics over a whole split.

- `sft_loss`, `train_sft`: SFT on (prompt, chosen + EOS); only response tokens are targets.
- `dpo_step`, `dpo_evaluate`, `train_dpo`: eq. (38) from π_θ = π_SFT with π_ref = π_SFT frozen,
  through the fast step of `chapters.ch8_instruction_dpo.dpo_step` (the reference's log-probs and
  hidden states cached once, pairs packed one a row).
Batches are grouped by length and seeded (`preference_data.length_grouped_batches`); the optimiser
is AdamW with gradients clipped at norm 1. Both loops run through `_train`, the set-up they share,
and `chapters.training.loop.train_epochs`, so a `scale`
(`chapters.ch8_instruction_dpo.scaled_run.Scale`) adds torchrun's processes, micro-batches, a
schedule, checkpoints, --resume and the saved models; without one they run as one process and save
nothing. The loops return plain dict rows (one per epoch or step) for tables and figures.
`train_dpo` is the DPO loop of every chapter: chapter 11 gives it its other losses (`step`), LoRA
policies trained in place (`in_place`) and readings along the way (`watch`).
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


def _train(scale, phase, engine, fingerprint, adamw: dict, *, device, **loop):
    """What both loops run on `engine` (`wrap`'s: DDP/FSDP2 or the plain model): AdamW with `adamw`
    (lr, weight_decay; fused None or left out: its fused kernels, but for FSDP2 on the CPU), the
    schedule over epochs × batches an epoch, and `chapters.training.loop.train_epochs` (`loop`:
    loss_fn, batches, weight, epochs, history, callbacks, desc, lr_flag, progress) with the phase's
    checkpoint, under a stop request (Ctrl-C, SIGTERM). Returns the history."""
    if adamw.get("fused") is None:  # FSDP2 on the CPU: AdamW's default kernels
        adamw = {**adamw, "fused": not scale.fsdp or torch.device(device).type == "cuda"}
    opt = torch.optim.AdamW(unwrapped(engine).parameters(), **adamw)
    total = loop["epochs"] * len(loop["batches"](1))
    schedule = lr_schedule(opt, scale.warmup_steps, total, scale.lr_schedule)
    run = Run(scale.checkpoint(phase), fingerprint, scale.resume, every=scale.save_every)
    with StopRequest() as stop:
        return train_epochs(
            engine,
            opt,
            schedule,
            dist=scale.dist,
            run=run,
            grad_accum=scale.grad_accum,
            stop=stop,
            **loop,
        )


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
    prompts, responses = [pairs[i].prompt for i in idx], [pairs[i].chosen for i in idx]
    return rows_batch(prompts, responses, pad_id).to(device)


def sft_evaluate(
    model, pairs, *, batch_size: int, device, pad_id: int, loss_fn=sft_loss, dist: Dist = None
) -> float:
    """Mean over length-sorted batches of `loss_fn` on (prompt, chosen) of `pairs`, without
    gradients; under torchrun each rank takes every N-th batch and the losses are gathered."""
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
    loss_fn=sft_loss,
    weight=None,
    batch_size: int,
    seed: int,
    device,
    pad_id: int,
    label: str = "SFT",
    scale: Scale = None,
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
    trained = copy.deepcopy(model) if scale.fsdp else model  # FSDP2 shards what it trains
    engine = wrap(trained, scale.dist, fsdp=scale.fsdp)

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
        train_loss = float(np.mean(history["losses"]))
        history["rows"].append(
            {"epoch": epoch, "train_loss": train_loss, "validation_loss": val_loss}
        )
        history["losses"] = []
        print(f"{label} epoch {epoch}: train loss {train_loss:.4f}, validation loss {val_loss:.4f}")

    history = _train(
        scale,
        phase,
        engine,
        fingerprint,
        dict(lr=lr, weight_decay=0.1),
        device=device,
        history={"rows": [], "losses": []},
        loss_fn=step,
        batches=lambda epoch: length_grouped_batches(lengths, batch_size, seed + epoch),
        weight=weight or (lambda idx: sum(len(train[i].chosen) for i in idx)),
        epochs=epochs,
        on_step=on_step,
        on_epoch=on_epoch,
        desc=label,
        lr_flag=lr_flag,
    )
    trained = _finish(scale, phase, engine, trained, history["rows"], fingerprint)
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
    dist=None,
) -> dict:
    """`METRICS` of `policy` over all of `pairs` (no gradients), averaged per pair; under torchrun
    each rank takes every N-th batch and the sums run over the gathered batches in their order."""
    d = dist or Dist()
    policy.eval()
    # a default-built cache's order: epoch 0 is exact too
    batches = evaluation_batches(pairs, batch_size)
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
    label: str = None,
    in_place: bool = False,
    watch=None,
    progress: bool = True,
    fused: bool = None,
):
    """Report eq. (38) minimised from π_θ = π_SFT with π_ref = π_SFT frozen (`caches` "train" and
    "validation" hold it); returns the policy, one row per step and rows per epoch (epoch 0:
    validation before training). The one DPO loop of the chapters: chapter 8's phase, chapter 11's
    other losses and its LoRA policies, chapter 12's offline arm.

    A train cache built in `first_epoch_batches(train, batch_size, seed)`
    (`Scale.reference_caches(..., seed=)`) makes the first step exact when the policy starts at the
    reference: loss ln 2, every margin 0. What a caller may change:

    - `step(policy, pairs, idx, cache, beta, device, pad_id)` -> (mean loss, metrics): the loss
      (default `dpo_step`, eq. (38)); the epoch rows average the `METRICS` its metrics hold;
    - `in_place`: train `sft_model` itself, on those of its parameters that need a gradient (a LoRA
      model: its adapters alone), instead of a copy with every parameter trained;
    - `val` None: no validation (`caches` needs only "train"), no printed lines, and one "train"
      row per epoch;
    - `watch(policy, steps)`: called before the first step (`steps` empty) and after each, with the
      step rows so far, for readings of the caller's own (not kept in checkpoints);
    - `label`: the run's name in progress bars and messages (default "DPO β=<beta>"); `lr_flag`: the
      flag a divergence asks to lower (None: "the learning rate"); `progress`: the progress bars;
      `fused` False: AdamW's per-parameter loop instead of its fused kernels (the same maths,
      rounded otherwise).
    """
    scale, phase, label = scale or Scale(), f"dpo_beta_{beta:g}", label or f"DPO β={beta}"
    fingerprint = _fingerprint(
        scale, phase, sft_model, train, beta=beta, lr=lr, epochs=epochs, seed=seed, step=_name(step)
    )
    done = scale.finished(phase, fingerprint)
    if done is not None:
        print(f"{label}: finished by an earlier run; policy from {scale.model_folder(phase)}/")
        return gpt.load_gpt2(scale.model_folder(phase)).to(device), done["steps"], done["epochs"]
    # a copy: every β starts from the same SFT weights
    policy = sft_model if in_place else copy.deepcopy(sft_model).requires_grad_(True)
    engine = wrap(policy, scale.dist, fsdp=scale.fsdp)
    settings = dict(batch_size=batch_size, device=device, pad_id=pad_id, step=step, dist=scale.dist)

    def validation(epoch):
        result = dpo_evaluate(unwrapped(engine), val, caches["validation"], beta, **settings)
        return {"beta": beta, "epoch": epoch, "split": "validation", **result}

    def on_begin(history):
        if val is not None:
            history["epochs"].append(validation(0))
        if watch is not None:
            watch(policy, history["steps"])

    def on_step(history, epoch, metrics):
        history["steps"].append(
            {"beta": beta, "epoch": epoch, "step": len(history["steps"]) + 1, **metrics}
        )
        if watch is not None:
            watch(policy, history["steps"])

    def on_epoch(history, epoch):
        rows = [s for s in history["steps"] if s["epoch"] == epoch]
        means = {k: float(np.mean([s[k] for s in rows])) for k in METRICS if k in rows[0]}
        t = {"beta": beta, "epoch": epoch, "split": "train", **means}
        history["epochs"].append(t)
        if val is None:
            return
        v = validation(epoch)
        history["epochs"].append(v)
        print(
            f"{label} epoch {epoch}: train loss {t['loss']:.4f} acc {t['rewards/accuracies']:.3f} "
            f"KL {t['kl']:.4f} | validation loss {v['loss']:.4f} acc {v['rewards/accuracies']:.3f} "
            f"margin {v['rewards/margins']:.3f} KL {v['kl']:.4f}"
        )

    def loss_fn(model, idx):
        loss, metrics = step(model, train, idx, caches["train"], beta, device, pad_id)
        if "kl" in metrics:
            # a mean over response tokens: micro-batches weigh in by their tokens, not their pairs
            tokens = sum(len(train[i].chosen) + len(train[i].rejected) for i in idx)
            metrics["kl"] = (metrics["kl"], tokens)
        return loss, metrics

    history = _train(
        scale,
        phase,
        engine,
        fingerprint,
        dict(lr=lr, weight_decay=0.0, fused=fused),
        device=device,
        history={"steps": [], "epochs": []},
        loss_fn=loss_fn,
        # the train cache's order too (`first_epoch_batches`)
        batches=dpo_batches(train, batch_size, seed),
        weight=len,
        epochs=epochs,
        on_begin=on_begin,
        on_step=on_step,
        on_epoch=on_epoch,
        desc=label,
        lr_flag=lr_flag,
        progress=progress,
    )
    policy = _finish(scale, phase, engine, policy, history, fingerprint)
    policy.eval()
    return policy, history["steps"], history["epochs"]
