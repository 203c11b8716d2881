"""Exercise: top-p (nucleus) filtering (docs/gpt.md, "Sampling and the KV cache").

Write top_p_filter. Grade it with
    python -m tensorlite.exercises check top_p --dir DIR
"""

import numpy as np  # noqa: F401 - for your code


def top_p_filter(probs, p):
    """probs (V,) sums to 1; 0 < p <= 1. Keep the smallest set of most probable tokens,
    taken most probable first, whose total probability reaches p (>= p); among equally
    probable tokens the lower id comes first. Return a new (V,) array: the kept
    probabilities renormalised to sum to 1, 0 for every other token."""
    raise NotImplementedError
