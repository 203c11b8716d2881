"""Speed lives here, behind one door. Ops call the small named helpers below and read as
math; this module decides which implementation of each helper runs.

Every kernel has a NumPy reference: the readable spec, the test oracle and the fallback.
A reference is marked `@kernel` (here, or in functional.py right beside its op), and one
table, `_TWINS`, maps each path to the compiled or threaded twins it has, by name:

    c        serial, fused C loops (tensorlite/kernels.c, loaded by kernels_c.py): the default
    numpy    the references themselves
    numba    threaded, fused loops (tensorlite/kernels_numba.py; the optional `numba` extra)
    numexpr  numexpr expressions for the elementwise families (kept for comparison:
             benchmarks/ops.py; it lost to NumPy on every CPU we measured)

TENSORLITE_KERNELS=c|numpy|numba|numexpr picks the path (or `use_kernels`); where the
chosen path cannot load (no C compiler, numba not installed) the NumPy references run and
one line on stderr says so. C is the default: it is as fast per kernel as numba, releases
the GIL (so the caller's threads share the work), costs a few MB and milliseconds to load
where numba costs ~130 MB and ~1 s, and never fights BLAS for the cores (it starts no
threads). The C library is compiled once for this CPU with the system's compiler and cached
on disk (beside the package, or in a user cache folder where that is read-only); the first
run says it is compiling. Thread settings and the allocator are here too. Measurements
behind every choice: docs/performance.md.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable

import numexpr as ne
import numpy as np

PATHS = ("numpy", "c", "numba", "numexpr")
DEFAULT_PATH = "c"
REFERENCES: dict[str, Callable] = {}  # name -> NumPy reference, filled by @kernel
_active: dict[str, Callable] | None = None  # name -> twin in use (None: not chosen yet)
_path = ""
_threads: int | None = None  # the last set_num_threads(n), applied to numba when it loads


def kernel(reference: Callable) -> Callable:
    """Mark a NumPy function as a kernel: calls go to the active path's twin of the same
    name, or to the reference itself where the path has none."""
    name = reference.__name__
    REFERENCES[name] = reference

    @functools.wraps(reference)
    def dispatch(*args, **kwargs):
        twins = _active if _active is not None else _choose()
        return twins.get(name, reference)(*args, **kwargs)

    dispatch.reference = reference
    return dispatch


def _numba_twins() -> dict[str, Callable]:
    from . import kernels_numba

    if _threads is not None:
        kernels_numba.set_num_threads(_threads)
    return kernels_numba.KERNELS


def _c_twins() -> dict[str, Callable]:
    from . import kernels_c

    return kernels_c.kernels()  # compiles on a fresh install (and says so), else loads


def _numexpr_twins() -> dict[str, Callable]:
    return dict(_NUMEXPR)


def contiguous(a, dtype=None) -> np.ndarray:
    """`a` as a C-contiguous array, of `dtype` if given: no copy if it already is (what the
    compiled twins walk). (Not np.ascontiguousarray: that turns a 0-d array into a 1-d one.)"""
    if isinstance(a, np.ndarray) and a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
        return a
    return np.array(a, dtype=dtype, order="C")


def square_stack(a) -> bool:
    """(..., T, T) with T >= 1, C-contiguous: the layout the compiled twins of the attention's
    softmax passes walk in place."""
    return a.ndim >= 2 and a.shape[-1] == a.shape[-2] >= 1 and a.flags.c_contiguous


def adds_in_place(totals, others) -> bool:
    """What the compiled twins of add_square_sum walk: C-contiguous arrays, the totals float32
    or float64, all of one dtype (and, with others, writable); each list of `others` as long
    as totals, with arrays of their totals' dtype and shape. (Whether an array added into a
    total overlaps it, each twin checks its own way: the C one from the addresses.)"""
    dtype = totals[0].dtype if len(totals) else None
    if dtype is None or dtype.char not in "fd" or any(len(o) != len(totals) for o in others):
        return False
    for total, *added in zip(totals, *others):
        flags = total.flags
        if total.dtype != dtype or not flags.c_contiguous or added and not flags.writeable:
            return False
        for other in added:
            if (getattr(other, "dtype", None) != dtype or other.shape != total.shape
                    or not other.flags.c_contiguous):
                return False
    return True


def run_reference(name: str, *args):
    """Run kernel `name`'s NumPy reference: what a compiled twin hands the inputs its loops
    do not take (another layout, or arrays that overlap the one a loop writes)."""
    return REFERENCES[name](*args)


# The kernels that the compiled paths (C, numba) have twins of, by name.
COMPILED = ("relu_squared", "relu_squared_backward", "rms_norm_forward", "rms_norm_backward",
            "causal_softmax_columns", "softmax_backward_columns",
            "cross_entropy_forward", "cross_entropy_backward", "scatter_add_rows", "adamw_update",
            "add_square_sum")
# ... and those only the C path has: the whole causal attention, products included (numba's
# path runs the references, which call its softmax twins between NumPy's BLAS products).
C_ONLY = ("causal_self_attention_forward", "causal_self_attention_backward")

_TWINS: dict[str, Callable[[], dict[str, Callable]]] = {  # path -> loader of its twins
    "c": _c_twins,
    "numba": _numba_twins,
    "numpy": dict,
    "numexpr": _numexpr_twins,
}


def use_kernels(path: str) -> str:
    """Run the kernels of `path` ("c", "numpy", "numba" or "numexpr") from now on. Returns
    the path in use: "numpy" if the path asked for cannot be loaded (one line says why)."""
    global _active, _path
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}; choose one of {', '.join(PATHS)}")
    try:
        twins = _TWINS[path]()
    except Exception as e:  # noqa: BLE001 - no compiler, numba missing, ...: fall back
        label = "C" if path == "c" else path
        print(f"tensorlite: {label} kernels unavailable ({type(e).__name__}: {e}); "
              "running the NumPy reference kernels", file=sys.stderr)
        path, twins = "numpy", {}
    _active, _path = twins, path
    return path


def kernel_path() -> str:
    """The path in use: "c", "numpy", "numba" or "numexpr". The first call (or the first
    kernel call) chooses it: TENSORLITE_KERNELS, or "c" when unset; "numpy" where the chosen
    path cannot load."""
    if _active is None:
        _choose()
    return _path


def _choose() -> dict[str, Callable]:
    """First kernel call: take TENSORLITE_KERNELS (default c), load it, warm it up."""
    wanted = os.environ.get("TENSORLITE_KERNELS", "").strip().lower() or DEFAULT_PATH
    if wanted not in PATHS:
        print(f"tensorlite: TENSORLITE_KERNELS={wanted!r} is not one of {', '.join(PATHS)}; "
              "running the NumPy reference kernels", file=sys.stderr)
        wanted = "numpy"
    if use_kernels(wanted) == "numba":
        warm_up()
    assert _active is not None
    return _active


def warm_up() -> float:
    """Choose the path and load (or, on a fresh install, compile) its kernels now, so the
    first training step does not pay for it. Says so on stderr when it has to compile.
    Returns the seconds it took (the C library compiles and loads whole when the path is
    chosen; numba compiles each kernel on its first call, so they are all called here)."""
    if _active is None:
        start = time.perf_counter()
        _choose()  # on the numba path this comes back here, below
        return time.perf_counter() - start
    if _path != "numba":
        return 0.0
    from . import kernels_numba as kn

    cold = [d for d in kn.DISPATCHERS if not os.path.exists(d._cache._cache_file._index_path)]
    if cold:
        print(f"tensorlite: compiling {len(cold)} numba kernels for this CPU (once; cached in "
              f"{kn.DISPATCHERS[0].stats.cache_path}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    _exercise(np.float32)
    seconds = time.perf_counter() - t0
    if cold:
        print(f"tensorlite: kernels compiled in {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def _exercise(dtype) -> None:
    """Call every twin once on small arrays of `dtype` (each compiles for what it is given)."""
    from .functional import (
        causal_self_attention_backward,
        causal_self_attention_forward,
        cross_entropy_backward,
        cross_entropy_forward,
        rms_norm_backward,
        rms_norm_forward,
    )

    x = np.linspace(-1, 1, 24, dtype=dtype).reshape(2, 2, 6)  # (B, T, 3C), C = 2
    y, pt = causal_self_attention_forward(x, 1, 0.5)
    causal_self_attention_backward(y, x, pt, 1, 0.5)
    w = np.ones(6, dtype=dtype)
    y, r = rms_norm_forward(x, w, 1e-5)
    rms_norm_backward(y, x, r, w)
    targets = np.zeros(4, dtype=np.int64)
    loss, probs = cross_entropy_forward(x.reshape(4, 6), targets)
    cross_entropy_backward(loss, probs, targets)
    relu_squared_backward(relu_squared(x), x)
    adamw_kernel(x.size)(x.copy(), x, np.zeros_like(x), np.zeros_like(x), 1e-3, 0.9, 0.99, 1e-8,
                         0.1, 1)
    scatter_add_rows(np.zeros((3, 6), dtype=dtype), targets, x.reshape(4, 6))
    add_square_sum([x.copy()], [x])
    add_square_sum([x])


# ---- elementwise: the NumPy references -----------------------------------------------------
@kernel
def exp(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return np.exp(x, out=out)


@kernel
def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


@kernel
def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) written as exp(min(x, 0)) / (1 + exp(-|x|)): never overflows, keeps
    full relative precision in both tails, and needs no data-dependent np.where (which
    cost ~8x more at 1e6 elements)."""
    y = np.exp(np.minimum(x, 0))
    y /= x.dtype.type(1) + np.exp(-np.abs(x))
    return y


