"""Exercise: a Hessian-vector product (docs/higher-order.md, section 2).

Write hessian_vector_product with tl.grad (not tl.hvp, which is the answer). Grade it with
    python -m tensorlite.exercises check hessian_vector_product --dir DIR
"""

import numpy as np  # noqa: F401 - for your code

import tensorlite as tl  # noqa: F401 - for your code


def hessian_vector_product(f, x, v):
    """H v, an ndarray shaped like x, where H is the Hessian of the scalar function f at x.

    f takes a tensorlite Tensor shaped like x and returns a 0-d Tensor; x and v are float64
    ndarrays of the same shape. Never form H: differentiate the gradient, once more, in the
    direction v.
    """
    raise NotImplementedError
