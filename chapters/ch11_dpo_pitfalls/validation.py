"""Input checks for chapter 11: a bad input raises ValueError with one line (what, what to do)."""

import math

import torch


def check_beta(beta) -> float:
    """β of eq. (27): a finite number > 0. Returns it as a float."""
    try:
        value = float(beta)
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"beta must be a finite number > 0 (the KL weight of eq. (27)), "
            f"got {beta!r}; pass e.g. beta=0.1"
        )
    return value


def check_weight(name: str, value, meaning: str) -> float:
    """A loss weight (DPOP's λ, RPO's or R-DPO's α): a finite number >= 0. Returns it as a float."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(
            f"{name} ({meaning}) must be a finite number >= 0, got {value!r}; "
            f"pass {name}=0 for plain DPO"
        )
    return number


def check_lengths(name: str, lengths, dtype: torch.dtype) -> torch.Tensor:
    """Response lengths |y| in tokens, each finite and > 0. Returns them as a `dtype` tensor."""
    lengths = torch.as_tensor(lengths).to(dtype)
    if not bool((torch.isfinite(lengths) & (lengths > 0)).all()):  # also refuses NaN
        raise ValueError(
            f"{name} must be response lengths > 0 (in tokens), got a value <= 0 "
            "or not finite; count at least one token per response"
        )
    return lengths


def check_broadcast(*tensors) -> torch.Size:
    """The per-example arguments must broadcast together (e.g. all (B,)); returns that shape."""
    shapes = [tuple(torch.as_tensor(t).shape) for t in tensors]
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        listed = ", ".join(str(s) for s in shapes)
        raise ValueError(
            f"the per-example arguments do not broadcast, shapes {listed}; "
            "give each as (B,), one per pair"
        ) from None
