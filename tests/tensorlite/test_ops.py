"""Property tests for every primitive op and for the autograd engine itself.

Each op is checked three ways on random shapes and values (hypothesis):
  1. its forward value against NumPy,
  2. its gradient against central finite differences in float64, projected on a random
     cotangent (tensorlite.testing.assert_gradients_match; a `.sum()` would hide bugs that
     are symmetric across elements),
  3. that neither forward nor backward writes into its inputs.
Then the engine: linearity, the chain rule, diamonds, deep chains, accumulation, dtypes,
no_grad, detach, errors, and the release of buffers after backward.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensorlite as tl
from tensorlite import Tensor
from tensorlite.testing import arrays, assert_gradients_match, broadcastable_shapes, shapes


# ---- the one helper every op test goes through -----------------------------------------------
def check_op(fn, reference, *inputs, atol: float = 1e-12) -> None:
    """fn(*Tensors) vs reference(*ndarrays) in float64, then gradients vs finite differences.

    Also asserts that forward and backward leave the inputs untouched and that each input's
    .grad has the input's shape and dtype.
    """
    xs = [np.array(x, dtype=np.float64) for x in inputs]
    before = [x.copy() for x in xs]
    ts = [Tensor(x, requires_grad=True) for x in xs]
    out = fn(*ts)
    assert isinstance(out, Tensor) and out.dtype == np.float64
    np.testing.assert_allclose(out.data, reference(*before), rtol=1e-12, atol=atol)
    u = np.random.default_rng(1).standard_normal(out.shape)
    out.backward(u)
    for x, b, t in zip(xs, before, ts):
        np.testing.assert_array_equal(x, b, err_msg="an op wrote into its input")
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == np.float64
    assert_gradients_match(fn, *before)


def distinct_values(order, shape, spacing: float = 0.25) -> np.ndarray:
    """Values on a grid, no two equal, in the given order (max stays away from ties)."""
    n = int(np.prod(shape))
    return ((np.array(order, dtype=np.float64) - n / 2) * spacing).reshape(shape)


# ---- + - * / with broadcasting and Python scalars -------------------------------------------
BINARY = {
    "add": (lambda a, b: a + b, np.add),
    "sub": (lambda a, b: a - b, np.subtract),
    "mul": (lambda a, b: a * b, np.multiply),
    "div": (lambda a, b: a / b, np.divide),
}


@pytest.mark.parametrize("name", list(BINARY))
@given(data=st.data())
def test_binary_ops_broadcast(name, data):
    shape_a, shape_b = data.draw(broadcastable_shapes(num_shapes=2))
    a = data.draw(arrays(shape=shape_a))
    b = data.draw(arrays(shape=shape_b, away_from=0.0, margin=0.5) if name == "div"
                  else arrays(shape=shape_b))
    fn, ref = BINARY[name]
    check_op(fn, ref, a, b)


@pytest.mark.parametrize("name", list(BINARY))
@pytest.mark.parametrize(
    "shape_a, shape_b",
    [((), ()), ((), (3,)), ((2, 1), (1, 3)), ((4, 1, 3), (2, 1)), ((1,), (2, 3)), ((2, 3), (2, 3))],
)
def test_binary_ops_fixed_shapes(name, shape_a, shape_b):
    """Size-1 axes, 0-d tensors and new leading axes on both sides, whatever hypothesis draws."""
    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 2, shape_b) * rng.choice([-1, 1], shape_b)
    a = rng.uniform(0.5, 2, shape_a) * rng.choice([-1, 1], shape_a)  # nonzero: a divides too
    fn, ref = BINARY[name]
    check_op(fn, ref, a, b)
    check_op(fn, ref, b, a)


@pytest.mark.parametrize("name", list(BINARY))
@given(x=arrays(away_from=0.0, margin=0.5),
       s=st.floats(0.5, 3.0) | st.floats(-3.0, -0.5) | st.integers(1, 3))
def test_binary_ops_with_python_scalars_on_either_side(name, x, s):
    fn, ref = BINARY[name]
    check_op(lambda t: fn(t, s), lambda a: ref(a, s), x)
    check_op(lambda t: fn(s, t), lambda a: ref(s, a), x)


@pytest.mark.parametrize("name", list(BINARY))
def test_ndarray_on_the_left_gives_a_tensor(name):
    fn, ref = BINARY[name]
    a = np.array([1.0, 2.0, 4.0])
    t = Tensor(np.array([0.5, -1.0, 2.0]), requires_grad=True)
    out = fn(a, t)
    assert isinstance(out, Tensor) and out.requires_grad
    np.testing.assert_allclose(out.data, ref(a, t.data))


@given(x=arrays())
def test_neg(x):
    check_op(lambda t: -t, np.negative, x)


# ---- ** with a scalar exponent ----------------------------------------------------------------
@given(data=st.data(), p=st.sampled_from([2, 3, -1, -2, 0, 1]))
def test_pow_integer_exponent(data, p):
    x = data.draw(arrays(away_from=0.0, margin=0.25))
    check_op(lambda t: t**p, lambda a: a**p, x, atol=1e-10)


@given(data=st.data(), p=st.sampled_from([0.5, 1.5, -0.5, 2.5, 3.0]))
def test_pow_real_exponent_positive_base(data, p):
    x = data.draw(arrays(min_value=0.2, max_value=3.0))
    check_op(lambda t: t**p, lambda a: a**p, x, atol=1e-10)


def test_pow_zero_exponent_has_zero_gradient_at_zero():
    x = Tensor(np.array([0.0, 0.0, 2.0]), requires_grad=True)
    (x**0).backward(np.array([1.0, -2.0, 3.0]))
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 0.0])  # not 0 * inf = nan at x = 0


def test_pow_rejects_a_tensor_exponent():
    with pytest.raises(TypeError, match="scalar exponent"):
        Tensor([1.0, 2.0]) ** Tensor([2.0, 2.0])


# ---- @ (np.matmul semantics) ------------------------------------------------------------------
@st.composite
def matmul_shapes(draw):
    """(x_shape, y_shape): 1-D or matrices, with (possibly broadcasting) batch dims."""
    batch_x, batch_y = draw(broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3))
    m, k, n = (draw(st.integers(1, 4)) for _ in range(3))
    x_vector, y_vector = draw(st.booleans()), draw(st.booleans())
    x_shape = (k,) if x_vector else batch_x + (m, k)
    y_shape = (k,) if y_vector else batch_y + (k, n)
    return x_shape, y_shape


@given(data=st.data())
def test_matmul_random_shapes(data):
    x_shape, y_shape = data.draw(matmul_shapes())
    check_op(lambda a, b: a @ b, np.matmul, data.draw(arrays(shape=x_shape)),
             data.draw(arrays(shape=y_shape)), atol=1e-11)


@pytest.mark.parametrize(
    "x_shape, y_shape",
    [
        ((3,), (3,)),  # 1-D @ 1-D: a dot product, 0-d out
        ((3,), (3, 2)),  # row vector
        ((2, 3), (3,)),  # column vector
        ((2, 3), (3, 4)),  # 2-D
        ((2, 2, 3), (2, 3, 4)),  # batched
        ((2, 2, 3), (3, 4)),  # a weight shared across the batch
        ((2, 3), (5, 3, 4)),  # a matrix against a batch
        ((2, 1, 2, 3), (4, 3, 2)),  # broadcast batch dims
        ((3,), (2, 3, 4)),  # 1-D against a batch
        ((2, 4, 3), (3,)),  # a batch against 1-D
    ],
)
def test_matmul_every_form(x_shape, y_shape):
    rng = np.random.default_rng(0)
    check_op(lambda a, b: a @ b, np.matmul, rng.standard_normal(x_shape),
             rng.standard_normal(y_shape), atol=1e-11)


def test_matmul_ndarray_on_the_left():
    w = np.arange(6.0).reshape(2, 3)
    t = Tensor(np.ones((3, 2)), requires_grad=True)
    out = w @ t
    assert isinstance(out, Tensor)
    np.testing.assert_allclose(out.data, w @ np.ones((3, 2)))


# ---- elementwise functions ---------------------------------------------------------------------
UNARY = {
    # name: (method, NumPy reference, strategy of inputs away from domain edges and kinks)
    "exp": (Tensor.exp, np.exp, arrays()),
    "log": (Tensor.log, np.log, arrays(min_value=0.1, max_value=4.0)),
    "sqrt": (Tensor.sqrt, np.sqrt, arrays(min_value=0.1, max_value=4.0)),
    "tanh": (Tensor.tanh, np.tanh, arrays(min_value=-3.0, max_value=3.0)),
    "sigmoid": (Tensor.sigmoid, lambda a: 1 / (1 + np.exp(-a)), arrays(min_value=-6, max_value=6)),
    "relu": (Tensor.relu, lambda a: np.maximum(a, 0), arrays(away_from=0.0, margin=1e-3)),
}


@pytest.mark.parametrize("name", list(UNARY))
@given(data=st.data())
def test_unary(name, data):
    method, ref, strategy = UNARY[name]
    check_op(method, ref, data.draw(strategy))


def test_sigmoid_is_stable_for_huge_inputs():
    """No overflow, no NaN, results in [0, 1], full relative precision in both tails
    (sigmoid(-50) = 2e-22 must not round to 0)."""
    xs = np.array([-1000.0, -50.0, -18.0, -5.0, 0.0, 5.0, 18.0, 50.0, 1000.0])
    x = Tensor(xs, requires_grad=True)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        y = x.sigmoid()
        y.backward(np.ones(xs.size))
    exact = np.exp(-np.logaddexp(0.0, -xs))
    assert np.all((y.data >= 0) & (y.data <= 1)) and np.all(np.isfinite(x.grad))
    np.testing.assert_allclose(y.data, exact, rtol=1e-12, atol=0)
    np.testing.assert_allclose(x.grad, exact * (1 - exact), rtol=1e-12, atol=0)


def test_relu_gradient_is_zero_on_the_negative_side_and_at_zero():
    x = Tensor(np.array([-2.0, 0.0, 3.0]), requires_grad=True)
    x.relu().backward(np.array([5.0, 6.0, 7.0]))
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 7.0])


# ---- reductions ---------------------------------------------------------------------------------
@st.composite
def shape_and_axis(draw, min_dims: int = 0):
    shape = draw(shapes(min_dims=min_dims))
    nd = len(shape)
    options = [st.none()]
    if nd:
        options.append(st.integers(-nd, nd - 1))
        options.append(st.lists(st.integers(0, nd - 1), unique=True, min_size=1, max_size=nd)
                       .flatmap(lambda axes: st.tuples(*(st.sampled_from([a, a - nd])
                                                         for a in axes))))
    axis = draw(st.one_of(*options))
    return shape, axis


REDUCTIONS = {"sum": np.sum, "mean": np.mean, "max": np.max}


@pytest.mark.parametrize("name", list(REDUCTIONS))
@given(data=st.data(), keepdims=st.booleans())
def test_reductions(name, data, keepdims):
    shape, axis = data.draw(shape_and_axis())
    if name == "max":
        x = distinct_values(data.draw(st.permutations(range(int(np.prod(shape))))), shape)
    else:
        x = data.draw(arrays(shape=shape))

    def fn(t):
        return getattr(t, name)(axis=axis, keepdims=keepdims)

    check_op(fn, lambda a: REDUCTIONS[name](a, axis=axis, keepdims=keepdims), x)


@pytest.mark.parametrize("name", list(REDUCTIONS))
@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2), (-1, 0, 1)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions_every_axis_form(name, axis, keepdims):
    x = distinct_values(np.random.default_rng(3).permutation(12), (2, 3, 2))
    check_op(lambda t: getattr(t, name)(axis=axis, keepdims=keepdims),
             lambda a: REDUCTIONS[name](a, axis=axis, keepdims=keepdims), x)


def _max_gradient_reference(x: np.ndarray, axis, dout: np.ndarray) -> np.ndarray:
    """dout split evenly among the positions that attain the maximum (written independently)."""
    m = np.max(x, axis=axis, keepdims=True)
    hit = (x == m).astype(np.float64)
    count = hit.sum(axis=axis, keepdims=True)
    return hit * np.reshape(dout, m.shape) / count


@pytest.mark.parametrize("name", ["sum", "mean", "max"])
def test_reductions_over_axis_0_of_a_0d_tensor(name):
    x = Tensor(np.array(3.0), requires_grad=True)
    out = getattr(x, name)(axis=0)
    assert out.shape == () and out.item() == 3.0
    out.backward(np.array(2.0))
    assert x.grad.shape == () and x.grad.item() == 2.0


def test_max_ties_split_evenly_examples():
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [0.0, 5.0, -1.0]]), requires_grad=True)
    x.max(axis=1).backward(np.array([6.0, 9.0, 4.0]))
    np.testing.assert_allclose(x.grad, [[0, 3, 3], [3, 3, 3], [0, 4, 0]])

    y = Tensor(np.array([[7.0, 1.0], [7.0, 7.0]]), requires_grad=True)
    y.max().backward()
    np.testing.assert_allclose(y.grad, [[1 / 3, 0], [1 / 3, 1 / 3]])


@given(data=st.data(), keepdims=st.booleans())
def test_max_ties_split_evenly_property(data, keepdims):
    shape, axis = data.draw(shape_and_axis(min_dims=1))
    # values from {0, 1, 2}: ties are the rule, not the exception
    x = data.draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([0.0, 1.0, 2.0])))
    t = Tensor(x, requires_grad=True)
    out = t.max(axis=axis, keepdims=keepdims)
    dout = np.random.default_rng(0).standard_normal(out.shape)
    out.backward(dout)
    np.testing.assert_allclose(t.grad, _max_gradient_reference(x, axis, dout), rtol=1e-12)
    # the gradient of a max still sums to the cotangent, however many ties
    np.testing.assert_allclose(t.grad.sum(), dout.sum(), rtol=1e-10, atol=1e-12)


# ---- shape ops ----------------------------------------------------------------------------------
@st.composite
def reshape_target(draw, shape):
    """A different shape with the same number of elements, maybe with a -1."""
    dims = list(draw(st.permutations(shape)))
    for _ in range(draw(st.integers(0, 2))):
        dims.insert(draw(st.integers(0, len(dims))), 1)
    if dims and draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = -1
    if draw(st.booleans()):
        dims = [int(np.prod(shape))]
    return tuple(dims)


@given(data=st.data(), as_tuple=st.booleans())
def test_reshape_both_call_forms(data, as_tuple):
    x = data.draw(arrays())
    target = data.draw(reshape_target(x.shape))

    def fn(t):
        return t.reshape(target) if as_tuple else t.reshape(*target)

    check_op(fn, lambda a: a.reshape(target), x)


def test_reshape_call_forms_agree_and_errors_name_shapes():
    t = Tensor(np.arange(6.0))
    assert t.reshape(2, 3).shape == t.reshape((2, 3)).shape == t.reshape([2, 3]).shape == (2, 3)
    assert t.reshape(-1, 2).shape == (3, 2)
    with pytest.raises(ValueError, match=r"\(6,\).*\(4, 2\)"):
        t.reshape(4, 2)


@given(data=st.data())
def test_transpose_without_axes_reverses(data):
    x = data.draw(arrays())
    check_op(lambda t: t.transpose(), np.transpose, x)
    check_op(lambda t: t.T, np.transpose, x)


@given(data=st.data(), as_tuple=st.booleans(), negative=st.booleans())
def test_transpose_explicit_axes(data, as_tuple, negative):
    x = data.draw(arrays(shape=shapes(min_dims=1)))
    axes = tuple(data.draw(st.permutations(range(x.ndim))))
    if negative:
        axes = tuple(a - x.ndim for a in axes)

    def fn(t):
        return t.transpose(axes) if as_tuple else t.transpose(*axes)

    check_op(fn, lambda a: np.transpose(a, axes), x)


@given(data=st.data())
def test_swapaxes(data):
    x = data.draw(arrays(shape=shapes(min_dims=1)))
    a = data.draw(st.integers(-x.ndim, x.ndim - 1))
    b = data.draw(st.integers(-x.ndim, x.ndim - 1))
    check_op(lambda t: t.swapaxes(a, b), lambda v: np.swapaxes(v, a, b), x)


# ---- indexing -----------------------------------------------------------------------------------
@given(data=st.data())
def test_getitem_basic_slicing(data):
    x = data.draw(arrays(shape=shapes(min_dims=1)))
    index = data.draw(hnp.basic_indices(x.shape, allow_newaxis=True))
    assume(np.asarray(x[index]).size > 0)
    check_op(lambda t: t[index], lambda a: a[index], x)


@given(data=st.data())
def test_getitem_integer_arrays(data):
    x = data.draw(arrays(shape=shapes(min_dims=1)))
    index = data.draw(hnp.integer_array_indices(x.shape, result_shape=shapes(min_dims=1, max_dims=2)))
    check_op(lambda t: t[index], lambda a: a[index], x)


@given(data=st.data())
def test_getitem_integer_array_mixed_with_a_slice(data):
    x = data.draw(arrays(shape=shapes(min_dims=2)))
    rows = np.array(data.draw(st.lists(st.integers(0, x.shape[0] - 1), min_size=1, max_size=6)))
    check_op(lambda t: t[rows, 1:], lambda a: a[rows, 1:], x)
    check_op(lambda t: t[rows.tolist()], lambda a: a[rows], x)


def test_getitem_repeated_indices_accumulate():
    x = Tensor(np.arange(4.0), requires_grad=True)
    x[np.array([0, 2, 2, 2, 3, 0])].backward(np.array([1.0, 10.0, 100.0, 1000.0, 5.0, 2.0]))
    np.testing.assert_array_equal(x.grad, [3.0, 0.0, 1110.0, 5.0])

    m = Tensor(np.zeros((3, 2)), requires_grad=True)
    m[[1, 1], [0, 0]].backward(np.array([4.0, 5.0]))
    np.testing.assert_array_equal(m.grad, [[0, 0], [9, 0], [0, 0]])


def test_getitem_out_of_range_names_the_shape():
    with pytest.raises(IndexError, match=r"\(2, 3\)"):
        Tensor(np.zeros((2, 3)))[5]


# ---- concatenate, stack, where ------------------------------------------------------------------
@given(data=st.data(), n=st.integers(1, 3))
def test_concatenate(data, n):
    base = data.draw(shapes(min_dims=1))
    axis = data.draw(st.integers(-len(base), len(base) - 1))
    xs = []
    for _ in range(n):
        shape = list(base)
        shape[axis] = data.draw(st.integers(1, 3))
        xs.append(data.draw(arrays(shape=tuple(shape))))
    check_op(lambda *ts: tl.concatenate(list(ts), axis=axis),
             lambda *a: np.concatenate(a, axis=axis), *xs)


@given(data=st.data(), n=st.integers(1, 3))
def test_stack(data, n):
    shape = data.draw(shapes())
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    xs = [data.draw(arrays(shape=shape)) for _ in range(n)]
    check_op(lambda *ts: tl.stack(ts, axis=axis), lambda *a: np.stack(a, axis=axis), *xs)


@given(data=st.data())
def test_where(data):
    cond_shape, a_shape, b_shape = data.draw(broadcastable_shapes(num_shapes=3))
    cond = data.draw(hnp.arrays(bool, cond_shape))
    a, b = data.draw(arrays(shape=a_shape)), data.draw(arrays(shape=b_shape))
    check_op(lambda x, y: tl.where(cond, x, y), lambda x, y: np.where(cond, x, y), a, b)


def test_where_with_a_python_scalar_and_no_gradient_to_the_unpicked_side():
    a = Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    out = tl.where(np.array([True, False, True]), a, 0.0)
    assert out.dtype == np.float64
    out.backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(a.grad, [1.0, 0.0, 3.0])


def test_concatenate_and_stack_errors_name_the_shapes():
    a, b = Tensor(np.zeros((2, 3))), Tensor(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        tl.concatenate([a, b], axis=0)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        tl.stack([a, b])
    with pytest.raises(ValueError):
        tl.concatenate([])


# ---- properties of the engine -------------------------------------------------------------------
COMPOSABLE = {
    # unary maps that are smooth on [-1, 1] (their outputs stay in a safe domain for the next)
    "exp": lambda t: t.exp(),
    "tanh": lambda t: t.tanh(),
    "sigmoid": lambda t: t.sigmoid(),
    "square": lambda t: t**2,
    "softplus-ish": lambda t: (t.exp() + 1.0).log(),
    "sqrt(1+x^2)": lambda t: (t * t + 1.0).sqrt(),
    "scale-shift": lambda t: 0.5 * t - 0.25,
    "sum-rows": lambda t: t.sum(axis=-1, keepdims=True) * t,
    "mean-center": lambda t: t - t.mean(axis=-1, keepdims=True),
    "self-matmul": lambda t: t @ t.transpose(),
    "divide": lambda t: t / (t * t + 2.0),
}


def _vjp(fn, x: np.ndarray, u: np.ndarray) -> np.ndarray:
    t = Tensor(x.copy(), requires_grad=True)
    fn(t).backward(u)
    return t.grad


@given(data=st.data(), f=st.sampled_from(sorted(COMPOSABLE)), g=st.sampled_from(sorted(COMPOSABLE)))
def test_chain_rule_across_compositions(data, f, g):
    """VJP of f(g(x)) with u == VJP of g at x with (VJP of f at g(x) with u)."""
    x = data.draw(arrays(shape=shapes(min_dims=2, max_dims=2), min_value=-1.0, max_value=1.0))
    f_fn, g_fn = COMPOSABLE[f], COMPOSABLE[g]
    gx = g_fn(Tensor(x)).data
    u = np.random.default_rng(2).standard_normal(f_fn(Tensor(gx)).shape)
    v = _vjp(f_fn, gx, u)
    np.testing.assert_allclose(_vjp(lambda t: f_fn(g_fn(t)), x, u), _vjp(g_fn, x, v),
                               rtol=1e-10, atol=1e-12)
    assert_gradients_match(lambda t: f_fn(g_fn(t)), x)


@given(data=st.data(), f=st.sampled_from(sorted(COMPOSABLE)), alpha=st.floats(-2, 2),
       beta=st.floats(-2, 2))
def test_gradient_is_linear_in_the_cotangent_and_in_the_function(data, f, alpha, beta):
    x = data.draw(arrays(shape=shapes(min_dims=2, max_dims=2), min_value=-1.0, max_value=1.0))
    fn = COMPOSABLE[f]
    rng = np.random.default_rng(4)
    shape = fn(Tensor(x)).shape
    u1, u2 = rng.standard_normal(shape), rng.standard_normal(shape)
    # VJP(alpha u1 + beta u2) == alpha VJP(u1) + beta VJP(u2)
    np.testing.assert_allclose(_vjp(fn, x, alpha * u1 + beta * u2),
                               alpha * _vjp(fn, x, u1) + beta * _vjp(fn, x, u2),
                               rtol=1e-9, atol=1e-10)
    # grad(alpha f + beta h) == alpha grad f + beta grad h   (h = tanh o f: same shape as f)
    def h(t):
        return fn(t).tanh()

    np.testing.assert_allclose(_vjp(lambda t: alpha * fn(t) + beta * h(t), x, u1),
                               alpha * _vjp(fn, x, u1) + beta * _vjp(h, x, u1),
                               rtol=1e-9, atol=1e-10)


def test_diamond_graph_accumulates():
    x = Tensor(np.array([1.5, -2.0, 0.5]), requires_grad=True)
    a = x * 3.0  # x used by a and b: both paths must add up
    b = x.exp()
    (a * b).sum().backward()
    expected = 3.0 * np.exp(x.data) + 3.0 * x.data * np.exp(x.data)
    np.testing.assert_allclose(x.grad, expected, rtol=1e-12)

    y = Tensor(np.array([2.0, 3.0]), requires_grad=True)
    (y + y + y * y).sum().backward()  # the same tensor twice in one op, and a third time
    np.testing.assert_allclose(y.grad, 2.0 + 2 * y.data)


def test_shared_intermediate_accumulates():
    x = Tensor(np.array([0.3, -0.7]), requires_grad=True)
    h = x.tanh()  # h feeds three consumers
    (h * h + h.sigmoid() - 2.0 * h).sum().backward()
    hv = np.tanh(x.data)
    s = 1 / (1 + np.exp(-hv))
    np.testing.assert_allclose(x.grad, (2 * hv + s * (1 - s) - 2.0) * (1 - hv**2), rtol=1e-12)


def test_chain_of_10000_ops_backward():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0001
        y = y + 0.5
    y.backward()
    np.testing.assert_allclose(x.grad, 1.0001**5000, rtol=1e-9)


def test_grad_accumulates_across_backward_calls_until_reset():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * x).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 4 * x.data)
    (3.0 * x).sum().backward()
    np.testing.assert_allclose(x.grad, 4 * x.data + 3.0)
    x.grad = None
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data)


def test_leaf_grad_is_a_private_buffer():
    """.grad must not alias the cotangent the user passed, nor another leaf's .grad."""
    x = Tensor(np.zeros(3), requires_grad=True)
    y = Tensor(np.zeros(3), requires_grad=True)
    u = np.array([1.0, 2.0, 3.0])
    (x + y).backward(u)
    x.grad += 1.0
    np.testing.assert_array_equal(u, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(y.grad, [1.0, 2.0, 3.0])


def test_backward_on_a_non_scalar_without_grad_raises_clearly():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"non-scalar.*\(2, 3\)"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 3\)"):
        (x * 2.0).backward(np.ones(3))
    with pytest.raises(RuntimeError, match="requires_grad"):
        Tensor([1.0]).sum().backward()


