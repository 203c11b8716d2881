"""Exercise: MatMul's backward (docs/autograd.md, section 6, "Matrix multiplication").

Write matmul_backward. Grade it with
    python -m tensorlite.exercises check matmul_backward --dir DIR
"""

import numpy as np  # noqa: F401 - for your code


def matmul_backward(dout, x, w):
    """out = x @ w: a linear layer, x (..., N, C) with any number of leading batch axes
    (none included), w (C, K), out (..., N, K). Given dout = dL/dout, return
    (dx, dw) shaped like x and w. The same w serves every batch element."""
    raise NotImplementedError
