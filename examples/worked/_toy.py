"""Shared by the gpt.md worked exercises: import examples/reverse_digits.py (examples/ is not a
package) and swap the attention the model calls, for the length of a `with` block."""

from __future__ import annotations

import contextlib
import importlib.util
import math
from pathlib import Path

import numpy as np

import tensorlite.functional as F
from tensorlite import Tensor

_spec = importlib.util.spec_from_file_location(
    "reverse_digits", Path(__file__).resolve().parent.parent / "reverse_digits.py")
reverse_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reverse_digits)


def attention_composed(q, k, v, causal: bool = True, scale: bool = True) -> Tensor:
    """softmax(q kᵀ · s + mask) v from primitive ops, with the mask and the 1/sqrt(hd) scale
    each optional."""
    scores = q @ k.swapaxes(-1, -2)  # (B, H, T, T)
    if scale:
        scores = scores * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        T = q.shape[-2]
        scores = scores + Tensor(np.triu(np.full((T, T), -np.inf, dtype=q.dtype), k=1))
    return F.softmax(scores) @ v


def self_attention_composed(qkv, n_head: int, causal: bool = True, scale: bool = True) -> Tensor:
    """F.causal_self_attention's job (qkv (B, T, 3C) -> (B, T, C)) with attention_composed."""
    B, T, C3 = qkv.shape
    heads = qkv.reshape(B, T, 3, n_head, C3 // 3 // n_head).transpose(2, 0, 3, 1, 4)
    y = attention_composed(heads[0], heads[1], heads[2], causal=causal, scale=scale)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)


@contextlib.contextmanager
def attention_variant(causal: bool = True, scale: bool = True):
    """Inside the block, gpt.model's attention is `attention_composed(causal, scale)` (the
    model calls the fused F.causal_self_attention in training and
    F.scaled_dot_product_attention in attention_maps: both are swapped; sampling's Decoder
    is plain NumPy and keeps the real attention)."""
    originals = F.scaled_dot_product_attention, F.causal_self_attention
    F.scaled_dot_product_attention = lambda q, k, v, **_: attention_composed(
        q, k, v, causal=causal, scale=scale)
    F.causal_self_attention = lambda qkv, n_head: self_attention_composed(
        qkv, n_head, causal=causal, scale=scale)
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.causal_self_attention = originals