def test_scalar_backward_defaults_to_one():
    x = Tensor(np.array([2.0]), requires_grad=True)
    (x * 5.0).backward()  # size-1, not 0-d: still a scalar
    np.testing.assert_array_equal(x.grad, [5.0])


def test_second_backward_through_a_released_graph_raises():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    w = Tensor(np.array([3.0, 4.0]), requires_grad=True)
    h = x * w
    loss = h.sum()
    loss.backward()
    assert not hasattr(h._ctx, "x") and not hasattr(h._ctx, "y"), "saved arrays were kept"
    with pytest.raises(RuntimeError, match="already freed"):
        loss.backward()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept_through_every_op(dtype):
    x = Tensor(np.linspace(0.1, 1.0, 6).reshape(2, 3).astype(dtype), requires_grad=True)
    w = Tensor(np.ones((3, 2), dtype=dtype), requires_grad=True)
    outs = [x + 1, 2 * x, x - 1.5, 1 / x, -x, x**2, x**0.5, x @ w, x.exp(), x.log(), x.sqrt(),
            x.tanh(), x.sigmoid(), x.relu(), x.sum(), x.mean(0), x.max(1), x.reshape(3, 2), x.T,
            x.swapaxes(0, 1), x[0], x[[0, 0]], tl.concatenate([x, x]), tl.stack([x, x]),
            tl.where(x.data > 0.5, x, 0.0)]
    for out in outs:
        assert out.dtype == dtype, out
        out.backward(np.ones(out.shape))
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


