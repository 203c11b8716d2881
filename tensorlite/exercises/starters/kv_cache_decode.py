"""Exercise: one KV-cache decode step that matches the full forward (docs/gpt.md,
"Sampling and the KV cache").

Write decode_step. Grade it with
    python -m tensorlite.exercises check kv_cache_decode --dir DIR
"""

import numpy as np


def attention_layer(x, w_qkv, w_out, n_head):
    """The full forward on all T positions at once (given): causal multi-head
    self-attention, x (T, C) -> (T, C), C = n_head * hd."""
    T, C = x.shape
    hd = C // n_head
    qkv = x @ w_qkv  # (T, 3C): q | k | v, each C wide, head by head
    q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(T, n_head, hd).transpose(1, 0, 2)
               for i in range(3))  # each (H, T, hd)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)  # (H, T, T)
    scores = scores + np.triu(np.full((T, T), -np.inf), k=1)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    y = (p @ v).transpose(1, 0, 2).reshape(T, C)  # heads side by side
    return y @ w_out


class KVCache:
    """The keys and values of the positions seen so far (given): k and v are
    (n_head, max_len, head_dim); positions 0 .. length-1 are filled."""

    def __init__(self, n_head, max_len, head_dim):
        self.k = np.zeros((n_head, max_len, head_dim))
        self.v = np.zeros((n_head, max_len, head_dim))
        self.length = 0


def decode_step(x_new, cache, w_qkv, w_out, n_head):
    """The layer's output (C,) for ONE new position, whose input row is x_new (C,), at
    position cache.length: equal to attention_layer(x, ...)[t] for the whole sequence x up
    to this position, computed from x_new and the cache alone. Store this position's k and v
    in the cache and add 1 to cache.length."""
    raise NotImplementedError
