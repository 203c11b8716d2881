"""The C twins of tensorlite's hot kernels: tensorlite/kernels.c, compiled on first use with
the system's C compiler and loaded with ctypes.

Each public function here has the same name, arguments and results as its NumPy reference
(tensorlite/references.py), which is the spec and the fallback for inputs the loops do not
take; `tensorlite.kernels` decides which one runs and is the only module that imports this
one. A learner can skip this file entirely.

Why C and ctypes: the kernels are serial loops (parallelism comes from the caller's
threads), a ctypes call releases the GIL while it runs, and a loaded shared library costs
a few MB and ~10 ms, where numba (measured and dropped) brought LLVM (~130 MB, ~0.5 s)
into the process (docs/performance.md). The library is compiled for this CPU (-march=native) once and cached
on disk: in the package's __pycache__, or where that cannot be written, in the user cache
folder ($XDG_CACHE_HOME/tensorlite or ~/.cache/tensorlite).

Two twins start threads of their own, as BLAS does for sgemm: matmul_bf16 (the bf16 GEMM,
where the CPU has AVX512_BF16) splits a product's rows over `threads`, and row_dots (a @ b.T,
the decoder's tied head) splits b's rows.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import operator
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from . import references

SOURCE = Path(__file__).resolve().with_name("kernels.c")
# As a fastmath without "no NaNs/infs": sums may be reassociated (so they vectorize),
# but NaN and inf propagate as in NumPy. No -ffast-math.
FLAGS = ["-O3", "-march=native", "-std=c99", "-fPIC", "-shared", "-fno-math-errno",
         "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math", "-ffp-contract=fast"]


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def _c(a, dtype=None) -> np.ndarray:
    """`a` as a C-contiguous array, of `dtype` if given: no copy if it already is (what the
    loops walk). (Not np.ascontiguousarray: that turns a 0-d array into a 1-d one.)"""
    if isinstance(a, np.ndarray) and a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
        return a
    return np.array(a, dtype=dtype, order="C")


def _square_stack(a) -> bool:
    """(..., T, T) with T >= 1, C-contiguous: the layout the softmax passes walk in place."""
    return a.ndim >= 2 and a.shape[-1] == a.shape[-2] >= 1 and a.flags.c_contiguous


def _adds_in_place(totals, others) -> bool:
    """What add_square_sum's loop walks: C-contiguous arrays, the totals float32 or float64,
    all of one dtype (and, with others, writable); each list of `others` as long as totals,
    with arrays of their totals' dtype and shape. (Whether an array added into a total
    overlaps it, the C function checks from the addresses.)"""
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


class CompilerError(RuntimeError):
    """The C kernels cannot be built or loaded here (no compiler, or it failed)."""


# ---- building and loading the library ----------------------------------------------------------
def _compiler() -> list[str]:
    cc = shlex.split(os.environ.get("CC", "") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        raise CompilerError(f"no C compiler: {cc[0] if cc else 'CC'!r} not found (set CC)")
    return cc


def _fingerprint(cc: list[str]) -> str:
    """A hash of everything the binary depends on: the source, the flags, the compiler's
    version and this CPU (-march=native)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(cc + FLAGS).encode())
    try:
        version = subprocess.run(cc + ["--version"], capture_output=True, timeout=60, check=False)
        h.update(version.stdout)
    except (OSError, subprocess.SubprocessError) as e:
        raise CompilerError(f"cannot run {cc[0]}: {e}") from e
    h.update(platform.machine().encode())
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    h.update(line.encode())
                if line.strip() == "":  # the first CPU is enough
                    break
    except OSError:
        h.update(platform.processor().encode())
    return h.hexdigest()[:16]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def cache_folder() -> Path:
    """Where the compiled library lives: the package's __pycache__ if writable, else the
    user cache folder."""
    package = Path(__file__).with_name("__pycache__")
    if _writable(package):
        return package
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tensorlite"
    if _writable(user):
        return user
    raise CompilerError(f"no writable cache folder ({package} and {user} are read-only)")


