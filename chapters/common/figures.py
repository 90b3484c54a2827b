"""Figures: matplotlib without a screen, and `save`, which writes a figure whole into the plots
folder.

Only modules that draw import this one, so the maths and the training code load no matplotlib.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

from chapters.common.files import atomic_open, plots_dir  # noqa: E402


def save_figure(fig, path) -> Path:
    """Write `fig` to `path` as PNG (150 dpi, tight), atomically, and close it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=150, bbox_inches="tight")
    finally:
        plt.close(fig)
    print(f"figure: {path}")
    return path


def save(fig, name: str) -> Path:
    """Write `fig` as plots/<name>.png (or under $DPO_PLOTS_DIR) and close it; return the path."""
    return save_figure(fig, plots_dir() / f"{name}.png")
