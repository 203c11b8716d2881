"""Token files on a real dask cluster (a `dask scheduler` and two `dask worker` processes on
127.0.0.1): a worker that reads the same token files as the parent is sent the windows'
starts and cuts the rows itself; one that cannot (another file at the path, a changed file)
is sent the rows. Either way the numbers are those of shipping the rows, to the bit.

Two workers on one machine see different files at one path through /proc/self/cwd (Linux):
each runs in its own folder, and the parent names its files /proc/self/cwd/d/..., which
every process resolves in its own folder, as machines with their own disks would."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_dask_chaos import Cluster, Training, env, logged_losses

from gpt import data as gd
from gpt import parallel
from gpt import train as gt
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.parallel import DataParallel

pytestmark = pytest.mark.skipif(not Path("/proc/self/cwd").is_dir(),
                                reason="two views of one path need Linux's /proc/self/cwd")
WORDS = ["the", "king", "and", "queen", "of", "a", "green", "field", "sing", "to", "all", "who",
         "hear", "them", "now"]
DIR = "/proc/self/cwd/d"  # each process's own folder's d/


def write_copy(src: Path, dst: Path, different: bool) -> None:
    """dst: a copy of the token file src, or (different) a file of its size with other ids;
    either way a file that a worker which mapped the old dst sees changed (a new mtime)."""
    ids = np.fromfile(src, dtype=np.uint16)
    if different:
        ids = ids[::-1].copy()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    ids.tofile(tmp)
    os.replace(tmp, dst)


def worker_address(worker: subprocess.Popen) -> str:
    return re.search(r"Start worker at:\s*(\S+)", worker.log_path.read_text()).group(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(cluster, folder of worker 0, of worker 1, {folder: address}): worker 0 runs in the
    folder where the parent's token files are (`same`), worker 1 in a folder of its own
    (`other`), whose d/train.bin each test sets as it needs."""
    base = tmp_path_factory.mktemp("dask-token-files")
    rng = np.random.default_rng(0)
    text = base / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS, size=8)).capitalize() + "."
                              for _ in range(400)) + "\n", encoding="utf-8")
    same, other = base / "same", base / "other"
    same.mkdir()
    gd.prepare(text, same / "d", progress=None)
    shutil.copytree(same / "d", other / "d")
    with Cluster(base / "cluster") as c:
        workers = [c.add_worker(cwd=same), c.add_worker(cwd=other)]
        for w in workers:
            c.wait_registered(w)
        yield c, same, other, {same: worker_address(workers[0]),
                               other: worker_address(workers[1])}


def counting_rows(monkeypatch) -> list:
    """Counts the shards the parent turns into rows (parallel._rows, in this process)."""
    calls: list = []
    rows = parallel._rows
    monkeypatch.setattr(parallel, "_rows", lambda shard: calls.append(shard.k) or rows(shard))
    return calls


def test_workers_with_the_files_read_them_and_a_changed_file_gets_rows(cluster, monkeypatch,
                                                                       capsys):
    """Both workers first read the same files: no shard goes as rows, and the loss and
    gradients are those of the rows to the bit. Then worker 1's file changes (same size,
    other ids): its shard by reference fails there at once, the step runs again as rows
    with the same numbers, and from then on worker 1 gets the rows."""
    c, same, other, address = cluster
    write_copy(same / "d" / "train.bin", other / "d" / "train.bin", different=False)
    monkeypatch.chdir(same)
    data = gd.load_token_dir(DIR)
    ids = data.train
    model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16),
                dtype=np.float64, seed=1)
    rng = np.random.default_rng(3)
    rows = counting_rows(monkeypatch)

    def both_ways(dp):
        starts = gd.batch_starts(len(ids), 16, 6, rng)
        by_reference = gd.TokenWindows.of(ids, starts, 16)
        assert by_reference.path == f"{DIR}/train.bin"
        loss = dp.loss_and_grads_from(by_reference)
        grads = [p.grad.copy() for p in model.params.values()]
        assert dp.loss_and_grads(*gd.windows(ids, starts, 16)) == loss
        for g, p in zip(grads, model.params.values(), strict=True):
            np.testing.assert_array_equal(g, p.grad)

    with DataParallel(model, 2, backend="dask", scheduler=c.address) as dp:
        both_ways(dp)
        assert rows == []  # both read the files: only starts were sent
        out = capsys.readouterr().out
        for a in address.values():
            assert f"dask worker {a} reads the token files itself" in out
        write_copy(same / "d" / "train.bin", other / "d" / "train.bin", different=True)
        both_ways(dp)  # worker 1 found out in the step, which ran again as rows
        assert sorted(rows) == [0, 1]
        assert (f"dask worker {address[other]} is sent the rows ({DIR}/train.bin here is "
                "another file (its fingerprint differs))") in capsys.readouterr().out
        rows.clear()
        both_ways(dp)
        assert len(rows) == 1  # worker 1's shard only


