"""Exercise: a forward-mode rule, softmax's JVP (docs/higher-order.md, section 4).

Write softmax_jvp. Grade it with
    python -m tensorlite.exercises check softmax_jvp --dir DIR
"""

import numpy as np


def softmax(x):
    """softmax over the last axis (given)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_jvp(dx, x):
    """The Jacobian-vector product of softmax (over the last axis) at x, along the tangent
    dx: how p = softmax(x) changes, to first order, when x moves by dx. Shaped like x."""
    raise NotImplementedError
