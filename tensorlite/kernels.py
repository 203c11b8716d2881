"""Speed lives here, behind one door: numexpr expressions, the size thresholds that decide
when numexpr pays, and thread settings. Ops call the small named helpers below and read as
math; each helper has a NumPy path and a numexpr path that give the same result (tested).

Why per family: numexpr costs ~7-30 us a call and, without VML, evaluates exp/tanh with
scalar libm calls, while NumPy 2 has SIMD loops for float32 exp/tanh. Measured here
(`python3 benchmarks/ops.py`, 2 cores, 1e3..1e6 float32 elements, 1 and 2 threads) NumPy won
every family at every size: numexpr was 1.6-100x slower, even on the long fused expressions
(AdamW, activation backward) where it saves temporaries. So every family defaults to None
(NumPy); the switch stays, per family, for machines where numexpr pays (VML, many cores):
re-run the benchmark there and call `set_numexpr_threshold`. Table in docs/performance.md.
"""

from __future__ import annotations

import os

import numexpr as ne
import numpy as np

# Minimum number of elements before a family goes through numexpr (None: never).
NUMEXPR_MIN_SIZE: dict[str, int | None] = {
    "transcendental": None,  # exp, tanh, sigmoid: numexpr 1.6-100x slower up to 1e6
    "fused": None,  # activation backward, AdamW: numexpr 2.7-33x slower up to 1e6
}
_env = os.environ.get("TENSORLITE_NUMEXPR")  # "0": never, "1": always (tests, benchmarks)
_FORCE: bool | None = None if _env is None else _env == "1"


def set_numexpr_threshold(family: str, min_size: int | None) -> None:
    """Change the switch point of one op family (`None` turns numexpr off for it)."""
    if family not in NUMEXPR_MIN_SIZE:
        raise KeyError(f"unknown op family {family!r}; known: {sorted(NUMEXPR_MIN_SIZE)}")
    if min_size is not None and (not isinstance(min_size, int) or min_size < 0):
        raise ValueError(f"min_size must be an int >= 0 or None, got {min_size!r}")
    NUMEXPR_MIN_SIZE[family] = min_size


def force_numexpr(value: bool | None) -> None:
    """True: every helper uses numexpr; False: none does; None: follow the thresholds."""
    global _FORCE
    _FORCE = value


def use_numexpr(family: str, size: int) -> bool:
    if _FORCE is not None:
        return _FORCE
    threshold = NUMEXPR_MIN_SIZE[family]
    return threshold is not None and size >= threshold


def _ne(expr: str, out: np.ndarray | None = None, **arrays) -> np.ndarray:
    return ne.evaluate(expr, local_dict=arrays, out=out, casting="same_kind")


# ---- threads -------------------------------------------------------------------------------
_blas_limiter = None


def set_num_threads(n: int) -> None:
    """Use `n` threads in numexpr and in NumPy's BLAS (matmuls)."""
    global _blas_limiter
    if int(n) < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    ne.set_num_threads(int(n))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return
    _blas_limiter = threadpool_limits(limits=int(n), user_api="blas")


def get_num_threads() -> int:
    try:
        from threadpoolctl import threadpool_info

        blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        return blas[0] if blas else ne.get_num_threads()
    except ImportError:  # pragma: no cover
        return ne.get_num_threads()


