"""Where one training step's time goes, by op, with tensorlite.profiler.

    python benchmarks/profile_step.py                 # baby config, 2 threads, 40 steps
    python benchmarks/profile_step.py --threads 1
    python benchmarks/profile_step.py --blas          # one graph, BLAS splits the matmuls

As gpt.train runs it: with several threads the batch is split over them (gpt.threaded), each
thread computing its shard's forward and backward. Prints per-op forward/backward milliseconds
per step (summed over the threads), the split of the threads' time into matmuls and the rest
(the rest includes the Python between ops and any waiting), once of the profiled steps' wall
clock and once of the median step run without the profiler (profiled and plain steps take
turns), then the plain steps' wall clock split into the shards' forward+backward, the sum of
their gradients (which measures the norm too: gpt.threaded), clipping and the AdamW update.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import tensorlite
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.optim import AdamW, clip_grad_norm
from gpt.threaded import ThreadShards
from tensorlite.profiler import Profile, profile


def main() -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from train import (  # benchmarks/train.py's data helpers
        CONFIGS,
        DATA,
        batches,
        gradients,
        load_ids,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="baby")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=DATA)
    p.add_argument("--blas", action="store_true",
                   help="one graph for the whole batch; BLAS splits each matmul over the threads")
    args = p.parse_args()
    if args.steps < 1 or args.threads < 1:
        raise SystemExit(f"profile_step: --steps and --threads must be >= 1, got --steps "
                         f"{args.steps} --threads {args.threads}")

    tensorlite.kernels.tune_allocator()
    tensorlite.set_num_threads(args.threads)
    n_layer, n_head, n_embd, block, batch = CONFIGS[args.config]
    ids, vocab = load_ids(args.data)
    model = GPT(GPTConfig(vocab, block, n_layer, n_head, n_embd), dtype=np.float32, seed=0)
    opt = AdamW(model.params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    data = list(batches(ids, block, batch, 0, 2 * args.steps + 5))  # warm-up, then 2 x steps

    threads = min(args.threads, batch)
    shards = ThreadShards(model, threads) if threads > 1 and not args.blas else None
    phases = np.zeros(4)  # forward+backward, the shards' gradients summed, clip, AdamW
    mapped = [0.0]  # seconds in the shards' forward+backward (ThreadShards._map) this step

    def step(x, y, timed=False):
        t0 = time.perf_counter()
        mapped[0] = 0.0
        gradients(model, shards, x, y)
        t1 = time.perf_counter()
        clip_grad_norm(model.parameters(), 1.0, shards.grad_norm if shards else None)
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if timed:
            summed = t1 - t0 - mapped[0] if shards is not None else 0.0
            phases[:] += (t1 - t0 - summed, summed, t2 - t1, t3 - t2)

    shard_times = []  # (wall, thread CPU) seconds of each shard: the gap is waiting (the GIL)
    plain_shard_times = []  # those of the plain steps (the profiler's clock reads slow the rest)
    if shards is not None:
        compute = shards._grads

        def timed_shard(*args):
            wall, cpu = time.perf_counter(), time.thread_time()
            result = compute(*args)
            shard_times.append((time.perf_counter() - wall, time.thread_time() - cpu))
            return result

        shards._grads = timed_shard
        run_shards = shards._map

        def timed_map(*args):
            start = time.perf_counter()
            result = run_shards(*args)
            mapped[0] += time.perf_counter() - start
            return result

        shards._map = timed_map
    for x, y in data[:5]:  # warm up
        step(x, y)
    # Profiled and plain steps take turns, so both see the same machine (it is shared and
    # noisy): the op table comes from the profiled ones, the wall clock of a step from the
    # plain ones (the profiler's lock and clock reads per op are not part of training).
    prof = Profile()
    matmul_per_step, plain_per_step = [], []
    for i, (x, y) in enumerate(data[5 : 5 + 2 * args.steps]):
        if i % 2 == 0:
            with profile() as one:
                step(x, y)
            for key, (calls, sec) in one.stats.items():
                entry = prof.stats.setdefault(key, [0, 0.0])
                entry[0] += calls
                entry[1] += sec
            prof.wall += one.wall
            matmul_per_step.append(sum(sec for (op, _), (_, sec) in one.stats.items()
                                       if op == "MatMul"))
        else:
            first, t0 = len(shard_times), time.perf_counter()
            step(x, y, timed=True)
            plain_per_step.append(time.perf_counter() - t0)
            plain_shard_times += shard_times[first:]

    how = (f"batch split over {threads} threads" if shards is not None
           else f"one graph, {args.threads} BLAS threads")
    print(f"config {args.config}, {how}, {args.steps} steps, kernels {tensorlite.kernels.kernel_path()}\n")
    print(prof.table(args.steps))
    # the threads' time: each of the `lanes` threads is busy or waiting for the whole wall clock
    lanes = threads if shards is not None else 1
    matmul = sum(matmul_per_step)
    lane_time = lanes * prof.wall
    print(f"\nthreads' time {1e3 * lane_time / args.steps:.2f} ms/step ({lanes} x wall): "
          f"matmuls {matmul / lane_time:.1%}, everything else {1 - matmul / lane_time:.1%}")
    # the same split against the plain steps, as medians (a step disturbed by another
    # process moves a median less than a total)
    plain = lanes * float(np.median(plain_per_step))
    share = float(np.median(matmul_per_step)) / plain
    print(f"without the profiler {1e3 * plain:.2f} ms/step ({lanes} x median step): "
          f"matmuls {share:.1%}, everything else {1 - share:.1%}")
    if plain_shard_times:
        wall, cpu = np.median(np.array(plain_shard_times), axis=0) * 1e3
        print(f"per shard (median of the plain steps' {len(plain_shard_times)} shards): wall "
              f"clock {wall:.2f} ms, the thread's CPU time {cpu:.2f} ms")
    total = phases.sum()
    print("\nphase          ms/step  share")
    for name, t in zip(("forward+backward", "gradient sum", "clip", "AdamW"), phases):
        print(f"{name:16s} {1e3 * t / args.steps:8.2f} {t / total:6.1%}")
    print(f"{'step':16s} {1e3 * total / args.steps:8.2f}")


if __name__ == "__main__":
    main()
