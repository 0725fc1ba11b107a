import os

import pytest
import torch

# Small, fast, deterministic CPU tests: two cores here, fp32 only.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
