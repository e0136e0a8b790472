"""Shared test set-up: Triton's CPU interpreter, and the real-data folder ../shared/data."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, the fused kernels' tests run in Triton's interpreter. Triton reads the switch
# when it decorates a function, its own library included, so it must be set before anything
# (torch_geometric, for one) imports triton.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests run many small tensor ops, for which a second thread costs more than it gives, and
# which slow down tenfold when another process shares the two cores.
torch.set_num_threads(1)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The folder of real detector files; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data folder {SHARED_DATA} is absent (it lies beside the project root in CI)")
    return SHARED_DATA
