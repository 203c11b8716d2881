"""Token files on a large corpus (issue 23): how long `python -m gpt.data prepare` takes and how
much memory it holds (char and BPE), the peak memory of `python -m gpt.train --preset baby`
trained from the text itself against trained from its token files, and what sending a step's
batch to 2 workers costs as rows against as the windows' starts (loky, and a dask cluster).

    python benchmarks/token_files.py                          # 220 MB, 3 rounds
    python benchmarks/token_files.py --mb 50 --rounds 1 --steps 20
    python benchmarks/token_files.py --mb 50 --parts dask --rounds 5

The corpus is Tiny Shakespeare (--source) repeated to --mb MB in a temporary folder, removed at
the end (it is never kept in the repository). Every command runs as its own process, as a user
runs it; its peak resident memory is the kernel's count for that process (wait4's ru_maxrss).
The variants alternate within each round; we print the median [min-max] of the rounds.
Training runs --steps steps of the baby shape with one evaluation at the end, once from the
text, once from the token files of the same text, and once from the token files of one copy
of the source (to show that the memory does not grow with the corpus).
The dask part starts a scheduler and 2 worker processes (one thread each) on 127.0.0.1 and
times what gpt.parallel.DaskCluster does with a step's batch of token files: each shard a task
pinned to its worker, carrying the rows cut here, or the starts (gpt.data.TokenWindows with
the file's fingerprint) from which the worker cuts the rows out of its own map of the file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name, sgemm_peak, summary

ROOT = Path(__file__).resolve().parent.parent
# this checkout's gpt, here, in the commands it runs and in loky's workers
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
# Tiny Shakespeare beside the checkout (or beside the folder of its worktrees), if there
SOURCE = next((d / "shared" / "data" / "tinyshakespeare.txt" for d in ROOT.parents
               if (d / "shared" / "data" / "tinyshakespeare.txt").is_file()),
              ROOT / "tinyshakespeare.txt")


def measured(args: list[str], cwd: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stdout) of `python -m ARGS`, run as its own process; exits
    with the command's stderr if it fails."""
    env = dict(os.environ)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=out,
                                stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            sys.exit(f"`python -m {' '.join(args)}` failed: {err.read().strip()}")
        return seconds, usage.ru_maxrss / 1024, out.read()  # ru_maxrss is in KB on Linux


def _shipped(x, y) -> int:
    """A worker's task that is given its batch rows (what gpt.parallel sends today)."""
    return int(x[0, 0]) + int(y[-1, -1])


_maps: dict = {}


def _read_here(path: str, starts, block_size: int) -> int:
    """A worker's task that cuts its batch rows from the token file itself."""
    import numpy as np

    from gpt.data import windows

    if path not in _maps:
        _maps[path] = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = windows(_maps[path], starts, block_size)
    return int(x[0, 0]) + int(y[-1, -1])


