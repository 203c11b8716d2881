"""Training speed: tensorlite's GPT vs the same architecture in PyTorch eager.

Each measurement runs in its own subprocess (so peak RSS is its own), the two engines
alternate round by round, and we print medians of tokens/s, their ratio, the achieved
GFLOP/s as a fraction of measured sgemm peak, and peak RSS.

    python benchmarks/train.py                      # baby config, 2 threads, 5 rounds
    python benchmarks/train.py --config default --rounds 3
    python benchmarks/train.py --engines tensorlite  # no torch needed
    python benchmarks/train.py --engines tensorlite,tensorlite-numpy,torch,torch-compile
    python benchmarks/train.py --config larger --rounds 3 --iters 20

Engines: tensorlite (the default kernels, TENSORLITE_KERNELS as set, the batch split over the
threads as gpt.train does), tensorlite-numpy (the NumPy references),
tensorlite-blas (one graph for the whole batch, BLAS splitting each matmul over the threads:
how gpt.train ran before gpt.threaded), tensorlite-untuned (glibc's default malloc thresholds),
tensorlite-bf16 (gpt.train --dtype bfloat16: float32 weights, bf16 matmul operands), torch
(eager), torch-compile (torch.compile, inductor; its first step, which compiles, is timed apart
and reported as compile time), torch-bf16 (eager, each step's forward inside
torch.autocast("cpu", dtype=torch.bfloat16): PyTorch's own mixed precision).

PyTorch comes from the optional `bench` extra (pip install -e ".[bench]"); gpt and
tensorlite never import it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

from gpt.config import PRESETS, TrainConfig, to_flat


def _shape(**settings) -> tuple[int, int, int, int, int]:
    """(n_layer, n_head, n_embd, block_size, batch_size) of gpt.train's defaults + settings."""
    flat = dict(to_flat(TrainConfig()), **settings)
    return tuple(flat[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size"))


CONFIGS = {  # the sizes of gpt.train --preset NAME (and of its defaults)
    "baby": _shape(**PRESETS["baby"]),
    "default": _shape(),
    "batch64": _shape(**dict(PRESETS["baby"], batch_size=64)),
    "larger": (6, 6, 384, 256, 8),  # nanoGPT's Shakespeare-char shape, scaled for 2 cores
}
ENGINES = ["tensorlite", "tensorlite-numpy", "tensorlite-blas",
           "tensorlite-untuned", "tensorlite-bf16", "torch", "torch-compile", "torch-bf16"]
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


_faults_at_start = 0


def mark_page_faults() -> None:
    global _faults_at_start
    _faults_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def page_faults_since_mark() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - _faults_at_start


def flops_per_token(n_layer: int, n_embd: int, block: int, vocab: int) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4) plus attention's
    q.k and p.v products (12 * L * T * C, the causal half not discounted), as in PaLM's count."""
    matmul_params = n_layer * 12 * n_embd * n_embd + n_embd * vocab
    return 6 * matmul_params + 12 * n_layer * block * n_embd


def load_ids(path: str, n: int = 200_000):
    import numpy as np

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()[:n]
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"benchmarks: cannot read the corpus {path} ({e.__class__.__name__}); "
                         "pass --data PATH to a UTF-8 text file") from None
    if len(text) < 1000:
        raise SystemExit(f"benchmarks: {path} holds {len(text)} characters; pass --data PATH "
                         "to a longer UTF-8 text file")
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return np.array([lookup[c] for c in text], dtype=np.int64), len(chars) + 2