# ---- transcendental ----------------------------------------------------------------------
def exp(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    if use_numexpr("transcendental", x.size):
        return _ne("exp(x)", out=out, x=x)
    return np.exp(x, out=out)


def tanh(x: np.ndarray) -> np.ndarray:
    if use_numexpr("transcendental", x.size):
        return _ne("tanh(x)", x=x)
    return np.tanh(x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) written as exp(min(x, 0)) / (1 + exp(-|x|)): never overflows, keeps
    full relative precision in both tails, and needs no data-dependent np.where (which
    cost ~8x more at 1e6 elements)."""
    one = x.dtype.type(1)
    if use_numexpr("transcendental", x.size):
        return _ne("exp(where(x < 0, x, 0)) / (one + exp(-abs(x)))", x=x, one=one)
    y = np.exp(np.minimum(x, 0))
    y /= one + np.exp(-np.abs(x))
    return y


# ---- fused elementwise ---------------------------------------------------------------------
def tanh_backward(dout: np.ndarray, out: np.ndarray) -> np.ndarray:
    """dout * (1 - out**2)."""
    one = out.dtype.type(1)
    if use_numexpr("fused", out.size):
        return _ne("dout * (one - y * y)", dout=dout, y=out, one=one)  # not out=: _ne's output buffer
    return dout * (one - out * out)


def sigmoid_backward(dout: np.ndarray, out: np.ndarray) -> np.ndarray:
    """dout * out * (1 - out)."""
    one = out.dtype.type(1)
    if use_numexpr("fused", out.size):
        return _ne("dout * y * (one - y)", dout=dout, y=out, one=one)
    return dout * out * (one - out)


def relu_squared(x: np.ndarray) -> np.ndarray:
    """relu(x)**2 = max(x, 0)**2."""
    if use_numexpr("fused", x.size):
        zero = x.dtype.type(0)
        return _ne("where(x > zero, x * x, zero)", x=x, zero=zero)
    r = np.asarray(np.maximum(x, 0))  # asarray: on a 0-d input a ufunc returns a scalar
    return np.multiply(r, r, out=r)


def relu_squared_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    """dout * 2 * relu(x)."""
    two, zero = x.dtype.type(2), x.dtype.type(0)
    if use_numexpr("fused", x.size):
        return _ne("where(x > zero, two * x * dout, zero)", x=x, dout=dout, two=two, zero=zero)
    g = np.maximum(x, 0)
    g *= dout
    g *= two
    return g


def adamw_kernel(size: int):
    """The fast twin of gpt.optim.adamw_update (same arguments, in place) for a parameter of
    `size` values, or None: then the NumPy math in gpt/optim.py runs. numexpr, where it pays."""
    return adamw_update_numexpr if use_numexpr("fused", size) else None


def adamw_update_numexpr(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray,
                         lr: float, beta1: float, beta2: float, eps: float,
                         weight_decay: float, step: int) -> None:
    """gpt.optim.adamw_update in three numexpr passes, in place on m, v, p."""
    t = p.dtype.type
    b1, b2, c1, c2 = t(beta1), t(beta2), t(1 - beta1), t(1 - beta2)
    decay, step_size = t(1 - lr * weight_decay), t(lr / (1 - beta1**step))
    inv_bc2, eps_ = t(1 / (1 - beta2**step)), t(eps)
    _ne("b1 * m + c1 * g", out=m, b1=b1, m=m, c1=c1, g=g)
    _ne("b2 * v + c2 * g * g", out=v, b2=b2, v=v, c2=c2, g=g)
    _ne(
        "p * decay - step_size * m / (sqrt(v * inv_bc2) + eps_)",
        out=p, p=p, decay=decay, step_size=step_size, m=m, v=v, inv_bc2=inv_bc2, eps_=eps_,
    )


# ---- reductions -----------------------------------------------------------------------------
def sum_of_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum(a * b, axis=-1) without the (a * b) temporary (einsum), ~3x faster for rows of
    128 floats."""
    return np.einsum("...i,...i->...", a, b)


# ---- scatter ------------------------------------------------------------------------------------
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


# ---- the allocator ----------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_allocator_tuned = False


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep large temporaries in the heap instead of mmap/munmap-ing them on every op.

    With glibc's defaults each array above ~128 KiB-32 MiB (the threshold adapts) is mapped
    fresh and returned to the OS when freed, so a training step page-faults thousands of
    times. Raising M_MMAP_THRESHOLD (32 MiB is glibc's maximum on 64-bit) and
    M_TRIM_THRESHOLD lets freed blocks be reused. Same effect as starting Python with
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set. Linux + glibc only; elsewhere,
    or if TENSORLITE_TUNE_MALLOC=0, it does nothing and returns False.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if os.environ.get("TENSORLITE_TUNE_MALLOC", "1") == "0":
        return False
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    except (OSError, AttributeError):
        return False
    _allocator_tuned = ok
    return ok
