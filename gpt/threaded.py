"""One process, several cores: each step's batch is cut into shards, one per thread, and the
threads compute their shards' losses and gradients at the same time: the threads transport of
gpt.shards, which holds the rules (how the batch is cut, what a shard computes, how the shards
add up) that gpt.parallel's worker processes follow too.

    thread k (k = 0 is the caller)              every thread
    shard k of the batch  ----------------->    gpt.shards.shard_grads: forward + backward on
                                                its rows alone, with tensorlite.grad (so no
                                                two threads write one .grad), its matmuls on
                                                1 BLAS thread and the kernels on the calling
                                                thread
    gpt.shards.add_shards:  grad = sum_k w_k * grad_k,  loss = sum_k w_k * loss_k,
                            w_k = rows_k / rows

Why threads, when BLAS could use both cores by itself: a step is not only matmuls. On the 2-core
machine we measure on, half of the step is attention, RMSNorm, relu^2 and the like, each one
call at a time on one core while the second waits, and every matmul is split in two and joined
again. Given whole shards, each core runs everything of its own half from start to end, and
NumPy, BLAS and tensorlite's compiled kernels release Python's GIL while they compute, so the
two threads overlap; only the Python glue between ops takes turns. docs/performance.md has
the measurements.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import tensorlite as tl

from .model import GPT
from .shards import Shard, ShardedStep, ShardGrads, cut_batch, shard_grads, shard_loss


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


class ThreadShards(ShardedStep):
    """Loss and gradients of a batch, computed by `threads` threads of this process on shards
    of its rows: the threads transport of gpt.shards.ShardedStep.

        shards = ThreadShards(model, threads=2)
        loss = shards.loss_and_grads(x, y, rng)   # fills every p.grad of model.params
        ...
        shards.close()

    While it is open, BLAS (process-wide) runs 1 thread, and so does each thread's kernels.
    With dropout > 0 each shard draws its masks from its own generator, seeded per step and
    shard (gpt.shards.shard_rng) as gpt.parallel's workers do, so threads=2 draws the masks of
    workers=2 and gives their gradients to float rounding."""

    def __init__(self, model: GPT, threads: int):
        if int(threads) != threads or threads < 1:
            raise ValueError(f"ThreadShards: threads must be a whole number >= 1, got {threads}")
        super().__init__(model, int(threads))
        self.threads = self.shards
        tl.kernels.kernel_path()  # choose and load the kernels once, before any thread asks
        self._threads_before = tl.get_num_threads()  # close() gives them back
        tl.set_num_threads(1)
        # (one thread: the caller computes the only shard, the pool never starts a thread)
        self._pool = ThreadPoolExecutor(max(self.threads - 1, 1), thread_name_prefix="gpt shard",
                                        initializer=tl.set_num_threads, initargs=(1,))

    def _grads(self, shard: Shard) -> ShardGrads:  # what one thread does
        return shard_grads(self.model, shard)

    def _map(self, fn, shards: list[Shard]) -> list:
        """[fn(shard) for every shard]: the others on the pool, shard 0 here."""
        # NumPy's floating-point error settings are per thread: take the caller's along
        futures = [self._pool.submit(_with_errstate, np.geterr(), fn, s) for s in shards[1:]]
        return [fn(shards[0])] + [f.result() for f in futures]

    def compute_grads(self, shards: list[Shard]) -> list[ShardGrads]:
        return self._map(self._grads, shards)

    def loss(self, x, y) -> float:
        """Mean cross-entropy of (x, y) without gradients (evaluation), shards in parallel."""
        shards = cut_batch(np.asarray(x), np.asarray(y), self.threads, seed=0)
        return float(sum(self._map(lambda s: shard_loss(self.model, s), shards)))

    def close(self) -> None:
        """Wait for the threads to end, and give BLAS back the threads it had before."""
        self._pool.shutdown(wait=True)
        tl.set_num_threads(self._threads_before)


def _with_errstate(err: dict, fn, *args):
    with np.errstate(**err):
        return fn(*args)
