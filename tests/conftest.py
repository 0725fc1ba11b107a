import importlib.util
import os

import pytest
import torch

# Small, fast, deterministic CPU tests: two cores here, fp32 only.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# run.precision=auto (the default) must not pick bf16 on CPUs with bf16 units, here or in the
# commands the tests start as subprocesses: the tests compare numbers and must not depend on timing.
os.environ["MAEVIT_CPU_BF16"] = "0"

# The test extras of pyproject.toml: a missing one is an error, never a silent skip of the tests
# that need it (the HF parity tests would otherwise vanish and let model bugs through).
TEST_DEPENDENCIES = ("transformers", "tensorboard", "s3fs", "moto", "flask_cors")


def pytest_configure(config):
    missing = [m for m in TEST_DEPENDENCIES if importlib.util.find_spec(m) is None]
    if missing:
        raise pytest.UsageError(
            f"test dependencies missing: {', '.join(missing)}. Install the test extras: "
            f"pip install -e '.[test]' (`make test` does)."
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster on a shared, oversubscribed CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
