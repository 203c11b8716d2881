"""The user kit, tensorlite.testing and tensorlite.gradcheck: the strategies make what they
promise, assert_gradients_match passes on correct ops and catches wrong gradients, even
ones a `.sum()` cotangent would miss, and a failure says where and by how much.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tensorlite as tl
import tensorlite.functional as F
from tensorlite import GradcheckError, Tensor, gradcheck
from tensorlite.autograd import Function
from tensorlite.testing import (
    arrays,
    assert_gradients_match,
    broadcastable_shapes,
    shapes,
    tensors,
)


# ---- the strategies ---------------------------------------------------------------------------
@given(shape=shapes(min_dims=1, max_dims=3, min_side=2, max_side=3))
def test_shapes_respect_their_bounds(shape):
    assert 1 <= len(shape) <= 3 and all(2 <= n <= 3 for n in shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(data=st.data())
def test_arrays_have_the_dtype_shape_and_range(dtype, data):
    x = data.draw(arrays(dtype=dtype, shape=(2, 3), min_value=-1.5, max_value=0.5))
    assert isinstance(x, np.ndarray) and x.dtype == dtype and x.shape == (2, 3)
    assert np.all(np.isfinite(x)) and np.all(x >= -1.5) and np.all(x <= 0.5)
    y = data.draw(arrays(dtype=dtype, shape=shapes(max_dims=2)))
    assert y.dtype == dtype and y.ndim <= 2 and np.all(np.abs(y) <= 2.0)


@given(x=arrays(away_from=0.0, margin=0.25), y=arrays(away_from=1.0, margin=0.5))
def test_arrays_keep_away_from_a_kink(x, y):
    assert np.all(np.abs(x) >= 0.25)
    assert np.all(np.abs(y - 1.0) >= 0.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(data=st.data(), requires_grad=st.booleans())
def test_tensors_wrap_arrays(dtype, data, requires_grad):
    t = data.draw(tensors(dtype=dtype, shape=(3,), requires_grad=requires_grad))
    assert isinstance(t, Tensor) and t.dtype == dtype and t.shape == (3,)
    assert t.requires_grad is requires_grad and t.grad is None
    assert data.draw(tensors()).requires_grad  # the default: ready for a gradient check


@given(data=st.data(), n=st.integers(1, 4))
def test_broadcastable_shapes_broadcast(data, n):
    result = data.draw(broadcastable_shapes(num_shapes=n, max_dims=3, max_side=4))
    assert isinstance(result, tuple) and len(result) == n
    out = np.broadcast_shapes(*result)  # raises if they do not broadcast
    assert all(len(s) <= 3 and all(1 <= d <= 4 for d in s) for s in result)
    assert len(out) <= 3


def test_broadcastable_shapes_include_size_one_axes_and_0d():
    """Over many draws the strategy really makes the hard cases (1-sized axes, () shapes)."""
    seen = {"one": False, "scalar": False, "different_rank": False}

    @given(broadcastable_shapes(num_shapes=2))
    def collect(pair):
        a, b = pair
        seen["one"] |= 1 in a + b
        seen["scalar"] |= a == () or b == ()
        seen["different_rank"] |= len(a) != len(b)

    collect()
    assert all(seen.values()), seen


# ---- assert_gradients_match on our own ops ---------------------------------------------------------
@given(data=st.data())
def test_assert_gradients_match_passes_on_our_ops(data):
    a_shape, b_shape = data.draw(broadcastable_shapes())
    a = data.draw(arrays(shape=a_shape))
    b = data.draw(arrays(shape=b_shape))
    assert_gradients_match(lambda x, y: (x * y).tanh() + x.exp() / (y * y + 1.0), a, b)
    assert_gradients_match(lambda x: F.softmax(x.reshape(-1)), a)


def test_assert_gradients_match_accepts_tensors_and_leaves_them_alone():
    x32 = Tensor(np.array([0.5, -1.0], dtype=np.float32), requires_grad=True)
    c = Tensor(np.array([2.0, 3.0]))  # requires_grad=False: a constant, not checked
    assert_gradients_match(lambda x, k: x * k, x32, c)
    assert x32.dtype == np.float32 and x32.grad is None
    np.testing.assert_array_equal(x32.data, np.array([0.5, -1.0], dtype=np.float32))


# ---- deliberately wrong gradients: the kit must catch them ------------------------------------------
class ReverseWithForgottenFlip(Function):
    """out = x[::-1]; the correct dx is dout[::-1]. This one forgets the flip.

    With a `.sum()` cotangent dout is all ones, and ones flipped are ones: the bug is
    invisible. A random cotangent exposes it."""

    def forward(self, x):
        return x[::-1].copy()

    def backward(self, dout):
        return dout  # BUG: should be dout[::-1]


class SquareMissingTwo(Function):
    """out = x**2; the correct dx is 2 x dout. This one returns x dout."""

    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, dout):
        return dout * self.x  # BUG: should be 2 * dout * self.x


class MulWithSwappedGradients(Function):
    """out = x * y; correct: dx = dout y, dy = dout x. This one swaps them (symmetric when x==y)."""

    def forward(self, x, y):
        self.x, self.y = x, y
        return x * y

    def backward(self, dout):
        return dout * self.x, dout * self.y  # BUG: swapped


def test_a_sum_cotangent_would_miss_the_symmetric_bug():
    """Why the kit projects on a random cotangent: with ones, the wrong backward looks right."""
    x = Tensor(np.array([1.0, 2.0, 3.0, 4.0]), requires_grad=True)
    ReverseWithForgottenFlip.apply(x).sum().backward()
    np.testing.assert_array_equal(x.grad, np.ones(4))  # what the correct gradient also is


@given(x=arrays(shape=st.integers(2, 6).map(lambda n: (n,))))
def test_assert_gradients_match_catches_the_symmetric_bug(x):
    with pytest.raises(GradcheckError, match="input 0"):
        assert_gradients_match(ReverseWithForgottenFlip.apply, x)
    assert_gradients_match(lambda t: t[::-1], x)  # the real op passes


@given(x=arrays(away_from=0.0, margin=0.1, shape=shapes(min_dims=1)))
def test_assert_gradients_match_catches_a_missing_factor(x):
    with pytest.raises(GradcheckError):
        assert_gradients_match(SquareMissingTwo.apply, x)


def test_assert_gradients_match_catches_swapped_gradients_and_names_the_input():
    x, y = np.array([1.0, 2.0]), np.array([3.0, -1.0])
    with pytest.raises(GradcheckError, match="input 0"):
        assert_gradients_match(MulWithSwappedGradients.apply, x, y)
    with pytest.raises(GradcheckError, match="input 1"):  # x not checked: the error is in y's
        assert_gradients_match(MulWithSwappedGradients.apply, Tensor(x), y)


def test_assert_gradients_match_catches_an_input_written_in_place():
    def scribbles(t, c):
        c.data[...] = 5.0  # changes its (constant) input
        return t * c

    with pytest.raises(GradcheckError, match="input 1 was modified in place"):
        assert_gradients_match(scribbles, np.array([1.0, 2.0]), Tensor(np.array([1.0, 1.0])))


# ---- gradcheck's report ------------------------------------------------------------------------------
def test_gradcheck_error_names_input_element_analytic_and_numeric():
    a = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    x = Tensor(np.array([[0.5, 1.0, 1.5], [2.0, 2.5, 3.0]]), requires_grad=True)
    seed = 7
    with pytest.raises(GradcheckError) as info:
        gradcheck(lambda p, q: p.sum() * SquareMissingTwo.apply(q), [a, x], seed=seed)
    message = str(info.value)
    # the same cotangent gradcheck draws: a standard normal of the output's shape
    u = np.random.default_rng(seed).standard_normal((2, 3))
    # first element of input 1 (input 0 is right): analytic = u * x * sum(a), numeric twice that
    analytic, numeric = u[0, 0] * 0.5 * 3.0, u[0, 0] * 2 * 0.5 * 3.0
    assert "input 1" in message and "shape (2, 3)" in message and "element (0, 0)" in message
    found = {k: float(v) for k, v in re.findall(r"(analytic|numeric) (-?[\d.e+-]+)", message)}
    assert found["analytic"] == pytest.approx(analytic, rel=1e-7)
    assert found["numeric"] == pytest.approx(numeric, rel=1e-5)


def test_gradcheck_returns_true_and_clears_grads():
    x = Tensor(np.array([0.3, -0.2]), requires_grad=True)
    assert gradcheck(lambda t: (t * t).sum(), [x]) is True
    assert x.grad is None


def test_gradcheck_accepts_a_non_contiguous_input_and_restores_it():
    data = np.arange(6.0).reshape(2, 3).T  # (3, 2), a transposed view
    x = Tensor(data, requires_grad=True)
    assert gradcheck(lambda t: (t * t) @ Tensor(np.array([1.0, -2.0])), [x]) is True
    np.testing.assert_array_equal(x.data, np.arange(6.0).reshape(2, 3).T)
    with pytest.raises(GradcheckError, match=r"element \(0, 0\)"):
        gradcheck(lambda t: SquareMissingTwo.apply(t), [Tensor(data + 1.0, requires_grad=True)])


def test_gradcheck_input_errors():
    x = Tensor(np.array([1.0]))
    with pytest.raises(ValueError, match="requires_grad"):
        gradcheck(lambda t: t * 2.0, [x])
    with pytest.raises(TypeError, match="Tensors"):
        gradcheck(lambda t: t, [np.array([1.0])])
    with pytest.raises(TypeError, match="must return a Tensor"):
        gradcheck(lambda t: t.data, [Tensor(np.array([1.0]), requires_grad=True)])
    with pytest.raises(GradcheckError, match="does not depend"):
        gradcheck(lambda t: Tensor(np.array([1.0])), [Tensor(np.array([1.0]), requires_grad=True)])
    assert issubclass(GradcheckError, AssertionError)
    assert tl.GradcheckError is GradcheckError and tl.gradcheck is gradcheck


# ---- bugs the suite once let through (each test fails on its mutant) ----------------------------
class CubeWithFlippedSign(Function):
    """out = x**3; the correct dx is 3 x**2 dout. This one returns its negative: the same
    magnitudes, so a check that compared only |analytic| and |numeric| would pass it."""

    def forward(self, x):
        self.x = x
        return x**3

    def backward(self, dout):
        return -3 * self.x**2 * dout  # BUG: the sign


@given(x=arrays(away_from=0.0, margin=0.1, shape=shapes(min_dims=1)))
def test_gradcheck_catches_a_flipped_sign(x):
    with pytest.raises(GradcheckError, match="input 0"):
        gradcheck(CubeWithFlippedSign.apply, [Tensor(x, requires_grad=True)])
    with pytest.raises(GradcheckError, match="input 0"):
        assert_gradients_match(CubeWithFlippedSign.apply, x)
    assert gradcheck(lambda t: t**3, [Tensor(x, requires_grad=True)]) is True


def test_gradcheck_ignores_a_gradient_the_input_already_holds():
    """An input left with a .grad by earlier work: backward accumulates into .grad, so unless
    gradcheck resets it first the stale values would read as a wrong gradient."""
    x = Tensor(np.array([0.5, -1.5, 2.0]), requires_grad=True)
    x.grad = np.full(3, 100.0)
    assert gradcheck(lambda t: t * t * t, [x]) is True
    assert x.grad is None
