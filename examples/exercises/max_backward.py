"""Reference solution: Max's backward, ties included (docs/autograd.md, section 6, "Reductions").

The starter with its functions written; the test suite grades it with
    python -m tensorlite.exercises check max_backward --dir examples/exercises
"""

import numpy as np


def max_backward(dout, x, axis):
    """out = x.max(axis=axis) (an int axis, maybe negative; the axis is dropped). Given
    dout = dL/dout, shaped like out, return dx shaped like x: dout goes to the elements that
    are the maximum along the axis, 0 elsewhere; when several elements tie for the maximum,
    they share it evenly (each gets dout / the number of ties), as tensorlite's Max does."""
    out = np.expand_dims(x.max(axis=axis), axis)  # (..., 1, ...): broadcasts against x
    is_max = x == out
    share = np.expand_dims(dout, axis) / is_max.sum(axis=axis, keepdims=True)
    return is_max * share
