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

from . import kernels
from .autograd import Function, composed_backward, unbroadcast
from .ops import ScatterAdd
from .tensor import Tensor, as_tensor


def _softmax(x: np.ndarray, axis: int, inplace: bool = False) -> np.ndarray:
    """exp(x - max) / sum(exp(x - max)): subtracting the max keeps exp from overflowing.
    `inplace=True` reuses x's buffer (for a caller that made x and no longer needs it)."""
    e = np.subtract(x, x.max(axis=axis, keepdims=True), out=x if inplace else None)
    e = kernels.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


@functools.lru_cache(maxsize=64)
def _causal_bias(tq: int, tk: int, dtype: np.dtype) -> np.ndarray:
    """(tq, tk) additive mask: 0 where query i may see key j (j <= i + tk - tq), -inf after.
    Adding it is ~20x faster than writing -inf through a boolean index."""
    future = np.triu(np.ones((tq, tk), dtype=bool), k=tk - tq + 1)
    bias = np.where(future, -np.inf, 0.0).astype(dtype)
    bias.flags.writeable = False
    return bias


class Softmax(Function):
    """y = exp(x) / sum(exp(x)) along axis.
    dx = y * (dout - sum(dout * y))   [Jacobian diag(y) - y y^T applied to dout]"""

    def forward(self, x, axis=-1):
        self.axis = axis
        self.y = _softmax(x, axis)
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


@kernels.kernel
def cross_entropy_forward(logits, targets):
    """NumPy reference. loss = mean_n(log sum_v exp(logits_nv) - logits_n,target_n); also
    returns softmax(logits), which the backward needs. (The row max is subtracted first.)"""
    rows = np.arange(len(targets))
    shifted = logits - logits.max(axis=1, keepdims=True)  # (N, V)
    probs = kernels.exp(shifted)
    total = probs.sum(axis=1)  # (N,)
    loss = np.log(total) - shifted[rows, targets]
    probs /= total[:, None]
    return np.asarray(loss.mean(), dtype=logits.dtype), probs


@kernels.kernel
def cross_entropy_backward(dout, probs, targets):
    """NumPy reference. dlogits = (probs - onehot(targets)) * dout / N, in place on probs."""
    probs[np.arange(len(targets)), targets] -= 1
    probs *= dout / probs.dtype.type(len(targets))
    return probs


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


@kernels.kernel
def rms_norm_forward(x, weight, eps):
    """NumPy reference. y = x * r * w with r = 1/sqrt(mean(x**2) + eps) per row; returns
    y and r (..., 1)."""
    ms = kernels.sum_of_products(x, x)[..., None] / x.dtype.type(x.shape[-1])  # (..., 1)
    r = 1.0 / np.sqrt(ms + x.dtype.type(eps))  # (..., 1)
    y = x * r
    y *= weight
    return y, r


@kernels.kernel
def rms_norm_backward(dout, x, r, weight):
    """NumPy reference. With xhat = x * r and dxhat = dout * w:
    dx = r * (dxhat - xhat * mean(dxhat * xhat)),  dw = sum over rows of dout * xhat."""
    c = x.shape[-1]
    xhat = x * r
    dxhat = dout * weight
    mean_dot = kernels.sum_of_products(dxhat, xhat)[..., None] / x.dtype.type(c)  # (..., 1)
    dx = xhat * mean_dot
    np.subtract(dxhat, dx, out=dx)
    dx *= r
    dw = kernels.sum_of_products(dout.reshape(-1, c).T, xhat.reshape(-1, c).T)  # (C,)
    return dx, dw


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


@kernels.kernel
def layer_norm_forward(x, weight, bias, eps):
    """NumPy reference. y = (x - mean(x)) * r * w + b with r = 1/sqrt(var(x) + eps) per row
    (the biased variance, over the last axis); returns y, xhat = (x - mean) * r and r (..., 1)."""
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean
    var = kernels.sum_of_products(xc, xc)[..., None] / x.dtype.type(x.shape[-1])  # (..., 1)
    r = 1.0 / np.sqrt(var + x.dtype.type(eps))  # (..., 1)
    xc *= r  # xhat
    y = xc * weight
    y += bias
    return y, xc, r


@kernels.kernel
def layer_norm_backward(dout, xhat, r, weight):
    """NumPy reference. With dxhat = dout * w:
    dx = r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
    dw = sum over rows of dout * xhat,  db = sum over rows of dout."""
    c = xhat.shape[-1]
    dxhat = dout * weight
    mean_d = dxhat.mean(axis=-1, keepdims=True)  # (..., 1)
    mean_dot = kernels.sum_of_products(dxhat, xhat)[..., None] / xhat.dtype.type(c)  # (..., 1)
    dx = xhat * mean_dot
    dx += mean_d
    np.subtract(dxhat, dx, out=dx)
    dx *= r
    rows = dout.reshape(-1, c)
    dw = kernels.sum_of_products(rows.T, xhat.reshape(-1, c).T)  # (C,)
    return dx, dw, rows.sum(axis=0)


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


GELU_K = math.sqrt(2.0 / math.pi)  # GPT-2's tanh approximation: gelu(x) ~ x Phi(x)
GELU_A = 0.044715


@kernels.kernel
def gelu_forward(x):
    """NumPy reference. y = x/2 * (1 + t),  t = tanh(k (x + a x**3)),  k = sqrt(2/pi),
    a = 0.044715; returns y and t (what the backward needs besides x)."""
    k, a = x.dtype.type(GELU_K), x.dtype.type(GELU_A)
    u = np.multiply(x, x, out=np.empty_like(x))  # (a fresh array even for a 0-d x)
    u *= a
    u += 1
    u *= x
    u *= k  # k (x + a x**3)
    t = np.tanh(u, out=u)
    y = t + 1
    y *= x
    y *= 0.5
    return y, t


