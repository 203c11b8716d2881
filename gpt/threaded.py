"""One process, several cores: each step's batch is cut into shards, one per thread, and the
threads compute their shards' losses and gradients at the same time.

    thread k (k = 0 is the caller)              every thread
    rows B_k of the batch  ---------------->    forward + backward on its rows alone, with
                                                tensorlite.grad (so no two threads write one
                                                .grad), its matmuls on 1 BLAS thread and the
                                                kernels on the calling thread
    grad = sum_k w_k * grad_k,   loss = sum_k w_k * loss_k,   w_k = rows_k / rows

The mean cross-entropy over the batch is the row-weighted mean of the shards' means, so this is
`model(x, y)` then `backward()` up to float rounding: the same rule as gpt.parallel's worker
processes, without copying weights or gradients between processes.

Why threads, when BLAS could use both cores by itself: a step is not only matmuls. On the 2-core
machine we measure on, half of the step is attention, RMSNorm, relu^2 and the like, each one
call at a time on one core while the second waits, and every matmul is split in two and joined
again. Given whole shards, each core runs everything of its own half from start to end, and
NumPy, BLAS and tensorlite's compiled kernels release Python's GIL while they compute, so the
two threads overlap; only the Python glue between ops takes turns. docs/performance.md has
the measurements.
"""

from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import tensorlite as tl

from .model import GPT


def shard_rows(rows: int, shards: int) -> list[slice]:
    """The rows of each shard of a batch: min(shards, rows) contiguous slices whose sizes
    differ by at most one, the longer first (as np.array_split cuts). gpt.parallel's worker
    processes cut the same way, so shard k holds the same rows on threads as in a worker."""
    n = min(shards, rows)
    size, longer = divmod(rows, n)
    bounds = np.cumsum([0] + [size + (k < longer) for k in range(n)])
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def dropout_seed(step: int, rng: np.random.Generator | None) -> int:
    """One seed per step for the shards' dropout masks: drawn from the run's dropout stream,
    or the step number without one."""
    return step if rng is None else int(rng.integers(2**63))


def shard_rng(seed: int, k: int) -> np.random.Generator:
    """The dropout masks of shard k in the step of `seed`, on a thread or in a worker."""
    return np.random.default_rng((seed, k))


