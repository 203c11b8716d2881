"""The shard rules of data-parallel training, in one place: how a step's batch is cut into
shards, what one shard computes, and how the shards' results add up to the whole batch's.
Two transports move the shards and only that: threads of this process
(gpt.threaded.ThreadShards) and worker processes or a dask cluster
(gpt.parallel.DataParallel). Both are a `ShardedStep`:

    loss_and_grads(x, y, rng)                       (the same code for every transport)
      cut_batch: shard k = rows B_k of (x, y), weight w_k = B_k / B, dropout seed
      compute_grads(shards) -> [ShardGrads]         (the transport: threads, processes, dask;
                                                     each shard runs shard_grads wherever it is)
      add_shards: loss = sum_k w_k L_k,  grad = sum_k w_k dL_k/dW,  and its global norm

The mean cross-entropy over B*T tokens is the row-weighted mean of the shards' means (every
row has T tokens), so the sum is `model(x, y)` then `backward()` up to float rounding:

    L = sum_k (B_k / B) L_k    and so    dL/dW = sum_k (B_k / B) dL_k/dW
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

import tensorlite as tl

from .model import GPT

if TYPE_CHECKING:  # (gpt.data needs nothing from here; the annotation is all)
    from .data import TokenWindows


# ---- the rules ---------------------------------------------------------------------------------
def shard_rows(rows: int, shards: int) -> list[slice]:
    """The rows of each shard of a batch: min(shards, rows) contiguous slices whose sizes
    differ by at most one, the longer first (as np.array_split cuts), on threads and in
    worker processes alike."""
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


@dataclass(frozen=True)
class Shard:
    """Shard k of one step: its rows of the batch and what it needs to compute them anywhere
    (it is small, and pickles with a task to a worker process or a dask worker)."""

    k: int  # its place in the batch: its dropout stream, its row of results
    x: np.ndarray  # (B_k, T) token ids
    y: np.ndarray  # (B_k, T) next-token targets
    weight: float  # B_k / B: its share of the batch's mean loss
    seed: int  # the step's dropout seed (dropout_seed)

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The (x, y) this shard computes. (Where it runs, a transport may build them some
        other way, e.g. read them from token files, by overriding this.)"""
        return self.x, self.y

    def rng(self) -> np.random.Generator:
        return shard_rng(self.seed, self.k)


def cut_batch(x: np.ndarray, y: np.ndarray, shards: int, seed: int) -> list[Shard]:
    """The shards of the batch (x, y), both (B, T)."""
    B = x.shape[0]
    return [Shard(k, x[r], y[r], (r.stop - r.start) / B, seed)
            for k, r in enumerate(shard_rows(B, shards))]


@dataclass(frozen=True)
class FileShard(Shard):
    """A shard that reads its rows where it runs, from token files (gpt.data.TokenWindows):
    a worker process is sent the windows' starts (8 bytes a row) instead of the rows (16
    bytes a token), and cuts the same x, y from its own map of the file."""

    windows: TokenWindows | None = None  # this shard's rows

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        return self.windows.batch()


def cut_windows(windows: TokenWindows, shards: int, seed: int) -> list[FileShard]:
    """The shards of the batch that `windows` (gpt.data.TokenWindows) names, by reference."""
    B = len(windows.starts)
    return [FileShard(k, None, None, (r.stop - r.start) / B, seed, windows.rows(r))
            for k, r in enumerate(shard_rows(B, shards))]


@dataclass
class ShardGrads:
    """What shard k sends back: its loss and gradients, already multiplied by its weight."""

    loss: float  # w_k * L_k
    grads: list[np.ndarray]  # w_k * dL_k/dW for each parameter, in model.params order


