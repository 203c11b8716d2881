"""Gradients of gradients, forward mode and Hessian-vector products: the API
(tensorlite.grad, Tensor.backward(create_graph=True), tensorlite.jvp, tensorlite.hvp), and
every op's second derivative and JVP checked with check_grads on hypothesis-chosen shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensorlite as tl
import tensorlite.functional as F
from tensorlite import ops
from tensorlite.autograd import Function
from tensorlite.testing import GradcheckError, arrays, broadcastable_shapes, check_grads, shapes


# ---- the API ------------------------------------------------------------------------------------
def test_grad_of_grad_to_third_order():
    x = tl.Tensor(np.array([0.5, -1.0, 2.0]), requires_grad=True)
    (g,) = tl.grad((x**4).sum(), [x], create_graph=True)
    (h,) = tl.grad(g.sum(), [x], create_graph=True)
    (t,) = tl.grad(h.sum(), [x], create_graph=True)
    (c,) = tl.grad(t.sum(), [x])
    np.testing.assert_allclose(g.data, 4 * x.data**3)
    np.testing.assert_allclose(h.data, 12 * x.data**2)
    np.testing.assert_allclose(t.data, 24 * x.data)
    np.testing.assert_allclose(c.data, [24.0, 24.0, 24.0])
    assert g.requires_grad and not c.requires_grad and x.grad is None  # .grad untouched


def test_grad_returns_zeros_for_an_unused_input_and_takes_several_outputs():
    x = tl.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    unused = tl.Tensor(np.ones((2, 2)), requires_grad=True)
    y1, y2 = x * 3.0, (x * x).sum()
    gx, gu = tl.grad([y1, y2], [x, unused], grad_outputs=[np.array([1.0, -1.0]), None])
    np.testing.assert_allclose(gx.data, [3.0 + 2.0, -3.0 + 4.0])
    np.testing.assert_array_equal(gu.data, np.zeros((2, 2)))
    assert isinstance(gx, tl.Tensor) and not gx.requires_grad


def test_grad_of_a_constant_gradient_is_zero():
    x = tl.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (g,) = tl.grad((x * 3.0).sum(), [x], create_graph=True)  # 3 everywhere: no graph left
    (h,) = tl.grad(g.sum(), [x])
    np.testing.assert_array_equal(h.data, [0.0, 0.0])


def test_grad_refuses_what_it_cannot_do():
    x = tl.Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="grad_outputs"):
        tl.grad(x * 2.0, [x])  # non-scalar output without a seed
    with pytest.raises(ValueError, match="requires_grad"):
        tl.grad((x * 2.0).sum(), [tl.Tensor(np.ones(3))])
    with pytest.raises(ValueError, match="shape"):
        tl.grad(x * 2.0, [x], grad_outputs=np.ones(4))


def test_grad_with_respect_to_an_intermediate_tensor():
    x = tl.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    h = x.exp()
    (gh,) = tl.grad((h * h).sum(), [h])
    np.testing.assert_allclose(gh.data, 2 * np.exp(x.data))


def test_backward_with_create_graph_keeps_grad_an_ndarray_and_the_graph():
    x = tl.Tensor(np.array([0.5, 1.5]), requires_grad=True)
    y = (x.tanh() * x).sum()
    y.backward(create_graph=True)
    first = x.grad.copy()
    assert isinstance(x.grad, np.ndarray)
    expected = np.tanh(x.data) + x.data * (1 - np.tanh(x.data) ** 2)
    np.testing.assert_allclose(first, expected)
    y.backward()  # the graph was kept: a second pass works and accumulates
    np.testing.assert_allclose(x.grad, 2 * expected)


def test_the_training_backward_never_touches_the_higher_order_rules(monkeypatch):
    """create_graph=False runs each op's ndarray backward only: no backward_graph, no jvp."""
    def refuse(self, *args):
        raise AssertionError(f"{type(self).__name__}: a higher-order rule ran in training")

    for op in CASES:
        monkeypatch.setattr(op, "backward_graph", refuse)
        monkeypatch.setattr(op, "jvp", refuse)
    rng = np.random.default_rng(0)
    x = tl.Tensor(rng.standard_normal((2, 3, 4)).astype(np.float32), requires_grad=True)
    w = tl.Tensor(np.ones(4, dtype=np.float32), requires_grad=True)
    h = F.rms_norm(x, w)
    a = F.scaled_dot_product_attention(h, h, h).reshape(6, 4)
    loss = F.cross_entropy(F.relu_squared(a) + a.tanh(), np.arange(6) % 4)
    loss.backward()
    assert isinstance(x.grad, np.ndarray) and x.grad.dtype == np.float32 and np.any(x.grad)
    (gw,) = tl.grad(F.rms_norm(x, w).sum(), [w])  # grad without create_graph: the same path
    assert gw.shape == (4,)


