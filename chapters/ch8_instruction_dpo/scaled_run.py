"""Chapter 8's run beyond one process and one go: its flags, its folder, its finished phases.

    torchrun --standalone --nproc_per_node 2 -m chapters.ch8_instruction_dpo --model gpt2-medium
    --grad-accum 2
    python -m chapters.ch8_instruction_dpo --model gpt2-medium --resume     # after Ctrl-C or
    SIGTERM

The run folder (--out) holds, besides the tables:
- checkpoints/<phase>.pt: the training state of the phase under way (sft, dpo_beta_0.1, ...),
  written at each epoch's end, every --save-every steps and on Ctrl-C/SIGTERM; removed once the
  phase's model is saved;
- models/<phase>/: model.safetensors + config.json (`gpt.load_gpt2` reads the folder) and
  history.json (the phase's rows and fingerprint), written last: a phase whose history.json is there
  is finished, and --resume takes it as it is;
- reference_<split>.safetensors: the frozen reference's cache
  (`chapters.ch8_instruction_dpo.reference_store`);
- run.lock: held by the run writing the folder, for its whole life (`Scale.hold`; the kernel lets go
  when the process ends, even by `kill -9`), with its pid inside: a second run into the folder stops
  at once with one line, instead of mixing its files with the first one's.
With every new flag left off, a run computes what it computed before them: one process, one
micro-batch, a constant learning rate, and the same numbers; only the files above are added.

A run without --resume starts afresh, as a TRL or nanoGPT run does in an existing output folder: an
earlier run's checkpoints and finished-phase marks there no longer count (`Scale.begin`), and a
reference cache that does not match is rebuilt. With --resume, a cache that does not match is
refused unless --rebuild-reference-cache. --authors-setup and --ladder run in one process and save
nothing (`start(args, alone=...)`): the ladder's rungs retrain the same phases with other settings,
so phases on disk would only overwrite each other.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from chapters.ch8_instruction_dpo.dpo_step import ReferenceCache
from chapters.ch8_instruction_dpo.reference_store import (
    build_order,
    cached_reference,
    reference_fingerprint,
)
from chapters.common.files import atomic_open, check_writable
from chapters.training import distributed
from chapters.training.checkpoints import DECAYS, fingerprint_difference, save_gpt2
from gpt.cli import nonnegative_int, positive_int


def add_arguments(parser):
    """The flags of issue 14, in their own group of `parser`'s help."""
    g = parser.add_argument_group(
        "scale: more processes, resumable runs, schedule (see chapters/scaled_run.py)"
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out: finished phases are loaded, the one under way resumes",
    )
    g.add_argument(
        "--warmup-steps",
        type=nonnegative_int,
        default=0,
        help="linear learning-rate warm-up over this many updates (default 0)",
    )
    g.add_argument(
        "--lr-schedule",
        choices=DECAYS,
        default="constant",
        help="after warm-up: constant (default: the DPO paper's and the report authors' choice), "
        "linear (TRL's default) or cosine decay to 0",
    )
    g.add_argument(
        "--grad-accum",
        type=positive_int,
        default=1,
        help="micro-batches per update: --batch-size pairs an update, in N processes × K pieces",
    )
    g.add_argument(
        "--fsdp", action="store_true", help="shard the policy with FSDP2 (under torchrun)"
    )
    g.add_argument(
        "--save-every",
        type=nonnegative_int,
        default=0,
        help="also write a checkpoint every this many updates (default 0 = never: only at epoch "
        "ends and on a stop)",
    )
    g.add_argument(
        "--rebuild-reference-cache",
        action="store_true",
        help="rebuild a reference cache whose fingerprint no longer matches, instead of stopping",
    )


LOCK = "run.lock"
# file systems that hold no files of ours, whatever the permissions say (/proc, /sys, ...)
VIRTUAL_FILE_SYSTEMS = {
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "debugfs",
    "tracefs",
    "securityfs",
    "configfs",
    "devpts",
    "mqueue",
    "bpf",
    "pstore",
    "fusectl",
}


