"""A toy task where you can see whether the GPT learned: reverse a string of digits.

Each example is one line such as "4071>1704": four random digits, ">", the same digits
reversed. A 2-layer GPT (gpt.model, trained with gpt.optim.AdamW) sees the first 8 tokens and
is scored only on the 4 answer digits (what comes before ">" is random, so unpredictable).
Accuracy is exact match on 1,000 held-out strings: greedy decoding after ">" gets all four
digits right. (Under teacher forcing every answer token is predicted from a correct prefix;
a string is exact only if all four argmaxes are right, which is exactly when greedy decoding
would have produced it, so one batched forward pass scores it.)

    python examples/reverse_digits.py                 # 100 steps, under a minute
    python examples/reverse_digits.py --steps 20      # too short: see the difference

Reversal needs attention: the answer digit at position 5+i must copy the digit at 3-i, so
a trained head's attention map shows an anti-diagonal (`--attention out.png` draws it).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import tensorlite.functional as F
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.optim import AdamW

DIGITS = 4
VOCAB = "0123456789>"  # token id = position in this string
SEQ = 2 * DIGITS + 1  # "dddd>dddd"


def make_batch(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, SEQ) token ids of n random strings and their reversals."""
    digits = rng.integers(0, 10, size=(n, DIGITS))
    sep = np.full((n, 1), VOCAB.index(">"))
    return np.concatenate([digits, sep, digits[:, ::-1]], axis=1)


def answer_logits(model: GPT, seqs: np.ndarray):
    """Logits (n*DIGITS, V) at the positions whose next token is an answer digit."""
    logits, _ = model(seqs[:, :-1])  # (n, SEQ-1, V): position t predicts token t+1
    return logits[:, DIGITS:, :].reshape(-1, len(VOCAB))  # predictions of tokens DIGITS+1..


def accuracy(model: GPT, seqs: np.ndarray) -> float:
    """Exact-match rate: all DIGITS answer tokens right."""
    pred = answer_logits(model, seqs).data.argmax(axis=1).reshape(len(seqs), DIGITS)
    return float((pred == seqs[:, DIGITS + 1:]).all(axis=1).mean())


def greedy_accuracy(model: GPT, seqs: np.ndarray) -> float:
    """Exact-match rate when the model writes its own answer: feed "dddd>", append the
    argmax, repeat DIGITS times. (No answer token is ever shown to the model.)"""
    ids = seqs[:, :DIGITS + 1]
    for _ in range(DIGITS):
        logits, _ = model(ids)  # (n, t, V)
        ids = np.concatenate([ids, logits.data[:, -1].argmax(axis=1)[:, None]], axis=1)
    return float((ids[:, DIGITS + 1:] == seqs[:, DIGITS + 1:]).all(axis=1).mean())


def train(steps: int = 100, seed: int = 0, batch_size: int = 64, verbose: bool = True) -> tuple[GPT, float]:
    """Train a fresh model; return it and its exact-match accuracy on held-out strings."""
    rng = np.random.default_rng(seed)
    config = GPTConfig(vocab_size=len(VOCAB), block_size=SEQ - 1, n_layer=2, n_head=2, n_embd=64)
    model = GPT(config, seed=seed)
    opt = AdamW(model.params, lr=3e-3)
    test = make_batch(1000, np.random.default_rng(10_000 + seed))
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        seqs = make_batch(batch_size, rng)
        loss = F.cross_entropy(answer_logits(model, seqs), seqs[:, DIGITS + 1:].reshape(-1))
        model.zero_grad()
        loss.backward()
        opt.step(lr=3e-3 * min(1.0, step / 50))  # a short warmup
        if verbose and (step % max(1, steps // 8) == 0 or step == steps):
            print(f"step {step:4d}  loss {loss.item():.4f}  held-out exact match "
                  f"{accuracy(model, test):.1%}  ({time.perf_counter() - t0:.0f} s)")
    return model, accuracy(model, test)


def draw_attention(model: GPT, path: str) -> None:
    """The attention maps of one held-out string: a grid, layer by head."""
    from gpt.plot import plot_attention

    seq = make_batch(1, np.random.default_rng(1))[0, :-1]
    labels = [VOCAB[i] for i in seq]
    plot_attention(model.attention_maps(seq), labels, path, title="reverse_digits: " + "".join(labels))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description="Train a tiny GPT to reverse digit strings.")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", metavar="PNG", help="also draw the trained attention maps")
    args = parser.parse_args(argv)
    model, acc = train(args.steps, args.seed)
    print(f"exact match on 1,000 held-out strings: {acc:.1%} (chance: 0.01%)")
    if args.attention:
        draw_attention(model, args.attention)
        print(f"wrote {args.attention}")
    return acc


if __name__ == "__main__":
    main()
