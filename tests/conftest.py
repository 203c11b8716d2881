"""Hypothesis profiles: "ci" (fast, still every op) when CI is set, "dev" otherwise.
Choose one explicitly with HYPOTHESIS_PROFILE=thorough (many more examples)."""

import os

import pytest
from hypothesis import HealthCheck, settings

from tensorlite import kernels

_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=15, derandomize=True, **_common)
settings.register_profile("dev", max_examples=30, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session", autouse=True)
def kernels_loaded():
    """Load this process's kernels once up front (with TENSORLITE_KERNELS=numba on a fresh
    checkout numba compiles them here, ~20-30 s). The CLI tests' subprocesses run the NumPy
    references: each would otherwise pay ~1.5 s to import numba and load the kernels, minutes
    over the suite. tests/tensorlite/test_kernels.py starts its own numba subprocesses."""
    kernels.kernel_path()
    os.environ.setdefault("TENSORLITE_KERNELS", "numpy")
