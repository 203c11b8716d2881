"""Exercise: causal attention's backward for q, k and v (docs/derivations.md,
"Causal attention").

Write attention_backward. Grade it with
    python -m tensorlite.exercises check attention_backward --dir DIR
"""

import numpy as np


def attention(q, k, v):
    """Causal attention, per head (given): softmax(q k^T / sqrt(D) + mask) v, where the mask
    is -inf above the diagonal (query i sees keys j <= i). q, k, v: (H, T, D)."""
    T, D = q.shape[-2:]
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(D)  # (H, T, T)
    scores = scores + np.triu(np.full((T, T), -np.inf), k=1)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)  # (H, T, T), 0 above the diagonal
    return p @ v  # (H, T, D)


def attention_backward(dout, q, k, v):
    """Given dout = dL/dout for out = attention(q, k, v), all (H, T, D), return
    (dq, dk, dv), each (H, T, D)."""
    raise NotImplementedError