@kernels.kernel
def gelu_backward(dout, x, t):
    """NumPy reference. dx = dout * ((1 + t)/2 + x/2 * (1 - t**2) * k (1 + 3 a x**2))."""
    k, a = x.dtype.type(GELU_K), x.dtype.type(GELU_A)
    du = np.multiply(x, x, out=np.empty_like(x))
    du *= 3 * a
    du += 1
    du *= k  # du/dx = k (1 + 3 a x**2)
    du *= 1 - t * t  # dt/dx
    du *= x
    du += 1 + t
    du *= 0.5
    du *= dout
    return du


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
        # The scores are kept TRANSPOSED, keys along rows: st = S^T = k q^T, (..., Tk, Tq).
        # The softmax then reduces over axis -2, across rows, which NumPy does about twice
        # as fast as along each short row; P^T feeds both products below without a copy.
        st = k @ q.swapaxes(-1, -2)  # (..., Tk, Tq)
        st *= self.scale
        if causal:
            st += _causal_bias(*st.shape[-1:-3:-1], st.dtype).T  # -inf where key j is future
        self.pt = _softmax(st, -2, inplace=True)  # P^T, (..., Tk, Tq)
        self.q, self.k, self.v, self.causal = q, k, v, causal
        return self.pt.swapaxes(-1, -2) @ v  # P v, (..., Tq, hv)

    def backward(self, dout):
        pt, q, k, v = self.pt, self.q, self.k, self.v
        dv = pt @ dout  # P^T dout, (..., Tk, hv)
        dst = v @ dout.swapaxes(-1, -2)  # dP^T = v dout^T, (..., Tk, Tq)
        # softmax backward, per query (a column here): dS = P * (dP - sum_keys(dP * P))
        dst -= np.einsum("...kq,...kq->...q", dst, pt)[..., None, :]
        dst *= pt
        dst *= self.scale  # dS^T, scaled
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
        scores = scores + _causal_bias(q.shape[-2], k.shape[-2], scores.dtype)
    return Softmax.apply(scores, axis=-1) @ v  # (..., Tq, hv)


@kernels.kernel
def causal_softmax_columns(st, scale):
    """NumPy reference, in place on st (..., T, T), the unscaled scores transposed (keys along
    rows: st[j, i] = k_j . q_i): st -> P^T, P = softmax over the visible keys j <= i of
    S * scale (the future's entries become 0). Returns st."""
    T = st.shape[-1]
    st *= scale
    st += _causal_bias(T, T, st.dtype).T
    return _softmax(st, -2, inplace=True)


@kernels.kernel
def softmax_backward_columns(dst, pt, scale):
    """NumPy reference, in place: dst = dP^T -> dS^T = P^T * (dP^T - colsum(dP^T * P^T)) * scale
    (the softmax backward, with its scale, on transposed matrices). Returns dst."""
    dst -= np.einsum("...kq,...kq->...q", dst, pt)[..., None, :]
    dst *= pt
    dst *= scale
    return dst


def _heads(qkv, n_head):
    """q, k, v of qkv (B, T, 3C), each (B, H, T, hd): views, no copies."""
    B, T, C3 = qkv.shape
    return qkv.reshape(B, T, 3, n_head, C3 // 3 // n_head).transpose(2, 0, 3, 1, 4)


@kernels.kernel
def causal_self_attention_forward(qkv, n_head, scale):
    """NumPy reference. Split qkv (B, T, 3C) into heads and run the attention math of
    ScaledDotProductAttention above: the two products are BLAS calls on strided views of
    qkv, and what lies between them is the causal_softmax_columns kernel. Returns y (B, T, C)
    and P^T (B, H, T, T). (The C path's twin does it all in one loop per (batch, head) whose
    products skip the future: tensorlite/kernels.c.)"""
    B, T, C3 = qkv.shape
    q, k, v = _heads(qkv, n_head)  # each (B, H, T, hd)
    pt = causal_softmax_columns(k @ q.swapaxes(-1, -2), scale)  # S^T -> P^T
    y = np.empty((B, T, n_head, C3 // 3 // n_head), dtype=pt.dtype)
    np.matmul(pt.swapaxes(-1, -2), v, out=y.transpose(0, 2, 1, 3))  # P v, heads side by side
    return y.reshape(B, T, C3 // 3), pt


@kernels.kernel
def causal_self_attention_backward(dy, qkv, pt, n_head, scale):
    """NumPy reference. The backward of ScaledDotProductAttention, with dq, dk, dv packed
    into one dqkv (B, T, 3C) in the layout of qkv; the softmax backward is the
    softmax_backward_columns kernel."""
    B, T, C3 = qkv.shape
    hd = C3 // 3 // n_head
    q, k, v = _heads(qkv, n_head)
    dout = dy.reshape(B, T, n_head, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    dqkv = np.empty((B, T, 3, n_head, hd), dtype=qkv.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # views to write into, each (B, H, T, hd)
    np.matmul(pt, dout, out=dv)  # P^T dout
    dst = softmax_backward_columns(v @ dout.swapaxes(-1, -2), pt, scale)  # dP^T -> dS^T
    np.matmul(dst.swapaxes(-1, -2), k, out=dq)
    np.matmul(dst, q, out=dk)
    return dqkv.reshape(B, T, C3)


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
