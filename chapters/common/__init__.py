"""What every chapter may use; imports only `gpt`. Figures live in `chapters.common.figures`, which
alone loads matplotlib, so the maths and the training code stay light.

- `files`: where figures and tables go, atomic writes (`atomic_open`), the writable-folder check;
- `runtime`: `one_thread`, `available_cores`, `ChapterSkipped`;
- `rows`: token-row layouts, how token lists become the (B, T) tensors a GPT-2 reads;
- `newton`: Newton's method for the tabular chapters' small smooth losses;
- `lbfgs`: L-BFGS to convergence, for the tabular chapters' fits;
- `figures`: matplotlib without a screen, `save`.
"""

from chapters.common.files import atomic_open, check_writable, plots_dir, plots_path  # noqa: F401
from chapters.common.newton import newton_minimise  # noqa: F401
from chapters.common.runtime import ChapterSkipped, available_cores, one_thread  # noqa: F401
