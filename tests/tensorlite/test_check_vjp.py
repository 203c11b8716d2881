"""check_vjp and check_jvp: hand-written gradients of plain NumPy functions, verified by a
hypothesis search. Right ones pass; wrong ones are caught, shrunk, and the failure names the
argument, the element, the expected and the got value."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

from tensorlite.testing import GradcheckError, check_jvp, check_vjp

_spec = importlib.util.spec_from_file_location(
    "attention_backward_bug",
    Path(__file__).resolve().parents[2] / "examples" / "attention_backward_bug.py",
)
attn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(attn)


def test_the_right_attention_backward_passes():
    check_vjp(attn.attention, attn.attention_backward, attn.SHAPES)


def test_a_q_only_attention_backward_is_caught_and_shrunk():
    with pytest.raises(GradcheckError) as e:
        check_vjp(attn.attention, attn.attention_backward_q_only, attn.SHAPES)
    message = str(e.value)
    # shrunk to one position and one feature: there P = 1, so dk = 0 and dv = dout
    assert message.startswith("check_vjp: argument 2 (shape (1, 1)), element (0, 0)")
    expected, got = re.search(r"expected (\S+) \(finite differences\), got (\S+)", message).groups()
    assert float(got) == 0.0 and float(expected) != 0.0
    assert "argument 0 = " in message and "dout = " in message


def test_a_missing_dk_needs_two_positions_and_is_found():
    def no_dk(dout, q, k, v):
        dq, _, dv = attn.attention_backward(dout, q, k, v)
        return dq, np.zeros_like(k), dv

    with pytest.raises(GradcheckError, match=r"argument 1 \(shape \(2, 1\)\)"):
        check_vjp(attn.attention, no_dk, attn.SHAPES)


def test_a_transposed_weight_in_a_linear_backward_is_caught():
    def linear(x, w):
        return x @ w  # (N, C) @ (C, C)

    def wrong(dout, x, w):
        return dout @ w, x.T @ dout  # dx should use w.T; right whenever w is symmetric

    def right(dout, x, w):
        return dout @ w.T, x.T @ dout

    check_vjp(linear, right, [("N", "C"), ("C", "C")])
    with pytest.raises(GradcheckError, match="argument 0"):
        check_vjp(linear, wrong, [("N", "C"), ("C", "C")])


def test_one_input_and_fixed_sizes():
    check_vjp(np.tanh, lambda dout, x: dout * (1 - np.tanh(x) ** 2), [(3, "N")])
    with pytest.raises(GradcheckError, match="argument 0"):
        check_vjp(np.tanh, lambda dout, x: dout * (1 - np.tanh(x)), [(3, "N")])


def test_shapes_may_be_a_strategy():
    pairs = st.integers(1, 3).map(lambda n: ((n,), (n,)))
    check_vjp(lambda a, b: a * b, lambda dout, a, b: (dout * b, dout * a), pairs)


def test_a_gradient_of_the_wrong_shape_is_named():
    with pytest.raises(GradcheckError, match=r"has shape \(1,\), the argument \(2,\)"):
        check_vjp(lambda x: x.sum(), lambda dout, x: np.ones(1) * dout, [(2,)])


def _attention_jvp(tangents, q, k, v):
    """d(P v) = dP v + P dv,  dP = P * (dS - rowsum(P * dS)),  dS = (dq k^T + q dk^T) / sqrt(D)"""
    dq, dk, dv = tangents
    p = attn._probabilities(q, k)
    ds = (dq @ k.T + q @ dk.T) / np.sqrt(q.shape[1])
    dp = p * (ds - (p * ds).sum(axis=1, keepdims=True))
    return dp @ v + p @ dv


def test_check_jvp_passes_a_right_jvp_and_names_the_argument_of_a_wrong_one():
    check_jvp(attn.attention, _attention_jvp, attn.SHAPES)

    def forgot_dk(tangents, q, k, v):
        dq, dk, dv = tangents
        return _attention_jvp((dq, np.zeros_like(dk), dv), q, k, v)

    with pytest.raises(GradcheckError, match=r"check_jvp: argument 1 .* output element"):
        check_jvp(attn.attention, forgot_dk, attn.SHAPES)


def test_a_jvp_that_gives_nan_fails_the_check():
    # NaN compares as nothing: a check that only asked "is any error too large?" let it pass
    with pytest.raises(GradcheckError, match=r"check_jvp: argument 0 .* got nan"):
        check_jvp(lambda x: x * x, lambda t, x: np.full(x.shape, np.nan), [(3,)])


# ---- the cotangent must be random (a mutation pass found an all-ones one passed everything) ----
def test_a_vjp_that_ignores_dout_is_caught():
    """d(x*x) is 2x*dout; a VJP returning 2x is right only where dout is all ones. check_vjp
    draws a random dout, so it must catch it (with an all-ones dout it would pass)."""
    check_vjp(lambda x: x * x, lambda dout, x: 2 * x * dout, [("N",)])
    with pytest.raises(GradcheckError, match="argument 0"):
        check_vjp(lambda x: x * x, lambda dout, x: 2 * x, [("N",)])


def test_a_backward_that_ignores_dout_fails_gradcheck():
    """The same mutation in a Function: gradcheck projects on a random cotangent u, so a
    backward that returns d(out)/dx without multiplying by dout is caught."""
    import tensorlite as tl
    from tensorlite.autograd import Function

    class SquareIgnoringDout(Function):
        def forward(self, x):
            self.x = x
            return x * x

        def backward(self, dout):
            return 2 * self.x

    x = tl.Tensor(np.array([0.5, -1.5, 2.0]), requires_grad=True)
    with pytest.raises(GradcheckError, match="input 0"):
        tl.gradcheck(lambda t: SquareIgnoringDout.apply(t), [x])


def test_one_finite_difference_formula_for_every_check():
    """central_differences nudges each element in place and restores it; its estimate of a
    known gradient is right to the rounding of the formula."""
    from tensorlite.testing import central_differences

    x = np.array([[0.3, -1.2], [2.0, 0.7]])
    before = x.copy()
    numeric = central_differences(lambda: float(np.sum(np.sin(x))), x, 1e-6)
    np.testing.assert_allclose(numeric, np.cos(before), rtol=1e-8, atol=1e-9)
    np.testing.assert_array_equal(x, before)
