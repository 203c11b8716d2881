"""Data-parallel training (gpt/parallel.py): shard gradients combine to the single-process
gradient, `--workers 2` logs the losses of `--workers 1`, on loky and on a local dask cluster,
and a worker that raises or dies becomes a one-line error instead of a hang."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numexpr
import numpy as np
import pytest

import tensorlite
from gpt import parallel
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.parallel import DataParallel

TINY = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16)
WORDS = ["the", "king", "and", "queen", "of", "a", "green", "field", "sing", "to", "all", "who",
         "hear", "them", "now"]


def batch(B: int, T: int = 16, V: int = 23, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def single_process(model: GPT, x, y) -> tuple[float, dict[str, np.ndarray]]:
    model.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    grads = {n: p.grad.copy() for n, p in model.params.items()}
    model.zero_grad()
    return float(loss.item()), grads


# ---- the library -------------------------------------------------------------------------------
@pytest.mark.parametrize("workers, B", [(2, 4), (3, 5)])  # (3, 5): shards of 2, 2, 1 rows
def test_shard_gradients_combine_to_the_whole_batch_gradient(workers, B):
    model = GPT(TINY, dtype=np.float64, seed=1)
    x, y = batch(B)
    loss, grads = single_process(model, x, y)
    with DataParallel(model, workers) as dp:
        got = dp.loss_and_grads(x, y)
        assert got == pytest.approx(loss, rel=1e-12)
        for name, p in model.params.items():
            np.testing.assert_allclose(p.grad, grads[name], rtol=1e-10, atol=1e-13,
                                       err_msg=name)
        # the workers see the parent's new weights at the next call
        for p in model.params.values():
            p.data += 0.01 * np.sign(p.data)
        loss2, grads2 = single_process(model, x, y)
        assert dp.loss_and_grads(x, y) == pytest.approx(loss2, rel=1e-12)
        assert abs(loss2 - loss) > 1e-6
        for name, p in model.params.items():
            np.testing.assert_allclose(p.grad, grads2[name], rtol=1e-10, atol=1e-13,
                                       err_msg=name)


def test_more_workers_than_rows_and_float32():
    model = GPT(TINY, dtype=np.float32, seed=2)
    x, y = batch(2)
    loss, grads = single_process(model, x, y)
    with DataParallel(model, 3) as dp:
        assert dp.loss_and_grads(x, y) == pytest.approx(loss, rel=1e-6)
        for name, p in model.params.items():
            assert p.grad.dtype == np.float32
            np.testing.assert_allclose(p.grad, grads[name], rtol=1e-4, atol=1e-7, err_msg=name)


def test_close_removes_the_shared_files_and_refuses_more_work():
    model = GPT(TINY, seed=0)
    dp = DataParallel(model, 2, threads_per_worker=1)
    x, y = batch(2)
    loss, _ = single_process(GPT(TINY, seed=0), x, y)
    assert dp.loss_and_grads(x, y) == pytest.approx(loss, rel=1e-6)
    if LINUX_PROC:  # the names were deleted at once; the workers map the parent's descriptors
        assert dp.transport._dir is None
        assert dp.spec.weights_path.startswith(f"/proc/{os.getpid()}/fd/")
        assert os.readlink(dp.spec.weights_path).endswith("weights.bin (deleted)")
    path = dp.spec.weights_path
    assert os.path.exists(path)
    dp.close()
    dp.close()  # twice is fine
    assert not os.path.exists(path)  # the descriptor is closed (or the named file removed)
    with pytest.raises(RuntimeError, match="closed"):
        dp.loss_and_grads(*batch(2))


def test_a_worker_that_raises_gives_a_one_line_error():
    model = GPT(TINY, seed=0)
    x, y = batch(4)
    with DataParallel(model, 2) as dp:
        with pytest.raises(RuntimeError) as info:
            dp.loss_and_grads(x + 100, y)  # token ids the model does not know
        msg = str(info.value)
        assert "\n" not in msg
        assert "worker failed" in msg and "ValueError" in msg and "outside [0, 23)" in msg


def test_a_worker_that_dies_gives_a_one_line_error_not_a_hang(monkeypatch):
    model = GPT(TINY, seed=0)
    x, y = batch(4)

    def die(*args):  # a closure, so it travels to the worker by value
        os._exit(3)

    with DataParallel(model, 2) as dp:
        monkeypatch.setattr(parallel, "_shard_loss_and_grads", die)
        with pytest.raises(RuntimeError, match="worker failed at step 0: TerminatedWorkerError"):
            dp.loss_and_grads(x, y)


def test_bad_settings_are_refused_in_one_line(monkeypatch):
    model = GPT(TINY, seed=0)
    with pytest.raises(ValueError, match="^scheduler must be given for backend 'dask'"):
        DataParallel(model, 2, backend="dask")
    with pytest.raises(ValueError, match="backend must be one of loky, dask"):
        DataParallel(model, 2, backend="spark")
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # as if dask were not installed
    with pytest.raises(RuntimeError, match=r"pip install 'tensorlite-gpt\[dask\]'"):
        DataParallel(model, 2, backend="dask", scheduler="tcp://127.0.0.1:8786")


# ---- the command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=8)).capitalize() + "." for _ in range(400)]
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def start_long_run(text_file, out_dir, log_interval: int) -> subprocess.Popen:
    """A --workers 2 training in its own process group, returned once it printed its first
    progress line (the workers are up and have done log_interval steps)."""
    args = run_train_args(text_file, out_dir, "--workers", "2", "--max-iters", "100000",
                          "--log-interval", str(log_interval))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "gpt.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("iter"):
            break
    return proc


LINUX_PROC = os.path.isdir(f"/proc/{os.getpid()}/fd")


@pytest.mark.skipif(not LINUX_PROC, reason="checks /proc/PID/fd (Linux)")
def test_kill_9_of_a_two_worker_run_leaves_no_shared_memory_files(text_file, tmp_path):
    """The shared files have no name left once the workers run: a kill -9 of the parent
    cannot leave /dev/shm/gpt-parallel-* behind (nothing named is left to delete)."""
    proc = start_long_run(text_file, tmp_path, log_interval=2)  # the files are mapped
    try:
        assert proc.poll() is None, proc.stderr.read()  # still training
        fd_dir = f"/proc/{proc.pid}/fd"
        targets = []
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(FileNotFoundError):  # closed since the listing
                targets.append(os.readlink(os.path.join(fd_dir, fd)))
        shared = [t for t in targets if "gpt-parallel-" in t]
        assert len(set(shared)) == 2 and all(t.endswith(" (deleted)") for t in shared), targets
        folder = os.path.dirname(shared[0].removesuffix(" (deleted)"))
        assert not os.path.exists(folder)
        proc.kill()  # SIGKILL: no cleanup code runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the orphaned workers too
    assert not os.path.exists(folder)


def run_train_args(text_file, out_dir, *flags) -> list[str]:
    return ["--data", str(text_file), "--out-dir", str(out_dir), "--n-layer", "2",
            "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
            "--max-iters", "40", "--warmup-iters", "5", "--log-interval", "1",
            "--eval-interval", "40", "--eval-iters", "1", *flags]


def run_train(text_file, out_dir, *flags, env=None):
    args = run_train_args(text_file, out_dir, *flags)
    # one BLAS thread in the parent: on a busy machine a tiny model's matmuls are much faster
    # without waiting for a second thread (the workers set their own, one each on 2 cores)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "gpt.train", *args], capture_output=True,
                          text=True, timeout=300, env=env, check=False)


def logged_losses(out_dir) -> list[float]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["train_loss"] for line in f]


@pytest.fixture(scope="module")
def one_worker_losses(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("w1")
    r = run_train(text_file, out, "--workers", "1", "--threads", "1")  # one graph, one thread
    assert r.returncode == 0, r.stderr
    losses = logged_losses(out)
    assert len(losses) == 40
    return losses


def assert_same_losses(losses, reference):
    assert len(losses) == len(reference) == 40
    rel = np.abs(np.array(losses) - reference) / np.abs(reference)
    assert rel.max() <= 1e-4, f"largest relative difference {rel.max():.2e}"
    assert reference[-1] < reference[0] - 0.5  # and the run did learn something


@pytest.fixture(scope="module")
def two_thread_losses(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("t2")
    r = run_train(text_file, out, "--threads", "2")  # gpt.threaded: shards on 2 threads
    assert r.returncode == 0, r.stderr
    return logged_losses(out)


def test_two_threads_log_the_losses_of_one(two_thread_losses, one_worker_losses):
    assert_same_losses(two_thread_losses, one_worker_losses)


def test_two_workers_log_the_losses_of_two_threads_to_the_bit(text_file, tmp_path,
                                                               two_thread_losses):
    """Worker processes and threads follow one set of shard rules (gpt.shards)."""
    r = run_train(text_file, tmp_path, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert logged_losses(tmp_path) == two_thread_losses


def test_workers_share_the_cores_this_process_may_run_on(monkeypatch):
    """Under taskset (or a cpuset) the workers' BLAS threads split the cores of the affinity
    mask, as --threads counts them, not every core of the machine."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    dp = DataParallel(GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2,
                                    n_embd=8)), 2)
    try:
        assert dp.spec.threads == 1
    finally:
        dp.close()


