"""The NumPy references of tensorlite's kernels: each formula's one home, in plain NumPy.

Every op that needs one of these math pieces (functional.py, ops.py, gpt's KV-cache decoder)
and every compiled twin that must agree with it (kernels_c.py) depends on this file; it
depends on nothing but NumPy. `tensorlite.kernels` picks, per call, this reference or a
faster twin of the same name. A learner can read this file beside docs/derivations.md and
ignore the rest of the kernel layer.
"""

from __future__ import annotations

import functools
import math

import numpy as np


# ---- softmax and the causal mask -------------------------------------------------------------
def softmax(x: np.ndarray, axis: int = -1, inplace: bool = False) -> np.ndarray:
    """exp(x - max) / sum(exp(x - max)) along `axis`: subtracting the max keeps exp from
    overflowing. `inplace=True` reuses x's buffer (for a caller that made x and no longer
    needs it)."""
    e = np.subtract(x, x.max(axis=axis, keepdims=True), out=x if inplace else None)
    e = np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


@functools.lru_cache(maxsize=64)
def causal_bias(tq: int, tk: int, dtype: np.dtype) -> np.ndarray:
    """(tq, tk) additive mask: 0 where query i may see key j (j <= i + tk - tq), -inf after.
    The tq queries are the last ones of the tk positions (a KV cache's new tokens). Adding
    it is ~20x faster than writing -inf through a boolean index."""
    future = np.triu(np.ones((tq, tk), dtype=bool), k=tk - tq + 1)
    bias = np.where(future, -np.inf, 0.0).astype(dtype)
    bias.flags.writeable = False
    return bias


