"""Mixed precision: a policy that makes matrix products run in bfloat16, and the op they run.

    with tl.autocast("bfloat16"):
        logits = x @ w            # MatMulBF16: operands rounded to bf16, float32 sums
        loss = ...                # everything else as before, in float32

Inside the block every `@` between two float32 tensors becomes MatMulBF16; sums, norms,
softmax and the parameters themselves stay float32 (as PyTorch's autocast does on the
CPU). The policy holds for the thread that entered the block (like no_grad). The gradients
of a MatMulBF16 are bf16 products too, whether or not backward runs inside the block.
docs/autograd.md's mixed-precision section says why this is enough for bf16 (and not fp16).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from .kernels import matmul_bf16, say_if_no_speedup
from .ops import MatMul

DTYPES = ("bfloat16", "float32")
_state = threading.local()  # .dtype: the matmul precision of this thread (None: as stored)


def autocast_dtype() -> str | None:
    """The matmul precision of the enclosing `autocast` block in this thread, or None."""
    return getattr(_state, "dtype", None)


@contextmanager
def autocast(dtype: str = "bfloat16", enabled: bool = True) -> Iterator[None]:
    """Inside this block (in this thread), float32 matrix products round their operands to
    bfloat16 and accumulate in float32. dtype "float32" (or enabled=False) turns it off.
    Says once, on a CPU without AVX512_BF16, that there is no speed-up there."""
    if dtype not in DTYPES:
        raise ValueError(f"autocast: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    wanted = dtype if enabled and dtype != "float32" else None
    if wanted:
        say_if_no_speedup()
    previous, _state.dtype = autocast_dtype(), wanted
    try:
        yield
    finally:
        _state.dtype = previous


def use_bf16(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether x @ y runs in bf16 here: inside autocast("bfloat16"), both float32."""
    return autocast_dtype() == "bfloat16" and x.dtype == np.float32 and y.dtype == np.float32


class MatMulBF16(MatMul):
    """out = bf16(x) @ bf16(y), summed in float32 (np.matmul's shapes; bf16 rounds to nearest even).
    dx = bf16(dout) @ bf16(y)^T,  dy = bf16(x)^T @ bf16(dout)

    The rounding counts as the identity in the backward pass (its true derivative is 0
    almost everywhere, which would teach nothing): the gradients are those of the product
    taken at the rounded operands, with the incoming gradient rounded too, as PyTorch's
    autocast computes them. tests/tensorlite/test_bf16.py checks them against float64 finite
    differences of exactly that."""

    product = staticmethod(matmul_bf16)  # MatMul's forward, backward, graph and jvp, in bf16

