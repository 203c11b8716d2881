"""Exercise: a slope by nudging (docs/autograd.md, section 0).

Write numerical_gradient. Grade it with
    python -m tensorlite.exercises check slope_by_nudging --dir DIR
"""

import numpy as np  # noqa: F401 - for your code


def numerical_gradient(f, x, eps=1e-6):
    """The gradient of f at x by central differences, an array shaped like x.

    f takes an array shaped like x and returns a float. Element i of the result is
    (f(x + eps e_i) - f(x - eps e_i)) / (2 eps), where e_i is 1 at element i and 0 elsewhere.
    x may have any shape, 0-d included; leave x as it was (nudge a copy).
    """
    raise NotImplementedError