def available_cores() -> int:
    """The cores this process may use: its affinity mask where the OS has one, and no more
    than a container's CPU quota (docker --cpus, a Kubernetes CPU limit) allows."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        cores = max(1, os.cpu_count() or 1)
    quota = cpu_quota()
    return cores if quota is None else min(cores, quota)


def cpu_quota(root: str = "/sys/fs/cgroup", membership: str = "/proc/self/cgroup") -> int | None:
    """The whole CPUs (at least 1) that this process's cgroup quota allows, or None without
    a quota. The quota is CPU time per period (`quota period`: 150000 100000 is 1.5 CPUs,
    taken as 1), read where Linux keeps it: cpu.max (cgroup v2) or cpu.cfs_quota_us and
    cpu.cfs_period_us (v1), in the process's own cgroup folder and every folder above it
    (the smallest counts)."""
    try:  # a cgroup's name may be any bytes: kept as they are (surrogateescape) for open()
        with open(membership, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except (OSError, ValueError):
        return None
    limits = []
    for line in lines:  # "hierarchy:controllers:path", "0::/path" in cgroup v2
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            tops, files = [root], ("cpu.max",)
        elif "cpu" in controllers.split(","):
            tops = [f"{root}/{controllers}", f"{root}/cpu"]
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        if ".." in parts:  # a cgroup outside this cgroup namespace: none of its folders is here
            continue
        for top in tops:
            for depth in range(len(parts), -1, -1):  # the own folder, then each one above
                folder = "/".join([top] + parts[:depth])
                limit = _read_quota([os.path.join(folder, name) for name in files])
                if limit is not None:
                    limits.append(limit)
    return max(1, int(min(limits))) if limits else None


def _read_quota(paths: list[str]) -> float | None:
    """CPUs of one quota: cpu.max ("max 100000" is none) or the v1 pair (-1 is none).
    Linux writes whole microseconds; anything else (nan, 1e999, a zero period) is no quota."""
    try:
        words = []
        for path in paths:
            with open(path, encoding="utf-8") as f:
                words += f.read().split()
        quota, period = int(words[0]), int(words[1])
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, IndexError, ValueError, OverflowError):  # "max" too
        return None


class ThreadShards:
    """Loss and gradients of a batch, computed by `threads` threads of this process on shards
    of its rows. loss_and_grads has the signature train.make_grad_fn hands out:

        shards = ThreadShards(model, threads=2)
        loss = shards.loss_and_grads(x, y, rng)   # fills every p.grad of model.params
        ...
        shards.close()

    While it is open, BLAS (process-wide) runs 1 thread, and so does each thread's kernels.
    With dropout > 0 each shard draws its masks from its own generator, seeded per step and
    shard as gpt.parallel's workers do, so threads=2 draws the masks of workers=2 and gives
    its gradients to float rounding (the workers' are weighted in the parent)."""

    def __init__(self, model: GPT, threads: int):
        if int(threads) != threads or threads < 1:
            raise ValueError(f"ThreadShards: threads must be a whole number >= 1, got {threads}")
        self.model, self.threads = model, int(threads)
        self.params = list(model.params.values())
        self.step = 0
        self.grad_norm: float | None = None  # of the gradients the last loss_and_grads set
        tl.kernels.kernel_path()  # choose and load the kernels once, before any thread asks
        self._threads_before = tl.get_num_threads()  # close() gives them back
        tl.set_num_threads(1)
        # (one thread: the caller computes the only shard, the pool never starts a thread)
        self._pool = ThreadPoolExecutor(max(self.threads - 1, 1), thread_name_prefix="gpt shard",
                                        initializer=tl.set_num_threads, initargs=(1,))

    # -- what one thread does --------------------------------------------------------------------
    def _grads(self, x, y, weight, rng):
        """weight * (loss, gradients) of one shard. The backward pass is seeded with the
        weight instead of 1, so the gradients come out already weighted and the caller only
        adds them up."""
        _, loss = self.model(x, y, training=True, rng=rng)
        grads = tl.grad(loss, self.params, grad_outputs=np.asarray(weight, dtype=loss.dtype))
        return weight * float(loss.data), [g.data for g in grads]

    def _loss(self, x, y, weight):
        with tl.no_grad():  # recording is off per thread: this thread must say so itself
            _, loss = self.model(x, y, training=False)
        return weight * float(loss.data)

    def _map(self, fn, x, y, rngs=None):
        """[fn(x_k, y_k, w_k[, rngs[k]]) for every shard k], w_k = rows_k / rows: the others
        on the pool, shard 0 here."""
        B = x.shape[0]
        shards = shard_rows(B, self.threads)
        args = [(x[s], y[s], (s.stop - s.start) / B) + ((rngs[k],) if rngs else ())
                for k, s in enumerate(shards)]
        # NumPy's floating-point error settings are per thread: take the caller's along
        futures = [self._pool.submit(_with_errstate, np.geterr(), fn, *a) for a in args[1:]]
        return [fn(*args[0])] + [f.result() for f in futures]

    # -- the two calls train uses ----------------------------------------------------------------
    def loss_and_grads(self, x, y, rng: np.random.Generator | None = None) -> float:
        """Mean cross-entropy of (x, y), both (B, T); every parameter's .grad is set to the
        gradient of that mean (a fresh array), and self.grad_norm to those gradients' global
        L2 norm (what clip_grad_norm(..., norm=) takes instead of measuring it again)."""
        x, y = np.asarray(x), np.asarray(y)
        seed = dropout_seed(self.step, rng)
        self.step += 1
        rngs = [shard_rng(seed, k) for k in range(min(self.threads, len(x)))]
        done = self._map(self._grads, x, y, rngs)  # [(w_k * loss_k, w_k * grads_k)]
        # each gradient: shard 0's array (tensorlite.grad's: no one else's) with the others
        # added in, in place; the global norm that clipping needs is measured in that pass
        totals = done[0][1]
        squares = tl.kernels.add_square_sum(totals, *(grads for _, grads in done[1:]))
        for p, total in zip(self.params, totals):
            p.grad = total
        self.grad_norm = math.sqrt(squares)
        return sum(loss for loss, _ in done)

    def loss(self, x, y) -> float:
        """Mean cross-entropy of (x, y) without gradients (evaluation), shards in parallel."""
        x, y = np.asarray(x), np.asarray(y)
        return float(sum(self._map(self._loss, x, y)))

    def close(self) -> None:
        """Wait for the threads to end, and give BLAS back the threads it had before."""
        self._pool.shutdown(wait=True)
        tl.set_num_threads(self._threads_before)


def _with_errstate(err: dict, fn, *args):
    with np.errstate(**err):
        return fn(*args)
