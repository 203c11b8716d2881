"""What the benchmarks print about the machine beside their figures: the CPU's name, a
measured sgemm peak, and medians with their [min-max] range."""

from __future__ import annotations

import statistics
import subprocess
import time

import numpy as np


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def sgemm_peak(m: int = 512, k: int = 512, n: int = 512, repeats: int = 50) -> float:
    """Measured float32 matmul GFLOP/s of (m, k) @ (k, n) (NumPy's BLAS, the threads set)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times) / 1e9


def summary(values: list[float], fmt: str = ".0f") -> str:
    """'median [min-max]' of the rounds."""
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"
