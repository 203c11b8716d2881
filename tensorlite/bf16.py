"""bfloat16 matrix products: the NumPy reference (the spec), and the door to its C twin.

bfloat16 (bf16) is float32 cut to its upper 16 bits: the same sign and 8-bit exponent, 7
mantissa bits instead of 23. `matmul_bf16(a, b)` rounds both operands to bf16 (to nearest,
ties to even) and multiplies them with float32 accumulation. Two ways to run it, one result
(up to the order of the float32 sums):

    fast      kernels.c's bf16 GEMM: AVX512_BF16's vdpbf16ps does two bf16 multiply-adds per
              float32 lane, twice float32 FMA's rate (CPUs with avx512_bf16: AMD Zen 4 and
              later, Intel Cooper Lake and Sapphire Rapids onwards)
    fallback  round the operands here, then NumPy's float32 matmul (sgemm): the same numbers
              on any CPU, with no speed-up

TENSORLITE_BF16=fallback (or `path="fallback"`) forces the fallback, and so does a kernel
path other than C (TENSORLITE_KERNELS=numpy: the references only) unless TENSORLITE_BF16=fast. The hardware's dot
product reads subnormal operands as zero, so the spec does too (`bf16_operand`); a product
smaller than float32's smallest normal number (~1e-38) is flushed to zero by the fast path
and kept by sgemm: far below any tolerance a float32 result has.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PATHS = ("fast", "fallback")
NO_SPEEDUP = ("tensorlite: this CPU has no AVX512_BF16 instructions (or no C compiler): bfloat16 "
              "matmuls round their operands and run float32 sgemm: the same results, no speed-up")

_EXPONENT, _SIGN = np.uint32(0x7F800000), np.uint32(0x80000000)


# ---- the reference: rounding and the product, in NumPy ------------------------------------------
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


def matmul_bf16_fallback(a, b) -> np.ndarray:
    """The reference's arithmetic with float32 sums: operands rounded, then NumPy's sgemm."""
    return np.matmul(bf16_operand(a), bf16_operand(b))


# ---- the C twin (kernels.c) ---------------------------------------------------------------------
_lib = None  # the loaded library's bf16 functions, or False where there are none
_loading = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_told = False


def _c_library():
    """kernels.c's bf16 functions (ctypes), or False: no compiler, or no AVX512_BF16 here."""
    global _lib
    with _loading:
        if _lib is None:
            try:
                from . import kernels_c

                kernels_c.kernels()
                lib = kernels_c._lib
                lib.bf16_gemm_available.restype = ctypes.c_int64
                if not lib.bf16_gemm_available():
                    raise OSError("no AVX512_BF16")
                p, i = ctypes.c_void_p, ctypes.c_int64
                for name, args, result in (("bf16_packed_b_size", [i, i], i),
                                           ("bf16_packed_a_size", [], i),
                                           ("bf16_pack_b", [p, i, i, i, i, p], None),
                                           ("bf16_gemm_packed", [p, i, i, p, p, i, i, i, i, p], None)):
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = args, result
                _lib = lib
            except Exception:  # noqa: BLE001 - no compiler, no instructions: the fallback
                _lib = False
    return _lib


def fast_path_available() -> bool:
    """Whether this CPU (and build) has the fast bf16 GEMM: AVX512_BF16 and the C kernels."""
    return bool(_c_library())


def bf16_path() -> str:
    """"fast" or "fallback": what matmul_bf16 runs here when no path is asked for. Fast
    where the CPU has it and the C kernels are the path in use (TENSORLITE_KERNELS=numpy
    runs references only); TENSORLITE_BF16=fallback or =fast picks one (fast only where
    the CPU has it)."""
    from .kernels import kernel_path

    wanted = os.environ.get("TENSORLITE_BF16", "").strip().lower()
    if wanted == "fallback" or (wanted != "fast" and kernel_path() != "c"):
        return "fallback"
    return "fast" if fast_path_available() else "fallback"


def say_if_no_speedup() -> None:
    """One line on stderr (once per process) where bf16 products gain nothing on this CPU."""
    global _told
    if not _told and not fast_path_available():
        print(NO_SPEEDUP, file=sys.stderr)
        _told = True


def _threads() -> int:
    """The threads one product is split over: tensorlite.set_num_threads's count (1 inside
    gpt.threaded's shards, which share the cores between them), else every core."""
    from . import kernels

    if kernels._threads is not None:
        return kernels._threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _strides(x: np.ndarray) -> tuple[int, int]:
    return x.strides[0] // 4, x.strides[1] // 4


def _walkable(x: np.ndarray) -> np.ndarray:
    """x as float32 whose strides the C loops can walk (whole values; any sign or order)."""
    if x.dtype != np.float32 or x.strides[0] % 4 or x.strides[1] % 4:
        return np.ascontiguousarray(x, dtype=np.float32)
    return x


def _fast_2d(a: np.ndarray, b: np.ndarray, threads: int) -> np.ndarray:
    """(m, k) @ (k, n) by the C twin: B packed once, A's rows split over `threads`."""
    global _pool
    lib = _lib
    (m, k), n = a.shape, b.shape[1]
    c = np.empty((m, n), dtype=np.float32)
    bp = np.empty(lib.bf16_packed_b_size(k, n), dtype=np.uint16)
    lib.bf16_pack_b(b.ctypes.data, *_strides(b), k, n, bp.ctypes.data)
    parts = max(1, min(threads, m // 48, 2 * m * n * k >> 20))  # small products: one thread
    bounds = [m * t // parts // 12 * 12 for t in range(parts)] + [m]

    def rows(t: int) -> None:
        i0, i1 = bounds[t], bounds[t + 1]
        ap = np.empty(lib.bf16_packed_a_size(), dtype=np.uint16)
        lib.bf16_gemm_packed(a.ctypes.data + i0 * a.strides[0], *_strides(a), bp.ctypes.data,
                             c.ctypes.data + i0 * c.strides[0], n, i1 - i0, n, k, ap.ctypes.data)

    if parts == 1:
        rows(0)
        return c
    if _pool is None or _pool._max_workers < parts - 1:
        _pool = ThreadPoolExecutor(parts - 1, thread_name_prefix="tensorlite bf16")
    others = [_pool.submit(rows, t) for t in range(1, parts)]
    rows(0)
    for f in others:
        f.result()
    return c


def matmul_bf16(a, b, path: str | None = None) -> np.ndarray:
    """bf16(a) @ bf16(b) with float32 accumulation, a float32 array (np.matmul's shapes).
    `path` is "fast" or "fallback" (default: bf16_path()); the fast path takes 2-D operands
    and a stack of rows times a matrix, the fallback anything np.matmul does."""
    path = path or bf16_path()
    if path not in PATHS:
        raise ValueError(f"matmul_bf16: path must be one of {', '.join(PATHS)}, got {path!r}")
    a, b = np.asarray(a), np.asarray(b)
    if path == "fallback" or a.ndim < 2 or b.ndim != 2 or not _c_library():
        return matmul_bf16_fallback(a, b)
    if a.shape[-1] != b.shape[0]:
        raise ValueError(f"matmul_bf16: shapes {a.shape} and {b.shape} do not match "
                         f"({a.shape[-1]} != {b.shape[0]})")
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1]) if a.ndim > 2 else a  # (..., k) -> (m, k), a view if it can
    a2, b = _walkable(a2), _walkable(b)
    if a2.size == 0 or b.size == 0:
        return np.zeros(lead + b.shape[1:], dtype=np.float32)
    return _fast_2d(a2, b, _threads()).reshape(lead + b.shape[1:])
