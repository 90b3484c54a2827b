"""Saved and resumable training: atomic checkpoints, a clean stop on Ctrl-C or SIGTERM, the
learning-rate schedule, and trained models saved as safetensors that `gpt.load_gpt2` reads.

- `save_checkpoint` / `load_training_checkpoint`: model, AdamW state, schedule, RNG states (torch,
  CUDA, Python `random`, NumPy), the data position (epoch, next batch) and the rows logged so far,
  written to a temporary file and renamed whole; read back only when the format and the run's
  fingerprint (its settings and data) match, else one line.
- `StopRequest`: the first Ctrl-C or SIGTERM asks the loop to stop after the current step and write
  a checkpoint; a second Ctrl-C stops at once.
- `lr_factor` / `lr_schedule`: linear warm-up over --warmup-steps, then constant (the default: the
  DPO paper's recipe, linear warm-up to a constant rate, and the report's authors' constant rate, so
  runs without the new flags keep their numbers), linear decay (TRL's default) or cosine decay
  (nanoGPT's), both reaching 0 one step past the last update.
- `save_gpt2`: a model as hub-layout model.safetensors + config.json (the layout `gpt.checkpoint`
  reads).
"""

import hashlib
import json
import math
import random
import signal
from pathlib import Path

import numpy as np
import torch

from chapters.common.files import atomic_open
from chapters.training.distributed import Objective
from gpt.checkpoint import name_map

FORMAT = "dpo-from-scratch/train-state/1"  # bump when the checkpoint's contents change meaning
DECAYS = ("constant", "linear", "cosine")


# ---------------------------------------------------------------- the learning-rate schedule


def lr_factor(step: int, warmup: int, total: int, decay: str = "constant") -> float:
    """The multiplier of the base learning rate at update `step` (0-based) of `total`.

    Warm-up: (step + 1) / (warmup + 1) for step < warmup, so the first update is small but not zero.
    Then 1 ("constant"), or from 1 down towards 0 at step = total: (total − step) / (total − warmup)
    ("linear"), ½(1 + cos(π (step − warmup) / (total − warmup))) ("cosine").
    """
    if decay not in DECAYS:
        raise ValueError(
            f"unknown learning-rate decay {decay!r}; choose one of {', '.join(DECAYS)}"
        )
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if decay == "constant" or total <= warmup:
        return 1.0
    done = min(step - warmup, total - warmup) / (total - warmup)  # in [0, 1)
    return 1.0 - done if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))


def lr_schedule(optimizer, warmup: int, total: int, decay: str = "constant"):
    """A LambdaLR over `lr_factor`; step it once after each optimizer update. Its state goes into
    checkpoints."""
    lr_factor(0, warmup, total, decay)  # refuse a bad decay now
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, decay)
    )


# ---------------------------------------------------------------- random number generators


def rng_state() -> dict:
    """Every generator a training step may draw from, as tensors and numbers (loadable with
    weights_only=True)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "words": torch.tensor(words, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"].tolist()), p["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- checkpoints


def _strip(state: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def full_state(objective, optimizer=None):
    """(model state, optimizer state) as full tensors on the CPU, keyed by parameter name, whatever
    the wrapping (plain, DDP's inner module, FSDP2 shards gathered):
    `torch.distributed.checkpoint.state_dict`'s full form."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(objective, optimizer or [], options=options)
    return _strip(model_state), (optim_state if optimizer is not None else None)


def load_full_state(objective, optimizer, model_state: dict, optim_state: dict):
    """Put `full_state`'s tensors back (each rank takes its shard under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    prefix = "model." if isinstance(objective, Objective) else ""
    model_state = {prefix + k: v for k, v in model_state.items()}
    set_state_dict(
        objective,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True),
    )


def save_checkpoint(
    path,
    *,
    fingerprint: dict,
    model_state: dict,
    optim_state: dict,
    schedule,
    position: dict,
    history,
    rng,
) -> Path:
    """Write a training checkpoint atomically (a temporary file renamed over `path` once whole);
    returns `path`.

    `position` is where the data resumes ({"epoch": e, "batch": b}: batch b of epoch e is the next
    to run), `history` the rows logged so far, `rng` the RNG states of every rank (a list, rank
    order).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "fingerprint": _jsonable(fingerprint),
        "model": model_state,
        "optimizer": optim_state,
        "schedule": schedule.state_dict() if schedule is not None else None,
        "position": dict(position),
        "history": history,
        "rng": rng,
    }
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return path


