"""Exercise 3 of docs/gpt.md: time sampling with and without the KV cache.

Without the cache every new token re-runs the whole context through the model: T positions
of work per token, so a sample of N tokens costs about N·T. With it, each token is one
position of work per layer. Both give the same text for the same seed (the cache is exact).
The timings printed here are one run on whatever machine runs it (no assertion on them:
speed is measured by benchmarks/sample.py, never asserted).

    python examples/worked/kv_cache_timing.py
"""

from __future__ import annotations

import time

from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.sample import generate
from gpt.tokenizer import CharTokenizer


def timed(model, tokenizer, use_kv_cache: bool, n: int = 120) -> tuple[str, float]:
    t0 = time.perf_counter()
    text = generate(model, tokenizer, "The ", n, temperature=1.0, seed=3, use_kv_cache=use_kv_cache)
    return text, time.perf_counter() - t0


def main() -> None:
    tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzT ,.")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=4, n_head=4,
                          n_embd=128))
    cached, t_cached = timed(model, tokenizer, True)
    full, t_full = timed(model, tokenizer, False)
    print(f"with the cache:    {t_cached * 1e3:7.1f} ms for 120 tokens")
    print(f"without the cache: {t_full * 1e3:7.1f} ms ({t_full / t_cached:.1f}x)")
    assert cached == full and len(cached) > len("The ")  # exact: the same text
    print("ok")


if __name__ == "__main__":
    main()