# ---- elementwise -----------------------------------------------------------------------------
def exp(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return np.exp(x, out=out)


def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) written as exp(min(x, 0)) / (1 + exp(-|x|)): never overflows, keeps
    full relative precision in both tails, and needs no data-dependent np.where (which
    cost ~8x more at 1e6 elements)."""
    y = np.exp(np.minimum(x, 0))
    y /= x.dtype.type(1) + np.exp(-np.abs(x))
    return y


def tanh_backward(dout: np.ndarray, out: np.ndarray) -> np.ndarray:
    """dout * (1 - out**2)."""
    return dout * (out.dtype.type(1) - out * out)


def sigmoid_backward(dout: np.ndarray, out: np.ndarray) -> np.ndarray:
    """dout * out * (1 - out)."""
    return dout * out * (out.dtype.type(1) - out)


def relu_squared(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """relu(x)**2 = max(x, 0)**2 (into `out` if given: the KV-cache decoder's buffers)."""
    r = np.asarray(np.maximum(x, 0, out=out))  # asarray: on a 0-d input a ufunc gives a scalar
    return np.multiply(r, r, out=r)


def relu_squared_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    """dout * 2 * relu(x)."""
    g = np.maximum(x, 0)
    g *= dout
    g *= x.dtype.type(2)
    return g


# ---- sums --------------------------------------------------------------------------------------
def sum_of_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum(a * b, axis=-1) without the (a * b) temporary (einsum), ~3x faster for rows of
    128 floats."""
    return np.einsum("...i,...i->...", a, b)


def scatter_add_rows(target: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> None:
    """target[indices[n]] += rows[n] for every n, repeated indices accumulating.

    Same result as np.add.at(target, indices, rows), ~6x faster here: sort the rows by
    index, sum each run of equal indices with one reduceat, add each sum once.
    """
    if indices.size == 0:
        return
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
    target[sorted_idx[starts]] += np.add.reduceat(rows[order], starts, axis=0)


def add_square_sum(totals: list[np.ndarray], *others: list[np.ndarray]) -> float:
    """totals[i] += others[k][i] for each list of `others`, in place; returns the sum of the
    results' squares, sum over i of sum(totals[i]**2): a float.

    With no others it only measures: add_square_sum(grads) is the squared global norm that
    gradient clipping needs. Where each gradient is the sum of several shards' (gpt.threaded),
    the C twin measures while it adds, in the same pass over memory, every array in one call
    (a call per parameter cost about what the saved pass did). The twin sums the squares in
    double (after blocks of 256 in the arrays' own type); NumPy's dot, here, sums float32 in
    float32."""
    squares = 0.0
    for i, total in enumerate(totals):
        for other in others:
            total += other[i]
        squares += float(np.vdot(total, total))
    return squares


# ---- a product by rows ---------------------------------------------------------------------------
def row_dots(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a @ b.T for a (n, k) and b (m, k): out[r, j] = a_r . b_j, the dot product of a row of a
    and a row of b. A tied head's logits, x @ wte.T, with wte (V, C) read as it is stored."""
    return np.matmul(a, b.T, out=out)


# ---- cross-entropy -----------------------------------------------------------------------------
def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray) -> tuple:
    """loss = mean_n(log sum_v exp(logits_nv) - logits_n,target_n); also returns
    softmax(logits), which the backward needs. (The row max is subtracted first.)"""
    rows = np.arange(len(targets))
    shifted = logits - logits.max(axis=1, keepdims=True)  # (N, V)
    probs = np.exp(shifted)
    total = probs.sum(axis=1)  # (N,)
    loss = np.log(total) - shifted[rows, targets]
    probs /= total[:, None]
    return np.asarray(loss.mean(), dtype=logits.dtype), probs


def cross_entropy_backward(dout, probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """dlogits = (probs - onehot(targets)) * dout / N, in place on probs."""
    probs[np.arange(len(targets)), targets] -= 1
    probs *= dout / probs.dtype.type(len(targets))
    return probs


# ---- RMSNorm -------------------------------------------------------------------------------------
def rms_norm_forward(x: np.ndarray, weight: np.ndarray, eps: float,
                     out: np.ndarray | None = None) -> tuple:
    """y = x * r * w with r = 1/sqrt(mean(x**2) + eps) per row; returns y and r (..., 1).
    (y into `out` if given: the KV-cache decoder's buffers.)"""
    ms = sum_of_products(x, x)[..., None] / x.dtype.type(x.shape[-1])  # (..., 1)
    r = 1.0 / np.sqrt(ms + x.dtype.type(eps))  # (..., 1)
    y = np.multiply(x, r, out=out)
    y *= weight
    return y, r


def rms_norm_backward(dout, x: np.ndarray, r: np.ndarray, weight: np.ndarray) -> tuple:
    """With xhat = x * r and dxhat = dout * w:
    dx = r * (dxhat - xhat * mean(dxhat * xhat)),  dw = sum over rows of dout * xhat."""
    c = x.shape[-1]
    xhat = x * r
    dxhat = dout * weight
    mean_dot = sum_of_products(dxhat, xhat)[..., None] / x.dtype.type(c)  # (..., 1)
    dx = xhat * mean_dot
    np.subtract(dxhat, dx, out=dx)
    dx *= r
    dw = sum_of_products(dout.reshape(-1, c).T, xhat.reshape(-1, c).T)  # (C,)
    return dx, dw


# ---- LayerNorm (GPT-2's) -------------------------------------------------------------------------
def layer_norm_forward(x, weight, bias, eps):
    """y = (x - mean(x)) * r * w + b with r = 1/sqrt(var(x) + eps) per row
    (the biased variance, over the last axis); returns y, xhat = (x - mean) * r and r (..., 1)."""
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean
    var = sum_of_products(xc, xc)[..., None] / x.dtype.type(x.shape[-1])  # (..., 1)
    r = 1.0 / np.sqrt(var + x.dtype.type(eps))  # (..., 1)
    xc *= r  # xhat
    y = xc * weight
    y += bias
    return y, xc, r


def layer_norm_backward(dout, xhat, r, weight):
    """With dxhat = dout * w:
    dx = r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
    dw = sum over rows of dout * xhat,  db = sum over rows of dout."""
    c = xhat.shape[-1]
    dxhat = dout * weight
    mean_d = dxhat.mean(axis=-1, keepdims=True)  # (..., 1)
    mean_dot = sum_of_products(dxhat, xhat)[..., None] / xhat.dtype.type(c)  # (..., 1)
    dx = xhat * mean_dot
    dx += mean_d
    np.subtract(dxhat, dx, out=dx)
    dx *= r
    rows = dout.reshape(-1, c)
    dw = sum_of_products(rows.T, xhat.reshape(-1, c).T)  # (C,)
    return dx, dw, rows.sum(axis=0)


# ---- GELU (GPT-2's) ----------------------------------------------------------------------------
GELU_K = math.sqrt(2.0 / math.pi)  # GPT-2's tanh approximation: gelu(x) ~ x Phi(x)
GELU_A = 0.044715


def gelu_forward(x):
    """y = x/2 * (1 + t),  t = tanh(k (x + a x**3)),  k = sqrt(2/pi),
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


def gelu_backward(dout, x, t):
    """dx = dout * ((1 + t)/2 + x/2 * (1 - t**2) * k (1 + 3 a x**2))."""
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


# ---- causal self-attention ----------------------------------------------------------------------
# The scores are kept TRANSPOSED, keys along rows: st = S^T = k q^T, (..., Tk, Tq). The softmax
# then reduces over axis -2, across rows, which NumPy does about twice as fast as along each
# short row, and P^T feeds both products of the backward without a copy.
def causal_softmax_columns(st: np.ndarray, scale) -> np.ndarray:
    """In place on st (..., Tk, Tq), the unscaled scores transposed (st[j, i] = k_j . q_i):
    st -> P^T, P = softmax over the keys query i may see (j <= i + Tk - Tq) of S * scale
    (the future's entries become 0). Returns st."""
    st *= scale
    st += causal_bias(st.shape[-1], st.shape[-2], st.dtype).T  # -inf where key j is future
    return softmax(st, -2, inplace=True)


def softmax_backward_columns(dst: np.ndarray, pt: np.ndarray, scale) -> np.ndarray:
    """In place: dst = dP^T -> dS^T = P^T * (dP^T - colsum(dP^T * P^T)) * scale (the softmax
    backward, with its scale, on transposed matrices). Returns dst."""
    dst -= np.einsum("...kq,...kq->...q", dst, pt)[..., None, :]
    dst *= pt
    dst *= scale
    return dst


def heads(qkv: np.ndarray, n_head: int) -> np.ndarray:
    """q, k, v of qkv (B, T, 3C), stacked: (3, B, H, T, hd). Views, no copies."""
    B, T, C3 = qkv.shape
    return qkv.reshape(B, T, 3, n_head, C3 // 3 // n_head).transpose(2, 0, 3, 1, 4)


def causal_self_attention_forward(qkv: np.ndarray, n_head: int, scale,
                                  softmax_columns=causal_softmax_columns) -> tuple:
    """y = softmax(q k^T * scale + causal mask) v per head, heads side by side: (B, T, C) for
    qkv (B, T, 3C) = q | k | v. Returns y and P^T (B, H, T, T), which the backward needs.
    (`softmax_columns`: the pass between the two products; a compiled twin may pass its own.)"""
    B, T, C3 = qkv.shape
    q, k, v = heads(qkv, n_head)  # each (B, H, T, hd), views of qkv
    pt = softmax_columns(k @ q.swapaxes(-1, -2), scale)  # S^T = k q^T -> P^T, (B, H, T, T)
    y = np.empty((B, T, n_head, C3 // 3 // n_head), dtype=pt.dtype)  # (B, T, H, hd)
    np.matmul(pt.swapaxes(-1, -2), v, out=y.transpose(0, 2, 1, 3))  # P v, into (B, H, T, hd)
    return y.reshape(B, T, C3 // 3), pt


def causal_self_attention_backward(dy: np.ndarray, qkv: np.ndarray, pt: np.ndarray,
                                   n_head: int, scale,
                                   softmax_backward=softmax_backward_columns) -> np.ndarray:
    """With P the probabilities, per head:
        dv = P^T dy,  dP = dy v^T,  dS = P * (dP - rowsum(dP * P)) * scale,
        dq = dS k,  dk = dS^T q
    packed into one dqkv (B, T, 3C) in the layout of qkv. (`softmax_backward`: the pass
    between the products; a compiled twin may pass its own.)"""
    B, T, C3 = qkv.shape
    hd = C3 // 3 // n_head
    q, k, v = heads(qkv, n_head)  # each (B, H, T, hd)
    dout = dy.reshape(B, T, n_head, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    dqkv = np.empty((B, T, 3, n_head, hd), dtype=qkv.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # views to write into, each (B, H, T, hd)
    np.matmul(pt, dout, out=dv)  # P^T dy
    dst = softmax_backward(v @ dout.swapaxes(-1, -2), pt, scale)  # dP^T = v dy^T -> dS^T
    np.matmul(dst.swapaxes(-1, -2), k, out=dq)  # dS k
    np.matmul(dst, q, out=dk)  # dS^T q
    return dqkv.reshape(B, T, C3)


# ---- one new position for each of many sequences (gpt.serve's batched decoding) ----------------
def decode_step(x: np.ndarray, put: np.ndarray, pos: np.ndarray, layers: list, k: np.ndarray,
                v: np.ndarray, n_head: int, scale, layernorm: bool = False, gelu: bool = False,
                linear=None, eps: float = 1e-5) -> np.ndarray:
    """A GPT's blocks for one new token of each of S sequences, in place on their residual
    rows x (S, C) (token + position embeddings in, the last block's output out): per block,
    x += attention(norm(x, ln_1)), then x += mlp(norm(x, ln_2)), mlp(h) = act(h @ W_fc) @ W_proj.

    layers[i] is block i's 12 arrays: (ln_1 weight, ln_1 bias, c_attn W, b, attn c_proj W, b,
    ln_2 weight, ln_2 bias, c_fc W, b, mlp c_proj W, b), None where there is no bias. The norm
    is rms_norm (its bias None) or, with `layernorm`, layer_norm; act is relu(h)**2 or, with
    `gelu`, gelu (tanh form). A linear layer is x @ W + b, or linear(x, (W, b)) if given (a bf16
    model's rounding, a weight laid out by rows).

    k, v (L, S', H, Tc, hd), S' >= S: the KV caches. Row s's new key and value go to position
    put[s] of cache s, and its query reads keys 0 .. pos[s] of it (put[s] == pos[s]); a row
    whose result nobody reads may put into a scratch position past every pos."""
    S, C = x.shape
    hd = C // n_head
    T1 = int(pos.max()) + 1  # the attention reads keys 0 .. T1-1 of every row's cache
    # (S, 1, 1, T1): 0 where key j is one of the row's positions (j <= pos), else -inf
    mask = np.where(np.arange(T1) <= pos[:, None], 0.0, -np.inf).astype(x.dtype)[:, None, None]
    rows = np.arange(S)
    if linear is None:
        def linear(a, layer):
            out = a @ layer[0]
            if layer[1] is not None:
                out += layer[1]
            return out

    def norm(a, weight, bias):
        if layernorm:
            return layer_norm_forward(a, weight, bias, eps)[0]
        return rms_norm_forward(a, weight, eps)[0]

    for i, (n1w, n1b, aw, ab, pw, pb, n2w, n2b, fw, fb, mw, mb) in enumerate(layers):
        # x = x + attn(norm(x, ln_1))
        heads = linear(norm(x, n1w, n1b), (aw, ab)).reshape(S, 3, n_head, hd)  # q | k | v
        k[i, rows, :, put] = heads[:, 1]  # (S, H, hd): each into its cache, at put
        v[i, rows, :, put] = heads[:, 2]
        q = heads[:, 0, :, None, :]  # (S, H, 1, hd)
        scores = q @ k[i, :S, :, :T1].swapaxes(-1, -2)  # (S, H, 1, T1): views of the caches
        scores *= scale
        scores += mask
        att = softmax(scores, inplace=True)  # (S, H, 1, T1)
        x += linear((att @ v[i, :S, :, :T1]).reshape(S, C), (pw, pb))
        # x = x + mlp(norm(x, ln_2))
        h = linear(norm(x, n2w, n2b), (fw, fb))  # (S, 4C)
        h = gelu_forward(h)[0] if gelu else relu_squared(h, out=h)
        x += linear(h, (mw, mb))
    return x


# ---- bfloat16 products (tensorlite/precision.py's MatMulBF16; docs/mixed-precision.md) --------
_EXPONENT, _SIGN = np.uint32(0x7F800000), np.uint32(0x80000000)


def round_to_bfloat16(x) -> np.ndarray:
    """x as float32, rounded to the nearest bfloat16 (ties to even), returned as float32 (a
    bf16 value is a float32 whose low 16 bits are zero). NaN stays NaN, +-inf stays +-inf, a
    value past bf16's largest (~3.39e38) becomes inf, subnormals round like any number.

    Rounding adds 0x7FFF, plus 1 if the bit that stays last is odd, then cuts the low 16 bits:
    below half-way rounds down, above rounds up, exactly half-way goes to the even neighbour.
    """
    u = np.array(x, dtype=np.float32, copy=True).view(np.uint32)  # (a 0-d array stays 0-d)
    nan = (u & ~_SIGN) > _EXPONENT
    odd = (u >> np.uint32(16)) & np.uint32(1)
    rounded = (u + (np.uint32(0x7FFF) + odd)) & np.uint32(0xFFFF0000)
    quiet_nan = (u | np.uint32(0x00400000)) & np.uint32(0xFFFF0000)  # keep the NaN a NaN
    return np.where(nan, quiet_nan, rounded).view(np.float32)


def bfloat16_bits(x) -> np.ndarray:
    """The 16-bit patterns (uint16) of round_to_bfloat16(x)."""
    return (round_to_bfloat16(x).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def bf16_operand(x) -> np.ndarray:
    """A matmul operand as the bf16 product reads it: rounded to bf16, subnormal values read
    as (signed) zero, as AVX512_BF16's dot product does. float32."""
    u = round_to_bfloat16(x).view(np.uint32)
    return np.where(u & _EXPONENT == 0, u & _SIGN, u).view(np.float32)


def matmul_bf16_reference(a, b) -> np.ndarray:
    """The spec: bf16_operand(a) @ bf16_operand(b), multiplied and summed in float64.

    A product of two bf16 numbers (8-bit significands) is exact in float32 (24 bits), so the
    only difference between this and any float32-accumulating implementation is the rounding
    of the sums (and the order they are taken in)."""
    return np.matmul(bf16_operand(a).astype(np.float64), bf16_operand(b).astype(np.float64))


def matmul_bf16(a, b) -> np.ndarray:
    """bf16(a) @ bf16(b) with float32 sums (np.matmul's shapes): the spec's arithmetic, the
    operands rounded here, then NumPy's float32 matmul (sgemm). The fallback on a CPU without
    AVX512_BF16; kernels_c.py's twin multiplies the same bf16 numbers with vdpbf16ps."""
    return np.matmul(bf16_operand(a), bf16_operand(b))
