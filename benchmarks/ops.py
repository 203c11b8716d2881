"""Elementwise kernels: numexpr vs NumPy, per op family, to choose kernels.NUMEXPR_MIN_SIZE.

Every helper in tensorlite/kernels.py has a NumPy path and a numexpr path; here each one is
timed both ways (kernels.force_numexpr(True) / (False)) on float32 arrays of 1e3..1e6
elements, with 1 and 2 threads. The two paths alternate sample by sample, so both see the
same machine load; we print medians, the speed-up of numexpr (NumPy time / numexpr time,
> 1 means numexpr wins) and, per family, the size where numexpr starts to win.

    python3 benchmarks/ops.py                    # 1 and 2 threads, 1e3..1e6, 21 rounds
    python3 benchmarks/ops.py --rounds 41 --threads 2

Families: transcendental (exp, tanh, sigmoid), fused (long expressions in one pass), and
simple (a*b+c), which no op routes through numexpr; it is here for reference.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np

import tensorlite
from tensorlite import kernels

SIZES = (1_000, 10_000, 100_000, 1_000_000)


def _multiply_add(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a*b+c: the reference 'simple' expression (not a tensorlite helper)."""
    if kernels.use_numexpr("simple", a.size):
        return kernels._ne("a * b + c", a=a, b=b, c=c)
    return a * b + c


def _adamw(p, g, m, v):
    """gpt.optim's AdamW update as AdamW.step runs it: the numexpr twin where it is switched
    on, else the NumPy math."""
    from gpt.optim import adamw_update

    update = kernels.adamw_kernel(p.size) or adamw_update
    update(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=10)


# family -> [(op name, number of input arrays, call)]
CASES: dict[str, list[tuple[str, int, Callable]]] = {
    "transcendental": [
        ("exp", 1, kernels.exp),
        ("tanh", 1, kernels.tanh),
        ("sigmoid", 1, kernels.sigmoid),
    ],
    "fused": [
        ("tanh_backward", 2, kernels.tanh_backward),
        ("sigmoid_backward", 2, kernels.sigmoid_backward),
        ("relu_squared", 1, kernels.relu_squared),
        ("relu_squared_backward", 2, kernels.relu_squared_backward),
        ("adamw_update", 4, _adamw),
    ],
    "simple": [("a*b+c", 3, _multiply_add)],
}


def make_inputs(n_arrays: int, size: int, rng: np.random.Generator) -> list:
    """float32 inputs in [-2, 2]; AdamW's second moment (the 4th array) must be >= 0."""
    xs = [rng.uniform(-2, 2, size).astype(np.float32) for _ in range(n_arrays)]
    if n_arrays == 4:
        xs[3] = np.abs(xs[3])
    return xs


def per_call_seconds(call: Callable, args: list, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        call(*args)
    return (time.perf_counter() - start) / number


def measure(call: Callable, args: list, rounds: int, sample_s: float) -> tuple[float, float]:
    """Median seconds per call through NumPy and through numexpr, alternating paths."""
    for force in (False, True):  # warm up: numexpr compiles and caches the expression
        kernels.force_numexpr(force)
        call(*args)
    kernels.force_numexpr(False)
    single = per_call_seconds(call, args, 3)
    number = max(1, int(sample_s / max(single, 1e-7)))
    times = {False: [], True: []}
    for r in range(rounds):
        for force in ((False, True) if r % 2 == 0 else (True, False)):
            kernels.force_numexpr(force)
            times[force].append(per_call_seconds(call, args, number))
    kernels.force_numexpr(None)
    return statistics.median(times[False]), statistics.median(times[True])


def break_even(speedups: list[float], sizes=SIZES) -> float | None:
    """The size from which numexpr wins (speed-up > 1) at every larger measured size,
    interpolated on a log scale between two measured sizes; None if it never wins."""
    if speedups[-1] <= 1:
        return None
    i = len(speedups) - 1
    while i > 0 and speedups[i - 1] > 1:
        i -= 1
    if i == 0:
        return float(sizes[0])  # wins already at the smallest size measured
    lo, hi = math.log(speedups[i - 1]), math.log(speedups[i])
    frac = -lo / (hi - lo)
    return math.exp(math.log(sizes[i - 1]) + frac * (math.log(sizes[i]) - math.log(sizes[i - 1])))


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=21, help="samples per path (median taken)")
    ap.add_argument("--sample-ms", type=float, default=4.0, help="length of one sample")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)

    kernels.NUMEXPR_MIN_SIZE.setdefault("simple", None)  # so use_numexpr knows the family
    rng = np.random.default_rng(0)
    results = {}  # (family, op, threads) -> [(numpy_s, numexpr_s) per size]
    for threads in args.threads:
        tensorlite.set_num_threads(threads)
        for family, cases in CASES.items():
            for op, n_arrays, call in cases:
                row = []
                for size in SIZES:
                    inputs = make_inputs(n_arrays, size, rng)
                    row.append(measure(call, inputs, args.rounds, args.sample_ms / 1e3))
                results[family, op, threads] = row

    print(f"numexpr vs NumPy, float32, median of {args.rounds} alternating samples of "
          f"~{args.sample_ms:g} ms each")
    print("cells: NumPy us / numexpr us (speed-up = NumPy time / numexpr time; > 1: numexpr wins)\n")
    print("| family | op | threads | " + " | ".join(f"{s:.0e}" for s in SIZES) + " |")
    print("|---|---|---|" + "---|" * len(SIZES))
    for (family, op, threads), row in results.items():
        cells = [f"{a * 1e6:.3g} / {b * 1e6:.3g} ({a / b:.2f})" for a, b in row]
        print(f"| {family} | {op} | {threads} | " + " | ".join(cells) + " |")

    print("\nper family: geometric mean speed-up of numexpr, and break-even size\n")
    print("| family | threads | " + " | ".join(f"{s:.0e}" for s in SIZES) + " | break-even |")
    print("|---|---|" + "---|" * len(SIZES) + "---|")
    for threads in args.threads:
        for family, cases in CASES.items():
            rows = [results[family, op, threads] for op, _, _ in cases]
            speedups = [geomean([r[i][0] / r[i][1] for r in rows]) for i in range(len(SIZES))]
            be = break_even(speedups)
            be_text = "never (up to 1e6)" if be is None else f"~{be:.2g}"
            print(f"| {family} | {threads} | " + " | ".join(f"{s:.2f}" for s in speedups)
                  + f" | {be_text} |")


if __name__ == "__main__":
    main()
