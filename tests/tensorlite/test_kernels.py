"""kernels.py: every helper gives the same result through its numexpr path and its NumPy
path (float32 and float64), the thresholds and thread settings behave as documented, and
the ops that call the helpers give the same values and gradients on either path.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensorlite as tl
import tensorlite.functional as F
from tensorlite import Tensor, kernels
from tensorlite.testing import arrays, assert_gradients_match, shapes

DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 2e-6, np.float64: 1e-13}


@pytest.fixture(autouse=True)
def restore_kernel_settings():
    """Every test leaves the switch and the thresholds as it found them."""
    forced, thresholds = kernels._FORCE, dict(kernels.NUMEXPR_MIN_SIZE)
    yield
    kernels.force_numexpr(forced)
    kernels.NUMEXPR_MIN_SIZE.clear()
    kernels.NUMEXPR_MIN_SIZE.update(thresholds)


@pytest.fixture(params=[False, True], ids=["numpy", "numexpr"])
def path(request):
    """Run the test once with every helper on NumPy, once with every helper on numexpr."""
    kernels.force_numexpr(request.param)
    yield request.param
    kernels.force_numexpr(None)


def both_paths(fn):
    """fn() through NumPy, then through numexpr (each helper forced), then back to None."""
    try:
        kernels.force_numexpr(False)
        a = fn()
        kernels.force_numexpr(True)
        b = fn()
    finally:
        kernels.force_numexpr(None)
    return a, b


def assert_same(a: np.ndarray, b: np.ndarray, dtype) -> None:
    a, b = np.asarray(a), np.asarray(b)  # a 0-d input may come back as a NumPy scalar
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-3)


def float_arrays(dtype, lo=-5.0, hi=5.0, shape=None):
    return arrays(dtype=dtype, shape=shapes(max_dims=3, max_side=5) if shape is None else shape,
                  min_value=lo, max_value=hi)


# ---- each helper: numexpr path == NumPy path ----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_transcendentals_same_on_both_paths(dtype, data):
    x = data.draw(float_arrays(dtype))
    x0 = x.copy()
    for helper in (kernels.exp, kernels.tanh, kernels.sigmoid):
        a, b = both_paths(lambda h=helper: h(x))
        assert_same(a, b, dtype)
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_exp_into_an_out_buffer_same_on_both_paths(dtype, data):
    x = data.draw(float_arrays(dtype, shape=shapes(min_dims=1)))

    def run():
        buf = x.copy()
        result = kernels.exp(buf, out=buf)  # in place, as softmax uses it
        assert result is buf or np.shares_memory(result, buf)
        return buf

    a, b = both_paths(run)
    assert_same(a, b, dtype)
    np.testing.assert_allclose(a, np.exp(x), rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_extremes_same_on_both_paths(dtype):
    x = np.array([-1000.0, -80.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 80.0, 1000.0], dtype=dtype)
    with np.errstate(over="raise", invalid="raise"):
        a, b = both_paths(lambda: kernels.sigmoid(x))
    assert_same(a, b, dtype)
    assert np.all(np.isfinite(a)) and a[0] == 0.0 and a[-1] == 1.0 and a[4] == 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_fused_helpers_same_on_both_paths(dtype, data):
    shape = data.draw(shapes(max_dims=3, max_side=5))
    x = data.draw(float_arrays(dtype, shape=shape))
    dout = data.draw(float_arrays(dtype, shape=shape))
    y = np.tanh(x)
    s = 1 / (1 + np.exp(-x))
    saved = [v.copy() for v in (x, dout, y, s)]
    cases = {
        "tanh_backward": (lambda: kernels.tanh_backward(dout, y), dout * (1 - y * y)),
        "sigmoid_backward": (lambda: kernels.sigmoid_backward(dout, s), dout * s * (1 - s)),
        "relu_squared": (lambda: kernels.relu_squared(x), np.maximum(x, 0) ** 2),
        "relu_squared_backward": (lambda: kernels.relu_squared_backward(dout, x),
                                  2 * dout * np.maximum(x, 0)),
    }
    for name, (run, expected) in cases.items():
        a, b = both_paths(run)
        assert_same(a, b, dtype)
        np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-5, err_msg=name)
    for v, v0 in zip((x, dout, y, s), saved):  # the helpers return new arrays
        np.testing.assert_array_equal(v, v0)


def _adamw_reference(p, g, m, v, lr, b1, b2, eps, wd, step):
    """AdamW written out in float64, independently of kernels.py."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
    p = p * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), weight_decay=st.sampled_from([0.0, 0.1]), lr=st.sampled_from([1e-3, 0.1]))