def test_default_backward_still_frees_the_graph():
    x = tl.Tensor(np.array([0.5, 1.5]), requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward()


def test_second_derivatives_keep_float32():
    rng = np.random.default_rng(0)
    x = tl.Tensor(rng.standard_normal((2, 3, 4)).astype(np.float32), requires_grad=True)
    w = tl.Tensor(rng.standard_normal(4).astype(np.float32), requires_grad=True)

    def loss(x, w):
        h = F.rms_norm(x, w)
        a = F.scaled_dot_product_attention(h, h, h)
        return F.cross_entropy(F.log_softmax(a.reshape(6, 4)), np.arange(6) % 4)

    gx, gw = tl.grad(loss(x, w), [x, w], create_graph=True)
    hx, hw = tl.grad((gx * gx).sum() + (gw * gw).sum(), [x, w])
    assert {t.dtype for t in (gx, gw, hx, hw)} == {np.dtype(np.float32)}
    fx, fw = tl.grad(loss(x, w), [x, w])  # the training path gives the same first gradients
    np.testing.assert_allclose(gx.data, fx.data, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw.data, fw.data, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [
    lambda h: F.scaled_dot_product_attention(h, h, h),
    lambda h: h * h / (h + 3.0),
    lambda h: tl.concatenate([h, h], axis=-1) @ tl.stack([h, h], axis=0).reshape(-1, 3),
], ids=["attention(h, h, h)", "h * h / (h + 3)", "concatenate-stack"])
def test_one_tensor_in_several_places(fn):
    check_grads(fn, np.random.default_rng(0).standard_normal((3, 3)))


def test_create_graph_records_even_inside_no_grad():
    x = tl.Tensor(np.array([0.5, 1.5]), requires_grad=True)
    y = (x**3).sum()
    with tl.no_grad():
        (g,) = tl.grad(y, [x], create_graph=True)
    assert g.requires_grad


def test_hvp_matches_the_hessian():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 3))
    A = a + a.T  # f(x) = x^T A x / 2 + sum(x^3): H = A + diag(6x)
    x, v = rng.standard_normal(3), rng.standard_normal(3)
    (hv,) = tl.hvp(lambda t: (t @ (tl.Tensor(A) @ t)) * 0.5 + (t**3).sum(), [x], [v])
    np.testing.assert_allclose(hv.data, (A + np.diag(6 * x)) @ v)


def test_jvp_matches_the_jacobian_and_passes_through_several_outputs():
    rng = np.random.default_rng(1)
    w, x, v = rng.standard_normal((2, 3)), rng.standard_normal(3), rng.standard_normal(3)
    out, tangent = tl.jvp(lambda t: (tl.Tensor(w) @ t).tanh(), [x], [v])
    jac = (1 - np.tanh(w @ x) ** 2)[:, None] * w
    np.testing.assert_allclose(out.data, np.tanh(w @ x))
    np.testing.assert_allclose(tangent.data, jac @ v)
    _, tangents = tl.jvp(lambda a, b: (a * b, a.sum()), [x, x], [v, np.zeros(3)])
    np.testing.assert_allclose(tangents[0].data, v * x)
    np.testing.assert_allclose(tangents[1].data, v.sum())


def test_jvp_leaves_no_tangent_behind():
    x = tl.Tensor(np.array([1.0, 2.0]))
    y, _ = tl.jvp(lambda t: t * 2.0, [x], [np.ones(2)])
    _, ty = tl.jvp(lambda t: t * y, [x], [np.ones(2)])  # y is a constant here
    np.testing.assert_allclose(ty.data, y.data)


def test_forward_over_reverse_is_the_hvp():
    x = tl.Tensor(np.array([0.3, -0.7]), requires_grad=True)
    v = np.array([1.0, 2.0])

    def gradient(t):
        return tl.grad((t.exp() * t).sum(), [t], create_graph=True)[0]

    _, hv = tl.jvp(gradient, [x], [v])
    np.testing.assert_allclose(hv.data, (2 + x.data) * np.exp(x.data) * v)


