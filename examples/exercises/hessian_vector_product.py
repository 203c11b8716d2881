"""Reference solution: a Hessian-vector product (docs/higher-order.md, section 2).

The starter with its functions written; the test suite grades it with
    python -m tensorlite.exercises check hessian_vector_product --dir examples/exercises
"""

import tensorlite as tl


def hessian_vector_product(f, x, v):
    """H v, an ndarray shaped like x, where H is the Hessian of the scalar function f at x.

    f takes a tensorlite Tensor shaped like x and returns a 0-d Tensor; x and v are float64
    ndarrays of the same shape. Never form H: differentiate the gradient, once more, in the
    direction v.
    """
    x = tl.Tensor(x, requires_grad=True)
    (g,) = tl.grad(f(x), [x], create_graph=True)  # the gradient, a Tensor with its own graph
    (hv,) = tl.grad((g * v).sum(), [x])  # the gradient of <g, v>, v held constant: H v
    return hv.data