def test_dtype_rules_on_creation():
    assert Tensor(1.5).dtype == np.float32
    assert Tensor(3).dtype == np.float32
    assert Tensor([1, 2, 3]).dtype == np.float32
    assert Tensor([[1.0, 2.0]]).dtype == np.float32
    assert Tensor(np.arange(3)).dtype == np.float32  # integer arrays become float32 too
    assert Tensor(np.zeros(2, dtype=np.float64)).dtype == np.float64
    assert Tensor(np.zeros(2, dtype=np.float32)).dtype == np.float32
    x64 = Tensor(np.ones(2))
    assert (x64 * 2.0).dtype == (2.0 * x64).dtype == (x64 + 1).dtype == np.float64
    assert (x64 / 3).dtype == (3 - x64).dtype == np.float64
    x32 = Tensor(np.ones(2, dtype=np.float32))
    assert (x32 * 2.0).dtype == (0.5 + x32).dtype == (x32**2).dtype == np.float32
    with pytest.raises(TypeError, match="float"):
        Tensor(np.arange(3), dtype=np.int64, requires_grad=True)


def test_attributes():
    t = Tensor(np.zeros((2, 3)), requires_grad=True)
    assert t.shape == (2, 3) and t.ndim == 2 and t.dtype == np.float64
    assert t.requires_grad and t.grad is None
    assert isinstance(t.data, np.ndarray)


