"""Exercise: RMSNorm's backward (docs/derivations.md, "RMSNorm").

Write rms_norm_backward. Grade it with
    python -m tensorlite.exercises check rms_norm_backward --dir DIR
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
    raise NotImplementedError
