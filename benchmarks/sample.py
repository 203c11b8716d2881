"""Sampling speed with and without the KV cache, at block_size 64 and 256, in this process or
through the command line.

In this process (the default): a random-init model of the baby width (n_layer 4, n_head 4,
n_embd 128, vocab 67, float32) generates from BOS with temperature 1 and a fixed seed. Two
lengths per block size: `fill` generates block_size - 1 tokens (the window just fills: the cache
never re-reads), and `3x` generates 3 * block_size tokens (the window slides; the cache re-reads
half a window each time). The two modes alternate round by round; we print medians of
tokens/s and their ratio, and check that both modes produced the same text.

Through the command line (`--cli OUT_DIR`, a gpt.train run's folder): `python -m gpt.sample`
(its own thread setting), from BOS with a fixed seed, once with 8 tokens and once with
8 + `--tokens`, with the cache and with --no-kv-cache, alternating round by round. The
difference of the two wall-clock times, over `--tokens`, is the time per token without the
start-up (imports, loading the checkpoint). We print medians and [min-max] over the rounds of
tokens/s and of the ratio, by the wall clock and by the CPU time the process used (which other
jobs on the machine disturb less), and whether both modes printed the same text.

    python benchmarks/sample.py                 # blocks 64 and 256, 5 rounds, 1 thread
    python benchmarks/sample.py --blocks 64 --rounds 3
    python -m gpt.train --preset baby --max-iters 20 --out-dir /tmp/baby   # any baby run
    python benchmarks/sample.py --cli /tmp/baby --tokens 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from machine import cpu_name, sgemm_peak, summary  # benchmarks/machine.py

import tensorlite
from gpt.config import PRESETS, GPTConfig
from gpt.model import GPT
from gpt.sample import generate
from gpt.tokenizer import CharTokenizer


class NeverStop:
    """The char tokenizer, except that sampling EOS does not stop generation (a random model
    samples it every ~67 tokens), so every run generates exactly the tokens asked for."""

    def __init__(self, tok: CharTokenizer):
        self.encode, self.decode, self.bos_id, self.eos_id = tok.encode, tok.decode, tok.bos_id, -1


def run_once(model: GPT, tok: NeverStop, n_tokens: int, use_kv_cache: bool) -> tuple:
    t0 = time.perf_counter()
    text = generate(model, tok, None, n_tokens, temperature=1.0, seed=0, use_kv_cache=use_kv_cache)
    return time.perf_counter() - t0, text


def in_process(args) -> None:
    tensorlite.set_num_threads(args.threads)
    # 65 printable characters, like tinyshakespeare's, so the vocabulary is 65 + BOS + EOS.
    chars = CharTokenizer.from_text("".join(chr(c) for c in range(32, 97)))
    tok = NeverStop(chars)

    print(f"threads {args.threads}, rounds {args.rounds}, medians; n_layer 4, n_head 4, n_embd 128")
    header = (
        f"{'block':>5} {'tokens':>10} {'no cache tok/s':>15} {'cache tok/s':>12} {'speedup':>8}"
    )
    print(header + "  same text")
    for block in args.blocks:
        width = {k: PRESETS["baby"][k] for k in ("n_layer", "n_head", "n_embd")}
        cfg = GPTConfig(chars.vocab_size, block_size=block, **width)
        model = GPT(cfg, dtype=np.float32, seed=0)
        for label, n in ((f"{block - 1} fill", block - 1), (f"{3 * block} 3x", 3 * block)):
            times = {True: [], False: []}
            texts = {}
            run_once(model, tok, 8, True)  # warm-up
            for _ in range(args.rounds):
                for cached in (False, True):
                    dt, texts[cached] = run_once(model, tok, n, cached)
                    times[cached].append(dt)
            plain = n / statistics.median(times[False])
            fast = n / statistics.median(times[True])
            same = "yes" if texts[True] == texts[False] else "NO"
            print(
                f"{block:>5} {label:>10} {plain:>15.0f} {fast:>12.0f} {fast / plain:>7.1f}x  {same}"
            )


START = 8  # tokens of the short run, whose time (start-up and all) is subtracted


def cli_run(out_dir: str, n: int, cached: bool) -> tuple[float, float, str]:
    """Wall-clock and CPU seconds and the output of `python -m gpt.sample` generating n tokens."""
    cmd = [sys.executable, "-m", "gpt.sample", "--out-dir", out_dir, "--max-new-tokens", str(n),
           "--seed", "0"] + ([] if cached else ["--no-kv-cache"])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[1:])} failed: {r.stderr.strip()}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, r.stdout


def through_cli(args) -> None:
    rate = {(cached, clock): [] for cached in (True, False) for clock in ("wall", "cpu")}
    texts = {}
    for _ in range(args.rounds):
        for cached in (True, False):
            short_wall, short_cpu, _ = cli_run(args.cli, START, cached)
            wall, cpu, texts[cached] = cli_run(args.cli, START + args.tokens, cached)
            rate[cached, "wall"].append(args.tokens / (wall - short_wall))
            rate[cached, "cpu"].append(args.tokens / (cpu - short_cpu))
    peaks = []
    for threads in (1, 2):
        tensorlite.set_num_threads(threads)
        peaks.append(f"{sgemm_peak(768, 128, 512, repeats=200):.0f}")
    print(f"python -m gpt.sample --out-dir {args.cli}: {args.tokens} tokens after {START}, "
          f"{args.rounds} rounds, medians [min-max]")
    print(f"{cpu_name()}; sgemm peak ((768, 128) @ (128, 512)) {' / '.join(peaks)} GFLOP/s on "
          f"1 / 2 threads; load average {os.getloadavg()[0]:.1f}")
    for clock, what in (("wall", "wall clock"), ("cpu", "CPU time (user + sys)")):
        cached, plain = rate[True, clock], rate[False, clock]
        ratio = [a / b for a, b in zip(cached, plain)]
        print(f"  by {what}:")
        print(f"    with the KV cache: {summary(cached)} tokens/s "
              f"({1e3 / statistics.median(cached):.3f} ms/token)")
        print(f"    --no-kv-cache:     {summary(plain)} tokens/s "
              f"({1e3 / statistics.median(plain):.3f} ms/token)")
        print(f"    ratio {summary(ratio, '.1f')}x")
    print(f"  same text: {'yes' if texts[True] == texts[False] else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (in this process)")
    ap.add_argument("--cli", metavar="OUT_DIR", help="time python -m gpt.sample on this run's "
                    "checkpoint instead (its block size, its own thread setting)")
    ap.add_argument("--tokens", type=int, default=2000, help="tokens timed per CLI run")
    args = ap.parse_args()
    through_cli(args) if args.cli else in_process(args)


if __name__ == "__main__":
    main()
