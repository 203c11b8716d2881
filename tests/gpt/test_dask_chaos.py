"""A real dask cluster on 127.0.0.1 (a `dask scheduler` process and `dask worker` processes)
training with --backend dask while its processes are killed (SIGKILL): a lost worker, at
any moment of a step, never hangs a run, which logs the losses of an uninterrupted one; a
worker that joins takes work; with no worker left, or the scheduler gone, the run ends in
bounded time with one line naming the kept checkpoint, and that checkpoint loads."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpt.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
WORDS = ["the", "king", "and", "queen", "of", "a", "green", "field", "sing", "to", "all", "who",
         "hear", "them", "now"]
STEPS = 200  # of a tiny model: a run lasts some seconds on the cluster (and runs repeat
# until KILLS kills are done)
KILLS = 10


def env() -> dict[str, str]:
    """This checkout's gpt in every process, one BLAS thread each (so a step's numbers do
    not depend on which worker computes it)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1")


class Cluster:
    """A scheduler and its workers, each its own process, all killed on exit."""

    def __init__(self, folder: Path):
        self.folder, self.procs, self.workers = folder, [], []
        folder.mkdir(parents=True, exist_ok=True)
        info = folder / "scheduler.json"
        self.scheduler = self._start("scheduler", "distributed.cli.dask_scheduler", "--host",
                                     "127.0.0.1", "--port", "0", "--no-dashboard",
                                     "--scheduler-file", str(info))
        self._until(lambda: info.exists() and info.stat().st_size > 0, "the scheduler started")
        time.sleep(0.2)  # (the file is written whole, but let it settle)
        self.address = json.loads(info.read_text())["address"]

    def _start(self, name: str, module: str, *args: str, cwd: Path = REPO) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env(), cwd=cwd)
        proc.log_path = self.folder / f"{name}.log"
        log.close()  # the child has its own descriptor
        self.procs.append(proc)
        return proc

    def add_worker(self, cwd: Path = REPO) -> subprocess.Popen:
        """A worker process (one thread), started in the folder `cwd`."""
        worker = self._start(f"worker{len(self.workers)}", "distributed.cli.dask_worker",
                             self.address, "--nthreads", "1", "--no-nanny", "--host",
                             "127.0.0.1", "--no-dashboard", "--local-directory",
                             str(self.folder / "scratch"), cwd=cwd)
        self.workers.append(worker)
        return worker

    @staticmethod
    def registered(worker: subprocess.Popen) -> bool:
        return worker.poll() is None and "Registered to" in worker.log_path.read_text()

    def _until(self, ok, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            assert time.monotonic() < deadline, f"timed out waiting until {what}"
            time.sleep(0.05)

    def wait_registered(self, worker: subprocess.Popen) -> None:
        self._until(lambda: self.registered(worker), "a worker registered")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Training:
    """`python -m gpt.train` in a subprocess, its output read as it comes."""

    def __init__(self, args: list[str], cwd: Path = REPO):
        self.proc = subprocess.Popen([sys.executable, "-m", "gpt.train", *args], env=env(),
                                     cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.last_output = time.monotonic()
        self._readers = [threading.Thread(target=self._read, args=(f, lines), daemon=True)
                         for f, lines in ((self.proc.stdout, self.out),
                                          (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            self.last_output = time.monotonic()

    def wait_for(self, prefix: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(line.startswith(prefix) for line in self.out):
            assert self.proc.poll() is None, f"the run ended early: {''.join(self.err)}"
            assert time.monotonic() < deadline, f"no {prefix!r} line: {''.join(self.err)}"
            time.sleep(0.02)

    def finish(self, stall: float = 60) -> int:
        """The exit status; a run that prints nothing for `stall` seconds has hung."""
        while self.proc.poll() is None:
            if time.monotonic() - self.last_output > stall:
                self.proc.kill()
                pytest.fail(f"the run hung (no output for {stall:g} s): {''.join(self.err)}")
            time.sleep(0.05)
        for reader in self._readers:
            reader.join(10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=8)).capitalize() + "." for _ in range(400)]
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_args(text_file: Path, out: Path, steps: int, *flags: str) -> list[str]:
    return ["--data", str(text_file), "--out-dir", str(out), "--n-layer", "2", "--n-head", "2",
            "--n-embd", "32", "--block-size", "32", "--batch-size", "8", "--max-iters",
            str(steps), "--warmup-iters", "5", "--log-interval", "1", "--eval-interval", "20",
            "--eval-iters", "1", *flags]


def logged_losses(out: Path) -> list[float]:
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["train_loss"] for line in f]


@pytest.fixture(scope="module")
def uninterrupted_losses(text_file, tmp_path_factory) -> list[float]:
    """The losses of the run without a cluster: two shards on two threads, which the dask
    backend matches to the bit (test_parallel)."""
    out = tmp_path_factory.mktemp("threads")
    run = Training(train_args(text_file, out, STEPS, "--threads", "2"))
    assert run.finish() == 0, "".join(run.err)
    return logged_losses(out)


def test_workers_killed_at_random_moments_never_hang_a_run_nor_change_its_losses(
        text_file, tmp_path, uninterrupted_losses):
    """Workers are SIGKILLed at (at least) KILLS random moments of runs on a cluster of 3,
    the oldest first, and a new worker starts after each kill, until a run has outlived
    every worker it started with (so it went on on workers that joined it). Every run must
    end by itself and log the uninterrupted run's losses exactly."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    kills, runs, joined_used = 0, 0, False
    with Cluster(tmp_path / "cluster") as cluster:
        for worker in [cluster.add_worker() for _ in range(3)]:
            cluster.wait_registered(worker)
        while kills < KILLS or not joined_used:
            assert runs < 8, f"only {kills} kills in {runs} runs (seed {seed})"
            out = tmp_path / f"run{runs}"
            runs += 1
            run = Training(train_args(text_file, out, STEPS, "--workers", "2", "--backend",
                                      "dask", "--scheduler", cluster.address))
            run.wait_for("iter")
            at_start = [w for w in cluster.workers if w.poll() is None]
            while kills < KILLS or not all(w.poll() is not None for w in at_start):
                time.sleep(rng.uniform(0.0, 0.5))  # a random moment of a step
                alive = [w for w in cluster.workers if cluster.registered(w)]
                if run.proc.poll() is not None:
                    break
                if len(alive) < 2:  # keep one worker: wait for the newest to register
                    cluster.wait_registered(cluster.workers[-1])
                    continue
                alive[0].kill()
                kills += 1
                cluster.add_worker()
            assert run.finish() == 0, f"seed {seed}: {''.join(run.err)}"
            assert logged_losses(out) == uninterrupted_losses, f"seed {seed}"
            joined_used |= all(w.poll() is not None for w in at_start)
    print(f"chaos: {kills} worker kills survived in {runs} runs (seed {seed})")


def kept_checkpoint_line(run: Training, out: Path, why: str) -> None:
    """The run ends with one line (after a warning per lost worker or step, if any) saying why it
    stopped and which checkpoint is kept, and that checkpoint loads (at iter 20, the last
    eval before the failure)."""
    err = "".join(run.err)
    *warnings, last = err.splitlines()
    assert all(line.startswith("warning: ") for line in warnings), err
    assert last.startswith("error: ") and why in last, err
    assert "the last good checkpoint (iter 20) is kept in" in last, err
    assert load_checkpoint(str(out)).state["iter"] == 20


@pytest.mark.parametrize("kill, why", [("workers", "no dask worker left"),
                                       ("scheduler", "lost the dask scheduler")])
def test_with_no_worker_or_scheduler_left_the_run_stops_in_bounded_time_with_one_line(
        text_file, tmp_path, kill, why):
    """Every worker, or the scheduler, SIGKILLed after the checkpoint at iter 20: the run
    ends by itself within a minute, with one line naming that checkpoint, which loads."""
    with Cluster(tmp_path / "cluster") as cluster:
        for worker in [cluster.add_worker() for _ in range(2)]:
            cluster.wait_registered(worker)
        out = tmp_path / "run"
        run = Training(train_args(text_file, out, 100_000, "--workers", "2", "--backend",
                                  "dask", "--scheduler", cluster.address))
        run.wait_for("eval iter 20")
        for proc in cluster.workers if kill == "workers" else [cluster.scheduler]:
            proc.kill()
        killed = time.monotonic()
        assert run.finish() == 2, "".join(run.err)  # gpt.cli.EXIT_ERROR
        assert time.monotonic() - killed < 60
    kept_checkpoint_line(run, out, why)