def load_training_checkpoint(path, fingerprint: dict, may_differ=()) -> dict:
    """The checkpoint at `path`, refused with one line (ValueError) when it is unreadable or cut
    short, not a training checkpoint of this project, or written by a run with other settings or
    data than `fingerprint` (the keys in `may_differ` aside: a learning rate lowered after a
    divergence)."""
    path = Path(path)
    resume = "rerun without --resume to start afresh"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a cut zip archive, a pickle of something else, random bytes
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint {path} is incomplete or not a training checkpoint ({reason}); delete it, "
            f"or {resume}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"checkpoint {path} is not a training checkpoint of this version (format {found!r}, "
            f"expected {FORMAT!r}); {resume}"
        )
    missing = [
        k
        for k in ("fingerprint", "model", "optimizer", "schedule", "position", "history", "rng")
        if k not in state
    ]
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks {', '.join(missing)}: it is incomplete; {resume}"
        )
    saved, wanted = state["fingerprint"], _jsonable(fingerprint)
    differ = fingerprint_difference(
        {k: v for k, v in saved.items() if k not in may_differ},
        {k: v for k, v in wanted.items() if k not in may_differ},
    )
    if differ:
        raise ValueError(
            f"checkpoint {path} was written by another run ({differ}); resume with the same "
            f"settings and data, or {resume}"
        )
    return state


def fingerprint_difference(saved: dict, wanted: dict, limit: int = 3) -> str:
    """'' when equal, else the first differing keys as 'key: saved there, wanted here'."""

    def show(v):  # hashes cut to their first 12 digits: enough to tell two apart
        return repr(v[:12] + "…") if isinstance(v, str) and len(v) > 40 else repr(v)

    keys = sorted(set(saved) | set(wanted))
    diff = [
        f"{k}: {show(saved.get(k, '(none)'))} there, {show(wanted.get(k, '(none)'))} here"
        for k in keys
        if saved.get(k) != wanted.get(k)
    ]
    return "; ".join(diff[:limit]) + (
        f"; and {len(diff) - limit} more" if len(diff) > limit else ""
    )


def _jsonable(d: dict) -> dict:
    """The fingerprint as JSON would store it (tuples become lists), so a saved one compares equal
    to a fresh one."""
    return json.loads(json.dumps(d, sort_keys=True))


def tensors_sha256(state: dict) -> str:
    """sha256 over every tensor of a state dict (name, dtype, shape, bytes), in name order: the
    weights' identity."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------- a clean stop


class StopRequest:
    """Inside `with StopRequest() as stop:`, the first SIGINT (Ctrl-C) or SIGTERM sets
    `stop.requested`; the loop checks it after each step, writes a checkpoint and stops. A second
    Ctrl-C raises KeyboardInterrupt at once. The previous handlers come back on exit. Outside the
    main thread (where Python allows no handler) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self.signal, self._old = False, None, {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(
                "stopped by a second Ctrl-C before the checkpoint was written; the last "
                "checkpoint written, if any, is whole"
            )
        self.requested, self.signal = True, signal.Signals(signum).name

    def __enter__(self):
        try:
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self._old = {}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


# ---------------------------------------------------------------- trained models as safetensors


def save_gpt2(model_state: dict, config, folder) -> Path:
    """Write `model_state` (gpt.GPT's names) as folder/model.safetensors in the hub layout of
    openai-community/gpt2 (no "transformer." prefix, Conv1D weights as (in, out), no lm_head: it is
    wte) with folder/config.json, each file atomically; `gpt.load_gpt2(folder)` reads it back.
    Returns the folder."""
    from safetensors.torch import save as safetensors_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for hf_name, (ours, turn) in name_map("hf", config.n_layer).items():
        t = model_state[ours].detach().cpu()
        tensors[hf_name] = (t.T if turn == ".T" else t).contiguous()
    cfg = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "layer_norm_epsilon": config.layer_norm_epsilon,
    }
    with atomic_open(folder / "config.json") as f:
        json.dump(cfg, f, indent=2)
    with atomic_open(folder / "model.safetensors", "wb") as f:
        f.write(safetensors_bytes(tensors, metadata={"format": "pt"}))
    return folder
