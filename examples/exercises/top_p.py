"""Reference solution: top-p (nucleus) filtering (docs/gpt.md, "Sampling and the KV cache").

The starter with its functions written; the test suite grades it with
    python -m tensorlite.exercises check top_p --dir examples/exercises
"""

import numpy as np


def top_p_filter(probs, p):
    """probs (V,) sums to 1; 0 < p <= 1. Keep the smallest set of most probable tokens,
    taken most probable first, whose total probability reaches p (>= p); among equally
    probable tokens the lower id comes first. Return a new (V,) array: the kept
    probabilities renormalised to sum to 1, 0 for every other token."""
    order = np.argsort(-probs, kind="stable")  # most probable first; ties: lower id first
    total = np.cumsum(probs[order])
    keep = min(int(np.searchsorted(total, p, side="left")) + 1, len(probs))  # first total >= p
    out = np.zeros_like(probs)
    out[order[:keep]] = probs[order[:keep]]
    return out / out.sum()