def test_no_grad():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    with tl.no_grad():
        y = x * 2.0 + x.exp()
        assert not tl.is_grad_enabled()
    assert tl.is_grad_enabled()
    assert not y.requires_grad and y._ctx is None
    with pytest.raises(RuntimeError):
        y.sum().backward()
    with pytest.raises(KeyError), tl.no_grad():  # the flag is restored even when it raises
        raise KeyError
    assert tl.is_grad_enabled()
    assert (x * 2.0).requires_grad


def test_no_grad_is_per_thread():
    """Two threads interleaving no_grad blocks (as a server's sampling threads do): one's exit
    must not switch recording back on inside the other's block, nor leak into a third."""
    import threading

    inside, left = threading.Event(), threading.Event()
    seen = {}

    def other():
        seen["before"] = tl.is_grad_enabled()  # main is inside no_grad: not this thread's state
        with tl.no_grad():
            inside.set()
            left.wait(5)
        seen["after"] = tl.is_grad_enabled()

    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    t = threading.Thread(target=other)
    with tl.no_grad():
        t.start()
        assert inside.wait(5)
        left.set()
        t.join(5)
        assert not tl.is_grad_enabled() and not (x * 2.0).requires_grad  # still off here
    assert seen == {"before": True, "after": True}
    assert tl.is_grad_enabled() and (x * 2.0).requires_grad