def _file_system(path: Path):
    """The type of the file system holding `path` (Linux's /proc/self/mounts), or None where
    unknown."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    path, best, kind = str(path.resolve()), "", None
    for line in mounts:
        _, point, fs, *_ = line.split()
        point = point.replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fs
    return kind


def check_out_folder(folder) -> Path:
    """--out, judged before anything loads and without writing anything: refused
    (PermissionError, one line naming the flag) when its nearest existing folder is a file, not
    writable, or on a virtual file system (/proc, /sys) where no folder can be made."""
    folder = Path(folder)
    try:
        check_writable(folder, "tables")
    except PermissionError as err:
        raise PermissionError(f"--out: {err}") from None
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    kind = _file_system(existing)
    if kind in VIRTUAL_FILE_SYSTEMS:
        raise PermissionError(
            f"--out: cannot write tables to {folder} ({existing} is on the virtual file system "
            f"{kind}, which holds no files); pass another folder"
        )
    return folder


@dataclass
class Scale:
    """How chapter 8's loops run. The defaults (folder None) are one process, saving nothing."""

    dist: distributed.Dist = field(default_factory=distributed.Dist)
    grad_accum: int = 1
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    fsdp: bool = False
    folder: Path = None
    resume: bool = False
    save_every: int = 0
    rebuild_reference: bool = False
    fingerprint: dict = field(
        default_factory=dict
    )  # what every phase of the run shares (model, data, lengths)
    lock: FileLock = None  # the run folder's, while `hold` has it

    def hold(self, folder):
        """Make `folder` and hold its run.lock until `close` (or the process's end, however it
        ends); rank 0 holds it for every rank. Another run holding it: ValueError with one line
        naming the folder and that run's pid, on every rank."""
        folder, error = Path(folder), None
        if self.dist.main:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                lock = FileLock(folder / LOCK, timeout=0)
                lock.acquire()
                (folder / LOCK).write_text(f"{os.getpid()}\n")
                self.lock = lock
            except Timeout:
                try:
                    pid = (folder / LOCK).read_text().strip() or "unknown"
                except OSError:
                    pid = "unknown"
                error = (
                    f"--out {folder} is in use by another run (pid {pid}); two runs in one folder "
                    "would mix their files: wait for it to end, or pass another --out"
                )
            except OSError as err:
                error = f"--out: cannot make {folder} ({err.strerror or err}); pass another folder"
        error = self.dist.broadcast(error)
        if error:
            raise ValueError(error)

    def close(self):
        """Let go of the run folder's lock and end the process group (torchrun; a no-op for N =
        1)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        distributed.close(self.dist)

    def checkpoint(self, phase: str):
        return None if self.folder is None else self.folder / "checkpoints" / f"{phase}.pt"

    def model_folder(self, phase: str):
        return None if self.folder is None else self.folder / "models" / phase

    def finished(self, phase: str, fingerprint: dict):
        """With --resume, the rows of a phase saved whole by an earlier run (its fingerprint
        checked), else None."""
        if (
            not self.resume
            or self.folder is None
            or not (self.model_folder(phase) / "history.json").is_file()
        ):
            return None
        saved = json.loads((self.model_folder(phase) / "history.json").read_text())
        differ = fingerprint_difference(
            saved["fingerprint"], json.loads(json.dumps(fingerprint, sort_keys=True))
        )
        if differ:
            raise ValueError(
                f"{self.model_folder(phase)} was trained with other settings ({differ}); resume "
                f"with the same settings, or rerun without --resume to start afresh"
            )
        return saved["history"]

    def save_phase(self, phase: str, model_state: dict, config, history, fingerprint: dict):
        """Rank 0 writes the phase's model and then its history.json (the mark of a finished phase),
        then the phase's checkpoint goes."""
        if self.folder is None:
            return
        if self.dist.main:
            folder = save_gpt2(model_state, config, self.model_folder(phase))
            with atomic_open(folder / "history.json") as f:
                json.dump({"fingerprint": fingerprint, "history": history}, f)
            self.checkpoint(phase).unlink(missing_ok=True)
            print(f"{phase}: model saved to {folder}/ (gpt.load_gpt2 reads it)")
        self.dist.barrier()

    def begin(self):
        """Before a fresh run's first phase (no --resume): rank 0 drops the checkpoints and
        finished-phase marks an earlier run left in the folder, so that --resume after this run
        takes up this run's phases only (the earlier models' weights stay until this run writes its
        own)."""
        if self.folder is None or self.resume:
            return
        if self.dist.main:
            old = sorted((self.folder / "checkpoints").glob("*.pt")) + sorted(
                (self.folder / "models").glob("*/history.json")
            )
            for path in old:
                path.unlink()
            if old:
                print(
                    f"fresh run in {self.folder}: {len(old)} checkpoint(s) and finished phase(s) "
                    f"of an earlier run there no longer count (to continue a run, give --resume)"
                )
        self.dist.barrier()

    def reference_caches(
        self,
        reference,
        pairs: dict,
        pad_id: int,
        batch_size: int,
        max_length: int,
        seed: int = None,
    ) -> dict:
        """ReferenceCache of each split in `pairs`: built in memory without a folder, else through
        the disk.

        `seed` (train_dpo's): the "train" split's cache is built in the batches of its first epoch,
        so that the first step, with the policy at the reference, gives eq. (38)'s ln 2 and margins
        of exactly 0 (one process, one micro-batch;
        `chapters.ch8_instruction_dpo.reference_store.build_order`). Other splits stay by length, as
        `dpo_evaluate` reads them.
        """
        caches = {}
        for split, ps in pairs.items():
            split_seed = seed if split == "train" else None
            if self.folder is None:
                _, batches = build_order(ps, batch_size, split_seed, self.dist)
                caches[split] = ReferenceCache(reference, ps, pad_id, batch_size, batches=batches)
                continue
            fp = reference_fingerprint(reference, ps, max_length=max_length, batch_size=batch_size)
            caches[split] = cached_reference(
                self.folder / f"reference_{split}.safetensors",
                reference,
                ps,
                pad_id,
                batch_size=batch_size,
                fingerprint=fp,
                dist=self.dist,
                seed=split_seed,
                rebuild=self.rebuild_reference,
                rebuild_stale=not self.resume,
            )
        return caches


