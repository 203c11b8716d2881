"""Exercise: Mul's backward with broadcasting (docs/autograd.md, section 6, "Broadcasting:
one rule, `unbroadcast`").

Write unbroadcast, then mul_backward with it. Grade it with
    python -m tensorlite.exercises check mul_backward --dir DIR
"""

import numpy as np  # noqa: F401 - for your code


def unbroadcast(grad, shape):
    """Sum grad (the gradient of a broadcast result) back down to `shape`, the shape of the
    input that was broadcast. NumPy broadcasting adds leading axes and stretches size-1
    axes; the gradient of the input sums over exactly those. Returns an array of `shape`."""
    raise NotImplementedError


def mul_backward(dout, x, y):
    """out = x * y, where x and y broadcast together. Given dout = dL/dout (shaped like
    out), return (dx, dy) = (dL/dx, dL/dy), shaped like x and y."""
    raise NotImplementedError