def shipping(train_bin: str, rounds: int, reps: int = 200) -> None:
    """Milliseconds per step of sending each of 2 workers its shard of a batch (the rows, as
    gpt.parallel does) against sending only the windows' starts for the worker to read from the
    token file, through the loky pool gpt.parallel uses; the tasks do nothing else."""
    import numpy as np
    from joblib.externals.loky import get_reusable_executor

    from gpt.data import batch_starts, windows

    ids = np.memmap(train_bin, dtype=np.uint16, mode="r")
    pool = get_reusable_executor(max_workers=2)
    rng = np.random.default_rng(0)
    for f in [pool.submit(_read_here, train_bin, np.arange(2), 8) for _ in range(8)]:
        f.result()  # the workers started, gpt.data imported and the file mapped in each
    print("\nsending a step's batch to 2 loky workers: ms per step "
          f"({rounds} rounds x {reps} steps)")
    for B, T in ((12, 64), (32, 256), (64, 1024)):
        times: dict[str, list[float]] = {"rows": [], "starts": []}
        for _ in range(rounds):
            for how, spent in times.items():
                t = time.perf_counter()
                for _ in range(reps):
                    starts = batch_starts(len(ids), T, B, rng)
                    halves = (starts[: B // 2], starts[B // 2 :])
                    if how == "rows":
                        futures = [pool.submit(_shipped, *windows(ids, h, T)) for h in halves]
                    else:
                        futures = [pool.submit(_read_here, train_bin, h, T) for h in halves]
                    for f in futures:
                        f.result()
                spent.append((time.perf_counter() - t) / reps * 1e3)
        rows_kb = B * T * 8 * 2 / 1024
        print(f"  batch {B} x {T}: rows ({rows_kb:,.0f} KB int64 x, y) "
              f"{summary(times['rows'], '.2f')} ms, starts ({B * 8} bytes) "
              f"{summary(times['starts'], '.2f')} ms")


def _rows_task(x, y) -> int:
    """A dask task given its shard's rows."""
    return int(x[0, 0]) + int(y[-1, -1])


def _windows_task(w) -> int:
    """A dask task given its shard's windows: it reads the rows as gpt.parallel's does."""
    x, y = w.batch()
    return int(x[0, 0]) + int(y[-1, -1])


def dask_shipping(train_bin: str, rounds: int, reps: int = 100) -> None:
    """Milliseconds per step of handing each of 2 dask workers its shard of a batch: the rows
    (cut here from the memmap) against the windows' starts (read in the worker)."""
    import dataclasses

    import numpy as np
    from dask.distributed import Client, LocalCluster

    from gpt.data import TokenWindows, batch_starts, file_fingerprint, load_token_dir, windows

    ids = load_token_dir(Path(train_bin).parent, check_ids=False).train
    fingerprint = file_fingerprint(train_bin)
    rng = np.random.default_rng(0)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        workers = sorted(client.nthreads())

        def step(how: str, B: int, T: int) -> None:
            starts = batch_starts(len(ids), T, B, rng)
            futures = []
            for k, half in enumerate((starts[: B // 2], starts[B // 2 :])):
                if how == "rows":
                    task, args = _rows_task, windows(ids, half, T)
                else:
                    w = dataclasses.replace(TokenWindows.of(ids, half, T),
                                            fingerprint=fingerprint)
                    task, args = _windows_task, (w,)
                futures.append(client.submit(task, *args, workers=[workers[k]],
                                             allow_other_workers=True, pure=False))
            client.gather(futures)

        for how in ("rows", "starts"):  # warm: the workers import gpt and map the file
            for _ in range(5):
                step(how, 2, 8)
        print(f"\nsending a step's batch to 2 dask workers (loopback): ms per step, the "
              f"median step of each round ({rounds} rounds x {reps} steps of each, the two "
              "alternating step by step)")
        for B, T in ((12, 64), (16, 128), (32, 128), (32, 256), (64, 512), (64, 1024)):
            times: dict[str, list[float]] = {"rows": [], "starts": []}
            for r in range(rounds):
                spent: dict[str, list[float]] = {"rows": [], "starts": []}
                for i in range(reps):
                    for how in ("rows", "starts") if (i + r) % 2 == 0 else ("starts", "rows"):
                        t = time.perf_counter()
                        step(how, B, T)
                        spent[how].append((time.perf_counter() - t) * 1e3)
                for how, ms in spent.items():
                    times[how].append(statistics.median(ms))
            ratio = [a / b for a, b in zip(times["rows"], times["starts"])]
            print(f"  batch {B} x {T} ({B * T:,} tokens, rows {B * T * 16 / 1024:,.0f} KB): "
                  f"rows {summary(times['rows'], '.2f')} ms, starts "
                  f"{summary(times['starts'], '.2f')} ms, rows/starts "
                  f"{summary(ratio, '.2f')}", flush=True)


def make_corpus(source: Path, mb: float, path: Path) -> int:
    """`source` repeated to at least mb MB into `path`; returns its size in bytes."""
    text = source.read_bytes()
    with open(path, "wb") as f:
        f.writelines(text for _ in range(int(mb * 1e6 // len(text)) + 1))
    return path.stat().st_size


def prepare_runs(corpus: Path, size: int, work: Path, rounds: int, bpe_vocab: int) -> None:
    """`gpt.data prepare` of the corpus, char and BPE in turn; keeps work/char."""
    prep: dict[str, list] = {"char": [], "bpe": []}
    for r in range(rounds):
        for kind, rows in prep.items():
            out = work / kind
            shutil.rmtree(out, ignore_errors=True)
            flags = ["--tokenizer", "bpe", "--vocab-size", str(bpe_vocab)] if kind == "bpe" else []
            rows.append(measured(["gpt.data", "prepare", str(corpus), "--out", str(out), *flags],
                                 str(work))[:2])
    print(f"\nprepare {size / 1e6:.0f} MB ({rounds} rounds): seconds, MB/s, peak RSS MB")
    for kind, rows in prep.items():
        secs = [s for s, _ in rows]
        print(f"  {kind:<5} {summary(secs, '.1f')} s   "
              f"{summary([size / 1e6 / s for s in secs], '.1f')} MB/s   "
              f"{summary([m for _, m in rows])} MB", flush=True)


def train_runs(corpus: Path, size: int, small: Path, work: Path, rounds: int,
               steps: int) -> None:
    """Peak RSS of gpt.train (baby, char) from the text, from its token files, and from the
    token files of one copy of the source."""
    measured(["gpt.data", "prepare", str(small), "--out", str(work / "small")], str(work))
    train = ["gpt.train", "--preset", "baby", "--max-iters", str(steps), "--eval-interval",
             str(steps), "--eval-iters", "5"]
    variants = {f"text file, {size / 1e6:.0f} MB": str(corpus),
                f"token files, {size / 1e6:.0f} MB": str(work / "char"),
                f"token files, {small.stat().st_size / 1e6:.1f} MB": str(work / "small")}
    runs: dict[str, list] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, data in variants.items():
            out = work / "run"
            shutil.rmtree(out, ignore_errors=True)
            runs[name].append(measured([*train, "--data", data, "--out-dir", str(out)],
                                       str(work))[:2])
    print(f"\ngpt.train --preset baby (char), {steps} steps + 1 eval ({rounds} rounds): "
          "peak RSS MB, seconds")
    for name, rows in runs.items():
        print(f"  from {name:<24} {summary([m for _, m in rows])} MB   "
              f"{summary([s for s, _ in rows], '.1f')} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=220.0, help="corpus size in MB (default 220)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every variant (default 3)")
    p.add_argument("--steps", type=int, default=100, help="training steps per run (default 100)")
    p.add_argument("--bpe-vocab", type=int, default=512, help="BPE vocabulary (default 512)")
    p.add_argument("--source", type=Path, default=SOURCE, help="the text to repeat")
    p.add_argument("--tmp", default=None, help="folder for the corpus and the token files")
    p.add_argument("--parts", default="prepare,train,ship,dask",
                   help="which measurements, comma-separated (default: all four)")
    a = p.parse_args()
    if a.rounds < 1 or a.steps < 1 or a.mb <= 0:
        sys.exit("error: --rounds, --steps and --mb must be positive")
    parts = set(a.parts.split(","))
    if not parts <= {"prepare", "train", "ship", "dask"}:
        sys.exit(f"error: --parts takes prepare, train, ship and dask, got {a.parts!r}")
    if not a.source.is_file():
        sys.exit(f"error: --source {a.source} is not a file; give Tiny Shakespeare's path "
                 "(python -m gpt.data shakespeare --out FILE fetches it)")

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; sgemm peak {sgemm_peak():.0f} GFLOP/s "
          "(512^3, NumPy's BLAS); the machine was shared with other work, so times vary")
    work = Path(tempfile.mkdtemp(prefix="token-files-", dir=a.tmp))
    try:
        corpus, small = work / "corpus.txt", work / "small.txt"
        size = make_corpus(a.source, a.mb, corpus)
        shutil.copyfile(a.source, small)
        print(f"corpus: {a.source.name} repeated to {size / 1e6:.1f} MB")

        last = work / "char"
        if "prepare" in parts:
            prepare_runs(corpus, size, work, a.rounds, a.bpe_vocab)
        else:
            measured(["gpt.data", "prepare", str(corpus), "--out", str(last)], str(work))
        if "train" in parts:
            train_runs(corpus, size, small, work, a.rounds, a.steps)
        if "ship" in parts:
            shipping(str(last / "train.bin"), a.rounds)
        if "dask" in parts:
            dask_shipping(str(last / "train.bin"), a.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
