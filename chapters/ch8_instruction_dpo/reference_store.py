"""Chapter 8's reference cache on disk: built once, reused across β and across runs, refused when
stale.

    cache = cached_reference(out / "reference_train.safetensors", reference, pairs, EOS_ID,
                             batch_size=8, dist=d,
                             fingerprint=reference_fingerprint(reference, pairs, max_length=256))

The file holds `chapters.ch8_instruction_dpo.dpo_step.ReferenceCache`'s tensors (log π_ref of each
chosen and rejected response and the reference's final hidden states at the response positions) and,
in its metadata, a fingerprint: the reference weights' sha256, the tokenizer, the data split (every
pair's tokens), --max-length, the row layout and how it was computed (device type, autocast dtype,
batch size, the order of its batches: "by length", or the training split's "training epoch 1 of seed
S", see `ReferenceCache`). A file whose fingerprint differs is refused with one line, and rebuilt
when asked (`rebuild=True`, --rebuild-reference-cache) or when the run is a fresh one
(`rebuild_stale`: a run without --resume recomputes what it cannot reuse). Under torchrun each rank
builds the cache of its share of the pairs, by length; the parts are gathered in memory, rank 0
alone writes the one file.
"""

import hashlib
import json
from pathlib import Path

import torch

from chapters.ch8_instruction_dpo.dpo_step import ReferenceCache, first_epoch_batches
from chapters.common.files import atomic_open
from chapters.training.checkpoints import fingerprint_difference, tensors_sha256
from chapters.training.distributed import Dist
from gpt.tokenizer import BPE_FILES

LAYOUT = "packed prompt+chosen+rejected rows (chapters.rows.packed_pairs_batch), v1"
BY_LENGTH = "by length"


def build_order(pairs, batch_size: int, seed: int = None, dist: Dist = None):
    """(the order's name for the fingerprint, `ReferenceCache`'s batches) of a cache of `pairs`.

    `seed` (the training split's, one process): the batches of `train_dpo`'s first epoch, so that
    its first step reads the policy's log-probs exactly as the cache did. Else, or under torchrun
    (each rank builds its share of the pairs), by length: equal up to rounding only.
    """
    if seed is None or (dist is not None and dist.active):
        return BY_LENGTH, None
    return f"training epoch 1 of seed {seed}", first_epoch_batches(pairs, batch_size, seed)


def pairs_sha256(pairs) -> str:
    """sha256 of the pairs' entry indices and tokens, in order: the split, the data file and
    --max-length's cut."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.index, p.prompt, p.chosen, p.rejected]).encode())
    return h.hexdigest()


def reference_fingerprint(
    reference, pairs, *, max_length: int, batch_size: int, order: str = BY_LENGTH
) -> dict:
    """What a saved cache must have been computed from to be reused (`order`: `build_order`'s name;
    `cached_reference` puts in the one it builds in)."""
    device = reference.lm_head.weight.device
    return {
        "reference_sha256": tensors_sha256(reference.state_dict()),
        "tokenizer": "gpt2 BPE " + " ".join(sha for _, sha in BPE_FILES.values()),
        "pairs_sha256": pairs_sha256(pairs),
        "n_pairs": len(pairs),
        "max_length": max_length,
        "layout": LAYOUT,
        "device_type": device.type,
        "autocast": "bfloat16" if device.type == "cuda" else "none",
        "batch_size": batch_size,
        "order": order,
    }


def _tensors(cache: ReferenceCache) -> dict:
    def lengths(hs):
        return torch.tensor([h.shape[0] for h in hs], dtype=torch.int64)

    return {
        "chosen": cache.chosen,
        "rejected": cache.rejected,
        "hidden_chosen": torch.cat(cache.hidden_chosen).cpu(),
        "hidden_rejected": torch.cat(cache.hidden_rejected).cpu(),
        "lengths_chosen": lengths(cache.hidden_chosen),
        "lengths_rejected": lengths(cache.hidden_rejected),
    }


def _write(path: Path, tensors: dict, fingerprint: dict):
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        f.write(
            save(
                {k: v.contiguous() for k, v in tensors.items()},
                metadata={"fingerprint": json.dumps(fingerprint, sort_keys=True)},
            )
        )


def _read(path: Path):
    """(fingerprint, tensors) of a cache file; ValueError in one line when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return json.loads(meta["fingerprint"]), tensors
    except Exception as err:  # safetensors' own errors, a missing key, bad JSON
        raise ValueError(
            f"reference cache {path} is incomplete or not a reference cache "
            f"({type(err).__name__}); delete it, or pass --rebuild-reference-cache"
        ) from None


