"""Fused ops: functions a transformer calls many times, each written as ONE op with a
hand-derived backward (llm.c style) instead of a chain of primitives. That saves the
intermediate buffers and the per-op overhead. Each is tested against the same function
composed from primitive ops (tests/tensorlite/test_functional.py). Each docstring gives
the result; docs/derivations.md derives each one step by step, with what forward saves.

Training runs only forward/backward. `backward_graph` (gradients of gradients) writes the
same gradient with Tensor ops, recomputing what it needs from the inputs (a softmax by the
fused Softmax, RMSNorm's r from primitives), or differentiates the op's composition
(attention: `composed_backward`); `jvp` is the forward-mode derivative.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import kernels, references
from .autograd import Function, unbroadcast
from .higher_order import composed_backward
from .kernels import (  # the dispatched kernels (their NumPy references: references.py)
    causal_self_attention_backward,
    causal_self_attention_forward,
    causal_softmax_columns,
    cross_entropy_backward,
    cross_entropy_forward,
    gelu_backward,
    gelu_forward,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
    softmax_backward_columns,
)
from .ops import ScatterAdd
from .references import GELU_A, GELU_K, causal_bias
from .tensor import Tensor, as_tensor


class Softmax(Function):
    """y = exp(x) / sum(exp(x)) along axis.
    dx = y * (dout - sum(dout * y))   [Jacobian diag(y) - y y^T applied to dout]"""

    def forward(self, x, axis=-1):
        self.axis = axis
        self.y = references.softmax(x, axis)
        return self.y

    def backward(self, dout):
        y = self.y
        return y * (dout - (dout * y).sum(axis=self.axis, keepdims=True))

    def backward_graph(self, dout):
        y = Softmax.apply(self.parents[0], axis=self.axis)
        return y * (dout - (dout * y).sum(axis=self.axis, keepdims=True))

    def jvp(self, dx):  # the Jacobian is symmetric, so J dx has the same form
        y = self.y
        return y * (dx - (dx * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    """y = x - log(sum(exp(x))) along axis (the max is subtracted first, for stability).
    dx = dout - softmax(x) * sum(dout)"""

    def forward(self, x, axis=-1):
        self.axis = axis
        shifted = x - x.max(axis=axis, keepdims=True)
        self.y = shifted - np.log(kernels.exp(shifted).sum(axis=axis, keepdims=True))
        return self.y

    def backward(self, dout):
        return dout - kernels.exp(self.y) * dout.sum(axis=self.axis, keepdims=True)

    def backward_graph(self, dout):
        p = Softmax.apply(self.parents[0], axis=self.axis)
        return dout - p * dout.sum(axis=self.axis, keepdims=True)

    def jvp(self, dx):  # dy = dx - sum(softmax(x) * dx)
        return dx - (np.exp(self.y) * dx).sum(axis=self.axis, keepdims=True)


class CrossEntropy(Function):
    """loss = mean_n( -log softmax(logits_n)[target_n] ),  logits (N, V), targets (N,).
    dlogits = (softmax(logits) - onehot(targets)) / N * dout"""

    def forward(self, logits, targets):
        if logits.ndim != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(
                f"cross_entropy: expected logits (N, V) and targets (N,), "
                f"got {logits.shape} and {targets.shape}"
            )
        n, v = logits.shape
        if n and (targets.min() < 0 or targets.max() >= v):
            raise ValueError(f"cross_entropy: targets must be in [0, {v}), got {targets.min()}..{targets.max()}")
        loss, self.probs = cross_entropy_forward(logits, targets)
        self.targets, self.rows = targets, np.arange(n)
        return loss

    def backward(self, dout):
        return cross_entropy_backward(dout, self.probs, self.targets)  # probs: ours to overwrite

    def backward_graph(self, dout):
        (logits,) = self.parents
        n = len(self.targets)
        onehot = np.zeros(logits.shape, dtype=logits.dtype)
        onehot[np.arange(n), self.targets] = 1
        return (Softmax.apply(logits, axis=1) - onehot) * (dout / n)

    def jvp(self, dlogits):  # mean_n( sum_v softmax * dlogits - dlogits[n, target_n] )
        n = len(self.targets)
        picked = dlogits[np.arange(n), self.targets]
        return ((self.probs * dlogits).sum() - picked.sum()) / n


class RMSNorm(Function):
    """y = x * r * w,  r = 1 / sqrt(mean(x**2) + eps) over the last axis (C features).
    With xhat = x * r and dxhat = dout * w:
        dw = sum over all rows of dout * xhat
        dx = r * (dxhat - xhat * mean(dxhat * xhat))
    (No weight: w = 1.)"""

    def forward(self, x, weight=None, eps=1e-5):
        c = x.shape[-1]
        if weight is not None and weight.shape != (c,):
            raise ValueError(f"rms_norm: weight must have shape ({c},) for x {x.shape}, got {weight.shape}")
        self.has_weight, self.eps = weight is not None, eps
        self.weight = weight if weight is not None else np.ones(c, dtype=x.dtype)
        y, self.r = rms_norm_forward(x, self.weight, eps)
        self.x = x
        return y

    def backward(self, dout):
        dx, dw = rms_norm_backward(dout, self.x, self.r, self.weight)
        return (dx, dw) if self.has_weight else dx

    def backward_graph(self, dout):
        x, w = self.parents[0], self.parents[1] if len(self.parents) > 1 else None
        r = ((x * x).mean(axis=-1, keepdims=True) + self.eps) ** -0.5  # (..., 1)
        xhat = x * r
        dxhat = dout if w is None else dout * w
        dx = r * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        if w is None:
            return dx
        return dx, (dout * xhat).reshape(-1, x.shape[-1]).sum(axis=0)

    def jvp(self, dx, dw=None):  # d(xhat) = r * (dx - xhat * mean(xhat * dx))
        xhat = self.x * self.r
        dxhat = self.r * (dx - xhat * (xhat * dx).mean(axis=-1, keepdims=True))
        return dxhat * self.weight + xhat * dw if self.has_weight else dxhat


class LayerNorm(Function):
    """y = xhat * w + b,  xhat = (x - mean(x)) * r,  r = 1 / sqrt(var(x) + eps) over the last
    axis (C features; var is the biased variance). With dxhat = dout * w:
        dw = sum over all rows of dout * xhat,   db = sum over all rows of dout
        dx = r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    (RMSNorm without the mean's subtraction, and without b; GPT-2 normalises with this.)"""

    def forward(self, x, weight, bias, eps=1e-5):
        c = x.shape[-1]
        if weight.shape != (c,) or bias.shape != (c,):
            raise ValueError(f"layer_norm: weight and bias must have shape ({c},) for x "
                             f"{x.shape}, got {weight.shape} and {bias.shape}")
        y, self.xhat, self.r = layer_norm_forward(x, weight, bias, eps)
        self.weight, self.eps = weight, eps
        return y

    def backward(self, dout):
        return layer_norm_backward(dout, self.xhat, self.r, self.weight)

    def backward_graph(self, dout):
        x, w, _ = self.parents
        xc = x - x.mean(axis=-1, keepdims=True)
        r = ((xc * xc).mean(axis=-1, keepdims=True) + self.eps) ** -0.5  # (..., 1)
        xhat = xc * r
        dxhat = dout * w
        dx = r * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                  - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        rows = dout.reshape(-1, x.shape[-1])
        return dx, (rows * xhat.reshape(-1, x.shape[-1])).sum(axis=0), rows.sum(axis=0)

    def jvp(self, dx, dw, db):  # d(xhat) = r * (dx - mean(dx) - xhat * mean(xhat * dx))
        xhat = self.xhat
        dxhat = self.r * (dx - dx.mean(axis=-1, keepdims=True)
                          - xhat * (xhat * dx).mean(axis=-1, keepdims=True))
        return dxhat * self.weight + xhat * dw + db


class GELU(Function):
    """y = x/2 * (1 + tanh(k (x + a x**3))),  k = sqrt(2/pi), a = 0.044715 (GPT-2's tanh
    approximation of x * Phi(x)). With t = tanh(...):
        dx = dout * ((1 + t)/2 + x/2 * (1 - t**2) * k (1 + 3 a x**2))"""

    def forward(self, x):
        y, self.t = gelu_forward(x)
        self.x = x
        return y

    def backward(self, dout):
        return gelu_backward(dout, self.x, self.t)

    def backward_graph(self, dout):
        return dout * _gelu_derivative(self.parents[0])

    def jvp(self, dx):
        return gelu_backward(dx, self.x, self.t)  # the Jacobian is diagonal: J dx = dx * y'


def _gelu_derivative(x):
    """gelu'(x) from Tensor ops (differentiable again), for backward_graph."""
    t = ((x + x * x * x * GELU_A) * GELU_K).tanh()
    return (t + 1.0) * 0.5 + x * 0.5 * (1.0 - t * t) * (x * x * (3 * GELU_A * GELU_K) + GELU_K)


class Embedding(Function):
    """out = weight[indices]  (rows of a (V, C) table).
    dweight = zeros, with each dout row added to the row it was read from"""

    def forward(self, weight, indices):
        if weight.ndim != 2:
            raise ValueError(f"embedding: weight must be (V, C), got {weight.shape}")
        if indices.size and (indices.min() < 0 or indices.max() >= weight.shape[0]):
            raise IndexError(
                f"embedding: indices must be in [0, {weight.shape[0]}), "
                f"got {indices.min()}..{indices.max()}"
            )
        self.indices, self.weight_shape, self.dtype = indices, weight.shape, weight.dtype
        return weight[indices]

    def backward(self, dout):
        dweight = np.zeros(self.weight_shape, dtype=self.dtype)
        kernels.scatter_add_rows(dweight, self.indices.ravel(), dout.reshape(-1, self.weight_shape[1]))
        return dweight

    def backward_graph(self, dout):
        return ScatterAdd.apply(dout, index=self.indices, shape=self.weight_shape)

    def jvp(self, dweight):
        return dweight[self.indices]


class ScaledDotProductAttention(Function):
    """out = softmax(q k^T * s + mask) v,  s = 1/sqrt(head_dim), on (..., T, hd).
    With P the attention probabilities:
        dv = P^T dout
        dP = dout v^T
        dS = P * (dP - sum(dP * P, -1))          (softmax backward, row by row)
        dq = dS k * s,   dk = dS^T q * s
    Causal: query i sees keys j <= i + (Tk - Tq), so a query block at the end of a longer
    key sequence (a KV cache) is masked correctly."""

    def forward(self, q, k, v, causal=True):
        if q.shape[-1] != k.shape[-1] or k.shape[:-1] != v.shape[:-1]:
            raise ValueError(
                f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
                "(need q (..., Tq, hd), k (..., Tk, hd), v (..., Tk, hv))"
            )
        if causal and q.shape[-2] > k.shape[-2]:
            raise ValueError(
                f"causal attention: {q.shape[-2]} queries but only {k.shape[-2]} keys; the last "
                "query sees every key, so the first ones would see none (need Tq <= Tk)"
            )
        self.scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
        # The scores TRANSPOSED, keys along rows, as in causal_self_attention (why: there)
        st = k @ q.swapaxes(-1, -2)  # S^T, (..., Tk, Tq)
        if causal:
            self.pt = causal_softmax_columns(st, self.scale)  # P^T
        else:
            st *= self.scale
            self.pt = references.softmax(st, -2, inplace=True)  # P^T
        self.q, self.k, self.v, self.causal = q, k, v, causal
        return self.pt.swapaxes(-1, -2) @ v  # P v, (..., Tq, hv)

    def backward(self, dout):
        pt, q, k, v = self.pt, self.q, self.k, self.v
        dv = pt @ dout  # P^T dout, (..., Tk, hv)
        dst = softmax_backward_columns(v @ dout.swapaxes(-1, -2), pt, self.scale)  # dP^T -> dS^T
        dq = dst.swapaxes(-1, -2) @ k  # (..., Tq, hd)
        dk = dst @ q  # (..., Tk, hd)
        # batch dims that were broadcast (k, v shared across a batch, say) are summed back
        return unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape)

    def backward_graph(self, dout):  # by its composition: softmax(q k^T s + mask) v
        return composed_backward(self, functools.partial(_attention_composed, causal=self.causal),
                                 dout)

    def jvp(self, dq, dk, dv):  # dS -> dP by the softmax JVP, then d(P v) = dP v + P dv
        p = self.pt.swapaxes(-1, -2)  # P, (..., Tq, Tk)
        ds = (dq @ self.k.swapaxes(-1, -2) + self.q @ dk.swapaxes(-1, -2)) * self.scale
        dp = p * (ds - (ds * p).sum(axis=-1, keepdims=True))
        return dp @ self.v + p @ dv