def _build(cc: list[str], target: Path) -> None:
    """Compile kernels.c into `target`: first to a temporary name beside it, then renamed in
    one step, so a process that compiles at the same time never sees half a file."""
    print(f"tensorlite: compiling C kernels for this CPU (once; cached in {target.parent}) ...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        errors = []  # the first line of each failure
        # Some compilers do not know -march=native (older clang on ARM): then without it.
        for flags in (FLAGS, [f for f in FLAGS if f != "-march=native"]):
            out = subprocess.run(cc + flags + ["-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                                 text=True, timeout=600, check=False)
            if out.returncode == 0:
                break
            errors.append((out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[0])
        else:
            raise CompilerError(f"{cc[0]} failed: {errors[0]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"tensorlite: C kernels compiled in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)


def load() -> ctypes.CDLL:
    """The compiled library, built first if this CPU, compiler and source have none cached
    (or if the cached file cannot be loaded: a damaged cache is rebuilt once)."""
    cc = _compiler()
    target = cache_folder() / f"kernels_c-{_fingerprint(cc)}.so"
    built = not target.exists()
    if built:
        _build(cc, target)
    try:
        return ctypes.CDLL(str(target))  # CDLL (not PyDLL): calls release the GIL
    except OSError as e:
        if built:
            raise CompilerError(f"cannot load {target}: {e}") from e
    _build(cc, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        raise CompilerError(f"cannot load {target}: {e}") from e


# The C signatures: p = pointer (an array's address), i = int64, r = a scalar of the
# kernel's own type (float for the _f32 function, double for _f64), d = a double. The
# result: None, or i (the kernels that index with targets: -1, or the first position whose
# index is out of range), or d (a sum).
_SIGNATURES = {  # name: (arguments, result)
    "relu_squared": ("ppi", None),
    "relu_squared_backward": ("pppi", None),
    "rms_norm_forward": ("ppriipp", None),
    "rms_norm_backward": ("ppppiipp", None),
    "causal_softmax_columns": ("piirpp", None),
    "softmax_backward_columns": ("ppiirp", None),
    "cross_entropy_forward": ("ppiipp", "i"),
    "cross_entropy_backward": ("ppiir", "i"),
    "scatter_add_rows": ("pippii", "i"),
    "adamw_update": ("ppppirrrrrrrr", None),
    "attention_fits": ("ii", "i"),
    "causal_attention_forward": ("piiiirppppp", None),
    "causal_attention_backward": ("pppiiiirpppp", None),
    "add_square_sum": ("iippp", "d"),
    "row_dots": ("piipipi", None),
    "decode_fits": ("i", "i"),
    "decode_panel": ("", "i"),
    "decode_step": ("piiiipppppiiiirrp", None),
}


def _declare(lib: ctypes.CDLL) -> dict:
    """Set each C function's argument and result types; returns {(name, dtype): function}."""
    table = {}
    for name, (signature, result) in _SIGNATURES.items():
        for dtype, suffix, real in ((_F32, "_f32", ctypes.c_float), (_F64, "_f64", ctypes.c_double)):
            fn = getattr(lib, name + suffix)
            types = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "r": real, "d": ctypes.c_double,
                     None: None}
            fn.argtypes = [types[c] for c in signature]
            fn.restype = types[result]
            table[name, dtype] = fn
    return table


def _check_index(bad: int, indices: np.ndarray, size: int) -> None:
    if bad >= 0:
        raise IndexError(f"index {indices.reshape(-1)[bad]} is out of bounds for axis 0 with size {size}")


_lib: ctypes.CDLL | None = None
_functions: dict = {}  # (name, dtype) -> the C function, filled when the library loads


def _fn(name: str, dtype: np.dtype):
    """The C function `name` for arrays of `dtype` (float32 or float64), or None."""
    return _functions.get((name, dtype))


def _ptr(a: np.ndarray) -> int:
    """The address of a's first value. Keep `a` in a variable until the C call returns: a
    temporary array would be freed (and its memory reused by another thread) before it.
    (Through the buffer protocol: 0.3 us, where `a.ctypes.data` takes 1 us; that one for
    the read-only and empty arrays the buffer route refuses.)"""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError):
        return a.ctypes.data


# ---- the twins: same names, arguments and results as the references ------------------------------
def relu_squared(x):
    fn = _fn("relu_squared", np.result_type(x))  # (the references also take 0-d arrays)
    if fn is None:
        return references.relu_squared(x)
    x = _c(x)
    y = np.empty_like(x)
    fn(_ptr(x), _ptr(y), x.size)
    return y


def relu_squared_backward(dout, x):
    fn = _fn("relu_squared_backward", np.result_type(x))
    if fn is None or np.shape(dout) != np.shape(x):
        return references.relu_squared_backward(dout, x)
    x = _c(x)
    dout = _c(dout, x.dtype)
    dx = np.empty_like(x)
    fn(_ptr(dout), _ptr(x), _ptr(dx), x.size)
    return dx


def rms_norm_forward(x, weight, eps):
    fn = _fn("rms_norm_forward", x.dtype)
    if fn is None or x.ndim == 0 or x.shape[-1] == 0 or np.shape(weight) != x.shape[-1:]:
        return references.rms_norm_forward(x, weight, eps)
    c = x.shape[-1]
    x2 = _c(x).reshape(-1, c)
    y = np.empty_like(x2)
    r = np.empty(x2.shape[0], dtype=x.dtype)
    w = _c(weight, x.dtype)
    fn(_ptr(x2), _ptr(w), eps, x2.shape[0], c, _ptr(y), _ptr(r))
    return y.reshape(x.shape), r.reshape(x.shape[:-1] + (1,))


def rms_norm_backward(dout, x, r, weight):
    fn = _fn("rms_norm_backward", x.dtype)
    if (fn is None or x.ndim == 0 or x.shape[-1] == 0 or np.shape(dout) != x.shape
            or np.shape(weight) != x.shape[-1:] or np.size(r) * x.shape[-1] != x.size):
        return references.rms_norm_backward(dout, x, r, weight)
    c = x.shape[-1]
    x2 = _c(x).reshape(-1, c)
    d2 = _c(dout, x.dtype).reshape(-1, c)
    dx, dw = np.empty_like(x2), np.empty(c, dtype=x.dtype)
    r, w = _c(r, x.dtype), _c(weight, x.dtype)
    fn(_ptr(d2), _ptr(x2), _ptr(r), _ptr(w), x2.shape[0], c, _ptr(dx), _ptr(dw))
    return dx.reshape(x.shape), dw


# Causal self-attention's softmax passes (the products around them are NumPy's BLAS calls in
# references.causal_self_attention_forward/backward, where the whole-attention loops below
# do not fit). As in the reference, the matrices are transposed, keys along rows: st[j, i] = k_j . q_i; one C call covers every (batch, head).
def causal_softmax_columns(st, scale):
    fn = _fn("causal_softmax_columns", st.dtype)
    if fn is None or not _square_stack(st):
        return references.causal_softmax_columns(st, scale)
    T = st.shape[-1]
    m, total = np.empty(T, dtype=st.dtype), np.empty(T, dtype=st.dtype)  # scratch
    fn(_ptr(st), st.size // (T * T), T, scale, _ptr(m), _ptr(total))  # st -> P^T, in place
    return st


def softmax_backward_columns(dst, pt, scale):
    fn = _fn("softmax_backward_columns", dst.dtype)
    if (fn is None or not _square_stack(dst) or np.shape(pt) != dst.shape
            or np.may_share_memory(dst, pt)):  # the C arguments never overlap (restrict)
        return references.softmax_backward_columns(dst, pt, scale)
    T = dst.shape[-1]
    pt, scratch = _c(pt, dst.dtype), np.empty(T, dtype=dst.dtype)
    fn(_ptr(dst), _ptr(pt), dst.size // (T * T), T, scale, _ptr(scratch))  # -> dS^T, in place
    return dst


# The whole causal attention (kernels.c: products that skip the future, and the softmax passes
# between them), for the sizes its vector loops take; for any other the reference, with the
# C softmax passes above between its BLAS products.
def _attention(name, qkv, n_head):
    """The C function `name` for this qkv (B, T, 3C) and n_head, with the head size, or
    (None, 0) where the loops do not take these sizes."""
    fn = _fn(name, qkv.dtype)
    if fn is None or qkv.ndim != 3 or qkv.shape[-1] % (3 * n_head):
        return None, 0
    hd = qkv.shape[-1] // 3 // n_head
    return (fn, hd) if _fn("attention_fits", qkv.dtype)(qkv.shape[1], hd) else (None, 0)


def causal_self_attention_forward(qkv, n_head, scale):
    fn, hd = _attention("causal_attention_forward", qkv, n_head)
    if fn is None:
        return references.causal_self_attention_forward(qkv, n_head, scale, causal_softmax_columns)
    B, T, C3 = qkv.shape
    qkv = _c(qkv)
    y = np.empty((B, T, C3 // 3), dtype=qkv.dtype)
    pt = np.empty((B, n_head, T, T), dtype=qkv.dtype)
    qt, m, total = (np.empty(n, dtype=qkv.dtype) for n in (hd * T, T, T))  # scratch
    fn(_ptr(qkv), B, T, n_head, hd, scale, _ptr(y), _ptr(pt), _ptr(qt), _ptr(m), _ptr(total))
    return y, pt


def causal_self_attention_backward(dy, qkv, pt, n_head, scale):
    fn, hd = _attention("causal_attention_backward", qkv, n_head)
    if fn is not None:
        B, T, C3 = qkv.shape
        if np.shape(dy) != (B, T, C3 // 3) or np.shape(pt) != (B, n_head, T, T):
            fn = None
    if fn is None:
        return references.causal_self_attention_backward(dy, qkv, pt, n_head, scale,
                                                         softmax_backward_columns)
    qkv = _c(qkv)
    dy, pt = _c(dy, qkv.dtype), _c(pt, qkv.dtype)  # read only; the outputs below are new
    dqkv = np.empty_like(qkv)
    ds, dt, colsum = (np.empty(n, dtype=qkv.dtype) for n in (T * T, hd * T, T))  # scratch
    fn(_ptr(dy), _ptr(qkv), _ptr(pt), B, T, n_head, hd, scale, _ptr(dqkv), _ptr(ds), _ptr(dt),
       _ptr(colsum))
    return dqkv


def _targets(targets) -> np.ndarray:
    return _c(targets, np.int64)


def cross_entropy_forward(logits, targets):
    fn = _fn("cross_entropy_forward", logits.dtype)
    if fn is None or logits.ndim != 2 or np.shape(targets) != logits.shape[:1] or logits.size == 0:
        return references.cross_entropy_forward(logits, targets)
    logits, targets = _c(logits), _targets(targets)
    n, v = logits.shape
    probs = np.empty_like(logits)
    losses = np.empty(n, dtype=logits.dtype)
    _check_index(fn(_ptr(logits), _ptr(targets), n, v, _ptr(probs), _ptr(losses)), targets, v)
    # the mean, as losses.mean() computes it, without np.mean's Python wrapper (whose first
    # call after a step's other work took ~30 us in training, against 2 us for this)
    return np.asarray(np.add.reduce(losses) / n, dtype=logits.dtype), probs


def cross_entropy_backward(dout, probs, targets):
    fn = _fn("cross_entropy_backward", probs.dtype)
    if (fn is None or not probs.flags.c_contiguous  # in place: it must be probs itself
            or probs.ndim != 2 or np.shape(targets) != probs.shape[:1]
            or np.may_share_memory(probs, targets)):  # (restrict; and checked, then reread)
        return references.cross_entropy_backward(dout, probs, targets)
    t = probs.dtype.type
    n, v = probs.shape
    targets = _targets(targets)
    _check_index(fn(_ptr(probs), _ptr(targets), n, v, t(dout / t(n))), targets, v)
    return probs


def scatter_add_rows(target, indices, rows):
    fn = _fn("scatter_add_rows", target.dtype)
    if (fn is None or not target.flags.c_contiguous or target.ndim != 2  # in place on target
            or np.shape(rows) != (np.size(indices), target.shape[1])
            or np.may_share_memory(target, rows) or np.may_share_memory(target, indices)):
        return references.scatter_add_rows(target, indices, rows)
    if indices.size == 0:
        return None
    indices, rows = _targets(indices).reshape(-1), _c(rows, target.dtype)
    v, c = target.shape
    _check_index(fn(_ptr(target), v, _ptr(indices), _ptr(rows), indices.size, c), indices, v)
    return None


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """gpt.optim.adamw_update (in place on p, m, v) in one fused C pass."""
    fn = _fn("adamw_update", p.dtype)
    if fn is None:
        raise TypeError(f"adamw_update: float32 or float64 parameters only, got {p.dtype}")
    if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        raise ValueError("adamw_update: p, m and v must be C-contiguous (they are updated in place)")
    if not (m.dtype == v.dtype == p.dtype and m.size == v.size == np.size(g) == p.size):
        raise ValueError("adamw_update: p, g, m and v must have the same size (p, m, v one dtype)")
    g = _c(g, p.dtype)
    if any(np.may_share_memory(a, b) for a, b in itertools.combinations((p, g, m, v), 2)):
        raise ValueError("adamw_update: p, g, m and v must be four separate arrays")
    fn(_ptr(p), _ptr(g), _ptr(m), _ptr(v), p.size, beta1, beta2, 1 - beta1,
       1 - beta2, 1 - lr * weight_decay, lr / (1 - beta1**step), 1 / (1 - beta2**step), eps)


def add_square_sum(totals, *others):
    """totals[i] += others[k][i], then the sum of the totals' squares, in one C call. Its
    arguments travel in one int64 table: the sizes, the totals' addresses, then the others'
    (a NumPy array per list, or a check per array in NumPy, cost more than the pass saved)."""
    if not _adds_in_place(totals, others):
        return references.add_square_sum(totals, *others)
    count = len(totals)
    table = np.array([t.size for t in totals] + [_ptr(a) for a in itertools.chain(totals, *others)],
                     dtype=np.int64)
    at = _ptr(table)
    squares = _fn("add_square_sum", totals[0].dtype)(
        count, len(others), at + 8 * count, at + 16 * count if others else None, at)
    if squares < 0:  # an array added into a total overlaps it: nothing was written
        return references.add_square_sum(totals, *others)
    return squares


# ---- the twins that split their work over threads ---------------------------------------------
# how many threads one product is split over: every core, until kernels.set_num_threads says
threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_pool = None  # the helper threads (concurrent.futures.ThreadPoolExecutor), made on first need


def _in_parts(work, parts: int) -> None:
    """work(0), ..., work(parts - 1): part 0 on this thread, the others on helper threads
    (the C calls release the GIL), all done on return."""
    global _pool
    if parts > 1 and (_pool is None or _pool._max_workers < parts - 1):
        from concurrent.futures import ThreadPoolExecutor

        # (a smaller pool is dropped, not shut down: another thread may be submitting to it;
        # its idle threads exit once it is garbage, as ThreadPoolExecutor's workers do)
        _pool = ThreadPoolExecutor(parts - 1, thread_name_prefix="tensorlite kernels")
    others = [_pool.submit(work, t) for t in range(1, parts)] if parts > 1 else []
    work(0)
    for f in others:
        f.result()


def row_dots(a, b, out=None):
    """references.row_dots (a @ b.T) reading b once, by rows; b's rows split over `threads`
    for a large b. b must be C-contiguous (a transposing copy would cost more than the
    product): otherwise, and for other dtypes or shapes, the reference runs."""
    a, b = np.asarray(a), np.asarray(b)
    fn = _fn("row_dots", a.dtype)
    if (fn is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]
            or b.dtype != a.dtype or not b.flags.c_contiguous):
        return references.row_dots(a, b, out)
    (n, k), m, size = a.shape, b.shape[0], a.dtype.itemsize
    if out is None:
        out = np.empty((n, m), dtype=a.dtype)
    elif (out.shape != (n, m) or out.dtype != a.dtype or not out.flags.writeable
          or (m > 1 and out.strides[1] != size) or out.strides[0] % size
          or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
        return references.row_dots(a, b, out)
    a = _c(a)
    if n == 0 or m == 0:
        return out
    ldy = out.strides[0] // size
    parts = max(1, min(threads, m * k * n >> 20))  # at least ~1M products per thread
    bounds = [m * t // parts for t in range(parts)] + [m]

    def rows(t: int) -> None:
        j0, j1 = bounds[t], bounds[t + 1]
        fn(_ptr(a), n, k, b.ctypes.data + j0 * k * size, j1 - j0, out.ctypes.data + j0 * size, ldy)

    _in_parts(rows, parts)
    return out


# id(layers) -> (layers, its blocks' lengths, their arrays, the loop's copies, their addresses)
_decode_weights: dict = {}
_decode_lock = threading.Lock()  # threads step at once: one changes the dict at a time


def _decode_packed(layers, dtype, c: int) -> tuple | None:
    """The packed weights decode_step's C loop reads `layers` from, where it takes them all: of
    `dtype`, C-contiguous, the shapes of a GPT with n_embd c (weights (in, out), as stored for
    training); else None. A tuple whose last item is the (L, 12) addresses (0 for a missing
    bias): the caller holds the tuple until the loop returns, since another thread's call may
    push it out of the cache meanwhile (and the copies would go with it). They are copies:
    each linear layer's weight packed in panels of the loop's vector width (kernels.c), the
    norms' arrays and the biases as they are (so nothing the loop writes can share them).
    Made on the first call with a list and kept with it (the list stays alive, so its id is
    not reused), with the arrays it held then: a list whose blocks were since replaced, added
    or removed is packed again (each call compares the arrays, by identity: ~3 us for 6
    blocks). The loop reads the values as they were then: a caller whose weights change in
    place makes a new list (gpt's BatchDecoder makes its list once, for a loaded model)."""
    with _decode_lock:
        kept = _decode_weights.get(id(layers))
    if (kept is not None and kept[0] is layers and list(map(len, layers)) == kept[1]
            and all(map(operator.is_, itertools.chain.from_iterable(layers), kept[2]))):
        return kept
    shapes = [(c,), (c,), (c, 3 * c), (3 * c,), (c, c), (c,), (c,), (c,), (c, 4 * c), (4 * c,),
              (4 * c, c), (c,)]
    cols = _fn("decode_panel", dtype)()
    copies, addresses = [], np.zeros((len(layers), 12), np.uint64)
    for i, block in enumerate(layers):
        if len(block) != 12:
            return None
        for j, (a, shape) in enumerate(zip(block, shapes)):
            if a is None and j % 2:  # a missing bias (or rms_norm's)
                continue
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape:
                return None
            if j in (2, 4, 8, 10):  # a linear layer's weight (k, n): panels (n/cols, k, cols)
                k, n = shape
                a = a.reshape(k, n // cols, cols).transpose(1, 0, 2)
            copies.append(np.array(a, order="C"))
            addresses[i, j] = copies[-1].ctypes.data
    kept = (layers, list(map(len, layers)), tuple(itertools.chain.from_iterable(layers)), copies,
            addresses)
    with _decode_lock:
        while len(_decode_weights) >= 4:  # models come and go in tests; a server keeps one
            _decode_weights.pop(next(iter(_decode_weights)))
        _decode_weights[id(layers)] = kept
    return kept


def _cache_fits(a, x: np.ndarray, layers: int, rows: int, n_head: int, hd: int) -> bool:
    """A KV cache decode_step's loop takes: (layers, >= rows, n_head, tc, hd) of x's dtype,
    C-contiguous and writable, not sharing x's memory."""
    return (isinstance(a, np.ndarray) and a.dtype == x.dtype and a.ndim == 5
            and a.flags.c_contiguous and a.flags.writeable and a.shape[0] == layers
            and a.shape[1] >= rows and a.shape[2] == n_head and a.shape[3] > 0
            and a.shape[4] == hd and not np.may_share_memory(a, x))


def decode_step(x, put, pos, layers, k, v, n_head, scale, layernorm=False, gelu=False,
                linear=None, eps=1e-5):
    """references.decode_step as ONE C call, the GIL free for all of it, where its loop takes
    the arrays: float32 or float64, x (S, C) C-contiguous with C a multiple of the CPU's
    vector width, weights (in, out) (the loop reads its own packed copy: _decode_packed), the
    caches as _cache_fits says, every put and pos inside them, and no `linear` of the
    caller's; otherwise the reference."""
    x = np.asarray(x)
    fn = _fn("decode_step", x.dtype)
    S, C = x.shape if x.ndim == 2 else (0, 0)
    hd = C // n_head if n_head > 0 else 0
    packed = None  # held until the loop returns: the copies it reads (_decode_packed)
    if (fn is not None and linear is None and S > 0 and hd * n_head == C
            and _fn("decode_fits", x.dtype)(C) and x.flags.c_contiguous and x.flags.writeable):
        packed = _decode_packed(layers, x.dtype, C)
    # put and pos as the reference indexes with them: integer arrays (S,); else it runs (and
    # raises). Copies: what the loop indexes with cannot change while it writes (see
    # scatter_add_rows).
    if all(isinstance(a, np.ndarray) and a.shape == (S,) and a.dtype.kind in "iu"
           for a in (put, pos)):
        rows_put, rows_pos = put.astype(np.int64), pos.astype(np.int64)
    else:
        packed = None
    # (L, 12): its own L, not len(layers), which another thread may change meanwhile; and
    # layer_norm's biases (columns 1 and 7) where the loop reads them, not in the list
    addresses = None if packed is None else packed[-1]
    if (addresses is None or layernorm and not addresses[:, 1::6].all()
            or not (_cache_fits(k, x, len(addresses), S, n_head, hd)
                    and _cache_fits(v, x, len(addresses), S, n_head, hd))
            or k.shape != v.shape or np.may_share_memory(k, v)
            or not (0 <= rows_put.min() and rows_put.max() < k.shape[3]
                    and 0 <= rows_pos.min() and rows_pos.max() < k.shape[3])):
        return references.decode_step(x, put, pos, layers, k, v, n_head, scale, layernorm, gelu,
                                      linear, eps)
    work = np.empty(S * 9 * C + k.shape[3], dtype=x.dtype)
    fn(_ptr(x), S, C, n_head, len(addresses), _ptr(rows_put), _ptr(rows_pos), addresses.ctypes.data,
       _ptr(k), _ptr(v), k.shape[1], k.shape[3], int(bool(layernorm)), int(bool(gelu)), eps,
       scale, _ptr(work))
    return x


KERNELS = {  # the references' names -> their C twins
    "relu_squared": relu_squared, "relu_squared_backward": relu_squared_backward,
    "rms_norm_forward": rms_norm_forward, "rms_norm_backward": rms_norm_backward,
    "causal_softmax_columns": causal_softmax_columns,
    "softmax_backward_columns": softmax_backward_columns,
    "causal_self_attention_forward": causal_self_attention_forward,
    "causal_self_attention_backward": causal_self_attention_backward,
    "cross_entropy_forward": cross_entropy_forward, "cross_entropy_backward": cross_entropy_backward,
    "scatter_add_rows": scatter_add_rows, "adamw_update": adamw_update,
    "add_square_sum": add_square_sum, "row_dots": row_dots,
    "decode_step": decode_step,
}


# ---- the bf16 product (kernels.c's last part; the reference: references.matmul_bf16) ------------
_bf16: ctypes.CDLL | None = None  # the library, where it has the AVX512_BF16 GEMM


def _declare_bf16(lib: ctypes.CDLL) -> ctypes.CDLL | None:
    lib.bf16_gemm_available.restype = ctypes.c_int64
    if not lib.bf16_gemm_available():
        return None
    p, i = ctypes.c_void_p, ctypes.c_int64
    for name, args, result in (("bf16_packed_b_size", [i, i], i), ("bf16_packed_a_size", [i], i),
                               ("bf16_pack_b", [p, i, i, i, i, p], None),
                               ("bf16_gemm_packed", [p, i, i, p, p, i, i, i, i, p], None)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def bf16_available() -> bool:
    """Whether the library here has the bf16 GEMM (this CPU has AVX512_BF16); loads it."""
    kernels()
    return _bf16 is not None


def _walkable(x: np.ndarray) -> np.ndarray:
    """x as float32 whose strides the C loops can walk (whole values; any sign or order)."""
    if x.dtype != _F32 or x.strides[0] % 4 or x.strides[1] % 4:
        return np.ascontiguousarray(x, dtype=np.float32)
    return x


def _bf16_2d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m, k) @ (k, n): B packed once, A's rows split over `threads` threads."""
    lib, (m, k), n = _bf16, a.shape, b.shape[1]
    c = np.empty((m, n), dtype=np.float32)
    bp = np.empty(lib.bf16_packed_b_size(k, n), dtype=np.uint16)
    lib.bf16_pack_b(b.ctypes.data, b.strides[0] // 4, b.strides[1] // 4, k, n, bp.ctypes.data)
    parts = max(1, min(threads, m // 48, 2 * m * n * k >> 20))  # small products: one
    bounds = [m * t // parts // 12 * 12 for t in range(parts)] + [m]  # whole 12-row tiles

    def rows(t: int) -> None:
        i0, i1 = bounds[t], bounds[t + 1]
        ap = np.empty(lib.bf16_packed_a_size(i1 - i0), dtype=np.uint16)
        lib.bf16_gemm_packed(a.ctypes.data + i0 * a.strides[0], a.strides[0] // 4,
                             a.strides[1] // 4, bp.ctypes.data, c.ctypes.data + i0 * c.strides[0],
                             n, i1 - i0, n, k, ap.ctypes.data)

    _in_parts(rows, parts)
    return c


def matmul_bf16(a, b):
    """references.matmul_bf16 with vdpbf16ps: 2-D operands, or a stack of rows times a matrix
    (folded into one product); anything else, or no AVX512_BF16 here, runs the reference."""
    a, b = np.asarray(a), np.asarray(b)
    if not bf16_available() or a.ndim < 2 or b.ndim != 2 or a.shape[-1] != b.shape[0]:
        return references.matmul_bf16(a, b)
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1]) if a.ndim > 2 else a  # (..., k) -> (m, k), a view if it can
    a2, b = _walkable(a2), _walkable(b)
    if a2.size == 0 or b.size == 0:
        return np.zeros(lead + b.shape[1:], dtype=np.float32)
    return _bf16_2d(a2, b).reshape(lead + b.shape[1:])


KERNELS["matmul_bf16"] = matmul_bf16


_loading = threading.Lock()


def kernels() -> dict:
    """Build or load the library (once per process, whichever thread asks first) and
    return KERNELS."""
    global _lib, _bf16
    with _loading:
        if _lib is None:
            lib = load()
            _functions.update(_declare(lib))
            _bf16 = _declare_bf16(lib)
            _lib = lib
    return KERNELS