def test_each_worker_runs_on_the_threads_it_was_given():
    """A worker sets its threads (tensorlite.set_num_threads) when it builds its model: BLAS
    to at most that many (OpenBLAS caps it at its own start-up count) and numexpr to exactly
    that many, whatever the previous run in the same reused process had set."""

    def threads_in_a_worker(spec):  # pickled by value into the worker
        parallel._worker_model(spec)  # what the worker does before its first shard
        return tensorlite.get_num_threads(), numexpr.get_num_threads()

    for threads in (1, 2):
        dp = DataParallel(GPT(TINY, seed=0), 2, threads_per_worker=threads)
        try:
            executor = dp.transport._executor
            for blas, numexpr_threads in (executor.submit(threads_in_a_worker, dp.spec).result()
                                          for _ in range(4)):
                assert 1 <= blas <= threads and numexpr_threads == threads
        finally:
            dp.close()


@pytest.mark.parametrize("cc", ["", "/nonexistent/cc"])  # the default compiler; none
def test_a_fresh_install_says_once_that_it_compiles_or_falls_back(text_file, tmp_path, cc):
    """On a fresh install (an empty kernel cache) `--workers 2` says once that it compiles the
    C kernels, or once that they are unavailable: the parent chooses the path before its
    workers start, and they run its choice (each used to compile, or fall back, and say so)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for package in ("tensorlite", "gpt"):  # a copy with no compiled library cached yet
        shutil.copytree(os.path.join(repo, package), tmp_path / "site" / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {k: v for k, v in os.environ.items() if k not in ("TENSORLITE_KERNELS", "CC")}
    env.update(PYTHONPATH=str(tmp_path / "site"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               OPENBLAS_NUM_THREADS="1", **({"CC": cc} if cc else {}))
    args = run_train_args(text_file, tmp_path / "out", "--workers", "2", "--max-iters", "2")
    r = subprocess.run([sys.executable, "-m", "gpt.train", *args], capture_output=True,
                       text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith("tensorlite:")]
    if "unavailable" in r.stderr:
        assert len(said) == 1 and "running the NumPy reference kernels" in said[0], said
    else:
        assert not cc
        assert len(said) == 2, said
        assert said[0].startswith("tensorlite: compiling C kernels for this CPU (once;")
        assert said[1].startswith("tensorlite: C kernels compiled in ")


def test_a_crashed_worker_is_a_one_line_cli_error(text_file, tmp_path, monkeypatch, capsys):
    from gpt import train

    def die(*args):  # a closure, so it travels to the worker by value
        os._exit(70)

    monkeypatch.setattr(parallel, "_shard_loss_and_grads", die)
    assert train.main(run_train_args(text_file, tmp_path, "--workers", "2")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "worker failed" in lines[0]


def test_ctrl_c_with_workers_still_saves_and_stops(text_file, tmp_path):
    """A terminal sends SIGINT to the whole process group, workers included: they must leave
    it to the parent, which finishes the step, saves and exits 130."""
    proc = start_long_run(text_file, tmp_path, log_interval=5)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted at iter" in err and "worker failed" not in err


# ---- a dask cluster on this machine --------------------------------------------------------------
@pytest.fixture(scope="module")
def dask_scheduler():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_dask_gradients_combine_to_the_whole_batch_gradient(dask_scheduler):
    model = GPT(TINY, dtype=np.float64, seed=1)
    x, y = batch(5)
    loss, grads = single_process(model, x, y)
    with DataParallel(model, 2, backend="dask", scheduler=dask_scheduler) as dp:
        assert dp.loss_and_grads(x, y) == pytest.approx(loss, rel=1e-12)
        for name, p in model.params.items():
            np.testing.assert_allclose(p.grad, grads[name], rtol=1e-10, atol=1e-13,
                                       err_msg=name)


def test_dask_backend_logs_the_losses_of_two_threads_to_the_bit(text_file, tmp_path,
                                                                two_thread_losses,
                                                                dask_scheduler):
    r = run_train(text_file, tmp_path, "--workers", "2", "--backend", "dask",
                  "--scheduler", dask_scheduler)
    assert r.returncode == 0, r.stderr
    assert logged_losses(tmp_path) == two_thread_losses


def test_a_lost_dask_worker_is_retried_with_the_same_loss_and_none_left_is_one_line(tmp_path,
                                                                                   monkeypatch):
    """A worker killed mid-step: its task runs again on the workers that remain and the
    step gives the same loss. With no worker left: one-line error."""
    import time

    from dask.distributed import LocalCluster

    from gpt.parallel import _shard_loss_and_grads

    marker = str(tmp_path / "died")

    def die_once(*args):  # a closure, so it travels to the worker by value
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # the first task to get here
        except FileExistsError:
            return _shard_loss_and_grads(*args)
        os._exit(9)

    model = GPT(TINY, dtype=np.float64, seed=1)
    x, y = batch(4)
    reference, _ = single_process(model, x, y)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, \
            DataParallel(model, 2, backend="dask", scheduler=cluster.scheduler_address) as dp:
        monkeypatch.setattr(parallel, "_shard_loss_and_grads", die_once)
        assert dp.loss_and_grads(x, y) == pytest.approx(reference, rel=1e-12)
        assert os.path.exists(marker)  # a worker did die during that step
        monkeypatch.setattr(parallel.DaskCluster, "no_worker_grace", 1.0)
        cluster.scale(0)
        deadline = time.monotonic() + 60
        while dp.transport.live_workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(RuntimeError, match="no dask worker left") as err:
            dp.loss_and_grads(x, y)
        assert "\n" not in str(err.value)


def test_the_dask_loop_drops_only_the_gathers_its_close_ended():
    """A gather left waiting when the cluster went ends in distributed's AllExit, which asyncio
    would print as a 'Task exception was never retrieved' traceback after the run's one error
    line; the Client loop's handler drops exactly those and passes anything else on."""
    from distributed.client import AllExit

    seen = []
    parallel._quiet_all_exit(seen.append, None, {"message": "gone", "exception": AllExit()})
    assert seen == []
    other = {"message": "a real bug", "exception": ValueError("x")}
    parallel._quiet_all_exit(seen.append, None, other)
    parallel._quiet_all_exit(seen.append, None, {"message": "no exception at all"})
    assert seen == [other, {"message": "no exception at all"}]
