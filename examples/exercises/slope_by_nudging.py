"""Reference solution: a slope by nudging (docs/autograd.md, section 0).

The starter with its functions written; the test suite grades it with
    python -m tensorlite.exercises check slope_by_nudging --dir examples/exercises
"""

import numpy as np


def numerical_gradient(f, x, eps=1e-6):
    """The gradient of f at x by central differences, an array shaped like x.

    f takes an array shaped like x and returns a float. Element i of the result is
    (f(x + eps e_i) - f(x - eps e_i)) / (2 eps), where e_i is 1 at element i and 0 elsewhere.
    x may have any shape, 0-d included; leave x as it was (nudge a copy).
    """
    x = np.array(x, dtype=np.float64)  # our own copy: the caller's x stays as it was
    slopes = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        kept = x[i]
        x[i] = kept + eps
        up = f(x)
        x[i] = kept - eps
        down = f(x)
        x[i] = kept
        slopes[i] = (up - down) / (2 * eps)
    return slopes
