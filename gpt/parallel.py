"""Data-parallel gradient accumulation over worker processes: the processes transport of
gpt.shards (which holds the rules: how a step's batch is cut into shards, what each shard
computes, how their weighted losses and gradients add up, the same as on threads). This is
the only module of the project that imports joblib.

`DataParallel` is the one interface (a gpt.shards.ShardedStep); how the numbers travel is its
transport, one small class each:

`SharedMemory` (backend "loky", one machine):

    parent                                      worker k (a persistent loky process)
    copy weights -> weights file (memmap)  ...  maps the file read-only once; its model's
                                                parameters ARE views into it (no copy)
    send (spec, shard k)  ------------------->  gpt.shards.shard_grads on its rows
                           <------------------  w_k * loss_k; writes w_k * its gradients to
                                                row k of the gradients file (memmap)
    gpt.shards.add_shards: grad = sum_k row_k,  loss = sum_k w_k * loss_k

So per step only the batch shards, a dropout seed and one float per shard are pickled.
`DaskCluster` (backend "dask", a dask.distributed cluster through its Client): the machines
share no files, so each shard's task carries the step's weights with it (so the scheduler
can run it again on another worker if its worker is lost) and its gradients come back by
value. A lost worker, whatever the moment, never hangs a step: see DaskCluster. Token files
are the one exception: a worker that can read the same files (asked once) cuts its rows
from them itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import typing
import uuid
import weakref
from dataclasses import dataclass

import numpy as np

import tensorlite

from .config import Backend, GPTConfig
from .data import (
    TokenFileUnreadable,
    TokenWindows,
    file_fingerprint,
    file_identity,
    mapped_token_file,
)
from .errors import UserError
from .model import GPT
from .shards import FileShard, Shard, ShardedStep, ShardGrads, shard_grads
from .threaded import available_cores


@dataclass(frozen=True)
class _Spec:
    """What a worker needs to rebuild the model and find the shared files (small; pickled
    with every task). `key` names one DataParallel, so a worker process can serve several."""

    key: str
    config: dict  # GPTConfig.to_dict()
    dtype: str
    matmul_dtype: str | None  # "bfloat16" for a mixed-precision model (its weights: dtype)
    layout: tuple  # ((name, shape, offset), ...) of each parameter in the flat vector
    size: int  # total number of parameter values
    threads: int | None  # BLAS/numexpr threads in the worker (None: leave as is)
    kernels: str  # the parent's tensorlite kernel path, which the worker runs too
    weights_path: str | None  # shared files (loky; on Linux /proc/PID/fd/N of the parent's
    # open descriptor, the name already deleted); None: weights come with each task (dask)
    grads_path: str | None
    shards: int


class DataParallel(ShardedStep):
    """Loss and gradients of a batch, computed by `workers` processes on shards of it: the
    processes transport of gpt.shards.ShardedStep (which cuts the batch and adds up the
    shards' results; the workers run gpt.shards.shard_grads).

        with DataParallel(model, workers=2) as dp:
            for step in range(n):
                loss = dp.loss_and_grads(x, y)   # fills every p.grad of model.params
                clip_grad_norm(model.params, 1.0, dp.grad_norm); opt.step(lr)

    Weights are read from `model` at every call, so the parent may change them freely (the
    optimizer step, a checkpoint load) between calls. With dropout > 0 each shard draws its
    own masks (seeded per step and shard), so runs match `workers=1` only without dropout.

    backend: "loky" (SharedMemory: processes on this machine) or "dask" (DaskCluster;
    `scheduler` is the address of a dask.distributed scheduler, e.g. "tcp://host:8786").
    threads_per_worker: BLAS and numexpr threads in each worker; by default
    available_cores() // workers for loky (so workers x threads <= the cores this process may
    run on: its affinity mask, as --threads counts them) and unchanged for dask
    (set them with `dask-worker --nthreads`). A worker that raises turns into a RuntimeError
    with a one-line message; so does a loky worker that dies. A dask worker that dies costs
    only time (its shards run again on the others), unless none is left: see DaskCluster.
    """

    def __init__(self, model: GPT, workers: int, backend: str = "loky",
                 scheduler: str | None = None, threads_per_worker: int | None = None,
                 timeout: float | None = None):
        if backend not in TRANSPORTS:
            raise UserError(f"must be one of {', '.join(TRANSPORTS)}, got {backend!r}",
                            field="backend")
        if int(workers) < 1:
            raise UserError(f"must be >= 1, got {workers}", field="workers")
        super().__init__(model, int(workers))
        self.workers, self.backend = self.shards, backend
        # The parent chooses the kernel path and, on a fresh install, compiles the C kernels
        # now, before any worker starts: so "compiling" (or "unavailable") is said once, not
        # by every worker, and the workers load the library it cached.
        path = tensorlite.kernels.kernel_path()
        layout, size = [], 0
        for name, p in model.params.items():
            layout.append((name, p.shape, size))
            size += p.size
        self.transport = TRANSPORTS[backend](model.dtype, self.workers, size, timeout, scheduler)
        if threads_per_worker is None and backend == "loky":
            threads_per_worker = max(1, available_cores() // self.workers)
        self.spec = _Spec(
            key=uuid.uuid4().hex, config=model.config.to_dict(), dtype=model.dtype.name,
            matmul_dtype=model.matmul_dtype,
            layout=tuple(layout), size=size, threads=threads_per_worker, kernels=path,
            weights_path=self.transport.paths[0], grads_path=self.transport.paths[1],
            shards=self.workers,
        )

    def compute_grads(self, shards: list[Shard]) -> list[ShardGrads]:
        """The current weights to the transport, each shard to a worker, and back each
        shard's weighted loss and flat (P,) gradients, cut into the parameters' shapes."""
        if self.transport is None:
            raise RuntimeError("DataParallel is closed")
        for name, shape, offset in self.spec.layout:  # the current weights, flattened
            p = self.model.params[name].data
            self.transport.weights[offset : offset + p.size] = p.reshape(-1)
        losses, flats = self.transport.run([(self.spec, s) for s in shards], self.step)
        flats = [np.array(flats[0])] + list(flats[1:])  # shard 0's becomes the caller's own
        return [ShardGrads(loss, self._unflatten(flat)) for loss, flat in zip(losses, flats)]

    def _unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        return [flat[offset : offset + int(np.prod(shape))].reshape(shape)
                for _, shape, offset in self.spec.layout]

    def close(self) -> None:
        """Stop using the workers and release what the transport holds. Safe to call twice."""
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()


def _why(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else '(no message)'}"


def _failed(step: int, e: BaseException, more: str = "") -> RuntimeError:
    return RuntimeError(f"data-parallel worker failed at step {step}{more}: {_why(e)}")


# ---- transport "loky": processes on this machine, numbers in shared files ------------------------
class SharedMemory:
    """Persistent loky processes; the weights (P,) and the gradients (workers, P) live in two
    files in /dev/shm that every worker maps, so only shards and seeds are pickled."""

    def __init__(self, dtype, workers: int, size: int, timeout: float | None, scheduler=None):
        self.timeout = timeout  # seconds a step may take (None: no limit)
        # /dev/shm keeps the files in memory on Linux; any temp dir works elsewhere
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self._dir = tempfile.mkdtemp(prefix="gpt-parallel-", dir=base)
        paths = (os.path.join(self._dir, "weights.bin"), os.path.join(self._dir, "grads.bin"))
        self.weights = np.memmap(paths[0], dtype=dtype, mode="w+", shape=(size,))  # (P,)
        self.grads = np.memmap(paths[1], dtype=dtype, mode="w+", shape=(workers, size))
        self._fds: list[int] = []
        self.paths = self._unlink_early(*paths)
        # remove the files (or close their descriptors) even if close() is never called
        self._finalizer = weakref.finalize(self, _release, self._dir, self._fds)
        # joblib's process pool (loky), reused across steps and runs: each task is submitted
        # to it directly. (joblib.Parallel over the same pool adds ~10 ms a step here: it
        # polls for finished tasks every 10 ms, half a shard's work.)
        from joblib.externals.loky import get_reusable_executor

        self._executor = get_reusable_executor(max_workers=workers, initializer=_ignore_sigint)

    def _unlink_early(self, *paths: str) -> tuple[str, ...]:
        """Where /proc/PID/fd exists (Linux), keep each file open, delete its name at once and
        give the workers /proc/<our pid>/fd/<fd> to map instead: a deleted file lives while
        someone has it open or mapped, so the memory goes back to the system when the last
        process using it ends, even after a kill -9 of the parent. Elsewhere the named files
        stay until close() (or the finalizer) removes them."""
        if not os.path.isdir(f"/proc/{os.getpid()}/fd"):
            return paths
        opened = []
        for path in paths:
            fd = os.open(path, os.O_RDWR)
            self._fds.append(fd)
            opened.append(f"/proc/{os.getpid()}/fd/{fd}")
        _remove_dir(self._dir)
        self._dir = None
        return tuple(opened)

    def run(self, tasks: list, step: int) -> tuple[list[float], list[np.ndarray]]:
        """Each task's loss; the gradients are rows 0..K-1 of the shared file."""
        try:
            futures = [self._executor.submit(_shard_loss_and_grads, *task, None)
                       for task in tasks]
            losses = [f.result(timeout=self.timeout)[0] for f in futures]
        except Exception as e:  # a worker raised or died
            raise _failed(step, e) from e
        return losses, self.grads[: len(tasks)]

    def close(self) -> None:
        self._executor = None  # the pool stays, for the next run to reuse
        self.weights = self.grads = None  # unmap before removing the files
        self._finalizer()


