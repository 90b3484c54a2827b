"""Files: where chapter figures and tables go: `plots/` at the top of the repository, or
$DPO_PLOTS_DIR (tests set it).

Every file is written whole or not at all (`atomic_open`): Ctrl-C or a crash never leaves half a PNG
or CSV.
"""

import os
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLOTS_ENV = "DPO_PLOTS_DIR"


def plots_path() -> Path:
    """The plots folder: $DPO_PLOTS_DIR when set, else plots/ at the top of the repository."""
    return Path(os.environ.get(PLOTS_ENV) or REPO / "plots")


def plots_dir() -> Path:
    """The plots folder, made if missing."""
    path = plots_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable(folder=None, what="figures") -> Path:
    """Make sure files can be written in `folder` (default: the plots folder) before any work
    starts; return it.

    Changes nothing on disk (a missing folder is judged by its nearest existing parent, and made
    later). Raises PermissionError with one line naming the folder (gpt.cli.run prints it as `error:
    ...`).
    """
    path = Path(folder) if folder is not None else plots_path()
    hint = (
        f"set ${PLOTS_ENV} to a folder you can write" if folder is None else "pass another folder"
    )
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        reason = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason, hint = f"no permission to write in {existing}", "make it writable or " + hint
    else:
        return path
    raise PermissionError(f"cannot write {what} to {path} ({reason}); {hint}")


@contextmanager
def atomic_open(path, mode="w", **kwargs):
    """`open(path, mode)` that writes a temporary file beside `path` and renames it over `path` only
    when whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: os.replace is atomic
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
