"""Sampling speed with and without the KV cache, at block_size 64 and 256.

A random-init model of the baby width (n_layer 4, n_head 4, n_embd 128, vocab 67, float32)
generates from BOS with temperature 1 and a fixed seed. Two lengths per block size:
`fill` generates block_size - 1 tokens (the window just fills: the cache never re-reads), and
`3x` generates 3 * block_size tokens (the window slides; the cache re-reads half a window each
time). The two modes alternate round by round; we print medians of tokens/s and their ratio,
and check that both modes produced the same text.

    python benchmarks/sample.py                 # blocks 64 and 256, 5 rounds, 1 thread
    python benchmarks/sample.py --blocks 64 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