def test_asking_a_worker_that_does_not_answer_takes_a_bounded_time_and_means_rows(cluster,
                                                                                  capsys):
    """A probe pinned to a worker that is gone (here: an address no worker has) waits at
    most connect_s, and that worker counts as one without the files."""
    c, same, *_ = cluster
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=1)
    files = dataclasses.replace(gd.TokenWindows.of(gd.load_token_dir(same / "d").train,
                                                   np.arange(2), 16), fingerprint="x")
    gone = "tcp://127.0.0.1:9"
    with DataParallel(model, 2, backend="dask", scheduler=c.address) as dp:
        dp.transport.connect_s = 1.0
        started = time.monotonic()
        dp.transport._probe([gone], files)
        assert time.monotonic() - started < 5
        assert dp.transport._readers == {(gone, files.path, "x"): False}
    assert f"dask worker {gone} is sent the rows (no answer in 1 s)" in capsys.readouterr().out


def test_a_token_file_gone_from_the_parent_is_a_one_line_error(cluster, tmp_path):
    c, same, *_ = cluster
    shutil.copytree(same / "d", tmp_path / "d")
    data = gd.load_token_dir(tmp_path / "d")
    model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=16, n_layer=1,
                          n_head=2, n_embd=16), seed=1)
    by_reference = gd.TokenWindows.of(data.train, np.arange(4), 16)
    (tmp_path / "d" / "train.bin").unlink()
    with DataParallel(model, 2, backend="dask", scheduler=c.address) as dp, \
            pytest.raises(RuntimeError, match="^data-parallel step 0: cannot read the token "
                          "file here") as err:
        dp.loss_and_grads_from(by_reference)
    assert "\n" not in str(err.value)


def train_args(out: Path, *flags: str) -> list[str]:
    return ["--data", DIR, "--out-dir", str(out), "--n-layer", "2", "--n-head", "2",
            "--n-embd", "32", "--block-size", "32", "--batch-size", "8", "--max-iters", "12",
            "--warmup-iters", "5", "--log-interval", "1", "--eval-interval", "12",
            "--eval-iters", "1", *flags]


def test_a_worker_without_the_files_gets_rows_and_the_run_logs_the_losses_of_threads(
        cluster, monkeypatch, tmp_path, capsys):
    """`gpt.train --data DIR --backend dask` with no token file where worker 1 looks:
    worker 0 reads its rows, worker 1 is sent its rows, and the run logs the losses of
    shipping every batch's rows and of two threads, to the bit."""
    c, same, other, address = cluster
    (other / "d" / "train.bin").unlink(missing_ok=True)
    monkeypatch.chdir(same)
    threads = subprocess.run([sys.executable, "-m", "gpt.train",
                              *train_args(tmp_path / "threads", "--threads", "2")],
                             capture_output=True, text=True, env=env(), timeout=300,
                             check=False)
    assert threads.returncode == 0, threads.stderr
    dask = ["--workers", "2", "--backend", "dask", "--scheduler", c.address]
    assert gt.main(train_args(tmp_path / "rows", *dask)) == 0  # 8 x 32 tokens: as rows
    assert "token files" not in capsys.readouterr().out
    monkeypatch.setattr(gt, "BY_REFERENCE_TOKENS_DASK", 64)
    rows = counting_rows(monkeypatch)
    assert gt.main(train_args(tmp_path / "files", *dask)) == 0
    out = capsys.readouterr().out
    assert f"dask worker {address[same]} reads the token files itself" in out
    assert (f"dask worker {address[other]} is sent the rows (cannot read {DIR}/train.bin "
            "here (No such file or directory))") in out
    assert len(rows) == 12  # one shard a step: worker 1's
    losses = logged_losses(tmp_path / "threads")
    assert len(losses) == 12
    assert logged_losses(tmp_path / "rows") == losses
    assert logged_losses(tmp_path / "files") == losses


def test_workers_killed_during_a_run_by_reference_never_hang_it_nor_change_its_losses(
        cluster, tmp_path):
    """A run whose batches go by reference (BY_REFERENCE_TOKENS_DASK tokens) on a cluster of
    its own, 3 workers with the files: two of them SIGKILLed at random moments, a new one
    started after each. The run ends by itself with the losses of two threads, and a worker
    that joined is asked, and reads the files too."""
    _, same, *_ = cluster
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    flags = ["--block-size", "64", "--batch-size", str(gd.BY_REFERENCE_TOKENS_DASK // 64),
             "--max-iters", "80", "--eval-interval", "80"]
    threads = Training(train_args(tmp_path / "threads", "--threads", "2", *flags), cwd=same)
    assert threads.finish() == 0, "".join(threads.err)
    with Cluster(tmp_path / "cluster") as c:
        for worker in [c.add_worker(cwd=same) for _ in range(3)]:
            c.wait_registered(worker)
        run = Training(train_args(tmp_path / "files", "--workers", "2", "--backend", "dask",
                                  "--scheduler", c.address, *flags), cwd=same)
        run.wait_for("iter")
        for victim in c.workers[:2]:
            time.sleep(rng.uniform(0.0, 0.6))
            assert run.proc.poll() is None, "the run ended before the kills: make it longer"
            victim.kill()
            c.wait_registered(c.add_worker(cwd=same))
        assert run.finish() == 0, f"seed {seed}: {''.join(run.err)}"
        joined = [worker_address(w) for w in c.workers[3:]]
    assert logged_losses(tmp_path / "files") == logged_losses(tmp_path / "threads"), seed
    out = "".join(run.out)
    assert "is sent the rows" not in out
    assert out.count("reads the token files itself") >= 3
    assert any(f"dask worker {a} reads the token files itself" in out for a in joined), out
