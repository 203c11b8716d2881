"""Reference solution: causal attention's backward for q, k and v (docs/derivations.md,
"Causal attention").

The starter with its functions written; the test suite grades it with
    python -m tensorlite.exercises check attention_backward --dir examples/exercises
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
    T, D = q.shape[-2:]
    s = 1.0 / np.sqrt(D)
    scores = q @ k.swapaxes(-1, -2) * s + np.triu(np.full((T, T), -np.inf), k=1)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)  # P, (H, T, T)
    dv = p.swapaxes(-1, -2) @ dout  # P^T dout
    dp = dout @ v.swapaxes(-1, -2)  # (H, T, T)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # softmax's backward, row by row
    dq = ds @ k * s
    dk = ds.swapaxes(-1, -2) @ q * s
    return dq, dk, dv
