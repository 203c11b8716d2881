"""The compiled twins of tensorlite's hot kernels: numba loops, threaded over rows (or heads)
with `prange`, fused so that each pass reads its inputs once and makes no temporaries.

Each public function here has the same name, arguments and results as its NumPy reference
(functional.py / kernels.py), which is the spec; `tensorlite.kernels` decides which one runs
and is the only module that imports this one. A learner can skip this file entirely.

Conventions: the loops are plain llm.c-style C in Python syntax. Scalars that meet float32
arrays are made float32 first (`x.dtype.type(...)` in the wrapper) so that numba does not
widen the arithmetic to float64. `fastmath` allows reassociation (vectorized sums) but not
"no NaNs/infs", so a NaN still reaches the loss and stops training as it should.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from .kernels import COMPILED, adds_in_place, square_stack
from .kernels import contiguous as _c
from .kernels import run_reference as _reference

_FAST = {"nsz", "arcp", "contract", "reassoc"}
_parallel = numba.njit(parallel=True, cache=True, fastmath=_FAST, nogil=True)
_serial = numba.njit(cache=True, fastmath=_FAST, nogil=True)


SERIAL_BELOW = 1 << 15  # elements: smaller calls run on the calling thread alone


def _run(kernel, size: int, *args):
    """kernel(*args), on one thread when the work is small: waking a second thread costs
    ~10 us on an idle machine and milliseconds on a busy one (it may not be scheduled),
    more than a small kernel's work (gradient checks and sampling make thousands of those)."""
    threads = numba.get_num_threads()
    if size >= SERIAL_BELOW or threads == 1:
        return kernel(*args)
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(threads)


# ---- exp, vectorized -----------------------------------------------------------------------------
def exp_inplace(a, bits):
    """a[:] = exp(a) for a contiguous 1-D array; bits: int64 scratch of at least a.size."""


@overload(exp_inplace, fastmath=_FAST)
def _exp_inplace(a, bits):
    """numba calls libm's scalar expf, which does not vectorize (~10x slower than NumPy's
    SIMD exp). For float32 we write exp as the classic range reduction plus polynomial
    (Cephes' expf: exp(x) = 2**n * exp(r), |r| <= ln2/2, max relative error ~1.2e-7
    here), with 2**n built in the exponent bits: every step vectorizes. float64 keeps
    math.exp (full precision)."""
    if a.dtype != types.float32:
        def exp64(a, bits):
            for i in range(a.size):
                a[i] = math.exp(a[i])
        return exp64

    def exp32(a, bits):
        b32 = bits.view(np.int32)
        lo, hi = np.float32(-87.33654), np.float32(88.37626)
        log2e, half = np.float32(1.4426950408889634), np.float32(0.5)
        ln2_hi, ln2_lo = np.float32(0.693359375), np.float32(-2.12194440e-4)
        for i in range(a.size):
            x = a[i]
            if x < lo:  # noqa: PLR1730 - comparisons, not min/max: a NaN stays NaN
                x = lo
            if x > hi:  # noqa: PLR1730
                x = hi
            n = np.floor(x * log2e + half)
            r = x - n * ln2_hi - n * ln2_lo
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            a[i] = p * r * r + r + np.float32(1)
            b32[i] = (np.int32(n) + np.int32(127)) << np.int32(23)  # the float 2**n
        two_n = b32[: a.size].view(np.float32)
        for i in range(a.size):
            a[i] *= two_n[i]
    return exp32


# ---- relu(x)**2 ---------------------------------------------------------------------------------
@_parallel
def _relu_squared(x, y):
    for i in prange(x.size):
        r = x[i]
        if r <= 0:
            y[i] = 0
        else:  # NaN lands here and stays NaN, as in np.maximum
            y[i] = r * r


@_parallel
def _relu_squared_backward(dout, x, dx):
    for i in prange(x.size):
        r = x[i]
        if r <= 0:
            dx[i] = 0
        else:
            dx[i] = (r + r) * dout[i]


def relu_squared(x):
    x = _c(x)
    y = np.empty_like(x)
    _run(_relu_squared, x.size, x.reshape(-1), y.reshape(-1))
    return y


def relu_squared_backward(dout, x):
    x, dout = _c(x), _c(dout)
    dx = np.empty_like(x)
    _run(_relu_squared_backward, x.size, dout.reshape(-1), x.reshape(-1), dx.reshape(-1))
    return dx


# ---- RMSNorm --------------------------------------------------------------------------------------
@_parallel
def _rms_norm_forward(x, w, eps, inv_c, one, y, r):
    n, c = x.shape
    for i in prange(n):
        ss = one - one
        for j in range(c):
            ss += x[i, j] * x[i, j]
        ri = one / math.sqrt(ss * inv_c + eps)
        r[i] = ri
        for j in range(c):
            y[i, j] = x[i, j] * ri * w[j]


