"""Every `Function` subclass in tensorlite has a gradient check here, in float64 against
central differences on a random cotangent. `test_every_function_has_a_gradient_case` lists
the subclasses themselves, so a new op without a case below fails the suite."""

from __future__ import annotations

import numpy as np
import pytest

import tensorlite as tl
import tensorlite.functional as F
from tensorlite import Tensor, functional, ops, precision, references
from tensorlite.autograd import Function
from tensorlite.testing import assert_gradients_match

IDX = np.array([[0, 2, 2], [1, 0, 3]])  # token ids into a (4, C) table (2 repeats)
TARGETS = np.array([1, 0, 3, 3])
COND = np.array([[True, False, True], [False, False, True]])
PICK = (np.array([0, 1, 1]), slice(None))  # rows 0, 1, 1 of a (2, 3): one picked twice


def _dropout(x):
    return F.dropout(x, 0.4, True, np.random.default_rng(0))  # the same mask on every call


# class -> (a function of the inputs that runs that op, the inputs' shapes, how to draw them)
CASES = {
    ops.Add: (lambda a, b: a + b, [(2, 3), (3,)], "any"),
    ops.Sub: (lambda a, b: a - b, [(2, 3), (2, 1)], "any"),
    ops.Mul: (lambda a, b: a * b, [(2, 3), (3,)], "any"),
    ops.Div: (lambda a, b: a / b, [(2, 3), (3,)], "positive"),
    ops.Neg: (lambda a: -a, [(2, 3)], "any"),
    ops.Pow: (lambda a: a**1.5, [(2, 3)], "positive"),
    ops.MatMul: (lambda a, b: a @ b, [(2, 2, 3), (3, 4)], "any"),
    ops.Exp: (lambda a: a.exp(), [(2, 3)], "any"),
    ops.Log: (lambda a: a.log(), [(2, 3)], "positive"),
    ops.Sqrt: (lambda a: a.sqrt(), [(2, 3)], "positive"),
    ops.Tanh: (lambda a: a.tanh(), [(2, 3)], "any"),
    ops.Sigmoid: (lambda a: a.sigmoid(), [(2, 3)], "any"),
    ops.Relu: (lambda a: a.relu(), [(2, 3)], "away_from_0"),
    ops.Sum: (lambda a: a.sum(axis=1), [(2, 3)], "any"),
    ops.Mean: (lambda a: a.mean(axis=0, keepdims=True), [(2, 3)], "any"),
    ops.Max: (lambda a: a.max(axis=1), [(2, 3)], "distinct"),
    ops.Reshape: (lambda a: a.reshape(3, 2), [(2, 3)], "any"),
    ops.Transpose: (lambda a: a.transpose(1, 0, 2), [(2, 3, 2)], "any"),
    ops.BroadcastTo: (lambda a: a.broadcast_to((2, 2, 3)), [(2, 1, 3)], "any"),
    ops.GetItem: (lambda a: a[PICK], [(2, 3)], "any"),
    ops.ScatterAdd: (lambda a: ops.ScatterAdd.apply(a, index=PICK, shape=(2, 3)), [(3, 3)], "any"),
    ops.Concatenate: (lambda a, b: tl.concatenate([a, b], axis=1), [(2, 3), (2, 1)], "any"),
    ops.Stack: (lambda a, b: tl.stack([a, b], axis=1), [(2, 3), (2, 3)], "any"),
    ops.Where: (lambda a, b: tl.where(COND, a, b), [(2, 3), (3,)], "any"),
    functional.Softmax: (lambda a: F.softmax(a, axis=-1), [(2, 3)], "any"),
    functional.LogSoftmax: (lambda a: F.log_softmax(a, axis=0), [(2, 3)], "any"),
    functional.CrossEntropy: (lambda a: F.cross_entropy(a, TARGETS), [(4, 5)], "any"),
    functional.RMSNorm: (lambda a, w: F.rms_norm(a, w), [(2, 4), (4,)], "any"),
    functional.LayerNorm: (lambda a, w, b: F.layer_norm(a, w, b), [(2, 4), (4,), (4,)], "any"),
    functional.GELU: (lambda a: F.gelu(a), [(2, 3)], "any"),
    functional.Embedding: (lambda w: F.embedding(IDX, w), [(4, 3)], "any"),
    functional.ScaledDotProductAttention: (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
        [(1, 2, 3, 2), (1, 2, 3, 2), (1, 2, 3, 2)], "any"),
    functional.CausalSelfAttention: (lambda qkv: F.causal_self_attention(qkv, 2), [(2, 3, 12)], "any"),
    functional.ReluSquared: (lambda a: F.relu_squared(a), [(2, 3)], "away_from_0"),
    functional.Dropout: (_dropout, [(2, 3)], "any"),
    precision.MatMulBF16: (lambda a, b: precision.MatMulBF16.apply(a, b), [(2, 2, 3), (3, 4)], "bf16"),
}


