"""Exercise 4 of docs/gpt.md: read the attention of the trained reversal model.

To write answer digit i (the token after position DIGITS + i), the model must fetch input
digit DIGITS - 1 - i: an anti-diagonal. `GPT.attention_maps` gives every head's
probabilities; for each head, find the key each answer-writing query attends to most, and
count how often that is the digit to copy, over 200 held-out strings.

    python examples/worked/reversal_heads.py
"""

from __future__ import annotations

import numpy as np
from _toy import reverse_digits as rd


def copy_rates(model, n: int = 200) -> np.ndarray:
    """(n_layer, n_head): how often the head's favourite key is the digit to copy."""
    D = rd.DIGITS
    queries = np.arange(D, 2 * D)  # positions D .. 2D-1 predict answer digits 0 .. D-1
    wanted = D - 1 - np.arange(D)  # the input digit each of them must copy
    hits = 0
    for seq in rd.make_batch(n, np.random.default_rng(3)):
        maps = model.attention_maps(seq[:-1])  # (L, H, T, T)
        hits = hits + (maps[:, :, queries].argmax(axis=-1) == wanted).mean(axis=-1)
    return hits / n


def main() -> None:
    model, acc = rd.train(150, seed=0, verbose=False)
    rates = copy_rates(model)
    for layer, row in enumerate(rates):
        print(f"layer {layer}: " + "  ".join(f"head {h} {r:.0%}" for h, r in enumerate(row)))
    print(f"(exact match {acc:.1%})")
    layer = copying_layer(rates)
    print(f"layer {layer} does the copying")
    assert acc > 0.9 and layer == 0  # docs/gpt.md: both heads of layer 0 draw the anti-diagonal
    print("ok")


def copying_layer(rates: np.ndarray) -> int | None:
    """The layer in which every head copies on more than 90% of the strings while no head of
    any other layer does on more than half; None when no layer stands out like that."""
    for layer, row in enumerate(rates):
        others = np.delete(rates, layer, axis=0)
        if row.min() > 0.9 and (others.size == 0 or others.max() < 0.5):
            return layer
    return None


if __name__ == "__main__":
    main()