@_parallel
def _rms_norm_backward(dout, x, r, w, inv_c, one, dx, dw_parts):
    n, c = x.shape
    chunks = dw_parts.shape[0]
    for part in prange(chunks):  # each chunk of rows sums its own share of dw
        dw = dw_parts[part]
        for i in range(part * n // chunks, (part + 1) * n // chunks):
            ri = r[i]
            dot = one - one  # mean of dxhat * xhat over the row
            for j in range(c):
                xhat = x[i, j] * ri
                dot += dout[i, j] * w[j] * xhat
                dw[j] += dout[i, j] * xhat
            dot *= inv_c
            for j in range(c):
                dx[i, j] = ri * (dout[i, j] * w[j] - x[i, j] * ri * dot)


def rms_norm_forward(x, weight, eps):
    c, t = x.shape[-1], x.dtype.type
    x2 = _c(x).reshape(-1, c)
    y = np.empty_like(x2)
    r = np.empty(x2.shape[0], dtype=x.dtype)
    _run(_rms_norm_forward, x.size, x2, _c(weight).astype(x.dtype, copy=False), t(eps), t(1 / c),
         t(1), y, r)
    return y.reshape(x.shape), r.reshape(x.shape[:-1] + (1,))


def rms_norm_backward(dout, x, r, weight):
    c = x.shape[-1]
    x2, d2 = _c(x).reshape(-1, c), _c(dout).reshape(-1, c)
    dx = np.empty_like(x2)
    chunks = max(1, min(numba.get_num_threads(), x2.shape[0] // 64))
    dw_parts = np.zeros((chunks, c), dtype=x.dtype)
    t = x.dtype.type
    _run(_rms_norm_backward, x.size, d2, x2, _c(r).reshape(-1),
         _c(weight).astype(x.dtype, copy=False), t(1 / c), t(1), dx, dw_parts)
    return dx.reshape(x.shape), dw_parts.sum(axis=0)


# ---- causal self-attention on a fused qkv ---------------------------------------------------------
# The four products go to BLAS (np.matmul on strided views of qkv: no copies); what lies
# between them, scale + causal mask + softmax and the softmax backward, is one fused pass
# each, threaded over (batch, head). As in the reference, scores are kept transposed, keys
# along rows: st[j, i] = k_j . q_i, so P^T feeds both products without a copy.
@_parallel
def _causal_softmax_columns(st, scale, one):
    """In place: st (N, Tk, Tq) scores^T -> P^T = softmax over keys j <= i of st * scale."""
    N, T, _ = st.shape
    zero = one - one
    for n in prange(N):
        s = st[n]
        for j in range(T):  # scaled first, as in the reference: any scale, negative too
            for i in range(j, T):  # key j is visible to queries i >= j
                s[j, i] *= scale
        m = s[0].copy()  # per query (column): the max over visible keys, later 1 / sum
        for j in range(1, T):
            for i in range(j, T):
                m[i] = max(m[i], s[j, i])
        total = np.zeros(T, dtype=st.dtype)
        bits = np.empty(T, dtype=np.int64)
        for j in range(T):
            row = s[j, j:]  # queries that see key j
            for i in range(j):
                s[j, i] = zero  # the future: key j comes after query i
            for i in range(row.size):
                row[i] -= m[j + i]
            exp_inplace(row, bits)
            for i in range(row.size):
                total[j + i] += row[i]
        for i in range(T):
            m[i] = one / total[i]
        for j in range(T):
            for i in range(j, T):
                s[j, i] *= m[i]


@_parallel
def _softmax_backward_columns(dst, pt, scale):
    """In place: dst (N, Tk, Tq) = dP^T -> dS^T = P^T * (dP^T - colsum(dP^T * P^T)) * scale."""
    N, T, Q = dst.shape
    for n in prange(N):
        d, p = dst[n], pt[n]
        c = np.zeros(Q, dtype=dst.dtype)
        for j in range(T):
            for i in range(Q):
                c[i] += d[j, i] * p[j, i]
        for j in range(T):
            for i in range(Q):
                d[j, i] = p[j, i] * (d[j, i] - c[i]) * scale


def causal_softmax_columns(st, scale):
    if not square_stack(st):  # a layout the loops do not walk in place
        return _reference("causal_softmax_columns", st, scale)
    T, t = st.shape[-1], st.dtype.type
    _run(_causal_softmax_columns, st.size, st.reshape(-1, T, T), t(scale), t(1))
    return st


def softmax_backward_columns(dst, pt, scale):
    if (not square_stack(dst) or np.shape(pt) != dst.shape
            or np.may_share_memory(dst, pt)):  # (the loop would read what it has written)
        return _reference("softmax_backward_columns", dst, pt, scale)
    T = dst.shape[-1]
    _run(_softmax_backward_columns, dst.size, dst.reshape(-1, T, T),
         _c(pt.astype(dst.dtype, copy=False)).reshape(-1, T, T), dst.dtype.type(scale))
    return dst


# ---- softmax cross-entropy ------------------------------------------------------------------------
@_parallel
def _cross_entropy_forward(logits, targets, one, probs, losses):
    n, v = logits.shape
    chunks = min(n, 16)
    for part in prange(chunks):
        bits = np.empty(v, dtype=np.int64)
        for i in range(part * n // chunks, (part + 1) * n // chunks):
            row, p = logits[i], probs[i]
            m = row[0]
            for j in range(1, v):
                m = max(m, row[j])
            for j in range(v):
                p[j] = row[j] - m
            exp_inplace(p, bits)
            total = one - one
            for j in range(v):
                total += p[j]
            losses[i] = math.log(total) - (row[targets[i]] - m)
            inv = one / total
            for j in range(v):
                p[j] *= inv


@_parallel
def _cross_entropy_backward(probs, targets, one, scale):
    n, v = probs.shape
    for i in prange(n):
        probs[i, targets[i]] -= one
        for j in range(v):
            probs[i, j] *= scale


def cross_entropy_forward(logits, targets):
    logits = _c(logits)
    probs = np.empty_like(logits)
    losses = np.empty(logits.shape[0], dtype=logits.dtype)
    _run(_cross_entropy_forward, logits.size, logits, _c(targets).astype(np.int64, copy=False),
         logits.dtype.type(1), probs, losses)
    return np.asarray(np.add.reduce(losses) / len(losses), dtype=logits.dtype), probs  # the mean


def cross_entropy_backward(dout, probs, targets):
    if np.may_share_memory(probs, targets):  # the loop would write the targets it reads
        return _reference("cross_entropy_backward", dout, probs, targets)
    t = probs.dtype.type
    _run(_cross_entropy_backward, probs.size, probs, _c(targets).astype(np.int64, copy=False),
         t(1), t(dout / t(len(targets))))
    return probs


# ---- the embedding backward -----------------------------------------------------------------------
@_serial
def _scatter_add_rows(target, indices, rows):
    for n in range(indices.size):
        t = indices[n]
        for j in range(rows.shape[1]):
            target[t, j] += rows[n, j]


def scatter_add_rows(target, indices, rows):
    if np.may_share_memory(target, indices) or np.may_share_memory(target, rows):
        return _reference("scatter_add_rows", target, indices, rows)  # (written while read)
    if indices.size == 0:
        return
    _scatter_add_rows(target, _c(indices).astype(np.int64, copy=False), _c(rows))


# ---- AdamW ----------------------------------------------------------------------------------------
@_parallel
def _adamw_update(p, g, m, v, b1, b2, c1, c2, decay, step_size, inv_bc2, eps):
    for i in prange(p.size):
        mi = b1 * m[i] + c1 * g[i]
        vi = b2 * v[i] + c2 * (g[i] * g[i])
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * mi / (math.sqrt(vi * inv_bc2) + eps)


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        raise ValueError("adamw_update: p, m and v must be C-contiguous (they are updated in place)")
    t = p.dtype.type
    _run(
        _adamw_update, p.size, p.reshape(-1), _c(g).reshape(-1), m.reshape(-1), v.reshape(-1),
        t(beta1), t(beta2), t(1 - beta1), t(1 - beta2), t(1 - lr * weight_decay),
        t(lr / (1 - beta1**step)), t(1 / (1 - beta2**step)), t(eps),
    )


# ---- the gradients' sum and norm -------------------------------------------------------------------
@_parallel
def _add_square_sum(total, other):
    squares = 0.0  # float64, whatever the arrays' type
    for i in prange(total.size):
        t = total[i] + other[i]
        total[i] = t
        squares += np.float64(t) * np.float64(t)
    return squares


@_parallel
def _square_sum(a):
    squares = 0.0
    for i in prange(a.size):
        squares += np.float64(a[i]) * np.float64(a[i])
    return squares


def add_square_sum(totals, *others):
    if not adds_in_place(totals, others) or any(  # (or the loop would read what it wrote)
            np.may_share_memory(total, o) for total, *added in zip(totals, *others) for o in added):
        return _reference("add_square_sum", totals, *others)
    squares = 0.0
    for total, *added in zip(totals, *others):
        flat = total.reshape(-1)
        part = 0.0 if added else _run(_square_sum, total.size, flat)
        for other in added:  # (the squares after the last addition count)
            part = _run(_add_square_sum, total.size, flat, other.reshape(-1))
        squares += part
    return float(squares)


# ---- threads --------------------------------------------------------------------------------------
def set_num_threads(n: int) -> None:
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def get_num_threads() -> int:
    return numba.get_num_threads()


def thread_safe() -> bool:
    """Whether several Python threads may call these kernels at once: not on numba's
    "workqueue" threading layer (taken where neither OpenMP nor TBB is found), which aborts
    the whole process when two threads enter it together."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: the layer is chosen on the first
        _relu_squared(np.zeros(1, np.float32), np.zeros(1, np.float32))
        layer = numba.threading_layer()
    return layer != "workqueue"


DISPATCHERS = [
    _relu_squared, _relu_squared_backward, _rms_norm_forward, _rms_norm_backward,
    _causal_softmax_columns, _softmax_backward_columns, _cross_entropy_forward, _cross_entropy_backward,
    _scatter_add_rows, _adamw_update, _add_square_sum, _square_sum,
]

KERNELS = {name: globals()[name] for name in COMPILED}  # same names as the references