def test_adamw_numexpr_kernel_matches_the_math(dtype, data, weight_decay, lr):
    """The numexpr twin of gpt.optim.adamw_update against AdamW in float64 (the NumPy math
    itself is checked in tests/gpt/test_optim.py, through AdamW, on both paths)."""
    shape = data.draw(shapes(min_dims=1, max_dims=2, max_side=6))
    p0 = data.draw(float_arrays(dtype, -2, 2, shape))
    grads = [data.draw(float_arrays(dtype, -2, 2, shape)) for _ in range(3)]
    hyper = {"lr": lr, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": weight_decay}

    pa, ma, va = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for step, g in enumerate(grads, start=1):
        kernels.adamw_update_numexpr(pa, g, ma, va, step=step, **hyper)  # in place
    assert pa.dtype == ma.dtype == va.dtype == dtype
    ref = (p0.astype(np.float64), np.zeros(shape), np.zeros(shape))
    for step, g in enumerate(grads, start=1):
        p, m, v = ref
        ref = _adamw_reference(p, g.astype(np.float64), m, v, lr, 0.9, 0.95, 1e-8, weight_decay,
                               step)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for got, want in zip((pa, ma, va), ref):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), v=st.integers(1, 6), c=st.integers(1, 4))
def test_scatter_add_rows_matches_add_at(dtype, data, v, c):
    n = data.draw(st.integers(0, 12))
    indices = np.array(data.draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n)),
                       dtype=np.int64)
    rows = data.draw(float_arrays(dtype, shape=(n, c)))
    start = data.draw(float_arrays(dtype, shape=(v, c)))
    got, want = start.copy(), start.copy()
    kernels.scatter_add_rows(got, indices, rows)
    np.add.at(want, indices, rows)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=RTOL[dtype])


