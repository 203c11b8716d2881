"""tensorlite's decode_step, the batched decoder step gpt.serve runs for every token: the C twin
(one call for all of a GPT's blocks, on packed copies of the weights) against its NumPy
reference (a product per linear layer through BLAS, a few NumPy calls per layer besides), for
1, 2, 4 and 8 sequences at once, each at position block_size/2 of its KV cache; and, for scale,
BLAS's own time for the step's products alone ((rows, C) @ (C, N) for the four linear layers
of every block, as the reference calls them).

    python benchmarks/decode_step.py                    # baby and 6x384, 5 rounds
    python benchmarks/decode_step.py --shapes baby --rounds 3 --threads 2

Every round times each way, taking turns (the 20th percentile of --repeats calls: noise only
ever adds); we print medians and [min-max] over the rounds, the CPU and a measured sgemm peak.
The shapes are benchmarks/serve.py's, random weights, float32.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from machine import cpu_name, sgemm_peak, summary  # benchmarks/machine.py

import tensorlite
from tensorlite import kernels, kernels_c

SHAPES = {"baby": (4, 8, 128, 64), "6x384": (6, 6, 384, 256)}  # layers, heads, n_embd, block
ROWS = (1, 2, 4, 8)


def arguments(shape: str, rows: int, rng: np.random.Generator) -> tuple:
    """decode_step's arguments: random blocks (rms_norm, relu**2, no biases, as gpt.train's
    defaults) and caches filled up to position block_size/2 for every row."""
    L, H, C, T = SHAPES[shape]
    hd = C // H

    def w(n_in, n_out):
        return (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)

    blocks = [(np.ones(C, np.float32), None, w(C, 3 * C), None, w(C, C), None,
               np.ones(C, np.float32), None, w(C, 4 * C), None, w(4 * C, C), None)
              for _ in range(L)]
    k = rng.standard_normal((L, rows, H, T + 1, hd)).astype(np.float32)
    v = rng.standard_normal((L, rows, H, T + 1, hd)).astype(np.float32)
    pos = np.full(rows, T // 2)
    x = rng.standard_normal((rows, C)).astype(np.float32)
    return x, pos, pos.copy(), blocks, k, v, H, np.float32(1 / np.sqrt(hd))


def timed(way: str, step: tuple, xs: list, repeats: int) -> float:
    """The seconds of one step `way`: "C" (decode_step's C twin), "NumPy" (its reference) or
    "products" (only BLAS's products of the step, xs: (input, weight) pairs)."""
    x, *rest = step
    kernels.use_kernels("numpy" if way == "NumPy" else "c")
    times = []
    for _ in range(repeats):
        rows = x.copy()  # (decode_step adds into its rows)
        t = time.perf_counter()
        if way == "products":
            for a, w in xs:
                a @ w
        else:
            kernels.decode_step(rows, *rest)
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="baby,6x384")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=100, help="calls per way per round")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (the C loop is serial)")
    args = ap.parse_args()
    tensorlite.set_num_threads(args.threads)
    kernels.use_kernels("c")
    width = kernels_c._fn("decode_panel", np.dtype(np.float32))()  # floats in one vector
    print(f"CPU: {cpu_name()}; sgemm peak {sgemm_peak():.0f} GFLOP/s (512^3 float32, "
          f"{args.threads} thread(s)); the C loop's vectors hold {width} floats; "
          f"{args.rounds} rounds, us per step, median [min-max]")
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        L, H, C, T = SHAPES[shape]
        print(f"\n{shape}: {L} layers, {H} heads, n_embd {C}, position {T // 2} of {T}")
        for rows in ROWS:
            step = arguments(shape, rows, rng)
            blocks = step[3]
            xs = [(rng.standard_normal((rows, n_in)).astype(np.float32), w)
                  for b in blocks for n_in, w in ((C, b[2]), (C, b[4]), (C, b[8]), (4 * C, b[10]))]
            results: dict[str, list[float]] = {"C": [], "NumPy": [], "products": []}
            for _ in range(args.rounds):
                for way, taken in results.items():
                    taken.append(timed(way, step, xs, args.repeats))
            kernels.use_kernels("c")
            c, ref = np.median(results["C"]), np.median(results["NumPy"])
            print(f"  {rows} row(s): C {summary([1e6 * t for t in results['C']])}, NumPy "
                  f"reference {summary([1e6 * t for t in results['NumPy']])} ({ref / c:.1f}x), "
                  f"its BLAS products alone {summary([1e6 * t for t in results['products']])}")


if __name__ == "__main__":
    main()