def _remove_dir(path: str | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _release(path: str | None, fds: list[int]) -> None:
    _remove_dir(path)
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


# ---- transport "dask": a cluster, numbers by value -------------------------------------------
class _Lost(Exception):
    """A step's tasks were lost with a worker (or the scheduler's connection): run it again."""


class _CannotRead(Exception):
    """Raised in a dask worker sent a shard by reference whose token file it cannot read (or
    reads another one): (its address, why). The parent sends that step's rows instead."""


class DaskCluster:
    """A dask.distributed cluster through its Client: each shard is one task that carries the
    step's weights with it, and its gradients come back by value.

    The weights travel inside each task (not scattered ahead of it), so the scheduler holds
    everything a task needs: when a worker is lost, whatever the moment (the task sent to it,
    running, or its result not yet fetched), the scheduler runs the task again on a worker
    that remains, and the step gives the same numbers. Nothing here waits without a limit:
    every wait is a short poll, and between polls the cluster is asked how it is. A task
    lost anyway (cancelled, or killed with too many workers) makes the step start again on
    the workers that remain (up to `retries` times); with no worker left for
    `no_worker_grace` seconds, or the scheduler gone for the Client's reconnect time (10 s),
    the step fails with a one-line RuntimeError. A worker that joins takes tasks from the
    next step on.

    Shards by reference (gpt.shards.FileShard, of token files) go by reference only to the
    workers that read the same files themselves: each worker is asked once, when a step
    first needs it, by a small task pinned to it (_probe: does the path hold a file of the
    parent's size and gpt.data.file_fingerprint?), and the answer is kept per worker. Such a
    step places shard k on worker k (round robin over the workers, a loose restriction, so
    the scheduler may still move it if that worker goes): by reference where that worker
    reads the files, as rows (read here) where it does not. A shard by reference that meets
    a worker without the files anyway (it moved, or the file changed there) fails at once
    with _CannotRead, and the step runs again with rows only: never a wrong batch, never a
    wait."""

    retries = 10  # fresh starts of one step
    poll = 0.5  # seconds between looks at the cluster while a step's results are awaited
    no_worker_grace = 10.0  # seconds without any worker before giving up
    connect_s = 10.0  # the Client's connect and reconnect time, and its calls' limit

    def __init__(self, dtype, workers: int, size: int, timeout: float | None,
                 scheduler: str | None):
        if not scheduler:
            raise UserError("must be given for backend 'dask' (the address of a dask "
                            "scheduler, e.g. tcp://host:8786)", field="scheduler")
        self.workers, self.timeout, self.address = workers, timeout, scheduler
        self.weights = np.empty(size, dtype=dtype)  # (P,) sent with each task
        self.paths = (None, None)
        self._readers: dict[tuple, bool] = {}  # (worker, file, fingerprint) -> reads it
        self._fingerprints: dict[tuple, str] = {}  # (file, its identity here) -> fingerprint
        try:
            from dask.distributed import Client
        except ImportError:
            raise RuntimeError(
                "the dask backend needs dask.distributed: pip install 'tensorlite-gpt[dask]'"
            ) from None
        # distributed logs lost connections on stderr by itself, also while it closes after
        # the run: from now on in this process they are said once, by the lines raised here
        for name in ["distributed", *logging.root.manager.loggerDict]:
            if name.startswith("distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            self._client = Client(scheduler, timeout=f"{self.connect_s:g}s")
        except (OSError, TimeoutError) as e:
            raise RuntimeError(
                f"cannot reach the dask scheduler at {scheduler} ({e}); is it running?"
            ) from None
        # a gather left waiting when the cluster went (AllExit) is reported by asyncio as a
        # "Task exception was never retrieved" traceback when it is collected: the one line
        # raised here already said what happened, so the loop drops exactly those reports
        loop = self._client.loop.asyncio_loop
        loop.set_exception_handler(
            functools.partial(_quiet_all_exit, loop.default_exception_handler))
        try:
            self._known = set(self._worker_threads())  # the workers seen so far, by address
        except _Lost as e:
            self.close()
            raise RuntimeError(f"the dask scheduler at {scheduler} does not answer ({e})"
                               ) from None

    def _worker_threads(self) -> dict[str, int]:
        """{address: threads} of the workers the scheduler has now; raises _Lost when the
        scheduler cannot answer within connect_s."""
        if self._client.status != "running":
            raise _Lost(f"the connection to the scheduler is {self._client.status}")
        try:
            return self._client.nthreads(callback_timeout=self.connect_s)
        except Exception as e:  # whatever the reason, no answer
            raise _Lost(f"the scheduler did not answer ({_why(e)})") from e

    def live_workers(self) -> int:
        """How many workers the dask scheduler has now (0 if it cannot be asked)."""
        try:
            return len(self._worker_threads())
        except _Lost:
            return 0

    def _look(self, step: int) -> int:
        """Say which workers left or joined since the last look; wait (a bounded time) for a
        worker, or for the scheduler's connection to come back. Returns the workers now."""
        since = time.monotonic()
        while True:
            try:
                now = set(self._worker_threads())
            except _Lost:
                if self._client.status == "closed" or time.monotonic() - since > self.connect_s:
                    raise RuntimeError(f"data-parallel step {step}: lost the dask scheduler at "
                                       f"{self.address} (no answer for {self.connect_s:g} s)"
                                       ) from None
                time.sleep(0.1)  # the Client is reconnecting
                continue
            for what, addresses in (("lost", self._known - now), ("joined", now - self._known)):
                for address in sorted(addresses):
                    print(f"warning: dask worker {address} {what} at step {step}; "
                          f"{len(now)} worker{'s' if len(now) != 1 else ''} now",
                          file=sys.stderr, flush=True)
            self._known = now
            if now:
                return len(now)
            if time.monotonic() - since > self.no_worker_grace:
                raise RuntimeError(f"data-parallel step {step}: no dask worker left (none "
                                   f"for {self.no_worker_grace:g} s)")
            time.sleep(self.poll)

    def run(self, tasks: list, step: int) -> tuple[list[float], list[np.ndarray]]:
        """Each task's (loss, flat gradients), the step run again while its tasks are lost."""
        started, why, lost, by_reference = time.monotonic(), None, False, True
        for attempt in range(self.retries + 1):
            workers = self._look(step)  # raises when nothing is left to run on
            if lost:
                print(f"warning: step {step} lost its dask tasks ({why}); running it again on "
                      f"the {workers} worker{'s' if workers != 1 else ''} there are",
                      file=sys.stderr, flush=True)
            try:
                futures = self._submit(tasks, by_reference)
            except (OSError, TokenFileUnreadable) as e:  # the parent's own file went
                raise RuntimeError(f"data-parallel step {step}: cannot read the token file "
                                   f"here ({e})") from None
            try:
                results = self._gather(futures, step, started)
                return [loss for loss, _ in results], [g for _, g in results]
            except _Lost as e:
                why, lost = str(e), True
            except _CannotRead as e:  # a worker without the files got a shard by reference:
                address, reason = e.args  # so this step goes again, as rows only
                self._say_reads(address, self._token_file(tasks), reason)
                why, lost, by_reference = f"{address}: {reason}", False, False
            with contextlib.suppress(Exception):  # whatever is left of them
                self._client.cancel(futures)
        raise RuntimeError(f"data-parallel step {step}: lost its dask tasks "
                           f"{self.retries + 1} times (last: {why})")

    def _submit(self, tasks: list, by_reference: bool) -> list:
        """One future per task, each carrying the weights. Shards by reference go as they
        are to workers that read their token file, as rows to the others (_placement)."""
        placement = self._placement(tasks) if by_reference else None
        futures = []
        for k, (spec, shard) in enumerate(tasks):
            options: dict = {}
            if isinstance(shard, FileShard):
                worker, reads = placement[k] if placement else (None, False)
                if worker is not None:  # where it should run (the scheduler may move it)
                    options = {"workers": [worker], "allow_other_workers": True}
                shard = (dataclasses.replace(shard, windows=self._fingerprinted(shard.windows))
                         if reads else _rows(shard))
            futures.append(self._client.submit(_shard_loss_and_grads, spec, shard, self.weights,
                                               key=f"gpt-shard-{uuid.uuid4().hex}",
                                               pure=False, **options))
        return futures

    def _placement(self, tasks: list) -> list[tuple[str, bool]] | None:
        """(worker, does it read the token file) for each task: shard k on the k-th worker
        (round robin, in address order); None for a step with no shard by reference."""
        files, addresses = self._token_file(tasks), sorted(self._known)
        if files is None or not addresses:
            return None
        ask = [a for a in addresses if (a, files.path, files.fingerprint) not in self._readers]
        if ask:
            self._probe(ask, files)
        return [(a, self._readers[(a, files.path, files.fingerprint)])
                for a in (addresses[k % len(addresses)] for k in range(len(tasks)))]

    def _token_file(self, tasks: list) -> TokenWindows | None:
        """The token file of the step's shards by reference (fingerprinted), if any."""
        files = [s.windows for _, s in tasks if isinstance(s, FileShard)]
        return self._fingerprinted(files[0]) if files else None

    def _fingerprinted(self, w: TokenWindows) -> TokenWindows:
        """`w` with this machine's fingerprint of its file (computed once per file)."""
        key = (w.path, *file_identity(os.stat(w.path)))
        if key not in self._fingerprints:
            self._fingerprints[key] = file_fingerprint(w.path)
        return dataclasses.replace(w, fingerprint=self._fingerprints[key])

    def _probe(self, addresses: list[str], files: TokenWindows) -> None:
        """Ask each worker of `addresses` whether it reads the token file `files` names
        (with its fingerprint) itself: a small task pinned to each, all awaited at most
        connect_s seconds together. No answer (the worker is gone or stuck) counts as no."""
        from dask.distributed import wait

        probe = dataclasses.replace(files, starts=np.empty(0, dtype=np.int64))
        futures = {a: self._client.submit(_reads_token_file, probe, workers=[a],
                                          key=f"gpt-probe-{uuid.uuid4().hex}", pure=False)
                   for a in addresses}
        with contextlib.suppress(Exception):  # (timed out: those are a no)
            wait(list(futures.values()), timeout=self.connect_s)
        for address, f in futures.items():
            reason = f"no answer in {self.connect_s:g} s"
            with contextlib.suppress(Exception):
                if f.status == "finished":
                    reason = f.result(timeout=self.connect_s)
                elif f.status == "error":
                    reason = _why(f.exception())
            self._say_reads(address, files, reason)
        with contextlib.suppress(Exception):
            self._client.cancel([f for f in futures.values() if f.status == "pending"])

    def _say_reads(self, address: str, files: TokenWindows, reason: str | None) -> None:
        """Keep (and say, once a worker) whether `address` reads the token file itself."""
        key = (address, files.path, files.fingerprint)
        if self._readers.get(key) is False:
            return
        self._readers[key] = reason is None
        print(f"dask worker {address} " + ("reads the token files itself" if reason is None
                                           else f"is sent the rows ({reason})"), flush=True)

    def _gather(self, futures: list, step: int, started: float) -> list:
        """The futures' results, in order. A task that raised is a one-line error; a task
        lost (cancelled, killed with its workers, its result unreachable) raises _Lost; and
        while waiting, the cluster is looked at every `poll` seconds."""
        from dask.distributed import KilledWorker, wait

        results: dict[int, tuple] = {}
        while len(results) < len(futures):
            for k, f in enumerate(futures):
                if k in results or f.status == "pending":
                    continue
                if f.status == "error":
                    e = f.exception()  # (done: no waiting)
                    if isinstance(e, KilledWorker):  # its workers died, not the task
                        raise _Lost(_why(e))
                    if isinstance(e, _CannotRead):  # a shard by reference, no files there
                        raise e
                    raise _failed(step, e)  # the task itself raised: again won't help
                if f.status != "finished":  # cancelled, lost
                    raise _Lost(f"a task was {f.status}")
                try:  # the result travels back from its worker
                    results[k] = f.result(timeout=self.connect_s)
                except Exception as e:  # the task ended well: its worker or the link failed
                    raise _Lost(_why(e)) from e
            pending = [f for k, f in enumerate(futures) if k not in results]
            if not pending:
                break
            with contextlib.suppress(Exception):  # timed out (or the wait failed): look around
                wait(pending, timeout=self.poll, return_when="FIRST_COMPLETED")
                continue
            if self.timeout is not None and time.monotonic() - started > self.timeout:
                raise RuntimeError(f"data-parallel step {step} took more than {self.timeout:g} "
                                   "s on the dask cluster")
            self._look(step)
        return [results[k] for k in range(len(futures))]

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # a lost scheduler: nothing left to close
                client.close(timeout=self.connect_s)


def _quiet_all_exit(default, loop, context: dict) -> None:
    """The dask Client loop's exception handler: a gather ended by the client's close
    (distributed's AllExit) is dropped; anything else goes to asyncio's default handler."""
    if type(context.get("exception")).__name__ != "AllExit":
        default(context)


TRANSPORTS: dict[str, type] = {"loky": SharedMemory, "dask": DaskCluster}
assert set(TRANSPORTS) == set(typing.get_args(Backend))  # the config's choices, one each


# ---- inside a worker -------------------------------------------------------------------------
_local = threading.local()  # per worker thread: {spec.key: (model, grads memmap or None)}


def _ignore_sigint() -> None:
    """Ctrl-C in a terminal reaches the workers too (one process group); only the parent
    should act on it: gpt.train finishes the step, saves and exits, and then the pool goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_model(spec: _Spec):
    """The model this worker computes with, built once per DataParallel (spec.key)."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    if spec.key not in cache:
        cache.clear()  # a new run: drop the previous one's model and maps
        tensorlite.kernels.use_kernels(spec.kernels)  # the parent chose it: no second fallback line
        if spec.threads is not None:
            tensorlite.set_num_threads(spec.threads)
        model = GPT(GPTConfig.from_dict(spec.config), dtype=spec.matmul_dtype or spec.dtype)
        grads = None
        if spec.weights_path is not None:  # parameters become read-only views of the file
            flat = np.memmap(spec.weights_path, dtype=spec.dtype, mode="r", shape=(spec.size,))
            _point_params_at(model, spec, flat.view(np.ndarray))
            grads = np.memmap(spec.grads_path, dtype=spec.dtype, mode="r+",
                              shape=(spec.shards, spec.size))
        cache[spec.key] = (model, grads)
    return cache[spec.key]


def _point_params_at(model: GPT, spec: _Spec, flat: np.ndarray) -> None:
    for name, shape, offset in spec.layout:
        p = model.params[name]
        p.data = flat[offset : offset + p.size].reshape(shape)


def _shard_loss_and_grads(spec: _Spec, shard: Shard, weights: np.ndarray | None):
    """One shard of a step, in a worker: gpt.shards.shard_grads with the worker's model, its
    weighted loss returned and its weighted gradients flattened into row k of the shared
    gradients file (returned as None) or, without shared files, returned as one (P,) array."""
    model, grads = _worker_model(spec)
    if weights is not None:  # dask: this step's weights came with the task
        _point_params_at(model, spec, weights)
        if isinstance(shard, FileShard):  # by reference: the rows from this worker's files
            try:
                shard = _rows(shard)
            except TokenFileUnreadable as e:
                from distributed import get_worker

                raise _CannotRead(get_worker().address, str(e)) from None
    done = shard_grads(model, shard)
    out = grads[shard.k] if grads is not None else np.empty(spec.size, dtype=spec.dtype)  # (P,)
    for g, (_, _, offset) in zip(done.grads, spec.layout):
        out[offset : offset + g.size] = g.reshape(-1)
    return done.loss, (None if grads is not None else out)


def _reads_token_file(files: TokenWindows) -> str | None:
    """In a dask worker: None if it reads the token file `files` names (and maps it now, for
    the steps to come), else why not."""
    try:
        mapped_token_file(files)
    except TokenFileUnreadable as e:
        return str(e)
    return None


def _rows(shard: FileShard) -> Shard:
    """A shard by reference turned into one that carries its rows (read here)."""
    return Shard(shard.k, *shard.batch(), shard.weight, shard.seed)
