"""GFLOP/s of tensorlite's bf16 GEMM (tensorlite.kernels.matmul_bf16: the AVX512_BF16 twin,
and the fallback: operands rounded, then sgemm) against NumPy's float32 sgemm, at the products one
training step of the 6-layer/384 model (block 256, batch 8: 2048 rows) makes, on 1 and 2
threads. The variants take turns within each round; medians and [min-max] over the rounds.

    python benchmarks/bf16_gemm.py [--rounds 7] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name, sgemm_peak, summary

import tensorlite as tl
from tensorlite import kernels

R, C, V = 2048, 384, 65  # rows (B*T), n_embd, vocab (Tiny Shakespeare's characters)
SHAPES = {  # name: (m, k, n, transposed operand)
    "qkv fwd (2048x384 @ 384x1152)": (R, C, 3 * C, ""),
    "fc fwd (2048x384 @ 384x1536)": (R, C, 4 * C, ""),
    "proj fwd (2048x1536 @ 1536x384)": (R, 4 * C, C, ""),
    "fc dx (2048x1536 @ W^T)": (R, 4 * C, C, "b"),
    "fc dW (X^T @ 2048x1536)": (C, R, 4 * C, "a"),
    "head fwd (2048x384 @ 384x65)": (R, C, V, ""),
}


def operands(m: int, k: int, n: int, transposed: str):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if transposed == "a" else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if transposed == "b" else (k, n), dtype=np.float32)
    return (a.T if transposed == "a" else a), (b.T if transposed == "b" else b)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3, help="calls per variant per round (best)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if args.rounds < 1 or args.repeats < 1 or min(args.threads) < 1:
        sys.exit("bf16_gemm: --rounds, --repeats and --threads must be >= 1")
    fast = kernels.bf16_fast_available()
    print(f"CPU: {cpu_name()}; avx512_bf16 fast path: {'yes' if fast else 'no'}; "
          f"shared machine: figures are noisy")
    variants = {"sgemm": lambda a, b: a @ b, "bf16 fallback": lambda a, b: kernels.matmul_bf16(
        a, b, path="fallback")}
    if fast:
        variants["bf16 fast"] = lambda a, b: kernels.matmul_bf16(a, b, path="fast")
    print(f"{'threads':>7}  {'product':<34}" + "".join(f"{v:>22}" for v in variants)
          + f"{'fast/sgemm':>12}")
    for threads in args.threads:
        tl.set_num_threads(threads)
        print(f"sgemm peak (512^3), {threads} thread(s): {sgemm_peak():.0f} GFLOP/s")
        for name, (m, k, n, transposed) in SHAPES.items():
            a, b = operands(m, k, n, transposed)
            flops = 2.0 * m * n * k
            rates: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for v, fn in variants.items():
                    rates[v].append(flops / best_of(lambda fn=fn, a=a, b=b: fn(a, b), args.repeats) / 1e9)
            ratio = (f"{np.median(rates['bf16 fast']) / np.median(rates['sgemm']):.2f}x"
                     if fast else "-")
            print(f"{threads:>7}  {name:<34}" + "".join(f"{summary(rates[v]):>22}" for v in variants)
                  + f"{ratio:>12}", flush=True)


if __name__ == "__main__":
    main()