@kernel
def tanh_backward(dout: np.ndarray, out: np.ndarray) -> np.ndarray:
    """dout * (1 - out**2)."""
    return dout * (out.dtype.type(1) - out * out)


@kernel
def sigmoid_backward(dout: np.ndarray, out: np.ndarray) -> np.ndarray:
    """dout * out * (1 - out)."""
    return dout * out * (out.dtype.type(1) - out)


@kernel
def relu_squared(x: np.ndarray) -> np.ndarray:
    """relu(x)**2 = max(x, 0)**2."""
    r = np.asarray(np.maximum(x, 0))  # asarray: on a 0-d input a ufunc returns a scalar
    return np.multiply(r, r, out=r)


@kernel
def relu_squared_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    """dout * 2 * relu(x)."""
    g = np.maximum(x, 0)
    g *= dout
    g *= x.dtype.type(2)
    return g


def adamw_kernel(size: int):
    """The fast twin of gpt.optim.adamw_update (same arguments, in place) on the active path,
    or None: then the NumPy math in gpt/optim.py runs (tensorlite never imports gpt, so
    that reference lives there). `size` is the parameter's number of values."""
    twins = _active if _active is not None else _choose()
    return twins.get("adamw_update")


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


@kernel
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


@kernel
def add_square_sum(totals: list[np.ndarray], *others: list[np.ndarray]) -> float:
    """totals[i] += others[k][i] for each list of `others`, in place; returns the sum of the
    results' squares, sum over i of sum(totals[i]**2): a float.

    With no others it only measures: add_square_sum(grads) is the squared global norm that
    gradient clipping needs. Where each gradient is the sum of several shards' (gpt.threaded),
    the compiled twins measure while they add, in the same pass over memory; the C one takes
    every array in one call (a call per parameter cost about what the saved pass did). The
    twins sum the squares in double (C: after blocks of 256 in the arrays' own type); NumPy's
    dot, here, sums float32 in float32."""
    squares = 0.0
    for i, total in enumerate(totals):
        for other in others:
            total += other[i]
        squares += float(np.vdot(total, total))
    return squares


