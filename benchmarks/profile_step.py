"""Where one training step's time goes, by op, with tensorlite.profiler.

    python benchmarks/profile_step.py                 # baby config, 2 threads, 40 steps
    python benchmarks/profile_step.py --threads 1

Prints per-op forward/backward milliseconds per step, then the step split into forward,
backward, clipping and the AdamW update.
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
from tensorlite.profiler import profile


def main() -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from train import CONFIGS, DATA, batches, load_ids  # benchmarks/train.py's data helpers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="baby")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=DATA)
    args = p.parse_args()

    tensorlite.kernels.tune_allocator()
    tensorlite.set_num_threads(args.threads)
    n_layer, n_head, n_embd, block, batch = CONFIGS[args.config]
    ids, vocab = load_ids(args.data)
    model = GPT(GPTConfig(vocab, block, n_layer, n_head, n_embd), dtype=np.float32, seed=0)
    opt = AdamW(model.params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    data = list(batches(ids, block, batch, 0, 2 * args.steps + 5))

    phases = np.zeros(4)  # forward, backward, clip, AdamW

    def step(x, y, timed=False):
        t0 = time.perf_counter()
        model.zero_grad()
        _, loss = model(x, y, training=True)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        clip_grad_norm(model.parameters(), 1.0)
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if timed:
            phases[:] += (t1 - t0, t2 - t1, t3 - t2, t4 - t3)

    for x, y in data[:5]:  # warm up
        step(x, y)
    with profile() as prof:
        for x, y in data[5 : 5 + args.steps]:
            step(x, y)
    for x, y in data[5 + args.steps :]:
        step(x, y, timed=True)

    print(f"config {args.config}, {args.threads} threads, {args.steps} steps\n")
    print(prof.table(args.steps))
    total = phases.sum()
    print("\nphase      ms/step  share")
    for name, t in zip(("forward", "backward", "clip", "AdamW"), phases):
        print(f"{name:9s} {1e3 * t / args.steps:8.2f} {t / total:6.1%}")
    print(f"{'step':9s} {1e3 * total / args.steps:8.2f}")


if __name__ == "__main__":
    main()
