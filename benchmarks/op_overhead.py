"""The engine's own cost per op: forward (Function.apply) plus backward (the driver loop),
on a chain of tiny ops where NumPy's work is negligible, so what is timed is tensorlite's
Python bookkeeping. Process CPU time, not wall time: on a busy machine it moves much less.

    python benchmarks/op_overhead.py                 # median and range of 15 rounds
    PYTHONPATH=/other/checkout python benchmarks/op_overhead.py   # the same for another version
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import tensorlite as tl


def one_round(n_ops: int) -> float:
    """CPU microseconds per op for a forward + backward through a chain of n_ops tiny ops."""
    x = tl.Tensor(np.ones(4), requires_grad=True)
    t0 = time.process_time()
    y = x
    for i in range(n_ops // 2):
        y = (y * 0.999 if i % 2 else y + 0.001).tanh()
    y.sum().backward()
    return 1e6 * (time.process_time() - t0) / n_ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--ops", type=int, default=20_000)
    args = p.parse_args()
    one_round(1000)  # warm up
    times = [one_round(args.ops) for _ in range(args.rounds)]
    print(f"{statistics.median(times):.2f} us per op (forward + backward), "
          f"range {min(times):.2f}-{max(times):.2f}, {args.rounds} rounds of {args.ops} ops")


if __name__ == "__main__":
    main()