def every_function() -> set[type]:
    """Every subclass of Function defined in the tensorlite package (tests' own excluded)."""
    found, todo = set(), [Function]
    while todo:
        for cls in todo.pop().__subclasses__():
            todo.append(cls)
            if cls.__module__.startswith("tensorlite."):
                found.add(cls)
    return found


def test_every_function_has_a_gradient_case():
    missing = sorted(c.__qualname__ for c in every_function() - set(CASES))
    assert not missing, f"Function subclasses without a gradient case in CASES: {missing}"


def draw(shape, how: str, rng: np.random.Generator) -> np.ndarray:
    if how == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if how == "away_from_0":  # relu's kink: keep finite differences off it
        return rng.choice([-1, 1], shape) * rng.uniform(0.2, 1.5, shape)
    if how == "bf16":  # bf16 numbers: rounding them changes nothing
        return references.round_to_bfloat16(rng.standard_normal(shape)).astype(np.float64)
    if how == "distinct":  # max's ties: keep the maximum unique
        return rng.permutation(np.arange(np.prod(shape), dtype=np.float64)).reshape(shape) / 3
    return rng.standard_normal(shape)


def ops_in_graph(out: Tensor) -> set[type]:
    seen, todo, found = set(), [out], set()
    while todo:
        t = todo.pop()
        if t._ctx is not None and id(t) not in seen:
            seen.add(id(t))
            found.add(type(t._ctx))
            todo.extend(t._ctx.parents)
    return found


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_gradient_of_every_function(cls):
    fn, shapes, how = CASES[cls]
    rng = np.random.default_rng(sum(map(ord, cls.__name__)))
    inputs = [draw(s, how, rng) for s in shapes]
    out = fn(*(Tensor(x, requires_grad=True) for x in inputs))
    assert cls in ops_in_graph(out), f"the case for {cls.__name__} does not run it"
    if how == "bf16":
        assert_bf16_gradients_match(fn, inputs, rng)
    else:
        assert_gradients_match(fn, *inputs)


def assert_bf16_gradients_match(fn, inputs, rng) -> None:
    """A bf16 op rounds its operands: flat almost everywhere, so finite differences of fn
    itself say nothing. Its gradient is defined as the float64 function's (the same op with
    the rounding left out, here NumPy's matmul) at the rounded operands with the cotangent
    rounded: at bf16 inputs and cotangent, float64 central differences of that function,
    up to float32 sums."""
    ts = [Tensor(x.astype(np.float32), requires_grad=True) for x in inputs]
    out = fn(*ts)
    dout = references.round_to_bfloat16(rng.standard_normal(out.shape)).astype(np.float64)
    out.backward(dout.astype(np.float32))
    eps = 1e-3  # (a product: central differences are exact but for rounding)
    for i, t in enumerate(ts):
        for where in np.ndindex(t.shape):
            xs = [x.copy() for x in inputs]
            xs[i][where] += eps
            plus = np.sum(dout * np.matmul(*xs))
            xs[i][where] -= 2 * eps
            expected = (plus - np.sum(dout * np.matmul(*xs))) / (2 * eps)
            np.testing.assert_allclose(t.grad[where], expected, rtol=1e-5, atol=1e-5)
