"""The fused ops of tensorlite.functional, each checked against its twin composed from
primitive ops (values and gradients on the same random cotangent) and against central
finite differences in float64. The composed twins below are the definitions: short,
obviously right, and slow.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import tensorlite as tl
import tensorlite.functional as F
from tensorlite import Tensor
from tensorlite.testing import arrays, assert_gradients_match, shapes


# ---- the composed twins (primitive ops only) ----------------------------------------------------
def softmax_composed(x, axis=-1):
    e = x.exp()
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax_composed(x, axis=-1):
    return x - x.exp().sum(axis=axis, keepdims=True).log()


def cross_entropy_composed(logits, targets):
    rows = np.arange(logits.shape[0])
    return -(log_softmax_composed(logits, axis=1)[rows, targets]).mean()


def rms_norm_composed(x, weight=None, eps=1e-5):
    y = x / ((x * x).mean(axis=-1, keepdims=True) + eps).sqrt()
    return y if weight is None else y * weight


def layer_norm_composed(x, weight, bias, eps=1e-5):
    xc = x - x.mean(axis=-1, keepdims=True)
    return xc / ((xc * xc).mean(axis=-1, keepdims=True) + eps).sqrt() * weight + bias


def gelu_composed(x):
    return x * 0.5 * (((x + x * x * x * 0.044715) * math.sqrt(2 / math.pi)).tanh() + 1.0)


def embedding_composed(indices, weight):
    return weight[np.asarray(indices)]


def attention_composed(q, k, v, causal=True):
    tq, tk = q.shape[-2], k.shape[-2]
    scores = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (..., Tq, Tk)
    if causal:  # query i sits at position i + (Tk - Tq) and sees keys up to there
        visible = np.arange(tk)[None, :] <= np.arange(tq)[:, None] + (tk - tq)
        scores = tl.where(visible, scores, -np.inf)
    return softmax_composed(scores, axis=-1) @ v


def relu_squared_composed(x):
    return x.relu() ** 2


# ---- the one helper: fused vs composed vs finite differences ----------------------------------
def check_fused(fused, composed, *inputs, float32: bool = True) -> None:
    xs = [np.array(x, dtype=np.float64) for x in inputs]
    before = [x.copy() for x in xs]
    a = [Tensor(x, requires_grad=True) for x in xs]
    b = [Tensor(x.copy(), requires_grad=True) for x in xs]
    out_fused, out_composed = fused(*a), composed(*b)
    assert out_fused.dtype == np.float64 and out_fused.shape == out_composed.shape
    np.testing.assert_allclose(out_fused.data, out_composed.data, rtol=1e-10, atol=1e-12)
    u = np.random.default_rng(5).standard_normal(out_fused.shape)
    out_fused.backward(u)
    out_composed.backward(u)
    for i, (ta, tb) in enumerate(zip(a, b)):
        assert ta.grad.dtype == np.float64
        np.testing.assert_allclose(ta.grad, tb.grad, rtol=1e-9, atol=1e-11,
                                   err_msg=f"gradient of input {i}: fused vs composed")
    for x, x0 in zip(xs, before):
        np.testing.assert_array_equal(x, x0, err_msg="a fused op wrote into its input")
    assert_gradients_match(fused, *before)
    if float32:
        out32 = fused(*(Tensor(x.astype(np.float32), requires_grad=True) for x in before))
        assert out32.dtype == np.float32
        np.testing.assert_allclose(out32.data, out_fused.data, rtol=1e-4, atol=1e-5)


@st.composite
def shape_and_axis(draw):
    shape = draw(shapes(min_dims=1))
    return shape, draw(st.integers(-len(shape), len(shape) - 1))


# ---- softmax, log_softmax ------------------------------------------------------------------------
@given(data=st.data())
def test_softmax(data):
    shape, axis = data.draw(shape_and_axis())
    x = data.draw(arrays(shape=shape, min_value=-3, max_value=3))
    check_fused(lambda t: F.softmax(t, axis=axis), lambda t: softmax_composed(t, axis), x)


@given(data=st.data())
def test_log_softmax(data):
    shape, axis = data.draw(shape_and_axis())
    x = data.draw(arrays(shape=shape, min_value=-3, max_value=3))
    check_fused(lambda t: F.log_softmax(t, axis=axis), lambda t: log_softmax_composed(t, axis), x)


def test_softmax_and_log_softmax_default_to_the_last_axis():
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3)))
    np.testing.assert_allclose(F.softmax(x).data.sum(axis=-1), 1.0)
    np.testing.assert_allclose(F.log_softmax(x).data, np.log(F.softmax(x).data))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(x=arrays(shape=(2, 5), min_value=-3, max_value=3), big=st.sampled_from([1e3, 1e4, 3e4]))
def test_log_softmax_is_stable_for_huge_logits(dtype, x, big):
    """Logits of +-1e4: the composed version overflows exp; the fused one must not."""
    logits = (x * big).astype(dtype)
    t = Tensor(logits, requires_grad=True)
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        y = F.log_softmax(t)
        y.backward(np.ones_like(logits))
        s = F.softmax(Tensor(logits))
    assert y.dtype == dtype and np.all(np.isfinite(y.data)) and np.all(np.isfinite(t.grad))
    x64 = logits.astype(np.float64)
    shifted = x64 - x64.max(axis=-1, keepdims=True)
    expected = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(y.data, expected, rtol=1e-6, atol=1e-6 * big)
    np.testing.assert_allclose(s.data.sum(axis=-1), 1.0, rtol=1e-5)
    assert np.all(y.data <= 0)


def test_log_softmax_is_shift_invariant():
    x = np.random.default_rng(0).standard_normal((3, 4))
    a = F.log_softmax(Tensor(x)).data
    b = F.log_softmax(Tensor(x + 1e4)).data
    np.testing.assert_allclose(a, b, atol=1e-9)


# ---- cross_entropy --------------------------------------------------------------------------------
@given(data=st.data(), n=st.integers(1, 5), v=st.integers(1, 6))
def test_cross_entropy(data, n, v):
    logits = data.draw(arrays(shape=(n, v), min_value=-3, max_value=3))
    targets = np.array(data.draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n)))
    check_fused(lambda t: F.cross_entropy(t, targets),
                lambda t: cross_entropy_composed(t, targets), logits)


def test_cross_entropy_value_and_huge_logits():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    loss = F.cross_entropy(Tensor(logits), np.array([0, 2]))
    expected = np.mean([-np.log(np.exp(2) / np.exp(logits[0]).sum()), np.log(3.0)])
    assert loss.shape == () and loss.item() == pytest.approx(expected, rel=1e-12)
    big = Tensor(np.array([[1e4, 0.0], [0.0, 1e4]], dtype=np.float32), requires_grad=True)
    out = F.cross_entropy(big, np.array([1, 1]))
    assert out.dtype == np.float32 and out.item() == pytest.approx(5e3, rel=1e-6)
    out.backward()
    assert np.all(np.isfinite(big.grad))


def test_cross_entropy_errors():
    logits = Tensor(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2,\)"):
        F.cross_entropy(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        F.cross_entropy(logits, np.array([0, 1, 4]))
    with pytest.raises(TypeError, match="integers"):
        F.cross_entropy(logits, np.array([0.0, 1.5, 2.0]))


# ---- rms_norm --------------------------------------------------------------------------------------
@given(data=st.data(), with_weight=st.booleans(), eps=st.sampled_from([1e-5, 1e-2]))
def test_rms_norm(data, with_weight, eps):
    shape = data.draw(shapes(min_dims=1))
    x = data.draw(arrays(shape=shape, away_from=0.0, margin=0.1))
    if with_weight:
        w = data.draw(arrays(shape=shape[-1:]))
        check_fused(lambda t, s: F.rms_norm(t, s, eps=eps),
                    lambda t, s: rms_norm_composed(t, s, eps=eps), x, w)
    else:
        check_fused(lambda t: F.rms_norm(t, eps=eps), lambda t: rms_norm_composed(t, eps=eps), x)


def test_rms_norm_output_has_unit_rms():
    x = np.random.default_rng(0).standard_normal((4, 16)) * 7.0
    y = F.rms_norm(Tensor(x), eps=0.0).data
    np.testing.assert_allclose(np.sqrt((y * y).mean(axis=-1)), 1.0, rtol=1e-12)


# ---- layer_norm, gelu ------------------------------------------------------------------------------
@given(data=st.data(), eps=st.sampled_from([1e-5, 1e-2]))
def test_layer_norm(data, eps):
    shape = data.draw(shapes(min_dims=1))[:-1] + (data.draw(st.integers(2, 5)),)
    x = data.draw(arrays(shape=shape))
    # rows of (nearly) equal values have var ~ 0: finite differences of r = 1/sqrt(var + eps)
    # then need a step far below what float64 can resolve, so such rows are not drawn
    assume(np.all(x.std(axis=-1) > 0.1))
    w, b = (data.draw(arrays(shape=shape[-1:])) for _ in range(2))
    check_fused(lambda t, s, c: F.layer_norm(t, s, c, eps=eps),
                lambda t, s, c: layer_norm_composed(t, s, c, eps=eps), x, w, b)


def test_layer_norm_output_has_zero_mean_and_unit_variance_then_weight_and_bias():
    x = np.random.default_rng(0).standard_normal((4, 16)) * 7.0 + 3.0
    y = F.layer_norm(Tensor(x), Tensor(np.ones(16)), Tensor(np.zeros(16)), eps=0.0).data
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=1e-12)
    w, b = np.arange(16.0), np.full(16, 0.5)
    z = F.layer_norm(Tensor(x), Tensor(w), Tensor(b), eps=0.0).data
    np.testing.assert_allclose(z, y * w + b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"\(16,\).*\(4, 16\)"):
        F.layer_norm(Tensor(x), Tensor(np.ones((4, 16))), Tensor(np.zeros(16)))


@given(x=arrays(shape=shapes(), min_value=-6, max_value=6))
def test_gelu(x):
    check_fused(F.gelu, gelu_composed, x)


def test_gelu_is_x_phi_x_to_a_thousandth():
    from math import erf

    x = np.linspace(-5, 5, 101)
    exact = np.array([v * 0.5 * (1 + erf(v / math.sqrt(2))) for v in x])  # x * Phi(x)
    np.testing.assert_allclose(F.gelu(Tensor(x)).data, exact, atol=1e-3)
    assert F.gelu(Tensor(np.array([0.0]))).data[0] == 0.0


# ---- embedding -------------------------------------------------------------------------------------
@given(data=st.data(), v=st.integers(1, 5), c=st.integers(1, 4))
def test_embedding(data, v, c):
    weight = data.draw(arrays(shape=(v, c)))
    index_shape = data.draw(shapes(min_dims=0, max_dims=2, max_side=6))
    indices = np.array(data.draw(st.lists(st.integers(0, v - 1), min_size=int(np.prod(index_shape)),
                                          max_size=int(np.prod(index_shape))))).reshape(index_shape)
    check_fused(lambda w: F.embedding(indices, w), lambda w: embedding_composed(indices, w), weight)


def test_embedding_repeated_indices_accumulate():
    weight = Tensor(np.zeros((4, 2)), requires_grad=True)
    indices = np.array([[3, 1, 3], [3, 0, 1]])
    out = F.embedding(indices, weight)
    assert out.shape == (2, 3, 2)
    dout = np.arange(12.0).reshape(2, 3, 2)
    out.backward(dout)
    expected = np.zeros((4, 2))
    for n, i in enumerate(indices.ravel()):
        expected[i] += dout.reshape(-1, 2)[n]
    np.testing.assert_array_equal(weight.grad, expected)
    np.testing.assert_array_equal(weight.grad[2], [0.0, 0.0])


def test_embedding_errors():
    w = Tensor(np.zeros((4, 2)))
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        F.embedding(np.array([4]), w)
    with pytest.raises(TypeError, match="integers"):
        F.embedding(np.array([1.5]), w)
    with pytest.raises(TypeError, match="integers"):
        F.cross_entropy(Tensor(np.zeros((2, 4))), np.array([1.0, np.nan]))
    # ids in a Tensor are float32 (Tensor's rule for lists): whole numbers are accepted
    np.testing.assert_array_equal(F.embedding(Tensor([3, 0]), w).data, w.data[[3, 0]])
    with pytest.raises(ValueError, match=r"\(4, 2, 1\)"):
        F.embedding(np.array([0]), Tensor(np.zeros((4, 2, 1))))


# ---- scaled_dot_product_attention --------------------------------------------------------------
@st.composite
def attention_shapes(draw, causal: bool):
    batch = draw(shapes(min_dims=0, max_dims=2, max_side=2))
    tq = draw(st.integers(1, 4))
    tk = tq + draw(st.integers(0, 3)) if causal else draw(st.integers(1, 4))  # Tq <= Tk (KV cache)
    hd, hv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return batch + (tq, hd), batch + (tk, hd), batch + (tk, hv)


@pytest.mark.parametrize("causal", [True, False])
@given(data=st.data())
def test_scaled_dot_product_attention(causal, data):
    q_shape, k_shape, v_shape = data.draw(attention_shapes(causal))
    q, k, v = (data.draw(arrays(shape=s)) for s in (q_shape, k_shape, v_shape))
    check_fused(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, causal=causal),
                lambda a, b, c: attention_composed(a, b, c, causal=causal), q, k, v)


def causal_self_attention_composed(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    heads = qkv.reshape(B, T, 3, n_head, C // n_head).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
    y = attention_composed(heads[0], heads[1], heads[2], causal=True)  # (B, H, T, hd)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C)


@given(data=st.data(), n_head=st.integers(1, 3), hd=st.integers(1, 3))
def test_causal_self_attention(data, n_head, hd):
    B, T = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5))
    qkv = data.draw(arrays(shape=(B, T, 3 * n_head * hd)))
    check_fused(lambda x: F.causal_self_attention(x, n_head),
                lambda x: causal_self_attention_composed(x, n_head), qkv)


def test_causal_self_attention_checks_the_shape():
    with pytest.raises(ValueError, match=r"qkv must be \(B, T, 3C\) with C divisible by n_head=2"):
        F.causal_self_attention(np.zeros((1, 2, 9)), 2)


@pytest.mark.parametrize("tq, tk", [(3, 3), (1, 5), (2, 6)])
def test_attention_causal_offset_fixed_shapes(tq, tk):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, tq, 3)), rng.standard_normal((2, tk, 3)), rng.standard_normal((2, tk, 2))
    check_fused(lambda a, b, c: F.scaled_dot_product_attention(a, b, c),
                lambda a, b, c: attention_composed(a, b, c), q, k, v)


@given(data=st.data(), t=st.integers(2, 6))
def test_attention_kv_cache_rows_match_full_causal_attention(data, t):
    """The last Tq queries against all T keys give the last Tq rows of full causal attention."""
    tq = data.draw(st.integers(1, t))
    q, k, v = (data.draw(arrays(shape=(2, t, 3))) for _ in range(3))
    full = F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), causal=True).data
    tail = F.scaled_dot_product_attention(Tensor(q[:, t - tq:]), Tensor(k), Tensor(v), causal=True)
    np.testing.assert_allclose(tail.data, full[:, t - tq:], rtol=1e-12, atol=1e-14)


def test_attention_causal_first_query_sees_only_the_first_key():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((4, 2)), rng.standard_normal((4, 2)), rng.standard_normal((4, 3))
    out = F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v)).data
    np.testing.assert_allclose(out[0], v[0], rtol=1e-12)
    scale_check = F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), causal=False).data
    s = q @ k.T / math.sqrt(2)
    p = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    np.testing.assert_allclose(scale_check, p @ v, rtol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_with_broadcast_batch_dims(causal):
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 2))
    check_fused(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, causal=causal),
                lambda a, b, c: attention_composed(a, b, c, causal=causal), q, k, v)


def test_attention_shape_errors_name_the_shapes():
    q, k, v = Tensor(np.zeros((2, 3))), Tensor(np.zeros((4, 5))), Tensor(np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
        F.scaled_dot_product_attention(q, k, v)


# ---- relu_squared -----------------------------------------------------------------------------------
@given(x=arrays(away_from=0.0, margin=1e-3))
def test_relu_squared(x):
    check_fused(F.relu_squared, relu_squared_composed, x)


# ---- dropout ----------------------------------------------------------------------------------------
def test_dropout_eval_and_p0_are_the_identity():
    x = Tensor(np.random.default_rng(0).standard_normal((5, 4)), requires_grad=True)
    for out in (F.dropout(x, 0.5, training=False), F.dropout(x, 0.0, training=True)):
        np.testing.assert_array_equal(out.data, x.data)
    F.dropout(x, 0.5, training=False).sum().backward()
    np.testing.assert_array_equal(x.grad, np.ones((5, 4)))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_train_zeroes_a_fraction_p_and_keeps_the_expectation(p):
    n = 200_000
    x = Tensor(np.ones(n))
    y = F.dropout(x, p, training=True, rng=np.random.default_rng(0)).data
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1.0 / (1.0 - p), rtol=1e-12)
    # binomial: the std of the kept fraction is sqrt(p(1-p)/n) < 1.2e-3; allow 5 of them
    assert abs(kept.mean() - (1 - p)) < 6e-3
    assert abs(y.mean() - 1.0) < 6e-3 / (1 - p)


@given(x=arrays(shape=(6, 5)), p=st.sampled_from([0.2, 0.5]), seed=st.integers(0, 100))
def test_dropout_gradient_uses_the_same_mask(x, p, seed):
    t = Tensor(x, requires_grad=True)
    y = F.dropout(t, p, training=True, rng=np.random.default_rng(seed))
    u = np.random.default_rng(1).standard_normal(x.shape)
    y.backward(u)
    mask = F.dropout(Tensor(np.ones_like(x)), p, training=True, rng=np.random.default_rng(seed)).data
    np.testing.assert_allclose(y.data, x * mask, rtol=1e-12)
    np.testing.assert_allclose(t.grad, u * mask, rtol=1e-12)
    # a fixed seed makes dropout a fixed linear map: finite differences must agree with it
    assert_gradients_match(lambda s: F.dropout(s, p, True, np.random.default_rng(seed)), x)


def test_dropout_keeps_dtype_and_checks_p():
    x = Tensor(np.ones((3, 3), dtype=np.float32))
    assert F.dropout(x, 0.5, True, np.random.default_rng(0)).dtype == np.float32
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            F.dropout(x, bad, True)


def test_causal_attention_needs_no_more_queries_than_keys():
    q, kv = Tensor(np.zeros((3, 4))), Tensor(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="3 queries but only 2 keys"):
        F.scaled_dot_product_attention(q, kv, kv, causal=True)
    assert F.scaled_dot_product_attention(q, kv, kv, causal=False).shape == (3, 4)


def test_rms_norm_weight_shape_is_checked_up_front():
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        F.rms_norm(Tensor(np.ones((2, 4))), Tensor(np.ones((2, 4))))