def test_detach():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    h = x * 3.0
    d = h.detach()
    assert not d.requires_grad and d._ctx is None
    assert np.shares_memory(d.data, h.data)
    (h * d).sum().backward()  # no gradient through d
    np.testing.assert_allclose(x.grad, 3.0 * d.data)


def test_item_and_numpy():
    t = Tensor(np.array([[2.5]]))
    assert t.item() == 2.5 and isinstance(t.item(), float)
    assert Tensor(np.array(7.0)).sum().item() == 7.0
    a = np.arange(3.0)
    assert Tensor(a).numpy() is a
    with pytest.raises(ValueError):
        Tensor(np.zeros(2)).item()


def test_errors_name_the_shapes():
    a, b = Tensor(np.zeros((2, 3))), Tensor(np.zeros((4,)))
    for op in (lambda: a + b, lambda: a - b, lambda: a * b, lambda: a / b):
        with pytest.raises(ValueError, match=r"\(2, 3\) and \(4,\)"):
            op()
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4, 5\)"):
        a @ Tensor(np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\(2, 2, 3\) and \(3, 3, 4\)"):
        Tensor(np.zeros((2, 2, 3))) @ Tensor(np.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        tl.where(np.ones((3, 3), dtype=bool), a, 0.0)
    with pytest.raises(ValueError, match="axis 2"):
        a.sum(axis=2)


# ---- float32 vs float64 forward -----------------------------------------------------------------
F32_CASES = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (b * b + 1.0),
    "pow": lambda a, b: (a * a + 1.0) ** 1.5 - b**3,
    "matmul": lambda a, b: a @ b.T,
    "exp-log-sqrt": lambda a, b: a.exp() + (b * b + 1.0).log() + (a * a + 0.5).sqrt(),
    "tanh-sigmoid-relu": lambda a, b: a.tanh() * b.sigmoid() + (a - b).relu(),
    "sum-mean-max": lambda a, b: a.sum(axis=1) + b.mean(axis=0) + a.max(axis=1) + b.max(),
    "shape": lambda a, b: a.reshape(-1)[::2] + b.T.swapaxes(0, 1).reshape(a.size)[::2],
    "join": lambda a, b: tl.concatenate([a, b], 1) * tl.stack([a, b], -1).reshape(a.shape[0], -1),
    "where": lambda a, b: tl.where(a.data > b.data, a, b),
}


@pytest.mark.parametrize("name", list(F32_CASES))
@given(x=arrays(shape=(3, 3)), y=arrays(shape=(3, 3)))
def test_float32_forward_matches_float64(name, x, y):
    fn = F32_CASES[name]
    out64 = fn(Tensor(x), Tensor(y))
    out32 = fn(Tensor(x.astype(np.float32)), Tensor(y.astype(np.float32)))
    assert out32.dtype == np.float32 and out64.dtype == np.float64
    np.testing.assert_allclose(out32.data, out64.data, rtol=1e-5, atol=1e-5)


def test_comparisons_give_bool_arrays_for_where():
    x = Tensor(np.array([-1.0, 0.0, 2.0]), requires_grad=True)
    y = Tensor(np.array([0.0, 0.0, 1.0]))
    assert (x > 0).dtype == bool and (x > 0).tolist() == [False, False, True]
    assert (x >= y).tolist() == [False, True, True]
    assert (x < y).tolist() == [True, False, False]
    assert (x <= 0).tolist() == [True, True, False]
    out = tl.where(x > 0, x, 0.0)
    out.backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 3.0])


