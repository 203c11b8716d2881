"""Speed lives here, behind one door: the dispatch. Ops call the named kernels below and
read as math; this module decides which implementation of each one runs.

Every kernel has a NumPy reference in tensorlite/references.py (the readable spec, the test
oracle and the fallback); `KERNELS` names them, and one table, `_TWINS`, maps each path to
the twins it has, by the same names:

    c        serial, fused C loops (tensorlite/kernels.c, loaded by kernels_c.py): the default
    numpy    the references themselves
    numexpr  numexpr expressions for the elementwise families (kept for comparison:
             benchmarks/ops.py; it lost to NumPy on every CPU we measured)

The layers, each importing only those below it (tests/test_layering.py checks it):

    references.py  (NumPy only)  <-  kernels_c.py (C twins)  <-  kernels.py (this dispatch)
                                                                   <-  ops.py, functional.py

TENSORLITE_KERNELS=c|numpy|numexpr picks the path (or `use_kernels`); where the chosen path
cannot load (no C compiler) the NumPy references run and one line on stderr says so. The C
library is compiled once for this CPU and cached on disk; the first run says it is compiling.
Thread settings and the allocator are here too. Measurements: docs/performance.md.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable

import numexpr as ne
import numpy as np

from . import kernels_c, references

PATHS = ("numpy", "c", "numexpr")
DEFAULT_PATH = "c"
REFERENCES: dict[str, Callable] = {}  # name -> NumPy reference, filled by kernel() below
_active: dict[str, Callable] | None = None  # name -> twin in use (None: not chosen yet)
_path = ""
_threads: int | None = None  # the last set_num_threads(n)


def kernel(reference: Callable) -> Callable:
    """The dispatched kernel of a NumPy reference: calls go to the active path's twin of the
    same name, or to the reference itself where the path has none."""
    name = reference.__name__
    REFERENCES[name] = reference

    @functools.wraps(reference)
    def dispatch(*args, **kwargs):
        twins = _active if _active is not None else _choose()
        return twins.get(name, reference)(*args, **kwargs)

    dispatch.reference = reference
    return dispatch


# ---- the kernels, one line each (their math: tensorlite/references.py) ------------------------
exp = kernel(references.exp)
tanh = kernel(references.tanh)
sigmoid = kernel(references.sigmoid)
tanh_backward = kernel(references.tanh_backward)
sigmoid_backward = kernel(references.sigmoid_backward)
relu_squared = kernel(references.relu_squared)
relu_squared_backward = kernel(references.relu_squared_backward)
scatter_add_rows = kernel(references.scatter_add_rows)
add_square_sum = kernel(references.add_square_sum)
cross_entropy_forward = kernel(references.cross_entropy_forward)
cross_entropy_backward = kernel(references.cross_entropy_backward)
rms_norm_forward = kernel(references.rms_norm_forward)
rms_norm_backward = kernel(references.rms_norm_backward)
layer_norm_forward = kernel(references.layer_norm_forward)
layer_norm_backward = kernel(references.layer_norm_backward)
gelu_forward = kernel(references.gelu_forward)
gelu_backward = kernel(references.gelu_backward)
causal_softmax_columns = kernel(references.causal_softmax_columns)
softmax_backward_columns = kernel(references.softmax_backward_columns)
causal_self_attention_forward = kernel(references.causal_self_attention_forward)
causal_self_attention_backward = kernel(references.causal_self_attention_backward)
row_dots = kernel(references.row_dots)
decode_step = kernel(references.decode_step)
sum_of_products = references.sum_of_products  # no twin: einsum is as fast as a loop


# ---- bfloat16 products: the same dispatch by path, plus a switch and a line of their own -------
BF16_PATHS = ("fast", "fallback")
NO_SPEEDUP = ("tensorlite: this CPU has no AVX512_BF16 instructions (or no C compiler): bfloat16 "
              "matmuls round their operands and run float32 sgemm: the same results, no speed-up")
REFERENCES["matmul_bf16"] = references.matmul_bf16
_told = False


def bf16_fast_available() -> bool:
    """Whether this CPU (and build) has the fast bf16 GEMM: AVX512_BF16 and the C kernels."""
    try:
        return kernels_c.bf16_available()
    except Exception:  # noqa: BLE001 - no compiler: the fallback
        return False


def bf16_path() -> str:
    """"fast" (kernels_c's vdpbf16ps twin) or "fallback" (references.matmul_bf16: operands
    rounded, then sgemm): what matmul_bf16 runs when no path is asked for. Fast where the CPU
    has it and the C kernels are the path in use; TENSORLITE_BF16=fallback or =fast picks one
    (fast only where the CPU has it)."""
    wanted = os.environ.get("TENSORLITE_BF16", "").strip().lower()
    if wanted == "fallback" or (wanted != "fast" and kernel_path() != "c"):
        return "fallback"
    return "fast" if bf16_fast_available() else "fallback"


def matmul_bf16(a, b, path: str | None = None) -> np.ndarray:
    """bf16(a) @ bf16(b) with float32 sums (references.matmul_bf16 is the math), a float32
    array, on `path` ("fast" or "fallback"; default bf16_path())."""
    path = path or bf16_path()
    if path not in BF16_PATHS:
        raise ValueError(f"matmul_bf16: path must be one of {', '.join(BF16_PATHS)}, got {path!r}")
    if path == "fast" and bf16_fast_available():
        return kernels_c.matmul_bf16(a, b)
    return references.matmul_bf16(a, b)


def say_if_no_speedup() -> None:
    """One line on stderr (once per process) where bf16 products gain nothing on this CPU."""
    global _told
    if not _told and not bf16_fast_available():
        print(NO_SPEEDUP, file=sys.stderr)
        _told = True


def adamw_kernel(size: int):
    """The fast twin of gpt.optim.adamw_update (same arguments, in place) on the active path,
    or None: then the NumPy math in gpt/optim.py runs (tensorlite never imports gpt, so
    that reference lives there). `size` is the parameter's number of values."""
    twins = _active if _active is not None else _choose()
    return twins.get("adamw_update")


