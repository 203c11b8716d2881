"""Sampling a large model is reading its weights: how fast each way of doing a decoder step's
matrix-vector products streams them from memory, at GPT-2 small's shapes, on 1 thread (what
gpt.sample uses). The figures behind gpt.model.lay_out_by_rows and tensorlite's row_dots
(docs/performance.md, "Sampling a large model").

Per shape, enough distinct matrices to fill ~300 MB (so none is in cache), one (1, in) row
times each; GB/s of weights read, median [min-max] over rounds that alternate the ways:

  sum            np.sum over the same bytes: the memory system's pace for one core
  blas (in,out)  np.matmul(x, W) with W (in, out), C order: BLAS's GEMV, the layout training keeps
  blas W^T       np.matmul(x, E.T) with E (out, in): BLAS's transposed GEMV (the tied head as it was)
  row_dots       tensorlite's row_dots(x, E), E (out, in): one pass over E's rows
  ... unaligned  the same with every matrix starting 48 bytes past a 64-byte boundary (where a
                 safetensors file's data began before load_model aligned it)
  ... 4K pages   the same with the matrices in a Python bytearray, which Linux backs with 4 KiB
                 pages, where NumPy's large arrays get huge pages (it asks with madvise; see
                 /sys/kernel/mm/transparent_hugepage/enabled): how checkpoint.load_model held
                 the weights before it read them into a NumPy buffer

    python benchmarks/gemv.py --rounds 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from machine import cpu_name, sgemm_peak, summary  # benchmarks/machine.py

import tensorlite
from tensorlite import kernels

SHAPES = {"attn.c_attn": (768, 2304), "attn.c_proj": (768, 768), "mlp.c_fc": (768, 3072),
          "mlp.c_proj": (3072, 768), "head (wte)": (768, 50257)}


def placed(shape: tuple[int, int], count: int, offset: int, rng,
           small_pages: bool = False) -> list[np.ndarray]:
    """`count` random float32 arrays of `shape`, C order, one after another in one buffer, each
    starting `offset` bytes past a 64-byte boundary. The buffer is a NumPy array, or with
    small_pages a bytearray (one large allocation: fresh pages from the kernel, as a file's
    bytes read by Python were)."""
    size = shape[0] * shape[1] * 4 + 64  # each array's bytes, plus room to place the next
    raw = (np.frombuffer(bytearray(size * count + 64), dtype=np.uint8) if small_pages
           else np.empty(size * count + 64, dtype=np.uint8))
    at = -raw.ctypes.data % 64 + offset
    out = []
    for _ in range(count):
        a = raw[at:at + size - 64].view(np.float32).reshape(shape)
        a[...] = rng.random(shape, dtype=np.float32)
        out.append(a)
        at += size
    return out


def measure(k: int, m: int, count: int, rounds: int, rng) -> dict[str, list[float]]:
    """GB/s of each way over `count` (k, m) matrices, rounds alternating the ways."""
    ins = placed((k, m), count, 0, rng)  # (in, out)
    rows = placed((m, k), count, 0, rng)  # (out, in)
    skewed = placed((m, k), count, 48, rng)
    small = placed((m, k), count, 0, rng, small_pages=True)
    x, y = rng.random((1, k), dtype=np.float32), np.empty((1, m), dtype=np.float32)
    ways = {
        "sum": lambda: [w.sum() for w in rows],
        "blas (in,out)": lambda: [np.matmul(x, w, out=y) for w in ins],
        "blas W^T": lambda: [np.matmul(x, w.T, out=y) for w in rows],
        "row_dots": lambda: [kernels.row_dots(x, w, out=y) for w in rows],
        "row_dots unaligned": lambda: [kernels.row_dots(x, w, out=y) for w in skewed],
        "row_dots 4K pages": lambda: [kernels.row_dots(x, w, out=y) for w in small],
    }
    rates: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(rounds):
        for way, run in ways.items():
            t = time.perf_counter()
            run()
            rates[way].append(count * k * m * 4 / (time.perf_counter() - t) / 1e9)
    return rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--megabytes", type=int, default=300, help="weights per measurement (MB)")
    args = p.parse_args(argv)
    tensorlite.set_num_threads(1)
    print(f"CPU: {cpu_name()}; sgemm peak {sgemm_peak():.0f} GFLOP/s (512^3, 1 thread); "
          f"kernels: {kernels.kernel_path()}")
    rng = np.random.default_rng(0)
    for name, (k, m) in SHAPES.items():
        count = max(1, args.megabytes * 10**6 // (k * m * 4))
        rates = measure(k, m, count, args.rounds, rng)
        print(f"{name} ({k} x {m}, {count} matrices): "
              + "; ".join(f"{way} {summary(r, '.1f')}" for way, r in rates.items()) + " GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
