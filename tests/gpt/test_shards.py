"""gpt.shards: the one set of shard rules. A batch cut into shards and summed by add_shards
gives the whole batch's loss and gradients, and both transports that implement ShardedStep
(threads: gpt.threaded, worker processes: gpt.parallel) give the same numbers, to the bit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.parallel import DataParallel
from gpt.shards import Shard, ShardedStep, ShardGrads, cut_batch, shard_grads
from gpt.threaded import ThreadShards

TINY = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16)


def batch(B: int, T: int = 16, V: int = 23, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


class InOrder(ShardedStep):
    """The smallest transport: every shard here, one after the other."""

    def __init__(self, model: GPT, shards: int):
        super().__init__(model, shards)
        self.seen: list[Shard] = []

    def compute_grads(self, shards: list[Shard]) -> list[ShardGrads]:
        self.seen += shards
        return [shard_grads(self.model, s) for s in shards]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("B, shards", [(5, 3), (4, 2), (2, 4), (3, 1)])
def test_cut_batch_covers_every_row_once_with_weights_summing_to_one(B, shards):
    x, y = batch(B)
    cut = cut_batch(x, y, shards, seed=9)
    assert len(cut) == min(B, shards)
    np.testing.assert_array_equal(np.concatenate([s.x for s in cut]), x)
    np.testing.assert_array_equal(np.concatenate([s.y for s in cut]), y)
    assert [s.k for s in cut] == list(range(len(cut)))
    assert [s.weight for s in cut] == [len(s.x) / B for s in cut]
    assert math.fsum(s.weight for s in cut) == pytest.approx(1.0, abs=1e-15)
    assert {s.seed for s in cut} == {9}


@pytest.mark.parametrize("B, shards", [(5, 3), (4, 2), (3, 1)])
def test_the_weighted_sum_of_shards_is_the_whole_batch(B, shards):
    model = GPT(TINY, dtype=np.float64, seed=1)
    x, y = batch(B)
    model.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    want = {n: p.grad.copy() for n, p in model.params.items()}
    model.zero_grad()
    step = InOrder(model, shards)
    assert step.loss_and_grads(x, y) == pytest.approx(float(loss.data), rel=1e-12)
    for name, p in model.params.items():
        np.testing.assert_allclose(p.grad, want[name], rtol=1e-10, atol=1e-13, err_msg=name)
    norm = math.sqrt(sum(float(np.sum(g**2)) for g in want.values()))
    assert step.grad_norm == pytest.approx(norm, rel=1e-10)
    assert step.step == 1 and len(step.seen) == min(B, shards)


def test_a_bad_batch_is_refused_before_any_shard_runs():
    step = InOrder(GPT(TINY, dtype=np.float64, seed=1), 2)
    x, y = batch(4)
    with pytest.raises(ValueError, match="x and y must be"):
        step.loss_and_grads(x, y[:, :-1])
    assert step.seen == [] and step.step == 0


@pytest.mark.parametrize("B", [4, 5])  # 5: weights 0.6 and 0.4, not powers of two
def test_threads_and_worker_processes_give_the_same_numbers_to_the_bit(B):
    """The two transports run the same rules (shard_grads, add_shards): with dropout, the same
    step seed gives the same loss, gradients and norm on threads as in worker processes."""
    config = GPTConfig(**dict(TINY.to_dict(), dropout=0.3))
    model = GPT(config, dtype=np.float32, seed=4)
    x, y = batch(B, seed=5)
    results = []
    for make in (lambda: InOrder(model, 2), lambda: ThreadShards(model, 2),
                 lambda: DataParallel(model, 2, threads_per_worker=1)):
        with make() as step:
            loss = step.loss_and_grads(x, y, np.random.default_rng(7))
            results.append((loss, step.grad_norm,
                            {n: p.grad.copy() for n, p in model.params.items()}))
    (loss, norm, grads), *others = results
    for other_loss, other_norm, other_grads in others:
        assert other_loss == loss and other_norm == norm
        for name, g in grads.items():
            np.testing.assert_array_equal(other_grads[name], g, err_msg=name)
