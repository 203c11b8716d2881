"""Shared by the gpt.md exercises: import examples/reverse_digits.py (examples/ is not a
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


@contextlib.contextmanager
def attention_variant(causal: bool = True, scale: bool = True):
    """Inside the block, gpt.model's attention is `attention_composed(causal, scale)`."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, **_: attention_composed(
        q, k, v, causal=causal, scale=scale)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
