"""Are the texts gpt.serve's batcher samples among others the texts `python -m gpt.sample`
gives for the same seeds alone? Batched products round differently in the last float32 bits,
so a token could differ where a uniform draw falls that close to a boundary between two
tokens' cumulative probabilities: this counts how often that happens.

Each round submits 8 sequences at once to a Batcher (prompts of 1 to 7 characters, so their
context windows slide at different steps; temperature 1, seeds 8r..8r+7), then generates each
alone with gpt.sample's `generate` and compares. The models are benchmarks/serve.py's
(random weights: near-uniform next-token distributions, the most boundaries a draw can fall
near).

    python benchmarks/serve_texts.py --shape baby --rounds 10
    python benchmarks/serve_texts.py --shape 6x384 --rounds 3
"""

from __future__ import annotations

import argparse
import math
import threading

import numpy as np
from serve import PROMPT, SHAPES, benchmark_model, benchmark_tokenizer  # benchmarks/serve.py

import tensorlite
from gpt.api import CompletionRequest
from gpt.batching import Batcher, Sequence
from gpt.sample import SAMPLING_THREADS, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="baby")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    tensorlite.set_num_threads(SAMPLING_THREADS)
    model, tok = benchmark_model(args.shape), benchmark_tokenizer()
    batcher = Batcher(model, max_batch=8, max_queue=0)
    differ, first = 0, []
    for r in range(args.rounds):
        done, ended = threading.Event(), []

        def emit(kind, *data, done=done, ended=ended):
            if kind == "end":
                ended.append(data)
                if len(ended) == 8:
                    done.set()

        prompts = [PROMPT[: 1 + i % len(PROMPT)] for i in range(8)]
        seqs = [Sequence(CompletionRequest("", args.tokens, seed=8 * r + i), tok.encode(p),
                         np.random.default_rng(8 * r + i), i, tok, emit, math.inf,
                         model.config.block_size) for i, p in enumerate(prompts)]
        batcher.submit(seqs)
        done.wait()
        for i, (p, seq) in enumerate(zip(prompts, seqs)):
            alone = generate(model, tok, p, args.tokens, seed=8 * r + i)[len(p):]
            if alone != seq.choice.text:
                differ += 1
                first.append(next(j for j, (a, b) in enumerate(zip(alone, seq.choice.text))
                                  if a != b))
    batcher.stop()
    n = 8 * args.rounds
    print(f"{args.shape}: {differ} of {n} texts differ from gpt.sample's ({n * args.tokens} "
          f"tokens compared)" + (f"; first differing tokens at {first}" if first else ""))


if __name__ == "__main__":
    main()