def from_tensors(tensors: dict, head_weight) -> ReferenceCache:
    """A ReferenceCache holding `tensors` (as `_tensors` lays them out), on the reference's head
    weight."""
    cache = ReferenceCache.__new__(ReferenceCache)
    cache.head_weight, cache.keep_hidden = head_weight.detach(), True
    cache.chosen, cache.rejected = tensors["chosen"], tensors["rejected"]
    device = head_weight.device
    for side in ("chosen", "rejected"):
        parts = torch.split(
            tensors[f"hidden_{side}"].to(device), tensors[f"lengths_{side}"].tolist()
        )
        setattr(cache, f"hidden_{side}", list(parts))
    return cache


def _join(parts: list, order: list) -> dict:
    """Per-rank tensors (each over its share of the pairs) -> one set over all pairs; order[r] =
    rank r's indices."""
    n = sum(len(o) for o in order)
    out = {}
    for side in ("chosen", "rejected"):
        values = torch.zeros(n, dtype=parts[0][side].dtype)
        hidden, lengths = [None] * n, torch.zeros(n, dtype=torch.int64)
        for part, idx in zip(parts, order):
            values[idx] = part[side]
            for i, h, L in zip(
                idx,
                torch.split(part[f"hidden_{side}"], part[f"lengths_{side}"].tolist()),
                part[f"lengths_{side}"],
            ):
                hidden[i], lengths[i] = h, L
        out[side], out[f"hidden_{side}"], out[f"lengths_{side}"] = (
            values,
            torch.cat(hidden),
            lengths,
        )
    return out


def cached_reference(
    path,
    reference,
    pairs,
    pad_id: int,
    *,
    batch_size: int,
    fingerprint: dict,
    dist: Dist = None,
    seed: int = None,
    rebuild: bool = False,
    rebuild_stale: bool = False,
    verbose: bool = True,
) -> ReferenceCache:
    """The ReferenceCache of `pairs`: read from `path` when its fingerprint matches, else built and
    saved there.

    `seed`: build it in `train_dpo`'s first-epoch batches of that seed (`build_order`); the
    fingerprint's "order" says which order, so a file built in another one is stale. A file with
    another fingerprint, or not a cache at all, is refused (ValueError, one line) unless `rebuild`
    (build without reading) or `rebuild_stale` (build instead of refusing, and say so).
    """
    path, dist = Path(path), dist or Dist()
    order, batches = build_order(pairs, batch_size, seed, dist)
    fingerprint = {**fingerprint, "order": order}
    if path.is_file() and not rebuild:
        try:
            saved, tensors = _read(path)
            differ = fingerprint_difference(
                saved, json.loads(json.dumps(fingerprint, sort_keys=True))
            )
            if differ:
                raise ValueError(
                    f"reference cache {path} is stale ({differ}); pass --rebuild-reference-cache "
                    f"to rebuild it, or delete it"
                )
        except ValueError as err:
            if not rebuild_stale:
                raise
            if verbose and dist.main:
                print(
                    f"{str(err).split('; pass --rebuild')[0].split('; delete it')[0]}: rebuilt (a "
                    f"fresh run)"
                )
        else:
            if verbose and dist.main:
                print(f"reference cache: {path} (fingerprint matches; reused)")
            return from_tensors(tensors, reference.lm_head.weight)
    mine = list(range(dist.rank, len(pairs), dist.world))
    cache = ReferenceCache(reference, [pairs[i] for i in mine], pad_id, batch_size, batches=batches)
    if dist.active:  # every rank gets every part (no file but rank 0's), and joins them
        tensors = _join(
            dist.gather(_tensors(cache)),
            [list(range(r, len(pairs), dist.world)) for r in range(dist.world)],
        )
        cache = from_tensors(tensors, reference.lm_head.weight)
    if dist.main:
        _write(path, tensors if dist.active else _tensors(cache), fingerprint)
        if verbose:
            print(f"reference cache: built for {len(pairs)} pairs, saved to {path}")
    dist.barrier()  # the file is whole before any rank goes on
    return cache
