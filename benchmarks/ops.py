"""Kernels, path against path: the NumPy references, the C and numexpr twins.

Every kernel in tensorlite.kernels runs on the path `kernels.use_kernels(...)` picks; here
each one is timed on every path that has a twin for it (the others run the reference), the
paths alternating sample by sample so all see the same machine load. We print medians (us per
call) and each path's speed-up over NumPy (> 1: faster than NumPy).

    python benchmarks/ops.py                      # 1 and 2 threads, 15 rounds
    python benchmarks/ops.py --rounds 31 --threads 2
    python benchmarks/ops.py --baby --threads 1 --paths numpy c   # the training kernels

Elementwise families at 1e3..1e6 float32 elements; every kernel of a training step at the
baby config's shapes (B 12, T 64, C 128, H 4, V 65, MLP hidden 512). The C kernels are
serial: their thread count is always 1 (the caller's threads share the work instead).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np

import tensorlite
import tensorlite.functional as F
from gpt.optim import adamw_update
from tensorlite import kernels

SIZES = (1_000, 10_000, 100_000, 1_000_000)
ELEMENTWISE = {  # name -> (number of input arrays, call)
    "exp": (1, lambda x: kernels.exp(x)),
    "tanh": (1, lambda x: kernels.tanh(x)),
    "sigmoid": (1, lambda x: kernels.sigmoid(x)),
    "tanh_backward": (2, lambda d, y: kernels.tanh_backward(d, y)),
    "relu_squared": (1, lambda x: kernels.relu_squared(x)),
    "relu_squared_backward": (2, lambda d, x: kernels.relu_squared_backward(d, x)),
    "adamw_update": (4, lambda p, g, m, v: (kernels.adamw_kernel(p.size) or adamw_update)(
        p, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 10)),
}


def fused_cases(rng: np.random.Generator) -> dict[str, Callable[[], object]]:
    B, T, C, H, V = 12, 64, 128, 4, 65
    f32 = np.float32
    qkv = rng.standard_normal((B, T, 3 * C)).astype(f32)
    dy = rng.standard_normal((B, T, C)).astype(f32)
    x = rng.standard_normal((B * T, C)).astype(f32)
    w = np.ones(C, dtype=f32)
    logits = rng.standard_normal((B * T, V)).astype(f32)
    targets = rng.integers(0, V, B * T)
    scale = 1 / math.sqrt(C // H)
    h = rng.standard_normal((B * T, 4 * C)).astype(f32)  # the MLP's hidden activations
    _, pt = F.causal_self_attention_forward(qkv, H, scale)
    _, r = F.rms_norm_forward.reference(x, w, 1e-5)
    _, probs = F.cross_entropy_forward.reference(logits, targets)
    table = np.zeros((V, C), dtype=f32)
    p, g = rng.standard_normal((C, 4 * C)).astype(f32), h[:C].copy()  # one MLP weight
    m, v = np.zeros_like(p), np.ones_like(p)
    dout = np.asarray(B * T, dtype=f32)  # scale dout / N = 1: repeated calls stay normal floats
    return {
        "attention forward": lambda: F.causal_self_attention_forward(qkv, H, scale),
        "attention backward": lambda: F.causal_self_attention_backward(dy, qkv, pt, H, scale),
        "rms_norm forward": lambda: F.rms_norm_forward(x, w, 1e-5),
        "rms_norm backward": lambda: F.rms_norm_backward(x, x, r, w),
        "relu_squared forward": lambda: kernels.relu_squared(h),
        "relu_squared backward": lambda: kernels.relu_squared_backward(h, h),
        "cross_entropy forward": lambda: F.cross_entropy_forward(logits, targets),
        # in place on probs: each call subtracts 1 at the targets again, the same work
        "cross_entropy backward": lambda: F.cross_entropy_backward(dout, probs, targets),
        "embedding backward": lambda: kernels.scatter_add_rows(table, targets, x),
        "adamw_update (128x512)": lambda: (kernels.adamw_kernel(p.size) or adamw_update)(
            p, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 10),
    }


def per_call_seconds(call: Callable, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - start) / number


def measure(call: Callable, paths: list[str], rounds: int, sample_s: float) -> dict[str, float]:
    """Median seconds per call on each path, the paths alternating (and their order too)."""
    for path in paths:  # warm up (C loads, numexpr caches the expression)
        kernels.use_kernels(path)
        call()
    number = max(1, int(sample_s / max(per_call_seconds(call, 3), 1e-7)))
    times = {p: [] for p in paths}
    for r in range(rounds):
        for path in paths if r % 2 == 0 else paths[::-1]:
            kernels.use_kernels(path)
            times[path].append(per_call_seconds(call, number))
    return {p: statistics.median(t) for p, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="samples per path (median taken)")
    ap.add_argument("--sample-ms", type=float, default=4.0, help="length of one sample")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=list(kernels.PATHS), choices=kernels.PATHS)
    ap.add_argument("--baby", action="store_true", help="only the kernels at the baby shapes")
    args = ap.parse_args(argv)
    wanted = ["numpy"] + [p for p in args.paths if p != "numpy"]  # numpy: the baseline
    paths = [p for p in wanted if kernels.use_kernels(p) == p]  # C may be missing
    rng = np.random.default_rng(0)

    print(f"float32, median of {args.rounds} alternating samples of ~{args.sample_ms:g} ms; "
          f"cells: us per call (speed-up over numpy)\n")
    print("| kernel | size | threads | " + " | ".join(paths) + " |")
    print("|---|---:|---:|" + "---:|" * len(paths))
    for threads in args.threads:
        tensorlite.set_num_threads(threads)
        rows = []
        for name, (n_arrays, call) in ({} if args.baby else ELEMENTWISE).items():
            for size in SIZES:
                xs = [rng.uniform(-2, 2, size).astype(np.float32) for _ in range(n_arrays)]
                if n_arrays == 4:
                    xs[3] = np.abs(xs[3])  # AdamW's second moment is >= 0
                rows.append((name, f"{size:.0e}", lambda c=call, xs=xs: c(*xs)))
        rows += [(name, "baby", call) for name, call in fused_cases(rng).items()]
        for name, size, call in rows:
            t = measure(call, paths, args.rounds, args.sample_ms / 1e3)
            cells = [f"{t[p] * 1e6:.3g} ({t['numpy'] / t[p]:.2f})" for p in paths]
            print(f"| {name} | {size} | {threads} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
