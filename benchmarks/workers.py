"""Data-parallel training speed: `--workers 1` (the parent alone, 2 BLAS threads) against
`--workers 2` (two loky workers, 1 thread each), at the baby config and at batch 64.

One training step is the one gpt.train takes: a batch, loss and gradients (in the parent or
through gpt.parallel.DataParallel), global-norm clipping, an AdamW step. Both settings live in
one process for the whole run (the worker pool persists, as in training) and alternate round by
round; we print the median tokens/s of each and the ratio.

    python benchmarks/workers.py                    # 5 rounds x 30 steps per setting
    python benchmarks/workers.py --rounds 9 --iters 50 --batches 12,64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import tensorlite
from gpt.config import PRESETS, GPTConfig
from gpt.model import GPT
from gpt.optim import AdamW, clip_grad_norm
from gpt.parallel import DataParallel

BABY = {k: PRESETS["baby"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
VOCAB = 65  # Tiny Shakespeare's characters; speed does not depend on which tokens they are


class Setting:
    """One way to compute a step: `workers` processes x `threads` BLAS threads each."""

    def __init__(self, workers: int, threads: int, config: GPTConfig):
        self.workers, self.threads = workers, threads
        self.model = GPT(config, dtype=np.float32, seed=0)
        self.opt = AdamW(self.model.params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
        self.dp = DataParallel(self.model, workers, threads_per_worker=threads) \
            if workers > 1 else None

    @property
    def name(self) -> str:
        return f"{self.workers} x {self.threads} thread{'s' if self.threads > 1 else ''}"

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        if self.dp is None:
            self.model.zero_grad()
            _, loss = self.model(x, y, training=True)
            loss.backward()
            loss = float(loss.item())
        else:
            loss = self.dp.loss_and_grads(x, y)
        clip_grad_norm(self.model.params, 1.0)
        self.opt.step()
        return loss

    def tokens_per_s(self, batch: int, block: int, iters: int, warmup: int, seed: int) -> float:
        tensorlite.set_num_threads(self.threads if self.dp is None else 1)
        rng = np.random.default_rng(seed)
        draws = [rng.integers(0, VOCAB, (batch, block + 1)) for _ in range(warmup + iters)]
        for i, ids in enumerate(draws):
            if i == warmup:
                t0 = time.perf_counter()
            self.step(ids[:, :-1], ids[:, 1:])
        return iters * batch * block / (time.perf_counter() - t0)

    def close(self) -> None:
        if self.dp is not None:
            self.dp.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="12,64", help="batch sizes to measure, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=30, help="timed steps per setting and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    p.add_argument("--threads", type=int, default=2, help="cores to use (workers x threads)")
    args = p.parse_args()
    tensorlite.kernels.tune_allocator()
    config = GPTConfig(vocab_size=VOCAB, **BABY)
    cores = args.threads
    settings = [Setting(1, cores, config), Setting(2, max(1, cores // 2), config)]
    print(f"baby config {BABY}, vocab {VOCAB}, float32; os.cpu_count() = {os.cpu_count()}; "
          f"{args.rounds} rounds x {args.iters} steps, alternating")
    rows = []
    try:
        for batch in (int(b) for b in args.batches.split(",")):
            results = {s.name: [] for s in settings}
            for r in range(args.rounds):
                for s in settings if r % 2 == 0 else settings[::-1]:  # alternate who goes first
                    tps = s.tokens_per_s(batch, config.block_size, args.iters, args.warmup,
                                         seed=r)
                    results[s.name].append(tps)
                    print(f"batch {batch:3d} round {r + 1} {s.name:12s} {tps:8.0f} tok/s",
                          flush=True)
            a, b = (results[s.name] for s in settings)
            paired = statistics.median(tb / ta for ta, tb in zip(a, b))  # same round, side by side
            rows.append((batch, {k: statistics.median(v) for k, v in results.items()},
                         {k: (min(v), max(v)) for k, v in results.items()}, paired))
    finally:
        for s in settings:
            s.close()

    names = [s.name for s in settings]
    print(f"\n| batch | {' | '.join(f'{n} (tok/s, median [min-max])' for n in names)} | "
          f"ratio of medians | median of per-round ratios |")
    print("|---:|" + "---:|" * len(names) + "---:|---:|")
    for batch, med, span, paired in rows:
        cells = " | ".join(f"{med[n]:,.0f} [{span[n][0]:,.0f}-{span[n][1]:,.0f}]" for n in names)
        print(f"| {batch} | {cells} | {med[names[1]] / med[names[0]]:.2f}x | {paired:.2f}x |")
    print(f"(ratios: {names[1]} / {names[0]})")


if __name__ == "__main__":
    main()
