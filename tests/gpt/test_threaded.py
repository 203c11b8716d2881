"""gpt.threaded: a batch split over threads of this process gives the whole batch's loss and
gradients (float64, to rounding), evaluation too, dropout masks equal to the worker
processes' own, and the training CLI's --threads setting."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import gpt.train as train_module
import tensorlite as tl
from gpt.config import GPTConfig, TrainConfig
from gpt.errors import UserError
from gpt.model import GPT
from gpt.optim import clip_grad_norm
from gpt.parallel import DataParallel
from gpt.shards import shard_rows
from gpt.threaded import ThreadShards, available_cores, cpu_quota
from gpt.train import make_grad_fn

TINY = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16)


def batch(B: int, T: int = 16, V: int = 23, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def whole_batch(model: GPT, x, y) -> tuple[float, dict[str, np.ndarray]]:
    model.zero_grad()
    _, loss = model(x, y, training=True)
    loss.backward()
    grads = {n: p.grad.copy() for n, p in model.params.items()}
    model.zero_grad()
    return float(loss.item()), grads


# (4, 3): more threads than rows; (1, 3): one thread, as available_cores() gives on one core
@pytest.mark.parametrize("threads, B", [(2, 4), (3, 5), (4, 3), (1, 3)])
def test_shards_on_threads_give_the_whole_batch_loss_and_gradients(threads, B):
    model = GPT(TINY, dtype=np.float64, seed=1)
    x, y = batch(B)
    loss, grads = whole_batch(model, x, y)
    shards = ThreadShards(model, threads)
    try:
        for _ in range(3):  # the same answer every time (no state left between calls)
            assert shards.loss_and_grads(x, y) == pytest.approx(loss, rel=1e-12)
            for name, p in model.params.items():
                np.testing.assert_allclose(p.grad, grads[name], rtol=1e-10, atol=1e-13,
                                           err_msg=name)
        with tl.no_grad():
            want = float(model(x, y)[1].data)
        assert shards.loss(x, y) == pytest.approx(want, rel=1e-12)
        assert abs(want - loss) < 1e-12  # no dropout: training and evaluation agree
    finally:
        shards.close()


def test_float32_shards_stay_float32_and_match():
    model = GPT(TINY, dtype=np.float32, seed=2)
    x, y = batch(6, seed=3)
    loss, grads = whole_batch(model, x, y)
    shards = ThreadShards(model, 2)
    try:
        assert shards.loss_and_grads(x, y) == pytest.approx(loss, rel=1e-5)
        for name, p in model.params.items():
            assert p.grad.dtype == np.float32
            np.testing.assert_allclose(p.grad, grads[name], rtol=2e-3, atol=2e-6, err_msg=name)
    finally:
        shards.close()


def test_gradients_are_summed_in_place_only_into_arrays_of_their_own():
    # each parameter's .grad is shard 0's array with the others added in: never an array
    # that a second parameter's gradient, a view or a read-only buffer also is (tensorlite.grad
    # hands back arrays of their own: tests/tensorlite/test_higher_order.py)
    model = GPT(TINY, dtype=np.float64, seed=1)
    shards = ThreadShards(model, 2)
    try:
        shards.loss_and_grads(*batch(4))
        grads = [p.grad for p in model.params.values()]
        assert len({id(g) for g in grads}) == len(grads)
        assert all(g.base is None and g.flags.writeable for g in grads)
        assert not any(np.shares_memory(g, p.data) for g in grads for p in model.params.values())
    finally:
        shards.close()


@pytest.mark.parametrize("B", [4, 5])  # 5: shards of 3 and 2 rows, cut alike in both
def test_dropout_masks_are_those_of_two_worker_processes(B):
    """The same rows, step seed and shard number give the same masks in a thread as in a
    worker, so with dropout --threads 2 trains like --workers 2 (to float rounding)."""
    config = GPTConfig(**dict(TINY.to_dict(), dropout=0.3))
    model = GPT(config, dtype=np.float64, seed=4)
    x, y = batch(B, seed=5)
    shards = ThreadShards(model, 2)
    try:
        got = shards.loss_and_grads(x, y, np.random.default_rng(7))
        grads = {n: p.grad.copy() for n, p in model.params.items()}
    finally:
        shards.close()
    with DataParallel(model, 2) as dp:
        want = dp.loss_and_grads(x, y, np.random.default_rng(7))
    assert got == pytest.approx(want, rel=1e-12)
    for name, p in model.params.items():
        np.testing.assert_allclose(grads[name], p.grad, rtol=1e-10, atol=1e-13, err_msg=name)
    whole, _ = whole_batch(model, x, y)
    assert abs(whole - got) > 1e-6  # dropout did act


@pytest.mark.parametrize("dtype, rel", [(np.float64, 1e-10), (np.float32, 1e-4)])
@pytest.mark.parametrize("threads, B", [(2, 4), (3, 5), (1, 3)])
def test_the_norm_measured_while_summing_is_the_whole_batch_gradients_norm(dtype, rel, threads, B):
    """ThreadShards.grad_norm (measured in the pass that sums the shards' gradients) is the
    global norm of the whole batch's gradients, and clip_grad_norm given it returns it and
    clips exactly as when it measures itself (which the single-graph path does)."""
    model = GPT(TINY, dtype=dtype, seed=3)
    x, y = batch(B, seed=4)
    _, whole = whole_batch(model, x, y)
    want = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in whole.values()))
    shards = ThreadShards(model, threads)
    try:
        shards.loss_and_grads(x, y)
    finally:
        shards.close()
    assert shards.grad_norm == pytest.approx(want, rel=rel)
    grads = {n: p.grad.copy() for n, p in model.params.items()}
    measured = clip_grad_norm(model.params, 0.5 * want)  # measures the summed gradients
    assert measured == pytest.approx(shards.grad_norm, rel=1e-12 if dtype == np.float64 else 1e-6)
    clipped_measuring = {n: p.grad.copy() for n, p in model.params.items()}
    for n, p in model.params.items():
        p.grad = grads[n].copy()
    assert clip_grad_norm(model.params, 0.5 * want, shards.grad_norm) == shards.grad_norm
    for n, p in model.params.items():
        np.testing.assert_allclose(p.grad, clipped_measuring[n], rtol=1e-12 if dtype == np.float64
                                   else 1e-6, atol=0, err_msg=n)
        assert np.abs(p.grad).max() < np.abs(grads[n]).max() or not grads[n].any()  # clipped


def test_training_on_threads_and_on_one_graph_logs_the_same_norms():
    """gpt.train's step: with --threads 2 the norm comes from the threads' sum, with one
    thread clip_grad_norm measures it; both runs clip the same gradients the same way."""
    norms, blas_threads = {}, tl.get_num_threads()  # (one thread sets BLAS to 1: restored)
    for threads in (1, 2):
        model = GPT(TINY, dtype=np.float64, seed=5)
        cfg = TrainConfig(batch_size=4, threads=threads)
        fns = make_grad_fn(model, cfg)
        try:
            assert fns.threads == threads
            steps = []
            for seed in range(3):
                fns.loss_and_grads(*batch(4, seed=seed), None)
                given = fns.grad_norm()
                assert (given is None) == (threads == 1)
                steps.append(clip_grad_norm(model.params, 1.0, given))
                steps.append({n: p.grad.copy() for n, p in model.params.items()})
            norms[threads] = steps
        finally:
            fns.close()
            tl.set_num_threads(blas_threads)
    for a, b in zip(norms[1], norms[2]):
        if isinstance(a, float):
            assert a == pytest.approx(b, rel=1e-10)
        else:
            for n in a:
                np.testing.assert_allclose(a[n], b[n], rtol=1e-9, atol=1e-14, err_msg=n)


def test_an_error_in_a_shard_thread_reaches_the_caller():
    model = GPT(TINY, dtype=np.float64, seed=1)
    x, y = batch(4)
    y[3, 0] = 99  # a target outside the vocabulary, in the second shard's rows
    shards = ThreadShards(model, 2)
    try:
        with pytest.raises((ValueError, IndexError)):
            shards.loss_and_grads(x, y)
    finally:
        shards.close()


def test_shard_rows_cut_as_array_split_does():
    for rows in range(1, 14):
        for shards in range(1, 6):
            want = np.array_split(np.arange(rows), min(shards, rows))
            got = [np.arange(rows)[s] for s in shard_rows(rows, shards)]
            assert [list(g) for g in got] == [list(w) for w in want]


def test_threads_setting_is_checked_and_defaults_to_the_cores():
    # the cores this process may run on: its affinity mask (taskset), not every CPU
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(mask)})  # (this thread only: restored below)
        assert available_cores() == 1
    finally:
        os.sched_setaffinity(0, mask)
    quota = cpu_quota()  # a container's CPU quota caps it too (tested below)
    assert available_cores() == (len(mask) if quota is None else min(len(mask), quota))
    assert TrainConfig(threads=None).validate().threads is None
    for bad in (0, -1, 2.5, "2"):
        with pytest.raises(UserError, match="threads"):
            TrainConfig(threads=bad).validate()


class FakeWorkers:
    def __init__(self, model, workers, backend, scheduler):
        self.loss_and_grads = self.close = lambda *args: None


@pytest.mark.parametrize("threads, workers, note", [
    (3, 1, "--threads 3 on 2 cores"), (2, 1, None), (None, 1, None), (1, 3, "--workers 3 on 2"),
    (1, 2, None), (8, 1, "--threads 4 on 2 cores"),  # (never more threads than rows: 4)
])
def test_more_shards_than_cores_get_a_one_line_note(monkeypatch, capsys, threads, workers, note):
    monkeypatch.setattr(train_module, "available_cores", lambda: 2)
    monkeypatch.setattr("gpt.parallel.DataParallel", FakeWorkers)  # no processes started
    cfg = TrainConfig(threads=threads, workers=workers, batch_size=4)
    train_module.make_grad_fn(GPT(TINY, dtype=np.float64, seed=1), cfg).close()
    err = capsys.readouterr().err
    if note is None:
        assert err == ""
    else:
        assert note in err and err.count("\n") == 1


def test_closing_gives_blas_its_threads_back():
    """BLAS runs one thread only while the shards are open: training, then sampling or a
    benchmark in the same process, gets its matmuls back on every thread."""
    before = tl.get_num_threads()
    tl.set_num_threads(2)
    try:
        shards = ThreadShards(GPT(TINY, dtype=np.float64, seed=1), 2)
        assert tl.get_num_threads() == 1
        shards.close()
        assert tl.get_num_threads() == 2
    finally:
        tl.set_num_threads(before)


def test_a_thread_count_below_one_is_refused():
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
            ThreadShards(GPT(TINY, dtype=np.float64, seed=1), bad)


def cgroup_tree(tmp_path, membership: str, files: dict[str, str]):
    """A fake /proc/self/cgroup and /sys/fs/cgroup: {path under the root: contents}."""
    (tmp_path / "self.cgroup").write_text(membership)
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    return {"root": str(tmp_path / "fs"), "membership": str(tmp_path / "self.cgroup")}


@pytest.mark.parametrize("membership, files, cpus", [
    ("0::/\n", {"cpu.max": "200000 100000\n"}, 2),  # docker --cpus 2, cgroup v2
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: one whole core
    ("0::/\n", {"cpu.max": "20000 100000\n"}, 1),  # a fifth of a CPU: still one thread
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # no quota
    ("0::/a/b\n", {"a/cpu.max": "300000 100000", "a/b/cpu.max": "max 100000"}, 3),  # above
    ("0::/a/b\n", {"a/cpu.max": "800000 100000", "a/b/cpu.max": "400000 100000"}, 4),
    ("3:cpu,cpuacct:/x\n1:memory:/m\n",  # cgroup v1
     {"cpu,cpuacct/x/cpu.cfs_quota_us": "300000", "cpu,cpuacct/x/cpu.cfs_period_us": "100000"}, 3),
    ("3:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ("0::/\n", {"cpu.max": "garbage"}, None),  # unreadable: as no quota
    ("0::/\n", {"cpu.max": "nan 100000"}, None),  # not microseconds: as no quota, no ValueError
    ("0::/\n", {"cpu.max": "1e999 100000"}, None),  # nor an OverflowError
    ("0::/\n", {"cpu.max": "1" + "0" * 400 + " 1"}, None),  # too large for a float
    ("0::/\n", {"cpu.max": "100000 0"}, None),
    # outside this cgroup namespace: /sys/fs/cgroup/.. is no folder of that cgroup
    ("0::/../x\n", {"../x/cpu.max": "100000 100000", "cpu.max": "400000 100000"}, None),
    ("0::/\n", {}, None),
])
def test_a_containers_cpu_quota_caps_the_default_threads(tmp_path, membership, files, cpus):
    assert cpu_quota(**cgroup_tree(tmp_path, membership, files)) == cpus


def test_a_cgroup_name_that_is_not_utf8_is_read_as_bytes(tmp_path):
    # a cgroup may be named with any bytes; its line in /proc/self/cgroup is then no UTF-8
    (tmp_path / "self.cgroup").write_bytes(b"0::/caf\xe9\n")
    folder = os.path.join(os.fsencode(tmp_path), b"fs", b"caf\xe9")
    os.makedirs(folder)
    with open(os.path.join(folder, b"cpu.max"), "wb") as f:
        f.write(b"200000 100000\n")
    assert cpu_quota(str(tmp_path / "fs"), str(tmp_path / "self.cgroup")) == 2
    (tmp_path / "self.cgroup").write_bytes(b"\xff\xfe\x00garbage")
    assert cpu_quota(str(tmp_path / "fs"), str(tmp_path / "self.cgroup")) is None


def test_available_cores_takes_the_smaller_of_affinity_and_quota(monkeypatch):
    monkeypatch.setattr("gpt.threaded.cpu_quota", lambda: 1)
    assert available_cores() == 1
    monkeypatch.setattr("gpt.threaded.cpu_quota", lambda: 10_000)
    assert available_cores() == len(os.sched_getaffinity(0))
