"""Where chapter figures go: `plots/` at the top of the repository, or $DPO_PLOTS_DIR (tests set it)."""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def plots_dir() -> Path:
    path = Path(os.environ.get("DPO_PLOTS_DIR", REPO / "plots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def save(fig, name: str) -> Path:
    """Write `fig` as plots/<name>.png (150 dpi, tight) and close it; return the path."""
    path = plots_dir() / f"{name}.png"
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(f"figure: {path}")
    return path
