"""LoRA (Hu et al. 2021, arXiv 2106.09685): low-rank adapters on GPT-2's linear layers.

    model = add_lora(load_gpt2("gpt2"), rank=8, alpha=16)  # attn.c_attn, attn.c_proj of each block
    ...                                                    # train: only lora_A, lora_B need grad
    save_lora(model, "sft.lora.safetensors")               # adapters alone, + rank/alpha/targets
    load_lora(load_gpt2("gpt2"), "sft.lora.safetensors")   # same base weights: the same model
    merge_lora(model)                                      # W + (alpha/rank) B A: plain GPT-2 speed

A wrapped layer keeps its base Parameters under their own names (`...attn.c_attn.weight`, `.bias`)
and adds `...attn.c_attn.lora_A` and `.lora_B`. Its base product stays `gpt.model.Linear`'s: with W
frozen, a product whose input needs no gradient (generation, evaluation, a reference pass, the first
block's while training) still runs on oneDNN's inner product. Targets are the module names inside a
block: attn.c_attn (fused q, k, v), attn.c_proj, mlp.c_fc, mlp.c_proj; c_attn and c_fc also do
alone, and c_proj alone means both projections.
"""

import json
import math
import os
from contextlib import contextmanager
from numbers import Integral, Real
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gpt.model import Linear

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # a block's linear layers
SHORT = {"c_attn": ("attn.c_attn",), "c_fc": ("mlp.c_fc",), "c_proj": ("attn.c_proj", "mlp.c_proj")}
DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj")  # attention only, as the paper (its §4.2)
ADAPTER_NAMES = (".lora_A", ".lora_B")


class LoRALinear(Linear):
    """Hu et al. 2021, eq. (3): h = W x + b + (alpha/rank) B A x, with W and b frozen.

    A (rank, in) starts Kaiming-uniform (as the authors' loralib; the paper says Gaussian) and B
    (out, rank) at zero, so a new adapter changes nothing. Dropout acts on the adapter's input.
    `merged`: B A is folded into W and the branch skipped; `enabled=False` runs W x + b alone.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(
            base.in_features, base.out_features, bias=base.bias is not None, device="meta"
        )  # no weights of its own: it takes base's below
        self.weight, self.bias = base.weight, base.bias  # the same Parameters, names unchanged
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as loralib
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged, self.enabled = False, True
        self.train(base.training)  # a new module is in training mode: its dropout would be on

    def delta_weight(self):
        """Hu et al. 2021, eq. (3): ΔW = (alpha/rank) B A, (out, r) @ (r, in) -> (out, in)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x):
        y = super().forward(x)  # W x + b: (..., in) -> (..., out); oneDNN when no grad is needed
        if self.merged or not self.enabled:
            return y
        h = F.linear(self.dropout(x), self.lora_A)  # (..., in) -> (..., r)
        return y + self.scale * F.linear(h, self.lora_B)  # (..., r) -> (..., out)

    def extra_repr(self):
        lora = f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"
        return f"{super().extra_repr()}, {lora}"


def lora_layers(model: nn.Module) -> dict:
    """The adapted layers by module name: {'transformer.h.0.attn.c_attn': LoRALinear, ...}."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_target(name: str, targets) -> bool:
    """Whether module `name` (e.g. transformer.h.3.mlp.c_fc) is one of `targets` (full names)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def expand_targets(targets) -> tuple:
    """Target names -> the full names they mean, in TARGETS' order; unknown names are refused."""
    try:
        names = (targets,) if isinstance(targets, str) else tuple(targets)
    except TypeError:
        names = ()
    if not names or not all(isinstance(t, str) for t in names):
        raise ValueError(
            f"targets must be a non-empty list of layer names from {TARGETS}, got {targets!r}"
        )
    unknown = [t for t in names if t not in TARGETS and t not in SHORT]
    if unknown:
        raise ValueError(
            f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(TARGETS)} "
            f"(or c_attn, c_fc, and c_proj for both projections)"
        )
    chosen = {full for t in names for full in SHORT.get(t, (t,))}
    return tuple(t for t in TARGETS if t in chosen)


def check_hyperparameters(rank, alpha, dropout):
    """Refuse a rank, alpha or dropout that LoRA cannot mean, one line each."""
    if isinstance(rank, bool) or not isinstance(rank, Integral) or rank <= 0:
        raise ValueError(f"rank must be an integer >= 1 (e.g. 8), got {rank!r}")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, Real)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(
            f"alpha must be a finite number > 0 (the update is scaled by alpha/rank; "
            f"e.g. 2 * rank), got {alpha!r}"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1) (0: off), got {dropout!r}")


def target_layers(model: nn.Module, targets) -> dict:
    """The linear layers that `targets` (full names) name, by module name."""
    found = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and is_target(name, targets)
    }
    if not found:
        raise ValueError(
            f"the model has no linear layer named {', '.join(targets)}; "
            f"pass a gpt.GPT (or a model holding one)"
        )
    return found


def add_lora(
    model: nn.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS, dropout: float = 0.0
):
    """Hu et al. 2021, eq. (3): wrap the `targets` of every block in a LoRALinear; freeze all else.

    Modifies `model` in place and returns it. Afterwards only the adapters (`lora_A`, `lora_B`) need
    gradients; everything else, embeddings and LayerNorms included, is frozen. To train a head too
    (a reward model's), call it on the GPT inside (`add_lora(rm.backbone, ...)`). Trainable
    parameters: Σ rank · (in + out) over the wrapped layers.
    """
    check_hyperparameters(rank, alpha, dropout)
    targets = expand_targets(targets)
    if lora_layers(model):
        raise ValueError(
            "the model already has LoRA adapters; call add_lora once per model "
            "(load_lora adds them only when missing)"
        )
    for name, layer in target_layers(model, targets).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(layer, rank, alpha, dropout))
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith(ADAPTER_NAMES)
    return model