# ---- a wrong rule is caught ---------------------------------------------------------------------
class CubeWrongSecond(Function):
    """out = x**3.  dx = dout * 3 x**2  (right), but backward_graph treats one x as a
    constant (x.data): the right value, half the second derivative"""

    def forward(self, x):
        self.x = x
        return x**3

    def backward(self, dout):
        return dout * 3 * self.x**2

    def backward_graph(self, dout):
        (x,) = self.parents
        return dout * 3.0 * x * x.data

    def jvp(self, dx):
        return dx * 3 * self.x**2


class CubeWrongJvp(CubeWrongSecond):
    """The same op with a right backward_graph and a JVP that forgets the factor 3."""

    def backward_graph(self, dout):
        return dout * 3.0 * self.parents[0] ** 2

    def jvp(self, dx):
        return dx * self.x**2


def test_a_wrong_second_derivative_is_caught():
    x = np.array([0.5, -1.0, 2.0])
    check_grads(CubeWrongSecond.apply, x, order=1)  # first order is right
    with pytest.raises(GradcheckError, match="reverse mode, order 2"):
        check_grads(CubeWrongSecond.apply, x, order=2, modes=("rev",))


def test_a_wrong_jvp_is_caught():
    x = np.array([0.5, -1.0, 2.0])
    check_grads(CubeWrongJvp.apply, x, modes=("rev",))  # reverse mode is right
    with pytest.raises(GradcheckError, match=r"forward mode, order 1 .* output element"):
        check_grads(CubeWrongJvp.apply, x, modes=("fwd",))


class CubeWrongGraphValue(CubeWrongJvp):
    """backward_graph consistent with its own derivative, but not the gradient."""

    def backward_graph(self, dout):
        return dout * 2.0 * self.parents[0] ** 2


def test_a_backward_graph_that_disagrees_with_backward_is_caught():
    with pytest.raises(GradcheckError, match="create_graph=True"):
        check_grads(CubeWrongGraphValue.apply, np.array([0.5, -1.0]), modes=("rev",))


def test_check_grads_rejects_unknown_modes():
    with pytest.raises(ValueError, match="modes"):
        check_grads(lambda t: t * 2.0, np.ones(2), modes=("reverse",))


# ---- every op, second order, both modes, hypothesis-chosen shapes ---------------------------
def _pair(data, **kwargs):
    sx, sy = data.draw(broadcastable_shapes(2))
    return data.draw(arrays(shape=sx)), data.draw(arrays(shape=sy, **kwargs))


def _one(data, min_dims=0, **kwargs):
    return data.draw(arrays(shape=shapes(min_dims=min_dims), **kwargs))


def _distinct(data, min_dims=0):
    """Values on a grid of 1/8, all different: max has no ties, finite differences no kinks."""
    shape = data.draw(shapes(min_dims=min_dims, max_side=3))
    grid = st.integers(-40, 40).map(lambda i: i / 8)
    return data.draw(hnp.arrays(np.float64, shape, elements=grid, unique=True))


def _reduction(data, method, distinct=False):
    x = _distinct(data) if distinct else _one(data)
    axis = data.draw(st.sampled_from([None, 0, -1, (0, -1)]) if x.ndim else st.just(None))
    keepdims = data.draw(st.booleans())
    return (lambda t: getattr(t, method)(axis=axis, keepdims=keepdims)), [x]


def _matmul(data):
    m, k, n, b = (data.draw(st.integers(1, 3)) for _ in range(4))
    sx, sy = data.draw(st.sampled_from([
        ((m, k), (k, n)), ((b, m, k), (k, n)), ((k,), (k, n)), ((m, k), (k,)),
        ((k,), (k,)), ((b, m, k), (b, k, n)), ((k,), (b, k, n)),
    ]))
    return (lambda x, y: x @ y), [data.draw(arrays(shape=sx)), data.draw(arrays(shape=sy))]


def _transpose(data):
    x = data.draw(arrays(shape=shapes(min_dims=3, max_dims=3)))
    axes = data.draw(st.permutations(range(3)))
    return (lambda t: t.transpose(axes)), [x]


def _broadcast_to(data):
    x = _one(data)
    shape = (2, *(3 if n == 1 else n for n in x.shape))
    return (lambda t: t.broadcast_to(shape)), [x]


def _getitem(data):
    x = _one(data, min_dims=1)
    n = x.shape[0]
    index = data.draw(st.sampled_from([
        slice(1, None), (Ellipsis, 0), [0] * 2 + [n - 1], (slice(None, None, 2), None),
    ]))
    return (lambda t: t[index]), [x]


