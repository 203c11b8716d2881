"""Reference solution: RMSNorm's backward (docs/derivations.md, "RMSNorm").

The starter with its functions written; the test suite grades it with
    python -m tensorlite.exercises check rms_norm_backward --dir examples/exercises
"""

import numpy as np

EPS = 1e-5


def rms_norm(x, w):
    """y = x / sqrt(mean(x**2) + EPS) * w over the last axis (given). x (..., C), w (C,)."""
    r = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + EPS)  # (..., 1)
    return x * r * w


def rms_norm_backward(dout, x, w):
    """Given dout = dL/dy for y = rms_norm(x, w), return (dx, dw) shaped like x and w.
    x may have any number of leading axes (none included); w is shared by every row."""
    r = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + EPS)  # (..., 1)
    xhat = x * r
    dxhat = dout * w
    dx = r * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    dw = (dout * xhat).reshape(-1, x.shape[-1]).sum(axis=0)  # (C,)
    return dx, dw