# ---- the paths ---------------------------------------------------------------------------------
def _c_twins() -> dict[str, Callable]:
    return kernels_c.kernels()  # compiles on a fresh install (and says so), else loads


def _numexpr_twins() -> dict[str, Callable]:
    return dict(_NUMEXPR)


_TWINS: dict[str, Callable[[], dict[str, Callable]]] = {  # path -> loader of its twins
    "c": _c_twins,
    "numpy": dict,
    "numexpr": _numexpr_twins,
}


def use_kernels(path: str) -> str:
    """Run the kernels of `path` ("c", "numpy" or "numexpr") from now on. Returns the path
    in use: "numpy" if the path asked for cannot be loaded (one line says why)."""
    global _active, _path
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}; choose one of {', '.join(PATHS)}")
    try:
        twins = _TWINS[path]()
    except Exception as e:  # noqa: BLE001 - no compiler, ...: fall back
        label = "C" if path == "c" else path
        print(f"tensorlite: {label} kernels unavailable ({type(e).__name__}: {e}); "
              "running the NumPy reference kernels", file=sys.stderr)
        path, twins = "numpy", {}
    _active, _path = twins, path
    return path


def kernel_path() -> str:
    """The path in use: "c", "numpy" or "numexpr". The first call (or the first kernel call)
    chooses it: TENSORLITE_KERNELS, or "c" when unset; "numpy" where the chosen path cannot
    load."""
    if _active is None:
        _choose()
    return _path


def _choose() -> dict[str, Callable]:
    """First kernel call: take TENSORLITE_KERNELS (default c) and load it."""
    wanted = os.environ.get("TENSORLITE_KERNELS", "").strip().lower() or DEFAULT_PATH
    if wanted not in PATHS:
        print(f"tensorlite: TENSORLITE_KERNELS={wanted!r} is not one of {', '.join(PATHS)}; "
              "running the NumPy reference kernels", file=sys.stderr)
        wanted = "numpy"
    use_kernels(wanted)
    assert _active is not None
    return _active


def warm_up() -> float:
    """Choose the path and load (or, on a fresh install, compile) its kernels now, so the
    first training step does not pay for it. Says so on stderr when it has to compile.
    Returns the seconds it took (0 when the path was chosen already)."""
    if _active is not None:
        return 0.0
    start = time.perf_counter()
    _choose()
    return time.perf_counter() - start


# ---- the numexpr twins of the elementwise families ----------------------------------------------
def _ne(expr: str, out: np.ndarray | None = None, **arrays) -> np.ndarray:
    return ne.evaluate(expr, local_dict=arrays, out=out, casting="same_kind")


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
    """Use `n` threads everywhere: NumPy's BLAS (matmuls) and numexpr. (A data-parallel
    worker calls this with cores // workers. The C kernels are serial: they run on the
    calling thread, except matmul_bf16 and row_dots, which split a large product over n.)"""
    global _blas_limiter, _threads
    if int(n) < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    _threads = int(n)
    ne.set_num_threads(_threads)
    kernels_c.threads = _threads  # the twins that split their work use as many
    from threadpoolctl import threadpool_limits

    _blas_limiter = threadpool_limits(limits=_threads, user_api="blas")


def get_num_threads() -> int:
    """The BLAS thread count (set_num_threads keeps numexpr's equal to it)."""
    from threadpoolctl import threadpool_info

    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    return blas[0] if blas else ne.get_num_threads()


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