def _attention_composed(q, k, v, causal: bool) -> Tensor:
    """Attention from Tensor ops (the fused Softmax included), for backward_graph."""
    scores = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (..., Tq, Tk)
    if causal:
        scores = scores + causal_bias(q.shape[-2], k.shape[-2], scores.dtype)
    return Softmax.apply(scores, axis=-1) @ v  # (..., Tq, hv)


class CausalSelfAttention(Function):
    """y = heads side by side of softmax(q k^T * s + causal mask) v,  q | k | v = qkv's thirds
    (B, T, 3C), each split into n_head heads of hd = C / n_head, s = 1/sqrt(hd).
    dqkv = dq | dk | dv of ScaledDotProductAttention, head by head, in qkv's layout.
    (One op instead of reshape, transpose, three slices, attention, transpose, reshape: the
    head split costs no copies and no graph nodes.)"""

    def forward(self, qkv, n_head):
        if qkv.ndim != 3 or qkv.shape[-1] % (3 * n_head):
            raise ValueError(f"causal_self_attention: qkv must be (B, T, 3C) with C divisible "
                             f"by n_head={n_head}, got {qkv.shape}")
        self.scale = 1.0 / math.sqrt(qkv.shape[-1] // 3 // n_head)
        self.qkv, self.n_head = qkv, n_head
        y, self.pt = causal_self_attention_forward(qkv, n_head, self.scale)
        return y

    def backward(self, dout):
        return causal_self_attention_backward(dout, self.qkv, self.pt, self.n_head, self.scale)

    def backward_graph(self, dout):  # by its composition: split heads, attention, merge
        composed = functools.partial(_causal_self_attention_composed, n_head=self.n_head)
        return composed_backward(self, composed, dout)

    def jvp(self, dqkv):  # ScaledDotProductAttention's rule, head by head
        B, T, C3 = dqkv.shape

        def heads(a):  # (B, T, 3C) -> q, k, v, each (B, H, T, hd)
            return a.reshape(B, T, 3, self.n_head, C3 // 3 // self.n_head).transpose(2, 0, 3, 1, 4)

        sdpa = ScaledDotProductAttention()
        (sdpa.q, sdpa.k, sdpa.v), sdpa.pt, sdpa.scale = heads(self.qkv), self.pt, self.scale
        dy = sdpa.jvp(*heads(dqkv))  # (B, H, T, hd)
        return dy.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)


def _causal_self_attention_composed(qkv, n_head: int) -> Tensor:
    """CausalSelfAttention from Tensor ops, for backward_graph."""
    B, T, C3 = qkv.shape
    heads = qkv.reshape(B, T, 3, n_head, C3 // 3 // n_head).transpose(2, 0, 3, 1, 4)
    y = _attention_composed(heads[0], heads[1], heads[2], causal=True)  # (B, H, T, hd)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)


class ReluSquared(Function):
    """y = relu(x)**2.  dx = dout * 2 * relu(x)"""

    def forward(self, x):
        self.x = x
        return kernels.relu_squared(x)

    def backward(self, dout):
        return kernels.relu_squared_backward(dout, self.x)

    def backward_graph(self, dout):
        return dout * self.parents[0].relu() * 2.0

    def jvp(self, dx):
        return dx * np.maximum(self.x, 0) * 2


class Dropout(Function):
    """y = x * mask / (1 - p), mask ~ Bernoulli(1 - p).  dx = dout * mask / (1 - p)"""

    def forward(self, x, p, rng):
        keep = rng.random(x.shape) >= p
        self.mask = keep * x.dtype.type(1.0 / (1.0 - p))
        return x * self.mask

    def backward(self, dout):
        return dout * self.mask

    backward_graph = backward  # the mask is a constant

    def jvp(self, dx):
        return dx * self.mask


def _integer_array(x, what: str) -> np.ndarray:
    """Integer ids as an int array. A Tensor made from a list of ints holds float32 (the
    Tensor rule), so whole-number floats are accepted too; anything else is an error."""
    a = np.asarray(x.data if isinstance(x, Tensor) else x)
    if a.dtype.kind in "iu":
        return a
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        return a.astype(np.int64)
    raise TypeError(f"{what} must be integers, got dtype {a.dtype}")


# ---- the public functions ----------------------------------------------------------------------
def softmax(x, axis: int = -1) -> Tensor:
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis: int = -1) -> Tensor:
    return LogSoftmax.apply(x, axis=axis)


def cross_entropy(logits, targets) -> Tensor:
    """Mean negative log-likelihood of integer `targets` (N,) under `logits` (N, V)."""
    return CrossEntropy.apply(logits, targets=_integer_array(targets, "cross_entropy: targets"))


def rms_norm(x, weight=None, eps: float = 1e-5) -> Tensor:
    if weight is None:
        return RMSNorm.apply(x, eps=eps)
    return RMSNorm.apply(x, weight, eps=eps)


def layer_norm(x, weight, bias, eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (weight, bias (C,))."""
    return LayerNorm.apply(x, weight, bias, eps=eps)


def gelu(x) -> Tensor:
    """GPT-2's GELU, the tanh approximation: x/2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3)))."""
    return GELU.apply(x)


def embedding(indices, weight) -> Tensor:
    """Rows of `weight` (V, C) picked by integer `indices` (any shape) -> (*indices.shape, C)."""
    return Embedding.apply(weight, indices=_integer_array(indices, "embedding: indices"))


def scaled_dot_product_attention(q, k, v, causal: bool = True) -> Tensor:
    return ScaledDotProductAttention.apply(q, k, v, causal=causal)


def causal_self_attention(qkv, n_head: int) -> Tensor:
    """Causal multi-head attention of qkv (B, T, 3C) = q | k | v -> (B, T, C)."""
    return CausalSelfAttention.apply(qkv, n_head=n_head)


def relu_squared(x) -> Tensor:
    return ReluSquared.apply(x)


def dropout(x, p: float, training: bool = True, rng: np.random.Generator | None = None) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (only in training)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    x = as_tensor(x)
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, p=p, rng=rng if rng is not None else np.random.default_rng())
