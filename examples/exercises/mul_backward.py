"""Reference solution: Mul's backward with broadcasting (docs/autograd.md, section 6, "Broadcasting:
one rule, `unbroadcast`").

The starter with its functions written; the test suite grades it with
    python -m tensorlite.exercises check mul_backward --dir examples/exercises
"""

import numpy as np


def unbroadcast(grad, shape):
    """Sum grad (the gradient of a broadcast result) back down to `shape`, the shape of the
    input that was broadcast. NumPy broadcasting adds leading axes and stretches size-1
    axes; the gradient of the input sums over exactly those. Returns an array of `shape`."""
    grad = np.asarray(grad)
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))  # the leading axes broadcasting added
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)  # the size-1 axes it stretched
    return grad


def mul_backward(dout, x, y):
    """out = x * y, where x and y broadcast together. Given dout = dL/dout (shaped like
    out), return (dx, dy) = (dL/dx, dL/dy), shaped like x and y."""
    return unbroadcast(dout * y, x.shape), unbroadcast(dout * x, y.shape)
