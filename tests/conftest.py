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
    """Load this process's kernels once up front: on a fresh checkout the C kernels compile
    here (~1 s), so the CLI tests' subprocesses find them cached and run the same path as
    the test session. Where the C
    kernels cannot be built (no compiler) the subprocesses are told the path in use, so
    they do not each print the fallback line into the output the CLI tests check."""
    os.environ.setdefault("TENSORLITE_KERNELS", kernels.kernel_path())