def batches(ids, block: int, batch: int, seed: int, count: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    for _ in range(count):
        starts = rng.integers(0, len(ids) - block - 1, size=batch)
        x = np.stack([ids[s : s + block] for s in starts])
        y = np.stack([ids[s + 1 : s + block + 1] for s in starts])
        yield x, y


# ---- tensorlite -------------------------------------------------------------------------------
def run_tensorlite(args, cfg, ids, vocab) -> float:
    import numpy as np

    import tensorlite
    from gpt.config import GPTConfig
    from gpt.model import GPT
    from gpt.optim import AdamW, clip_grad_norm
    from gpt.threaded import ThreadShards

    if args.worker != "tensorlite-untuned":  # that one keeps glibc's malloc defaults
        tensorlite.kernels.tune_allocator()
    if args.worker == "tensorlite-numpy":
        tensorlite.kernels.use_kernels(args.worker.split("-")[1])
    tensorlite.set_num_threads(args.threads)
    tensorlite.kernels.kernel_path()  # load (or compile) the kernels before the clock starts
    n_layer, n_head, n_embd, block, batch = cfg
    dtype = "bfloat16" if args.worker == "tensorlite-bf16" else np.float32
    model = GPT(GPTConfig(vocab, block, n_layer, n_head, n_embd), dtype=dtype, seed=0)
    opt = AdamW(model.params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    # what gpt.train does: the batch split over the threads (gpt.threaded), or, for the
    # tensorlite-blas engine, one graph whose matmuls BLAS splits over the threads
    shards = None
    if args.worker != "tensorlite-blas" and min(args.threads, batch) > 1:
        shards = ThreadShards(model, min(args.threads, batch))
    t0 = None
    for i, (x, y) in enumerate(batches(ids, block, batch, 0, args.warmup + args.iters)):
        if i == args.warmup:
            t0 = time.perf_counter()
            mark_page_faults()
        gradients(model, shards, x, y)
        clip_grad_norm(model.parameters(), 1.0, shards.grad_norm if shards else None)
        opt.step()
    return time.perf_counter() - t0


def gradients(model, shards, x, y) -> None:
    """Every p.grad of one training batch: on the threads' shards, or one graph."""
    if shards is not None:
        shards.loss_and_grads(x, y)
    else:
        model.zero_grad()
        _, loss = model(x, y, training=True)
        loss.backward()


# ---- PyTorch eager, the same architecture ------------------------------------------------------
def run_torch(args, cfg, ids, vocab) -> float:
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_layer, n_head, n_embd, block, batch = cfg

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.RMSNorm(n_embd, eps=1e-5)
            self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
            self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
            self.ln_2 = nn.RMSNorm(n_embd, eps=1e-5)
            self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
            self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(a.transpose(1, 2).reshape(B, T, C))
            return x + self.mlp_proj(F.relu(self.c_fc(self.ln_2(x))).square())

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab, n_embd)
            self.wpe = nn.Embedding(block, n_embd)
            self.h = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.RMSNorm(n_embd, eps=1e-5)
            self.lm_head = nn.Linear(n_embd, vocab, bias=False)
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for blk in self.h:
                x = blk(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    model = Model()
    step_model = torch.compile(model) if args.worker == "torch-compile" else model
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.99), eps=1e-8,
    )
    t0 = None
    for i, (x, y) in enumerate(batches(ids, block, batch, 0, args.warmup + args.iters)):
        if i == 0:
            t_first = time.perf_counter()
        if i == 1:
            _extra["first_step_s"] = time.perf_counter() - t_first  # torch-compile: compiling
        if i == args.warmup:
            t0 = time.perf_counter()
            mark_page_faults()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.worker == "torch-bf16"):
            loss = step_model(torch.from_numpy(x), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - t0


def sgemm_peak(threads: int, n_embd: int, tokens: int) -> float:
    """Measured sgemm GFLOP/s for this model's biggest matmul shape: (tokens, C) @ (C, 4C)."""
    import numpy as np

    import tensorlite

    tensorlite.set_num_threads(threads)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((tokens, n_embd), dtype=np.float32)
    b = rng.standard_normal((n_embd, 4 * n_embd), dtype=np.float32)
    times = []
    for _ in range(200):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * tokens * n_embd * 4 * n_embd / statistics.median(times) / 1e9


_extra: dict = {}


def worker(args) -> None:
    cfg = CONFIGS[args.config]
    ids, vocab = load_ids(args.data)
    run = run_torch if args.worker.startswith("torch") else run_tensorlite
    seconds = run(args, cfg, ids, vocab)
    faults = page_faults_since_mark() / args.iters
    tokens = args.iters * cfg[3] * cfg[4]
    print(json.dumps({"tokens_per_s": tokens / seconds, "ms_per_iter": 1e3 * seconds / args.iters,
                      "peak_rss_mb": peak_rss_mb(), "faults_per_iter": faults, "vocab": vocab,
                      **_extra}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="baby")
    p.add_argument("--engines", default="tensorlite,torch")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=DATA)
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    load_ids(args.data)  # a missing or empty corpus: one line here, not one per worker
    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"benchmarks: unknown engine {unknown[0]!r}; --engines takes a comma "
                         f"list of {', '.join(ENGINES)}")
    if min(args.rounds, args.iters, args.threads) < 1 or args.warmup < 0:
        raise SystemExit(f"benchmarks: --rounds, --iters and --threads must be >= 1 and --warmup "
                         f">= 0, got {args.rounds}, {args.iters}, {args.threads}, {args.warmup}")

    results = {e: [] for e in engines}
    for r in range(args.rounds):
        order = engines if r % 2 == 0 else engines[::-1]  # alternate who goes first
        for e in order:
            cmd = [sys.executable, __file__, "--worker", e, "--config", args.config,
                   "--iters", str(args.iters), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--data", args.data]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"{e} worker failed:\n{out.stderr}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[e].append(res)
            first = (f"  first step {res['first_step_s']:.1f} s" if e == "torch-compile" else "")
            print(f"round {r + 1} {e:18s} {res['tokens_per_s']:9.0f} tok/s  "
                  f"{res['ms_per_iter']:6.1f} ms/iter  peak RSS {res['peak_rss_mb']:.0f} MB  "
                  f"{res['faults_per_iter']:.0f} page faults/iter{first}", flush=True)

    n_layer, n_head, n_embd, block, batch = CONFIGS[args.config]
    vocab = results[engines[0]][0]["vocab"]
    fpt = flops_per_token(n_layer, n_embd, block, vocab)
    peak = sgemm_peak(args.threads, n_embd, block * batch)
    print(f"\nconfig {args.config} (n_layer {n_layer}, n_head {n_head}, n_embd {n_embd}, block {block}, "
          f"batch {batch}), {args.threads} threads, {args.rounds} rounds x {args.iters} iters")
    print(f"{fpt / 1e6:.2f} MFLOP per training token; sgemm peak here {peak:.0f} GFLOP/s")
    print(f"{'engine':18s} {'median tok/s':>12s} {'ms/iter':>8s} {'GFLOP/s':>8s} {'% peak':>7s} "
          f"{'peak RSS MB':>11s} {'faults/iter':>11s}")
    med = {}
    for e in engines:
        tps = statistics.median(r["tokens_per_s"] for r in results[e])
        med[e] = tps
        rss = statistics.median(r["peak_rss_mb"] for r in results[e])
        gf = tps * fpt / 1e9
        faults = statistics.median(r["faults_per_iter"] for r in results[e])
        print(f"{e:18s} {tps:12.0f} {1e3 * block * batch / tps:8.1f} {gf:8.1f} {100 * gf / peak:6.1f}% "
              f"{rss:11.0f} {faults:11.0f}")
    if "torch-compile" in engines:
        firsts = [r["first_step_s"] for r in results["torch-compile"]]
        print(f"torch-compile first step (compiling): median {statistics.median(firsts):.1f} s "
              f"[{min(firsts):.1f}-{max(firsts):.1f}], not in the figures above")
    for e in engines[1:]:
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results[engines[0]], results[e])]
        print(f"ratio {engines[0]}/{e}: {med[engines[0]] / med[e]:.2f}x of medians; "
              f"per-round ratios median {statistics.median(ratios):.2f}x "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