def shard_grads(model: GPT, shard: Shard) -> ShardGrads:
    """Forward and backward of one shard, wherever it runs (a thread, a worker process). The
    backward pass is seeded with the weight instead of 1, so the gradients come out already
    weighted and add_shards only adds them up. Leaves every .grad of the model alone."""
    x, y = shard.batch()
    _, loss = model(x, y, training=True, rng=shard.rng())
    params = list(model.params.values())
    grads = tl.grad(loss, params, grad_outputs=np.asarray(shard.weight, dtype=loss.dtype))
    return ShardGrads(shard.weight * float(loss.data), [g.data for g in grads])


def shard_loss(model: GPT, shard: Shard) -> float:
    """w_k * L_k without gradients (evaluation)."""
    x, y = shard.batch()
    with tl.no_grad():  # recording is off per thread: a thread must say so itself
        _, loss = model(x, y, training=False)
    return shard.weight * float(loss.data)


def add_shards(done: list[ShardGrads]) -> tuple[float, list[np.ndarray], float]:
    """(loss, gradients, their global L2 norm) of the whole batch from its shards'. The
    gradients are shard 0's arrays with the others added in, in place (so shard 0's must be
    the caller's own), and the norm that clipping needs is measured in that same pass."""
    totals = done[0].grads
    squares = tl.kernels.add_square_sum(totals, *(d.grads for d in done[1:]))
    return sum(d.loss for d in done), totals, math.sqrt(squares)


# ---- the interface every transport implements ------------------------------------------------
class ShardedStep(ABC):
    """Loss and gradients of a batch, computed on `shards` shards of its rows. The batch is
    cut and the results added here; a transport says only how the shards travel, in
    compute_grads (and what it holds, in close):

        step = ThreadShards(model, threads=2)      # or DataParallel(model, workers=2, ...)
        loss = step.loss_and_grads(x, y, rng)      # fills every p.grad of model.params
        clip_grad_norm(model.params, 1.0, step.grad_norm); opt.step(lr)
        ...
        step.close()
    """

    def __init__(self, model: GPT, shards: int):
        self.model, self.shards = model, shards
        self.step = 0  # calls so far (named in errors; the dropout seed without an rng)
        self.grad_norm: float | None = None  # of the gradients the last loss_and_grads set

    @abstractmethod
    def compute_grads(self, shards: list[Shard]) -> list[ShardGrads]:
        """shard_grads of every shard, in order, however the transport runs them; shard 0's
        arrays must be fresh (add_shards adds the others into them)."""

    @abstractmethod
    def close(self) -> None:
        """Release the threads, processes or cluster connection. Safe to call twice."""

    def loss_and_grads(self, x, y, rng: np.random.Generator | None = None) -> float:
        """Mean cross-entropy of (x, y), both (B, T) token ids; every parameter's .grad is set
        to the gradient of that mean (a fresh array, owned by the caller) and self.grad_norm
        to those gradients' global L2 norm (what clip_grad_norm(..., norm=) takes instead of
        measuring it again). `rng` (the run's dropout stream) gives one seed per step for
        the shards' dropout masks; without it the seed is the step number."""
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 2 or x.shape != y.shape:
            raise ValueError(f"x and y must be (B, T) arrays of one shape, got {x.shape}, "
                             f"{y.shape}")
        return self._run(lambda seed: cut_batch(x, y, self.shards, seed), rng)

    def loss_and_grads_from(self, windows: TokenWindows,
                            rng: np.random.Generator | None = None) -> float:
        """loss_and_grads of the batch that `windows` (gpt.data.TokenWindows) names: each
        shard reads its rows from the token file where it runs, so worker processes are sent
        the windows' starts, not the rows. Same batch, same result."""
        return self._run(lambda seed: cut_windows(windows, self.shards, seed), rng)

    def _run(self, cut: Callable[[int], list[Shard]], rng: np.random.Generator | None) -> float:
        """One step on the shards cut(seed) gives: their gradients, added up into .grad."""
        seed = dropout_seed(self.step, rng)
        done = self.compute_grads(cut(seed))
        self.step += 1
        loss, grads, self.grad_norm = add_shards(done)
        for p, g in zip(self.model.params.values(), grads):
            p.grad = g
        return loss

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
