import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chapters.common.runtime import one_thread as _one_thread  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_plots_dir(tmp_path_factory, monkeypatch):
    """Every test starts from seed 0 and writes figures to a temporary folder, never over plots/."""
    torch.manual_seed(0)
    monkeypatch.setenv("DPO_PLOTS_DIR", str(tmp_path_factory.getbasetemp() / "plots"))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run on one thread (see chapters.common.runtime.one_thread), for the rest of the
    test module."""
    with _one_thread():
        yield
