import os

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the real SmolLM2 model (seconds to a minute)")
    config.addinivalue_line("markers", "gpu: needs a GPU; run by scripts on the device machine")
