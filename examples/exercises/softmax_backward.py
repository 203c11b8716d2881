"""Reference solution: softmax's backward (docs/derivations.md, "Softmax").

The starter with its functions written; the test suite grades it with
    python -m tensorlite.exercises check softmax_backward --dir examples/exercises
"""

import numpy as np


def softmax(x):
    """softmax over the last axis (given)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward(dout, x):
    """p = softmax(x) over the last axis, x of any shape (..., V). Given dout = dL/dp,
    return dx = dL/dx, shaped like x."""
    p = softmax(x)
    return p * (dout - (dout * p).sum(axis=-1, keepdims=True))
