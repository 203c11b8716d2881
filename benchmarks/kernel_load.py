"""What each kernel path costs to start: time to load its kernels and the process's peak RSS.

Each measurement is a fresh Python process that imports tensorlite, loads every kernel of
one path (compiling first if its cache is cold) and calls each once in float32; the paths
alternate round by round. We print the medians and ranges.

    python benchmarks/kernel_load.py                          # numpy, c, numba; 3 rounds
    python benchmarks/kernel_load.py --paths c --cold         # compile into an empty cache

--cold runs each process on a fresh copy of tensorlite whose __pycache__ cannot be written,
with an empty user cache folder: the C path then compiles (and numba too).
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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
if path != "numpy":
    kernels._exercise(np.float32)
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported,
                  "first_calls_s": time.perf_counter() - loaded,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(path: str, cold: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NUMBA_CACHE_DIR", None)
    with tempfile.TemporaryDirectory() as tmp:
        if cold:
            site = Path(tmp) / "site"
            shutil.copytree(REPO / "tensorlite", site / "tensorlite",
                            ignore=shutil.ignore_patterns("__pycache__"))
            (site / "tensorlite" / "__pycache__").write_text("read-only")
            env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(Path(tmp) / "cache"))
        out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True,
                             env=env, cwd=tmp, check=False, timeout=900)
    if out.returncode != 0:
        sys.exit(f"{path}: the measuring process failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", nargs="+", default=["numpy", "c", "numba"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="compile into an empty cache each time")
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {p: [] for p in args.paths}
    for r in range(args.rounds):
        for path in args.paths if r % 2 == 0 else args.paths[::-1]:
            runs[path].append(measure(path, args.cold))

    def cell(path: str, key: str, scale: float, fmt: str) -> str:
        values = [run[key] * scale for run in runs[path]]
        return (f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]")

    cache = "cold (compiling)" if args.cold else "warm"
    print(f"{args.rounds} rounds, {cache} cache; median [min-max]\n")
    print("| path | import tensorlite (ms) | load kernels (ms) | first calls (ms) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for path in args.paths:
        print(f"| {path} | {cell(path, 'import_s', 1e3, '.0f')} | {cell(path, 'load_s', 1e3, '.0f')}"
              f" | {cell(path, 'first_calls_s', 1e3, '.1f')} | {cell(path, 'peak_rss_mb', 1, '.0f')} |")


if __name__ == "__main__":
    main()