def sum_of_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum(a * b, axis=-1) without the (a * b) temporary (einsum), ~3x faster for rows of
    128 floats."""
    return np.einsum("...i,...i->...", a, b)


# ---- the numexpr twins of the elementwise families ----------------------------------------------
def _ne(expr: str, out: np.ndarray | None = None, **arrays) -> np.ndarray:
    return ne.evaluate(expr, local_dict=arrays, out=out, casting="same_kind")


_NUMEXPR: dict[str, Callable] = {
    "exp": lambda x, out=None: _ne("exp(x)", out=out, x=x),
    "tanh": lambda x: _ne("tanh(x)", x=x),
    "sigmoid": lambda x: _ne("exp(where(x < 0, x, 0)) / (one + exp(-abs(x)))", x=x,
                             one=x.dtype.type(1)),
    "tanh_backward": lambda dout, out: _ne("dout * (one - y * y)", dout=dout, y=out,
                                           one=out.dtype.type(1)),
    "sigmoid_backward": lambda dout, out: _ne("dout * y * (one - y)", dout=dout, y=out,
                                              one=out.dtype.type(1)),
    "relu_squared": lambda x: _ne("where(x <= zero, zero, x * x)", x=x, zero=x.dtype.type(0)),
    "relu_squared_backward": lambda dout, x: _ne(
        "where(x <= zero, zero, two * x * dout)", x=x, dout=dout, two=x.dtype.type(2),
        zero=x.dtype.type(0)),
    "adamw_update": adamw_update_numexpr,
}


# ---- threads -------------------------------------------------------------------------------
_blas_limiter = None


def set_num_threads(n: int) -> None:
    """Use `n` threads everywhere: NumPy's BLAS (matmuls), the numba kernels and numexpr.
    (A data-parallel worker calls this with cores // workers. The C kernels are serial: they
    run on the calling thread.)"""
    global _blas_limiter, _threads
    if int(n) < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    _threads = int(n)
    ne.set_num_threads(_threads)
    if _path == "numba":
        from . import kernels_numba

        kernels_numba.set_num_threads(_threads)
    from threadpoolctl import threadpool_limits

    _blas_limiter = threadpool_limits(limits=_threads, user_api="blas")


def get_num_threads() -> int:
    """The BLAS thread count (set_num_threads keeps the others equal to it)."""
    from threadpoolctl import threadpool_info

    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    return blas[0] if blas else ne.get_num_threads()


def thread_safe() -> bool:
    """Whether several threads of this process may run the kernels at once (gpt.threaded's
    shards do). True on every path but numba on its "workqueue" threading layer."""
    if kernel_path() != "numba":
        return True
    from . import kernels_numba

    return kernels_numba.thread_safe()


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
