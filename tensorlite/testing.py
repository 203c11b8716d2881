"""Tools to verify an op's gradient the way tensorlite verifies its own: hypothesis
strategies for float arrays, Tensors and broadcastable shape pairs, and
`assert_gradients_match`, a float64 finite-difference check on a random cotangent.

    from hypothesis import given
    from tensorlite.testing import tensors, assert_gradients_match

    @given(tensors(shape=(3, 4)))
    def test_my_op(x):
        assert_gradients_match(my_op, x)

See docs/verifying-gradients.md for a worked example.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from .gradcheck import GradcheckError, gradcheck
from .tensor import Tensor

__all__ = [
    "GradcheckError",
    "arrays",
    "assert_gradients_match",
    "broadcastable_shapes",
    "shapes",
    "tensors",
]


def shapes(min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 4):
    """Array shapes, e.g. (), (3,), (1, 4, 2)."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def arrays(
    dtype=np.float64,
    shape=None,
    min_value: float = -2.0,
    max_value: float = 2.0,
    away_from: float | None = None,
    margin: float = 1e-2,
):
    """Float arrays of `dtype` with finite values in [min_value, max_value].

    `shape` is a tuple or a strategy of tuples (default: `shapes()`). `away_from=0` keeps
    values at least `margin` away from a kink (relu at 0, say), so finite differences are
    taken on one side of it.
    """
    shape = shapes() if shape is None else shape
    elements = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False, width=64)
    if away_from is not None:
        elements = elements.filter(lambda v: abs(v - away_from) >= margin)
    return hnp.arrays(dtype=dtype, shape=shape, elements=elements)


def tensors(dtype=np.float64, shape=None, requires_grad: bool = True, **kwargs):
    """Tensors wrapping `arrays(dtype, shape, **kwargs)`."""
    return arrays(dtype, shape, **kwargs).map(lambda a: Tensor(a, requires_grad=requires_grad))


def broadcastable_shapes(num_shapes: int = 2, min_dims: int = 0, max_dims: int = 3, max_side: int = 4):
    """Tuples of `num_shapes` shapes that broadcast together (size-1 axes included)."""
    return hnp.mutually_broadcastable_shapes(
        num_shapes=num_shapes, min_dims=min_dims, max_dims=max_dims, max_side=max_side
    ).map(lambda r: r.input_shapes)


def assert_gradients_match(
    fn: Callable[..., Tensor],
    *inputs,
    eps: float = 1e-6,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    seed: int = 0,
) -> None:
    """Raise GradcheckError unless fn's gradients match central finite differences.

    `inputs` are Tensors or arrays (arrays become float64 Tensors with requires_grad=True).
    The check runs in float64, element by element, projected on a random cotangent.
    """
    ts = []
    for x in inputs:
        if isinstance(x, Tensor):
            data = np.array(x.data, dtype=np.float64)  # a private copy: the check nudges it
            ts.append(Tensor(data, requires_grad=x.requires_grad))
        else:
            ts.append(Tensor(np.array(x, dtype=np.float64), requires_grad=True))
    before = [t.data.copy() for t in ts]
    gradcheck(fn, ts, eps=eps, atol=atol, rtol=rtol, seed=seed)
    for i, (t, b) in enumerate(zip(ts, before)):
        if not np.array_equal(t.data, b):
            raise GradcheckError(f"input {i} was modified in place by fn")