def _scatter_add(data):
    n = data.draw(st.integers(1, 3))
    index = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4)))
    x = data.draw(arrays(shape=(len(index), 2)))
    return (lambda t: ops.ScatterAdd.apply(t, index=index, shape=(n, 2))), [x]


def _join(data, stack):
    shape = data.draw(shapes(min_dims=1))
    axis = data.draw(st.integers(0, len(shape) - (0 if stack else 1)))
    other = shape if stack else shape[:axis] + (data.draw(st.integers(1, 3)),) + shape[axis + 1:]
    xs = [data.draw(arrays(shape=shape)), data.draw(arrays(shape=other))]
    if stack:
        return (lambda a, b: tl.stack([a, b], axis=axis)), xs
    return (lambda a, b: tl.concatenate([a, b], axis=axis)), xs


def _where(data):
    sc, sa, sb = data.draw(broadcastable_shapes(3))
    cond = data.draw(hnp.arrays(np.bool_, sc))
    return (lambda a, b: tl.where(cond, a, b)), [data.draw(arrays(shape=sa)),
                                                 data.draw(arrays(shape=sb))]


def _along_axis(data, fn):
    x = _one(data, min_dims=1)
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    return (lambda t: fn(t, axis=axis)), [x]


def _cross_entropy(data):
    n, v = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    targets = np.array(data.draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n)))
    return (lambda t: F.cross_entropy(t, targets)), [data.draw(arrays(shape=(n, v)))]


def _rms_norm(data):
    x = _one(data, min_dims=1)
    if data.draw(st.booleans()):
        return (lambda t, w: F.rms_norm(t, w)), [x, data.draw(arrays(shape=x.shape[-1:]))]
    return F.rms_norm, [x]


def _layer_norm(data):
    """Rows of 2..4 distinct values on a grid of 1/8: a row's variance is never near 0, where
    r = 1/sqrt(var + eps) makes finite differences of the second order meaningless."""
    shape = data.draw(shapes(min_dims=1, max_side=3)) [:-1] + (data.draw(st.integers(2, 4)),)
    grid = st.integers(-40, 40).map(lambda i: i / 8)
    x = data.draw(hnp.arrays(np.float64, shape, elements=grid, unique=True))
    w, b = (data.draw(arrays(shape=shape[-1:])) for _ in range(2))
    return (lambda t, s, c: F.layer_norm(t, s, c)), [x, w, b]


def _embedding(data):
    v, c = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    idx = data.draw(hnp.arrays(np.int64, shapes(max_dims=2), elements=st.integers(0, v - 1)))
    return (lambda w: F.embedding(idx, w)), [data.draw(arrays(shape=(v, c)))]


def _attention(data):
    b, tk, hd, hv = (data.draw(st.integers(1, 3)) for _ in range(4))
    causal = data.draw(st.booleans())
    tq = data.draw(st.integers(1, tk if causal else 3))
    xs = [data.draw(arrays(shape=s)) for s in ((b, tq, hd), (b, tk, hd), (b, tk, hv))]
    return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal)), xs


def _causal_self_attention(data):
    n_head, hd = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    shape = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), 3 * n_head * hd)
    return (lambda t: F.causal_self_attention(t, n_head)), [data.draw(arrays(shape=shape))]


def _dropout(data):
    return (lambda t: F.dropout(t, 0.3, rng=np.random.default_rng(0))), [_one(data)]


def _pow(data):
    p = data.draw(st.sampled_from([0, 1, 2, 3, 0.5, -1.5]))
    return (lambda t: t**p), [_one(data, min_value=0.5)]


def _unary(method, **kwargs):
    return lambda data: ((lambda t: getattr(t, method)()), [_one(data, **kwargs)])


