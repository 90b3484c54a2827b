"""Chapter 8 on N processes: torch.distributed from torchrun's environment; a plain run is the N = 1
case.

    # gloo on CPU, NCCL on CUDA:
    torchrun --standalone --nproc_per_node 2 -m chapters.ch8_instruction_dpo ...
    python -m chapters.ch8_instruction_dpo ...  # N = 1, the same code

Every rank draws the same length-grouped global batches (same seed). Rank r takes pairs r, r + N,
... of each (`shard`), cut into K = --grad-accum micro-batches (`micro_batches`). A micro-batch's
mean loss is weighted by its share of the global batch, times N because DDP and FSDP average
gradients over ranks (`loss_scale`), so the summed gradient is the gradient of the global batch's
mean loss whatever N and K (tests/test_ch8_scale.py checks it). Rank 0 alone writes files
(`Dist.main`); sharded evaluations are summed over ranks (`Dist.sum`).
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

TORCHRUN = "torchrun --standalone --nproc_per_node N -m chapters.ch8_instruction_dpo ..."


@dataclass
class Dist:
    """This process's place among the ranks: rank, world size, and its device (cuda:LOCAL_RANK under
    torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """True on rank 0, the one rank that writes files and prints progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self):
        if self.active:
            torch_dist.barrier()

    def sum(self, values) -> list:
        """Each value summed over ranks (float64, so sums of per-rank sums lose nothing at float32
        precision)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor(
            [float(v) for v in values], dtype=torch.float64, device=self._comm_device()
        )
        torch_dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True when `flag` is true on any rank (e.g. a stop request only some ranks got)."""
        return self.sum([float(flag)])[0] > 0

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order, on every rank (small Python objects: rows, generated
        texts)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def _comm_device(self):
        return self.device if torch_dist.get_backend() == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or torch.distributed.run) started: it sets RANK, WORLD_SIZE,
    LOCAL_RANK."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init(device="cpu", fsdp: bool = False) -> Dist:
    """The process group from torchrun's environment (gloo for a CPU `device`, NCCL for CUDA), or N
    = 1 without it.

    Under torchrun each rank takes cuda:LOCAL_RANK. `--fsdp` without torchrun is refused with one
    line.
    """
    device = torch.device(device)
    if not launched_by_torchrun():
        if fsdp:
            raise ValueError(
                f"--fsdp shards the model over the processes torchrun starts; run: {TORCHRUN} "
                f"--fsdp (with N >= 1), or leave out --fsdp"
            )
        return Dist(device=device)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"torchrun started local rank {local} but this machine has "
                f"{torch.cuda.device_count()} CUDA devices; give --nproc_per_node at most that many"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
    return Dist(rank=rank, world=world, device=device)


def close(d: Dist):
    """End the process group (a no-op for N = 1)."""
    if d.active and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


# -------------------------------------------------------------- each rank's share of a global batch


def shard(idx, rank: int, world: int) -> list:
    """Rank `rank`'s share of the global batch `idx`: items rank, rank + world, ... (lengths stay
    mixed alike)."""
    return list(idx)[rank::world]


def micro_batches(idx, k: int) -> list:
    """`idx` cut into k consecutive micro-batches whose sizes differ by at most one (some empty when
    len < k)."""
    n = len(idx)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [list(idx)[bounds[i] : bounds[i + 1]] for i in range(k)]


def loss_scale(part_weight: float, global_weight: float, world: int) -> float:
    """What a micro-batch's mean loss is multiplied by before backward: its weight's share of the
    global batch, × N.

    Summed over the micro-batches of every rank, with gradients averaged over the N ranks, the
    gradient is that of Σ (weight · mean) / global weight: the global batch's mean loss. Exactly 1.0
    for one micro-batch and N = 1.
    """
    return part_weight / global_weight * world


# ---------------------------------------------------------------- the model behind DDP or FSDP


class Objective(torch.nn.Module):
    """`objective(fn, *args)` = `fn(model, *args)` as a module's forward, so DDP and FSDP see every
    use of the model.

    The DPO step calls `model.run_blocks` and reads `model.lm_head.weight` directly, not
    `model.forward`; called through this module, DDP's gradient hooks and FSDP's gathering of the
    root parameters cover all of it.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def call(model, fn, *args, **kwargs):
    """`fn(model, *args)` for a plain model, through the module's forward for an `Objective` (FSDP2
    needs it)."""
    return (
        model(fn, *args, **kwargs) if isinstance(model, Objective) else fn(model, *args, **kwargs)
    )


def rank_share(items, d: Dist) -> list:
    """This rank's items r, r + N, ... as (item, kept) pairs, padded with (items[0], False) to the
    same count on every rank: under FSDP2 each forward is a collective, so every rank must run as
    many.
    """
    mine = [(item, True) for item in list(items)[d.rank :: d.world]]
    return mine + [(items[0], False)] * (-(-len(items) // d.world) - len(mine)) if items else []


def in_batch_order(per_rank: list) -> list:
    """Results gathered from the ranks (rank r did items r, r + N, ...) back in the items' order."""
    n = sum(map(len, per_rank))
    return [per_rank[i % len(per_rank)][i // len(per_rank)] for i in range(n)]


def wrap(model, d: Dist, fsdp: bool = False):
    """The module a training step calls, engine(fn, *args): `Objective(model)`, under DDP (N > 1) or
    FSDP2 (`fsdp`).

    FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each transformer block and then the rest
    (embeddings, tied head, final LayerNorm) over the ranks: each rank keeps 1/N of the weights,
    gradients and AdamW state.
    """
    objective = Objective(model)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(objective)
        return objective
    if d.active:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            objective, device_ids=[d.device.index] if d.device.type == "cuda" else None
        )
    return objective


def gradient_sync(engine, last: bool):
    """A context for one micro-batch's backward: gradients are exchanged only after the last one
    (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`); a no-op for N = 1."""
    if hasattr(engine, "no_sync"):
        return nullcontext() if last else engine.no_sync()
    if hasattr(engine, "set_requires_gradient_sync"):
        engine.set_requires_gradient_sync(last)
    return nullcontext()


def unwrapped(engine):
    """The `Objective` inside a DDP wrapper (FSDP2 and N = 1 hold it directly)."""
    return getattr(engine, "module", engine)