def start(args, alone: str = None) -> Scale:
    """The process group (torchrun's, or N = 1) and the run's Scale from the parsed flags; sets
    args.device to this rank's device, and silences print on every rank but 0 (one copy of each
    line).

    `alone` (a flag such as "--ladder"): that mode runs in one process and saves nothing; torchrun
    and the flags that save or resume are refused with one line, and the Scale has no folder. Under
    torchrun rank 0 alone says why.
    """
    try:
        return _start(args, alone)
    except ValueError:
        if os.environ.get("RANK", "0") != "0":
            raise SystemExit(2) from None  # one copy of the line: rank 0's
        raise


def _start(args, alone):
    folder = Path(args.out)
    if alone:
        given = [
            flag
            for flag, on in (
                ("torchrun", distributed.launched_by_torchrun()),
                ("--fsdp", args.fsdp),
                ("--resume", args.resume),
                ("--save-every", args.save_every),
                ("--rebuild-reference-cache", args.rebuild_reference_cache),
            )
            if on
        ]
        if given:
            raise ValueError(
                f"{alone} runs in one process and saves no models, checkpoints or reference cache "
                f"(its "
                f"phases are minutes on the miniature); leave out {' and '.join(given)}, or run "
                f"without {alone}"
            )
        folder = None
    if args.resume and not any((folder / sub).is_dir() for sub in ("checkpoints", "models")):
        raise ValueError(
            f"--resume: nothing to resume in {folder} (no checkpoints/ or models/ there); run "
            f"without --resume, or give the --out of the run to continue"
        )
    d = distributed.init(args.device, fsdp=args.fsdp)
    if args.batch_size < d.world * args.grad_accum:
        raise ValueError(
            f"--batch-size {args.batch_size} is fewer pairs than the {d.world} process(es) × "
            f"--grad-accum "
            f"{args.grad_accum} micro-batches of an update; raise --batch-size or lower "
            f"--grad-accum"
        )
    args.device = d.device
    if not d.main:
        sys.stdout = open(os.devnull, "w")
    if d.main and d.active:
        print(
            f"torchrun: {d.world} processes ({'NCCL' if d.device.type == 'cuda' else 'gloo'}), "
            f"{'FSDP2' if args.fsdp else 'DDP'}; --batch-size {args.batch_size} pairs an update in "
            f"all, {args.grad_accum} micro-batch(es) a process"
        )
    return Scale(
        dist=d,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule,
        fsdp=args.fsdp,
        folder=folder,
        resume=args.resume,
        save_every=args.save_every,
        rebuild_reference=args.rebuild_reference_cache,
        fingerprint={
            "model": args.tag,
            "seed": args.seed,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "warmup_steps": args.warmup_steps,
            "lr_schedule": args.lr_schedule,
            "mistakes_on": " ".join(getattr(getattr(args, "setup", None), "on", ())),
        },
    )


def sharded_runs(
    generate_runs, d: distributed.Dist, name, model, pairs, temperatures, **settings
) -> list:
    """`generate_runs` with the temperatures dealt over the ranks (each temperature has its own
    seeded generator, so the texts do not depend on N), gathered in the temperatures' order on every
    rank.
    """
    mine = list(range(d.rank, len(temperatures), d.world))
    runs = generate_runs(name, model, pairs, [temperatures[i] for i in mine], **settings)
    placed = {}
    for idx, got in zip(
        [list(range(r, len(temperatures), d.world)) for r in range(d.world)], d.gather(runs)
    ):
        placed.update(zip(idx, got))
    return [placed[i] for i in range(len(temperatures))]