CASES = {
    ops.Add: lambda d: ((lambda x, y: x + y), list(_pair(d))),
    ops.Sub: lambda d: ((lambda x, y: x - y), list(_pair(d))),
    ops.Mul: lambda d: ((lambda x, y: x * y), list(_pair(d))),
    ops.Div: lambda d: ((lambda x, y: x / y), list(_pair(d, min_value=0.5))),
    ops.Neg: lambda d: ((lambda x: -x), [_one(d)]),
    ops.Pow: _pow,
    ops.MatMul: _matmul,
    ops.Exp: _unary("exp"),
    ops.Log: _unary("log", min_value=0.5),
    ops.Sqrt: _unary("sqrt", min_value=0.5),
    ops.Tanh: _unary("tanh"),
    ops.Sigmoid: _unary("sigmoid"),
    ops.Relu: _unary("relu", away_from=0.0),
    ops.Sum: lambda d: _reduction(d, "sum"),
    ops.Mean: lambda d: _reduction(d, "mean"),
    ops.Max: lambda d: _reduction(d, "max", distinct=True),
    ops.Reshape: lambda d: ((lambda x: x.reshape(x.shape[::-1])), [_one(d)]),
    ops.Transpose: _transpose,
    ops.BroadcastTo: _broadcast_to,
    ops.GetItem: _getitem,
    ops.ScatterAdd: _scatter_add,
    ops.Concatenate: lambda d: _join(d, stack=False),
    ops.Stack: lambda d: _join(d, stack=True),
    ops.Where: _where,
    F.Softmax: lambda d: _along_axis(d, F.softmax),
    F.LogSoftmax: lambda d: _along_axis(d, F.log_softmax),
    F.CrossEntropy: _cross_entropy,
    F.RMSNorm: _rms_norm,
    F.LayerNorm: _layer_norm,
    F.GELU: lambda d: (F.gelu, [_one(d, min_value=-4, max_value=4)]),
    F.Embedding: _embedding,
    F.ScaledDotProductAttention: _attention,
    F.CausalSelfAttention: _causal_self_attention,
    F.ReluSquared: lambda d: (F.relu_squared, [_one(d, away_from=0.0)]),
    F.Dropout: _dropout,
}


def _function_classes(module) -> set:
    return {c for c in vars(module).values()
            if isinstance(c, type) and issubclass(c, Function) and c.__module__ == module.__name__}


def test_every_op_has_a_second_order_and_forward_mode_case():
    assert _function_classes(ops) | _function_classes(F) == set(CASES)


@pytest.mark.parametrize("op", list(CASES), ids=[c.__name__ for c in CASES])
@given(data=st.data())
def test_check_grads_order_2_both_modes(op, data):
    fn, inputs = CASES[op](data)
    check_grads(fn, *inputs, order=2, modes=("rev", "fwd"))


def test_grad_hands_back_arrays_that_share_memory_with_nothing():
    # tl.grad keeps a gradient buffer that backward made fresh (no copy) and copies the rest:
    # a gradient passed through unchanged (Add gives both inputs dout itself), or a view
    rng = np.random.default_rng(0)
    a, b, w = (tl.Tensor(rng.standard_normal(s), requires_grad=True)
               for s in [(3, 4), (3, 4), (4, 2)])
    h = a + b  # dh reaches a and b as one and the same array
    y = h @ w  # dw = h^T dy: a fresh array
    out = (y * y).sum() + h.reshape(12)[::2].sum()  # a strided view in the graph too
    ga, gb, gw = tl.grad(out, [a, b, w])
    arrays = [ga.data, gb.data, gw.data]
    others = [a.data, b.data, w.data, h.data, y.data]
    for i, g in enumerate(arrays):
        assert g.base is None and g.flags.writeable
        assert not any(np.shares_memory(g, o) for o in others)
        assert not any(np.shares_memory(g, o) for o in arrays[i + 1:])
    want = 2 * y.data @ w.data.T + (np.arange(12) % 2 == 0).reshape(3, 4)
    np.testing.assert_allclose(ga.data, want)
    np.testing.assert_allclose(gb.data, want)
    np.testing.assert_allclose(gw.data, h.data.T @ (2 * y.data))


class _OneArrayForBoth(Function):
    """out = 2 (x + y): a backward that hands one and the same fresh array to both inputs."""

    def forward(self, x, y):
        return 2 * (x + y)

    def backward(self, dout):
        g = 2 * dout
        return g, g


@pytest.mark.parametrize("how", ["backward", "grad"])
def test_one_array_handed_to_two_inputs_is_never_added_into_in_place(how):
    # a's gradient gets more added to it (a is used twice); b's must not change with it
    a, b = (tl.Tensor(np.full(3, v), requires_grad=True) for v in (1.0, 2.0))
    out = (_OneArrayForBoth.apply(a, b) + a * a).sum()
    if how == "backward":
        out.backward()
        ga, gb = a.grad, b.grad
    else:
        ga, gb = (g.data for g in tl.grad(out, [a, b]))
    np.testing.assert_array_equal(ga, 2 + 2 * a.data)
    np.testing.assert_array_equal(gb, np.full(3, 2.0))
    assert not np.shares_memory(ga, gb)