# ---- the version counter: backward refuses arrays changed after the forward pass ------------
def test_changing_an_input_after_forward_makes_backward_raise_naming_op_and_tensor():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True, name="x")
    y = (x * x).sum()
    x.data *= 2  # in place: Mul saved x's array, which now holds other numbers
    with pytest.raises(RuntimeError, match=r"Mul.*'x'.*changed in place"):
        y.backward()


def test_changing_a_saved_output_or_item_assignment_is_caught():
    x = Tensor(np.array([0.5, -1.0]), requires_grad=True)
    h = x.exp()  # Exp's backward uses its own output
    h[0] = 7.0
    with pytest.raises(RuntimeError, match=r"Exp: its output, the tensor of shape \(2,\)"):
        h.backward(np.ones(2))
    g = x.exp()
    loss = (g * 3.0).sum()
    g[1] = 0.0
    with pytest.raises(RuntimeError, match=r"Mul: its input 0"):
        loss.backward()


def test_unchanged_tensors_and_changes_before_forward_pass():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    x.data = x.data + 1  # before the forward pass: fine
    y = (x * x).sum()
    y.backward()
    np.testing.assert_allclose(x.grad, [4.0, 6.0])
    x.data -= 1.0  # after backward (an optimizer step): fine, and the next pass sees it
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, [4.0 + 2.0, 6.0 + 4.0])


@pytest.mark.parametrize("data", [np.array([2**24 + 1]), [1, 2], 3, np.array([True])])
def test_requires_grad_on_integer_data_raises(data):
    with pytest.raises(TypeError, match="only float tensors can require grad"):
        Tensor(data, requires_grad=True)
    t = Tensor(data, requires_grad=True, dtype=np.float64)  # converting on purpose is allowed
    assert t.dtype == np.float64 and t.requires_grad
