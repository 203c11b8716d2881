"""What each kernel path costs to start: time to load its kernels and the process's peak RSS.

Each measurement is a fresh Python process that imports tensorlite, loads every kernel of
one path (compiling first if its cache is cold) and calls each once in float32; the paths
alternate round by round. We print the medians and ranges.

    python benchmarks/kernel_load.py                          # numpy, c; 3 rounds
    python benchmarks/kernel_load.py --paths c --cold         # compile into an empty cache
    python benchmarks/kernel_load.py --train                  # start to gpt.train's first step

--cold runs each process on a fresh copy of tensorlite (and gpt) whose __pycache__ cannot be
written, with an empty user cache folder: the C path then compiles.
--train times `python -m gpt.train --preset baby` from process start to its first logged
step (the issue's target: within 3 s with a warm cache) instead of the kernels alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
CHILD = """
import json, resource, sys, time
start = time.perf_counter()
import numpy as np
from tensorlite import kernels
imported = time.perf_counter()
path = sys.argv[1]
assert kernels.use_kernels(path) == path, f"the {path} kernels did not load"
kernels.warm_up()
loaded = time.perf_counter()
x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 2, 6)  # (B, T, 3C), C = 2: every kernel once
y, pt = kernels.causal_self_attention_forward(x, 1, 0.5)
kernels.causal_self_attention_backward(y, x, pt, 1, 0.5)
y, r = kernels.rms_norm_forward(x, np.ones(6, np.float32), 1e-5)
kernels.rms_norm_backward(y, x, r, np.ones(6, np.float32))
targets = np.zeros(4, dtype=np.int64)
loss, probs = kernels.cross_entropy_forward(x.reshape(4, 6), targets)
kernels.cross_entropy_backward(loss, probs, targets)
kernels.relu_squared_backward(kernels.relu_squared(x), x)
kernels.scatter_add_rows(np.zeros((3, 6), np.float32), targets, x.reshape(4, 6))
kernels.add_square_sum([x.copy()], [x])
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported,
                  "first_calls_s": time.perf_counter() - loaded,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(path: str, cold: bool, train: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), TENSORLITE_KERNELS=path)
    env.pop("NUMBA_CACHE_DIR", None)
    with tempfile.TemporaryDirectory() as tmp:
        if cold:
            site = Path(tmp) / "site"
            for package in ("tensorlite", "gpt"):
                shutil.copytree(REPO / package, site / package,
                                ignore=shutil.ignore_patterns("__pycache__"))
            (site / "tensorlite" / "__pycache__").write_text("read-only")
            env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(Path(tmp) / "cache"))
        if train:
            return {"first_step_s": first_step_seconds(env, tmp, train)}
        out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True,
                             env=env, cwd=tmp, check=False, timeout=900)
    if out.returncode != 0:
        sys.exit(f"{path}: the measuring process failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout)


def first_step_seconds(env: dict, tmp: str, data: str) -> float:
    """Seconds from starting `python -m gpt.train --preset baby` to its first step line."""
    cmd = [sys.executable, "-m", "gpt.train", "--preset", "baby", "--data", data,
           "--out-dir", str(Path(tmp) / "run"), "--max-iters", "2", "--log-interval", "1"]
    start = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=tmp) as proc:
        for line in proc.stdout:
            if line.startswith("iter 1/"):
                seconds = time.perf_counter() - start
                proc.kill()
                return seconds
    sys.exit(f"gpt.train printed no step line (exit status {proc.returncode})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", nargs="+", default=["numpy", "c"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="compile into an empty cache each time")
    ap.add_argument("--train", action="store_true", help="time gpt.train's first step instead")
    ap.add_argument("--data", default=str(DATA), help="the text --train trains on")
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {p: [] for p in args.paths}
    for r in range(args.rounds):
        for path in args.paths if r % 2 == 0 else args.paths[::-1]:
            runs[path].append(measure(path, args.cold, args.data if args.train else None))

    def cell(path: str, key: str, scale: float, fmt: str) -> str:
        values = [run[key] * scale for run in runs[path]]
        return (f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]")

    cache = "cold (compiling)" if args.cold else "warm"
    print(f"{args.rounds} rounds, {cache} cache; median [min-max]\n")
    if args.train:
        print("| path | python -m gpt.train --preset baby: first step logged after (s) |")
        print("|---|---:|")
        for path in args.paths:
            print(f"| {path} | {cell(path, 'first_step_s', 1, '.2f')} |")
        return
    print("| path | import tensorlite (ms) | load kernels (ms) | first calls (ms) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for path in args.paths:
        print(f"| {path} | {cell(path, 'import_s', 1e3, '.0f')} | {cell(path, 'load_s', 1e3, '.0f')}"
              f" | {cell(path, 'first_calls_s', 1e3, '.1f')} | {cell(path, 'peak_rss_mb', 1, '.0f')} |")


if __name__ == "__main__":
    main()