# ---- the ops that use the helpers: same on both paths, gradients right on both ----------------
HELPER_OPS = {
    "exp": lambda t: t.exp(),
    "tanh": lambda t: t.tanh(),
    "sigmoid": lambda t: t.sigmoid(),
    "relu_squared": lambda t: F.relu_squared(t),
    "softmax": lambda t: F.softmax(t),
    "log_softmax": lambda t: F.log_softmax(t, axis=0),
    "cross_entropy": lambda t: F.cross_entropy(t.reshape(-1, t.shape[-1]),
                                               np.zeros(t.size // t.shape[-1], dtype=np.int64)),
    "attention": lambda t: F.scaled_dot_product_attention(t, t, t),
}


@pytest.mark.parametrize("name", list(HELPER_OPS))
@given(x=arrays(shape=hnp.array_shapes(min_dims=2, max_dims=2, max_side=4), away_from=0.0,
                margin=1e-3))
def test_ops_give_the_same_values_and_gradients_on_both_paths(name, x):
    fn = HELPER_OPS[name]
    u = np.random.default_rng(0).standard_normal(fn(Tensor(x)).shape)

    def run():
        t = Tensor(x.copy(), requires_grad=True)
        out = fn(t)
        out.backward(u)
        return out.data, t.grad

    (ya, ga), (yb, gb) = both_paths(run)
    np.testing.assert_allclose(ya, yb, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ga, gb, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(HELPER_OPS))
def test_gradients_match_finite_differences_on_the_numexpr_path(name, path):
    x = np.random.default_rng(1).uniform(-1.5, 1.5, (3, 4))
    assert_gradients_match(HELPER_OPS[name], x)


def test_numexpr_path_is_taken_when_forced(monkeypatch):
    calls = []
    real = kernels._ne
    monkeypatch.setattr(kernels, "_ne", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    x = np.linspace(-1, 1, 5)
    kernels.force_numexpr(True)
    kernels.exp(x), kernels.tanh_backward(x, x)
    assert len(calls) == 2
    kernels.force_numexpr(False)
    kernels.exp(x), kernels.tanh_backward(x, x)
    assert len(calls) == 2


# ---- thresholds -----------------------------------------------------------------------------------
def test_thresholds_decide_the_path():
    kernels.force_numexpr(None)
    kernels.set_numexpr_threshold("fused", 100)
    assert not kernels.use_numexpr("fused", 99)
    assert kernels.use_numexpr("fused", 100) and kernels.use_numexpr("fused", 10**6)
    kernels.set_numexpr_threshold("fused", None)  # None: never
    assert not kernels.use_numexpr("fused", 10**9)
    kernels.force_numexpr(True)  # forcing overrides the thresholds both ways
    assert kernels.use_numexpr("fused", 1)
    kernels.force_numexpr(False)
    kernels.set_numexpr_threshold("transcendental", 0)
    assert not kernels.use_numexpr("transcendental", 10**9)


def test_set_numexpr_threshold_validation():
    before = dict(kernels.NUMEXPR_MIN_SIZE)
    with pytest.raises(KeyError, match="unknown op family 'matmul'.*fused.*transcendental"):
        kernels.set_numexpr_threshold("matmul", 10)
    for bad in (-1, 2.5, "1000"):
        with pytest.raises(ValueError, match="min_size"):
            kernels.set_numexpr_threshold("fused", bad)
    assert kernels.NUMEXPR_MIN_SIZE == before  # a rejected value changes nothing
    kernels.set_numexpr_threshold("fused", 0)
    kernels.set_numexpr_threshold("fused", None)
    assert kernels.NUMEXPR_MIN_SIZE["fused"] is None


def test_every_family_has_a_threshold():
    assert set(kernels.NUMEXPR_MIN_SIZE) == {"transcendental", "fused"}
    for family, value in kernels.NUMEXPR_MIN_SIZE.items():
        assert value is None or (isinstance(value, int) and value >= 0), family


# ---- threads --------------------------------------------------------------------------------------
def test_set_num_threads_sets_numexpr_and_blas():
    before = tl.get_num_threads()
    numexpr_before = kernels.ne.get_num_threads()
    try:
        tl.set_num_threads(1)
        assert tl.get_num_threads() == 1 and kernels.ne.get_num_threads() == 1
        tl.set_num_threads(2)
        assert tl.get_num_threads() == 2 and kernels.ne.get_num_threads() == 2
        # results do not depend on the thread count
        a = np.random.default_rng(0).standard_normal((64, 64))
        tl.set_num_threads(1)
        one = (Tensor(a) @ Tensor(a)).data
        tl.set_num_threads(2)
        np.testing.assert_allclose((Tensor(a) @ Tensor(a)).data, one, rtol=1e-12)
    finally:
        tl.set_num_threads(before)
        kernels.ne.set_num_threads(numexpr_before)
    assert tl.set_num_threads is kernels.set_num_threads


@pytest.mark.parametrize("bad", [0, -2])
def test_set_num_threads_rejects_less_than_one(bad):
    with pytest.raises(ValueError, match=">= 1"):
        tl.set_num_threads(bad)


# ---- the allocator ----------------------------------------------------------------------------------
def test_tune_allocator_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(kernels, "_allocator_tuned", False)
    monkeypatch.setenv("TENSORLITE_TUNE_MALLOC", "0")
    assert kernels.tune_allocator() is False
    monkeypatch.delenv("TENSORLITE_TUNE_MALLOC")
    result = kernels.tune_allocator()
    assert isinstance(result, bool) and kernels.tune_allocator() is result  # idempotent