def adapted(model: nn.Module) -> dict:
    """`lora_layers(model)`, refusing a model without adapters."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            "the model has no LoRA adapters; call add_lora(model, rank, alpha) "
            "or load_lora(model, path) first"
        )
    return layers


@torch.no_grad()
def merge_lora(model: nn.Module):
    """Hu et al. 2021, §4.1: W <- W + (alpha/rank) B A in each adapted layer; same outputs.

    The adapters stay, their branch skipped, so `unmerge_lora` can take them out again; leave A and
    B alone while merged (they get no gradient then). Merged layers stay as they are. Returns the
    model.
    """
    for layer in adapted(model).values():
        if not layer.merged:
            layer.weight += layer.delta_weight()
            layer.merged = True
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module):
    """Undo `merge_lora`: W <- W - (alpha/rank) B A (W again, to float rounding); returns model."""
    for layer in adapted(model).values():
        if layer.merged:
            layer.weight -= layer.delta_weight()
            layer.merged = False
    return model


@contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model inside the block: every adapter switched off, then back on.

    This is the base model, not the model an adapter was trained from when that one was itself an
    adapter (SFT with LoRA, then DPO with LoRA): as a DPO reference it is the wrong one.
    """
    layers = adapted(model).values()
    if any(layer.merged for layer in layers):
        raise ValueError(
            "the adapters are merged into the weights and cannot be switched off; "
            "unmerge_lora(model) first"
        )
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def lora_config(model: nn.Module) -> dict:
    """{'rank', 'alpha', 'dropout', 'targets'} of the model's adapters (as add_lora had them)."""
    layers = adapted(model)
    first = next(iter(layers.values()))
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    targets = tuple(t for t in TARGETS if any(is_target(name, (t,)) for name in layers))
    return dict(rank=first.rank, alpha=first.alpha, dropout=dropout, targets=targets)


def lora_state_dict(model: nn.Module) -> dict:
    """The adapters alone: {'transformer.h.0.attn.c_attn.lora_A': (r, in), '..lora_B': (out, r)}."""
    adapted(model)
    return {k: v for k, v in model.state_dict().items() if k.endswith(ADAPTER_NAMES)}


def save_lora(model: nn.Module, path):
    """Write the adapters alone to a safetensors file, with rank, alpha, dropout and targets.

    The file goes to a temporary name and is renamed when whole. Loading needs the same base.
    """
    config = lora_config(model)
    tensors = {k: v.detach().contiguous() for k, v in lora_state_dict(model).items()}
    metadata = {
        "format": "pt",
        "lora": "gpt.lora",
        "rank": str(config["rank"]),
        "alpha": repr(float(config["alpha"])),
        "dropout": repr(float(config["dropout"])),
        "targets": json.dumps(config["targets"]),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_lora_file(path):
    """(tensors, config) of a file written by `save_lora`; anything else is one ValueError line."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a safetensors file ({e}); give a file written by save_lora"
        ) from None
    try:
        if meta.get("lora") != "gpt.lora":
            raise KeyError("lora")
        config = dict(
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            dropout=float(meta["dropout"]),
            targets=expand_targets(json.loads(meta["targets"])),
        )
        check_hyperparameters(config["rank"], config["alpha"], config["dropout"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path} is not a LoRA adapter file (bad metadata: {e}); "
            f"give a file written by save_lora"
        ) from None
    return tensors, config


@torch.no_grad()
def load_lora(model: nn.Module, path):
    """Load adapters written by `save_lora` into `model`; returns the model.

    A model without adapters gets them first (the file's rank, alpha, targets and dropout); one with
    adapters must have the file's rank, alpha and targets. Names and shapes must match too: a
    mismatch is one ValueError line, before the model changes. The base weights must be the ones the
    adapters were trained on (not checked).
    """
    tensors, config = read_lora_file(path)
    has_adapters = bool(lora_layers(model))
    if has_adapters:
        have = lora_config(model)
        for key in ("rank", "alpha", "targets"):
            if have[key] != config[key]:
                raise ValueError(
                    f"{path} holds adapters with {key}={config[key]} but the model's "
                    f"have {key}={have[key]}; load it into a model without adapters"
                )
        if any(layer.merged for layer in lora_layers(model).values()):
            raise ValueError(
                "the model's adapters are merged into its weights; unmerge_lora(model) first"
            )
        layers = lora_layers(model)
    else:
        layers = target_layers(model, config["targets"])
    r = config["rank"]
    expected = {}
    for name, layer in layers.items():
        expected[f"{name}.lora_A"] = (r, layer.in_features)  # (r, in)
        expected[f"{name}.lora_B"] = (layer.out_features, r)  # (out, r)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which the model lacks"
        raise ValueError(
            f"{path} does not fit the model: it {what} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected); load it into the model it was saved from"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{path}: tensor {key} has shape {tuple(tensors[key].shape)} but the "
                f"model needs {shape}; load it into the model size it was saved from"
            )
    if not has_adapters:
        add_lora(model, r, config["alpha"], config["targets"], config["dropout"])
    params = dict(model.named_parameters())
    for key, tensor in tensors.items():
        params[key].copy_(tensor)
    return model
