"""kernels.py and its twins: every compiled (C) and numexpr twin gives its NumPy
reference's results, forward and backward, in float32 and float64 (and so does the batched
decoder step, decode_step); the dispatch table, the fallback, the on-disk caches, the thread settings and calls from several threads behave as
documented; and the ops that call kernels give the same values and gradients on every path.

CI (.ci/run) runs this file on the default (C) path and again with TENSORLITE_KERNELS=numpy.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorlite as tl
import tensorlite.functional as F
from tensorlite import Tensor, kernels, references
from tensorlite.testing import arrays, assert_gradients_match, shapes

DTYPES = [np.float32, np.float64]
# Twins sum in another order (threads, SIMD lanes) and float32 exp is a polynomial
# (relative error ~1.2e-7): a few float32 ulps, float64 rounding only.
TOL = {np.float32: 2e-5, np.float64: 1e-12}
REPO = Path(__file__).resolve().parents[2]


def c_available() -> bool:
    """CI installs a C compiler, so there this is True; where none exists the C tests that
    need one are left out and the fallback test below covers the machine."""
    from tensorlite import kernels_c

    try:
        kernels_c.kernels()
    except kernels_c.CompilerError:
        return False
    return True


@pytest.fixture(autouse=True)
def restore_path():
    """Every test leaves the kernel path as it found it."""
    before = kernels.kernel_path()
    yield
    kernels.use_kernels(before)


def twin_paths() -> list[str]:
    return (["c"] if c_available() else []) + ["numexpr"]


def run_on(path: str, fn):
    """fn() with the kernels of `path`, then fn() on the NumPy references."""
    kernels.use_kernels(path)
    a = fn()
    kernels.use_kernels("numpy")
    b = fn()
    return a, b


def assert_close(a, b, dtype, scale: float = 1.0) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    tol = TOL[dtype] * scale
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def float_arrays(dtype, lo=-5.0, hi=5.0, shape=None):
    return arrays(dtype=dtype, shape=shapes(max_dims=3, max_side=5) if shape is None else shape,
                  min_value=lo, max_value=hi)


# ---- the table --------------------------------------------------------------------------------
def test_every_twin_has_a_reference_of_the_same_name():
    kernels.kernel_path()  # load the table
    assert {"relu_squared", "rms_norm_forward", "softmax_backward_columns",
            "cross_entropy_forward", "scatter_add_rows"} <= set(kernels.REFERENCES)
    from tensorlite import kernels_c

    assert set(kernels_c.KERNELS) <= set(kernels.REFERENCES) | {"adamw_update"}
    assert set(kernels._NUMEXPR) <= set(kernels.REFERENCES) | {"adamw_update"}
    # adamw_update's reference is gpt.optim.adamw_update (tensorlite never imports gpt)
    kernels.use_kernels("numpy")
    assert kernels.adamw_kernel(10) is None


def test_use_kernels_switches_and_reports_the_path():
    assert kernels.use_kernels("numpy") == "numpy" and kernels.kernel_path() == "numpy"
    assert kernels.use_kernels("numexpr") == "numexpr"
    with pytest.raises(ValueError, match="unknown kernel path 'fast'.*numpy, c, numexpr"):
        kernels.use_kernels("fast")
    assert kernels.kernel_path() == "numexpr"  # a rejected path changes nothing


def test_a_path_that_cannot_load_falls_back_to_numpy_with_one_line(monkeypatch, capsys):
    def broken():
        raise kernels_c.CompilerError("no C compiler: 'cc' not found (set CC)")

    from tensorlite import kernels_c

    monkeypatch.setitem(kernels._TWINS, "c", broken)
    assert kernels.use_kernels("c") == "numpy"
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "C kernels unavailable (CompilerError: no C compiler: 'cc' not found" in err
    assert "NumPy reference kernels" in err
    x = np.linspace(-1, 1, 7)
    np.testing.assert_array_equal(kernels.relu_squared(x), np.maximum(x, 0) ** 2)


@pytest.mark.parametrize("value, expected", [("numpy", "numpy"), ("numexpr", "numexpr"),
                                             ("c", "c"), ("", "c"), ("bogus", "numpy")])
def test_the_environment_variable_picks_the_path(value, expected):
    if expected == "c" and not c_available():
        expected = "numpy"
    code = "from tensorlite import kernels; print(kernels.kernel_path())"
    env = dict(os.environ, TENSORLITE_KERNELS=value, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
    if value == "bogus":
        assert out.stderr.count("\n") == 1 and "TENSORLITE_KERNELS='bogus'" in out.stderr


# ---- each twin == its reference -------------------------------------------------------------------
@pytest.mark.parametrize("path", twin_paths())
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_elementwise_twins_match_the_references(path, dtype, data):
    shape = data.draw(shapes(max_dims=3, max_side=6))
    x = data.draw(float_arrays(dtype, shape=shape))
    dout = data.draw(float_arrays(dtype, shape=shape))
    y, s = np.tanh(x), 1 / (1 + np.exp(-x))
    saved = [v.copy() for v in (x, dout, y, s)]
    cases = {
        "exp": lambda: kernels.exp(x),
        "tanh": lambda: kernels.tanh(x),
        "sigmoid": lambda: kernels.sigmoid(x),
        "tanh_backward": lambda: kernels.tanh_backward(dout, y),
        "sigmoid_backward": lambda: kernels.sigmoid_backward(dout, s),
        "relu_squared": lambda: kernels.relu_squared(x),
        "relu_squared_backward": lambda: kernels.relu_squared_backward(dout, x),
    }
    for name, run in cases.items():
        a, b = run_on(path, run)
        assert_close(a, b, dtype)
        if name == "relu_squared_backward":
            # (atol: below the smallest normal float, rounding is absolute, not relative)
            np.testing.assert_allclose(a, 2 * dout * np.maximum(x, 0), rtol=TOL[dtype],
                                       atol=np.finfo(dtype).tiny)
    for v, v0 in zip((x, dout, y, s), saved):  # inputs are never written
        np.testing.assert_array_equal(v, v0)


@pytest.mark.parametrize("path", twin_paths())
@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_into_an_out_buffer_and_sigmoid_extremes(path, dtype):
    x = np.array([-1000.0, -80.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 80.0, 1000.0], dtype=dtype)

    def run():
        buf = np.linspace(-3, 3, 9).astype(dtype)
        result = kernels.exp(buf, out=buf)
        assert np.shares_memory(result, buf)
        with np.errstate(over="raise", invalid="raise"):
            return buf, kernels.sigmoid(x)

    (ea, sa), (eb, sb) = run_on(path, run)
    assert_close(ea, eb, dtype)
    assert_close(sa, sb, dtype)
    assert np.all(np.isfinite(sa)) and sa[0] == 0.0 and sa[-1] == 1.0 and sa[4] == 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), n_head=st.integers(1, 3), hd=st.integers(1, 5))
def test_attention_twin_matches_the_reference(dtype, data, n_head, hd):
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9))
    C = n_head * hd
    qkv = data.draw(float_arrays(dtype, -3, 3, (B, T, 3 * C)))
    dy = data.draw(float_arrays(dtype, -3, 3, (B, T, C)))
    scale = 1 / math.sqrt(hd)
    qkv0 = qkv.copy()

    def run():
        y, pt = F.causal_self_attention_forward(qkv, n_head, scale)
        return y, pt, F.causal_self_attention_backward(dy, qkv, pt.copy(), n_head, scale)

    for path in twin_paths():
        (ya, pa, ga), (yb, pb, gb) = run_on(path, run)
        assert_close(ya, yb, dtype, scale=4)
        assert_close(pa, pb, dtype)  # P^T, zeros above the causal diagonal
        assert_close(ga, gb, dtype, scale=4)
    np.testing.assert_array_equal(qkv, qkv0)
    assert np.all(np.tril(pb, k=-1) == 0) and np.all(pb >= 0)  # key j > query i: unseen
    np.testing.assert_allclose(pb.sum(axis=-2), 1, rtol=10 * TOL[dtype])  # each query's P sums to 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, -30.0])
def test_causal_softmax_columns_twins_take_any_scale(dtype, scale):
    """The reference scales before its max; twins that took exp((s - max s) * scale) overflowed
    to inf (columns of 0 and NaN) for a negative scale."""
    st0 = (np.random.default_rng(3).standard_normal((2, 9, 9)) * 10).astype(dtype)
    for path in twin_paths():
        a, b = run_on(path, lambda: F.causal_softmax_columns(st0.copy(), scale))
        assert_close(a, b, dtype)


def assert_as_accurate(got, ref, exact, factor: float = 4.0) -> None:
    """`got` (a twin's float32 result) is no further from `exact` (float64) than `factor`
    times the reference's own float32 result, give or take a few ulps of the largest value:
    the test for sums long enough, and cancelling enough, that no fixed tolerance fits."""
    err_got = np.abs(got.astype(np.float64) - exact).max()
    err_ref = np.abs(ref.astype(np.float64) - exact).max()
    floor = 4 * np.finfo(got.dtype).eps * np.abs(exact).max()
    assert err_got <= factor * err_ref + floor, (err_got, err_ref, floor)


def _attention_unit(dtype) -> int:
    """The smallest T (and head size) the C attention loops take on this CPU (8 where they
    take none: a CPU without AVX, whose calls all go to the reference)."""
    from tensorlite import kernels_c

    kernels_c.kernels()
    fits = kernels_c._fn("attention_fits", dtype)
    return next((u for u in (8, 16, 32) if fits(u, u)), 8)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), n_head=st.integers(1, 3))
def test_whole_attention_c_twin_matches_the_reference(dtype, data, n_head):
    """The C twin of causal_self_attention_forward/backward (the products too, skipping the
    future) at the sizes its vector loops take: T and the head size multiples of one vector
    (attention_fits). The test above draws sizes it hands to the reference."""
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    from tensorlite import kernels_c

    kernels.use_kernels("c")
    fits = kernels_c._fn("attention_fits", np.dtype(dtype))
    unit = _attention_unit(np.dtype(dtype))  # one vector's values (8 at least: 8 rows)
    B, T = data.draw(st.integers(1, 2)), unit * data.draw(st.integers(1, 4))
    hd = unit * data.draw(st.integers(1, 2))
    assert not fits(T + 1, hd) and not fits(T, hd + 1)
    assert fits(T, hd) or not fits(32, 32)  # (no size at all without AVX)
    C = n_head * hd
    qkv = data.draw(float_arrays(dtype, -3, 3, (B, T, 3 * C)))
    dy = data.draw(float_arrays(dtype, -3, 3, (B, T, C)))
    scale = 1 / math.sqrt(hd)
    qkv0, dy0 = qkv.copy(), dy.copy()
    y, pt = F.causal_self_attention_forward(qkv, n_head, scale)
    dqkv = F.causal_self_attention_backward(dy, qkv, pt, n_head, scale)
    kernels.use_kernels("numpy")
    y0, pt0 = F.causal_self_attention_forward(qkv, n_head, scale)
    dqkv0 = F.causal_self_attention_backward(dy, qkv, pt0, n_head, scale)
    assert_close(pt, pt0, dtype)
    assert np.all(np.tril(pt, k=-1) == 0)  # the future is exactly 0, as in the reference
    if dtype == np.float64:
        assert_close(y, y0, dtype, scale=4)
        assert_close(dqkv, dqkv0, dtype, scale=4)
    else:  # sums of up to T products that may cancel: judged against the float64 result
        y64, pt64 = F.causal_self_attention_forward(qkv.astype(np.float64), n_head, scale)
        dqkv64 = F.causal_self_attention_backward(dy.astype(np.float64), qkv.astype(np.float64),
                                                  pt64, n_head, scale)
        assert_as_accurate(y, y0, y64)
        assert_as_accurate(dqkv, dqkv0, dqkv64)
    np.testing.assert_array_equal(qkv, qkv0)  # inputs are never written
    np.testing.assert_array_equal(dy, dy0)


def test_whole_attention_c_twin_propagates_nan_and_takes_strided_inputs():
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    kernels.use_kernels("c")
    rng = np.random.default_rng(1)
    wide = rng.standard_normal((2, 32, 2 * 3 * 32)).astype(np.float32)
    qkv = wide[:, :, ::2]  # (2, 32, 96), not contiguous: one head of 32
    dy = rng.standard_normal((2, 32, 32)).astype(np.float32)
    y, pt = F.causal_self_attention_forward(qkv, 1, 0.2)
    d = F.causal_self_attention_backward(dy, qkv, pt, 1, 0.2)
    ref_y, ref_pt = F.causal_self_attention_forward.reference(qkv, 1, 0.2)
    assert_close(y, ref_y, np.float32, scale=4)
    q64, dy64 = qkv.astype(np.float64), dy.astype(np.float64)
    assert_as_accurate(d, F.causal_self_attention_backward.reference(dy, qkv, ref_pt, 1, 0.2),
                       F.causal_self_attention_backward(dy64, q64, F.causal_self_attention_forward(
                           q64, 1, 0.2)[1], 1, 0.2))
    bad = np.ascontiguousarray(qkv)
    bad[1, 5, 40] = np.nan  # a key of batch 1 at position 5: every query from 5 on sees it
    y, pt = F.causal_self_attention_forward(bad, 1, 0.2)
    assert np.isnan(y[1, 5:]).all() and np.isfinite(y[1, :5]).all() and np.isfinite(y[0]).all()
    dy[0, 3, 0] = np.nan
    assert np.isnan(F.causal_self_attention_backward(dy, qkv, pt, 1, 0.2)[0]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, -0.25, -30.0])
def test_whole_attention_c_twin_takes_any_scale(dtype, scale):
    """The reference scales the scores before the softmax, so a scale of 0 gives every query
    the mean of the values it sees, and a negative one favours the lowest scores. The C twin
    must agree (it once took exp((s - max s) * scale): NaN at 0, from its -inf padding times
    0, and columns that did not sum to 1 below 0)."""
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    kernels.use_kernels("c")
    u = _attention_unit(np.dtype(dtype))
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((2, 2 * u, 3 * 2 * u)).astype(dtype)  # two heads of u
    dy = rng.standard_normal((2, 2 * u, 2 * u)).astype(dtype)
    y, pt = F.causal_self_attention_forward(qkv, 2, scale)
    d = F.causal_self_attention_backward(dy, qkv, pt, 2, scale)
    kernels.use_kernels("numpy")  # the references' softmax passes in NumPy too
    y0, pt0 = F.causal_self_attention_forward(qkv, 2, scale)
    d0 = F.causal_self_attention_backward(dy, qkv, pt0, 2, scale)
    assert_close(pt, pt0, dtype, scale=4)
    assert_close(y, y0, dtype, scale=4)
    assert_close(d, d0, dtype, scale=4 * abs(scale) * u + 4)  # dS carries the scale


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_rms_norm_twin_matches_the_reference(dtype, data):
    shape = data.draw(shapes(min_dims=1, max_dims=3, max_side=70))
    x = data.draw(float_arrays(dtype, -3, 3, shape))
    w = data.draw(float_arrays(dtype, -2, 2, shape[-1:]))
    dout = data.draw(float_arrays(dtype, -2, 2, shape))

    def run():
        y, r = F.rms_norm_forward(x, w, 1e-5)
        return (y, r) + tuple(F.rms_norm_backward(dout, x, r, w))

    for path in twin_paths():
        for a, b in zip(*run_on(path, run)):
            assert_close(a, b, dtype, scale=10)  # dw sums up to 70 * 70 rows


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), n=st.integers(0, 9), k=st.integers(1, 300), m=st.integers(0, 70))
def test_row_dots_twin_matches_the_reference(dtype, data, n, k, m):
    """a @ b.T, with and without an out buffer (also one whose rows are spaced wider)."""
    a = data.draw(float_arrays(dtype, -2, 2, (n, k)))
    b = data.draw(float_arrays(dtype, -2, 2, (m, k)))
    wide = np.full((n, m + 3), np.nan, dtype)

    def run():
        into = wide.copy()
        got = kernels.row_dots(a, b, out=into[:, :m])
        return kernels.row_dots(a, b), got, into

    for path in twin_paths():
        (y, y_out, into), (want, _, _) = run_on(path, run)
        assert_close(y, want, dtype, scale=k / 8 + 1)
        assert_close(y_out, want, dtype, scale=k / 8 + 1)
        assert np.isnan(into[:, m:]).all()  # nothing written past the out view


@pytest.mark.skipif(not c_available(), reason="needs the C kernels")
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_dots_gives_each_row_the_same_bits_alone_batched_or_split_over_threads(dtype,
                                                                                    monkeypatch):
    """A row's dot products are summed in an order fixed by k alone, so they do not change with
    the other rows, or with how b's rows are split over threads."""
    from tensorlite import kernels_c

    kernels.use_kernels("c")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 771)).astype(dtype), rng.standard_normal((3001, 771)).astype(dtype)
    monkeypatch.setattr(kernels_c, "threads", 1)
    together = kernels.row_dots(a, b)
    for r in range(len(a)):
        assert np.array_equal(kernels.row_dots(a[r:r + 1], b)[0], together[r])
    monkeypatch.setattr(kernels_c, "threads", 3)  # 3001 rows of b in three parts
    assert np.array_equal(kernels.row_dots(a, b), together)
    assert np.array_equal(kernels.row_dots(a[2:3], b[5:]), together[2:3, 5:])


@pytest.mark.skipif(not c_available(), reason="needs the C kernels")
def test_row_dots_runs_the_reference_for_what_its_loop_does_not_take():
    """A transposed b (the loop reads rows), mixed dtypes, an out that overlaps an input."""
    kernels.use_kernels("c")
    rng = np.random.default_rng(1)
    a, bt = rng.standard_normal((3, 40)).astype(np.float32), rng.standard_normal((40, 9))
    b = bt.astype(np.float32).T  # (9, 40), not C-contiguous
    np.testing.assert_array_equal(kernels.row_dots(a, b), a @ b.T)
    np.testing.assert_allclose(kernels.row_dots(a, bt.T), a @ bt, rtol=1e-6)
    square = rng.standard_normal((5, 5)).astype(np.float32)
    want = square @ square.T
    np.testing.assert_allclose(kernels.row_dots(square, square.copy(), out=square), want,
                               rtol=1e-5)


# ---- decode_step: the batched decoder step gpt.serve runs for every token -----------------------
# Its C twin runs all of a GPT's blocks in one call, on packed copies of the weights; gpt's own
# tests check the texts the server samples with it against gpt.sample's.
def random_blocks(rng, n_layer: int, C: int, dtype, layernorm: bool, bias: bool) -> list:
    """n_layer blocks of 12 arrays, in references.decode_step's order."""
    def a(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    def b(n):
        return a(n, scale=0.1) if bias else None

    blocks = []
    for _ in range(n_layer):
        norm1 = (1 + a(C, scale=0.1), a(C, scale=0.1) if layernorm else None)
        norm2 = (1 + a(C, scale=0.1), a(C, scale=0.1) if layernorm else None)
        blocks.append((*norm1, a(C, 3 * C, scale=C ** -0.5), b(3 * C), a(C, C, scale=C ** -0.5),
                       b(C), *norm2, a(C, 4 * C, scale=C ** -0.5), b(4 * C),
                       a(4 * C, C, scale=(4 * C) ** -0.5), b(C)))
    return blocks


def case(seed: int, dtype, n_layer: int, n_head: int, hd: int, rows: int, slots: int, tc: int,
         layernorm: bool, gelu: bool, bias: bool, scratch: int):
    """Everything decode_step takes: rows 0..rows-1 at random positions of caches with `slots`
    sequences of tc positions, already filled with random keys and values; the last `scratch`
    rows write into the scratch position tc - 1 and read only key 0 (as gpt's idle slots)."""
    rng = np.random.default_rng(seed)
    C = n_head * hd
    x = rng.standard_normal((rows, C)).astype(dtype)
    k = rng.standard_normal((n_layer, slots, n_head, tc, hd)).astype(dtype)
    v = rng.standard_normal((n_layer, slots, n_head, tc, hd)).astype(dtype)
    pos = rng.integers(0, tc - 1, rows)
    put = pos.copy()
    put[rows - scratch:], pos[rows - scratch:] = tc - 1, 0
    blocks = random_blocks(rng, n_layer, C, dtype, layernorm, bias)
    return x, put, pos, blocks, k, v, n_head, dtype(hd ** -0.5), layernorm, gelu


def run(path: str, args):
    """decode_step on `path`, on copies of the arrays it writes: (rows, k, v) after it."""
    kernels.use_kernels(path)
    x, put, pos, blocks, k, v, *rest = args
    x, k, v = x.copy(), k.copy(), v.copy()
    out = kernels.decode_step(x, put, pos, blocks, k, v, *rest)
    assert out is x  # in place, as the reference
    return x, k, v


@pytest.mark.skipif(not c_available(), reason="needs the C kernels")
@pytest.mark.parametrize("dtype", DTYPES)
@settings(deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_layer=st.integers(1, 3),
       n_head=st.sampled_from([1, 2, 3, 4]), vectors=st.integers(1, 3),
       rows=st.integers(1, 19), more_slots=st.integers(0, 3), tc=st.integers(2, 40),
       layernorm=st.booleans(), gelu=st.booleans(), bias=st.booleans(), data=st.data())
def test_decode_step_c_twin_matches_the_reference(dtype, seed, n_layer, n_head, vectors, rows,
                                                   more_slots, tc, layernorm, gelu, bias, data):
    """Rows 1..19 (the loop's tiles of 8, 4, 2 and 1 rows, and what is left over), heads of
    one to three vectors' width (the vectorized dot products) and of odd widths (the scalar
    ones), the keys at every position, rows that write into a scratch position."""
    from tensorlite import kernels_c

    kernels_c.kernels()
    cols = kernels_c._fn("decode_panel", np.dtype(dtype))()
    hd = data.draw(st.sampled_from([vectors * cols, vectors * cols // n_head or 1]))
    if (n_head * hd) % cols:  # n_embd that is no multiple of a vector: the reference runs
        hd = cols
    scratch = data.draw(st.integers(0, rows - 1))
    args = case(seed, dtype, n_layer, n_head, hd, rows, rows + more_slots, tc, layernorm, gelu,
                bias, scratch)
    with mock.patch.object(references, "decode_step", side_effect=AssertionError("fell back")):
        got = run("c", args)  # the C loop itself: the twin may not hand these to the reference
    want = run("numpy", args)
    for a, b in zip(got, want):
        assert_close(a, b, dtype)
    # the keys and values of each row went to its own cache at `put`, and nowhere else
    _, put, _, _, k, _, *_ = args
    changed = np.argwhere((got[1] != k).any(axis=(0, 2, 4)))  # (slot, position) pairs
    assert {tuple(p) for p in changed} <= {(r, put[r]) for r in range(rows)}


@pytest.mark.skipif(not c_available(), reason="needs the C kernels")
def test_decode_step_c_twin_reads_the_weights_of_a_new_list():
    """The loop reads packed copies made on the first call with a list: weights that change
    in place come in with a new list (as gpt's BatchDecoder makes one per model)."""
    args = case(0, np.float32, 2, 2, 16, 5, 6, 12, False, False, True, 0)
    first = run("c", args)[0]
    x, put, pos, blocks, k, v, *rest = args
    for block in blocks:
        block[2][...] *= 2  # c_attn's weight, in place
    renewed = (x, put, pos, [tuple(b) for b in blocks], k, v, *rest)
    again = run("c", renewed)[0]
    assert not np.allclose(again, first)
    np.testing.assert_allclose(again, run("numpy", renewed)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not c_available(), reason="needs the C kernels")
@pytest.mark.parametrize("gelu", [False, True])
def test_decode_step_c_twin_lets_a_nan_through_as_the_reference(gelu):
    """A NaN in the MLP's hidden layer (here from c_fc's bias) reaches the output as in NumPy,
    where relu(NaN)**2 is NaN. (Found in review: the loop's relu tested `h > 0`, which a NaN
    fails, and made it 0: finite rows where the reference's were all NaN.)"""
    args = case(0, np.float32, 1, 2, 16, 3, 3, 12, False, gelu, True, 0)
    args[3][0][9][0] = np.nan  # block 0's c_fc bias (new arrays: a new case)
    got, want = run("c", args)[0], run("numpy", args)[0]
    assert np.isnan(want).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.skipif(not c_available(), reason="needs the C kernels")
def test_decode_step_c_twin_takes_put_and_pos_only_as_the_reference_does():
    """Positions the reference cannot index with (floats, a boolean mask, columns, a list for
    pos, one row's 0-d arrays) raise its error on the C path too. (Found in review: the twin
    made int64 rows of any of them and ran the loop.)"""
    x, put, pos, blocks, k, v, *rest = case(0, np.float32, 1, 2, 16, 3, 3, 12, False, False,
                                             True, 0)
    for rows, p, q in ((3, put.astype(float), pos), (3, np.array([True, False, True]), pos),
                       (3, put[:, None], pos[:, None]), (3, put, list(pos)),
                       (1, put[0], pos[0])):
        args = (x[:rows], p, q, blocks, k, v, *rest)
        with pytest.raises((IndexError, ValueError, AttributeError)) as want:
            run("numpy", args)
        with pytest.raises(want.type):
            run("c", args)


@pytest.mark.skipif(not c_available(), reason="needs the C kernels")
def test_decode_step_c_twin_asks_the_packed_weights_whether_layernorm_has_its_biases():
    """layer_norm's biases are looked for where the loop reads them, the packed table: a block
    that is not 12 arrays raises the reference's error. (Found in review: the twin looked in
    the list before packing it, b[1] and b[7], an IndexError on a short block; and a list
    changed by another thread between that look and the packing could have handed the loop
    a NULL bias to read.)"""
    x, put, pos, blocks, k, v, *rest = case(0, np.float32, 1, 2, 16, 3, 3, 12, True, False,
                                             True, 0)
    args = (x, put, pos, [blocks[0][:7]], k, v, *rest)
    with pytest.raises(ValueError, match="not enough values to unpack"):
        run("numpy", args)
    with pytest.raises(ValueError, match="not enough values to unpack"):
        run("c", args)


CHANGED_LIST = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_kernels import case, random_blocks, run

args = case(3, np.float32, 2, 2, 16, 3, 3, 12, False, False, True, 0)
x, put, pos, blocks, k, v, *rest = args
run("c", args)  # the list's first call: its weights are packed
rng = np.random.default_rng(4)
blocks[1] = random_blocks(rng, 1, 32, np.float32, False, True)[0]  # a block replaced
print(np.allclose(run("c", args)[0], run("numpy", args)[0], rtol=1e-4, atol=1e-4))
blocks += random_blocks(rng, 30, 32, np.float32, False, True)  # 30 blocks more, caches to match
k, v = (np.zeros((32,) + a.shape[1:], np.float32) for a in (k, v))
deeper = (x, put, pos, blocks, k, v, *rest)
print(np.allclose(run("c", deeper)[0], run("numpy", deeper)[0], rtol=1e-4, atol=1e-4))
"""


@pytest.mark.skipif(not c_available(), reason="needs the C kernels")
def test_decode_step_c_twin_reads_a_list_as_it_is_now():
    """The packed copies are kept with the list they were made for: a list whose blocks were
    replaced, or that grew, after that first call is read as it is now. (Found in review: the
    copies were found by the list's identity alone, so a replaced block was never read, and a
    grown list made the loop read block addresses past the end of the table: a crash, hence
    the subprocess.)"""
    out = subprocess.run([sys.executable, "-c", CHANGED_LIST, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300, check=False,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert (out.returncode, out.stdout.split()) == (0, ["True", "True"]), out.stderr


EVICTED_WHILE_READ = """
import sys
import threading
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_kernels import case, run

args = case(0, np.float32, 8, 4, 64, 64, 64, 16, False, False, True, 0)  # n_embd 256, 8 blocks
want = run("numpy", args)[0]
x, put, pos, blocks, k, v, *rest = args
bad, done = [], threading.Event()

def steps():  # one model, stepped over and over (its copies packed once)
    for _ in range(20):
        bad.append(not np.allclose(run("c", args)[0], want, rtol=1e-4, atol=1e-4))
    done.set()

thread = threading.Thread(target=steps)
thread.start()
small = case(1, np.float32, 1, 1, 8, 1, 1, 4, False, False, False, 0)
while not done.is_set():  # meanwhile, other models: each new list's copies evict the oldest
    run("c", (*small[:3], [tuple(b) for b in small[3]], *small[4:]))
thread.join()
print(sum(bad))
"""


@pytest.mark.skipif(not c_available(), reason="needs the C kernels")
def test_decode_step_c_twin_keeps_its_copies_while_another_thread_evicts_them():
    """One thread steps a model while another calls decode_step with other lists, whose packed
    copies push the first model's out of the cache: the loop that reads them still has them.
    (Found in review: the cache held the only reference to the copies, so they were freed
    under a running loop, which read freed memory: wrong values, or with large arrays
    unmapped on free, as MALLOC_MMAP_THRESHOLD_ makes them here, a crash.)"""
    out = subprocess.run([sys.executable, "-c", EVICTED_WHILE_READ, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300, check=False,
                         env=dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="65536"))
    assert (out.returncode, out.stdout.split()) == (0, ["0"]), out.stderr


@pytest.mark.skipif(not c_available(), reason="needs the C kernels")
def test_decode_step_runs_the_reference_for_what_its_loop_does_not_take():
    """A caller's own linear layer, weights stored by rows (transposed views), n_embd that is no
    multiple of a vector, integer rows, overlapping caches: the reference's results (and its
    errors: a position outside the cache is an IndexError, not a write past it)."""
    args = case(1, np.float32, 2, 2, 16, 4, 4, 10, True, True, True, 1)
    want = run("numpy", args)
    x, put, pos, blocks, k, v, n_head, scale, ln, gelu = args

    def linear(a, layer):
        return a @ layer[0] + (0 if layer[1] is None else layer[1])

    kernels.use_kernels("c")
    by_rows = [tuple(np.asfortranarray(a) if a is not None and a.ndim == 2 else a for a in b)
               for b in blocks]
    for layers, own in ((blocks, linear), (by_rows, None)):
        xc, kc, vc = x.copy(), k.copy(), v.copy()
        kernels.decode_step(xc, put, pos, layers, kc, vc, n_head, scale, ln, gelu, own)
        np.testing.assert_allclose(xc, want[0], rtol=1e-4, atol=1e-4)
    odd = case(2, np.float32, 1, 1, 12, 3, 3, 8, False, False, False, 0)  # n_embd 12
    np.testing.assert_allclose(run("c", odd)[0], run("numpy", odd)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError):
        kernels.decode_step(x.copy(), put + 100, pos, blocks, k.copy(), v.copy(), n_head, scale,
                            ln, gelu)
    with pytest.raises(IndexError):
        kernels.decode_step(x.copy(), put, pos, blocks, k[:, :2].copy(), v[:, :2].copy(), n_head,
                            scale, ln, gelu)  # 4 rows, 2 caches


def test_decode_step_reference_is_the_models_forward_one_position_at_a_time():
    """The spec itself: rows decoded one position after another into their caches give what a
    plain full-sequence forward (causal attention over all positions) gives at each position."""
    rng = np.random.default_rng(3)
    n_layer, n_head, hd, T = 2, 2, 4, 6
    C = n_head * hd
    blocks = random_blocks(rng, n_layer, C, np.float64, False, True)
    seq = rng.standard_normal((T, C))  # a sequence's embedded positions
    k = np.zeros((n_layer, 1, n_head, T, hd))
    v = np.zeros_like(k)
    stepped = np.stack([references.decode_step(seq[t:t + 1].copy(), np.array([t]), np.array([t]),
                                               blocks, k, v, n_head, hd ** -0.5)[0]
                        for t in range(T)])
    x = seq.copy()  # the same blocks over the whole sequence at once
    for n1w, _, aw, ab, pw, pb, n2w, _, fw, fb, mw, mb in blocks:
        qkv = references.rms_norm_forward(x, n1w, 1e-5)[0] @ aw + ab
        y, _ = references.causal_self_attention_forward(qkv[None], n_head, hd ** -0.5)
        x = x + y[0] @ pw + pb
        h = references.relu_squared(references.rms_norm_forward(x, n2w, 1e-5)[0] @ fw + fb)
        x = x + h @ mw + mb
    np.testing.assert_allclose(stepped, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), n=st.integers(1, 40), v=st.integers(1, 70))
def test_cross_entropy_twin_matches_the_reference(dtype, data, n, v):
    logits = data.draw(float_arrays(dtype, -30, 30, (n, v)))
    targets = np.array(data.draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n)))
    dout = np.asarray(data.draw(st.floats(-2, 2)), dtype=dtype)

    def run():
        loss, probs = F.cross_entropy_forward(logits, targets)
        return loss, probs.copy(), F.cross_entropy_backward(dout, probs, targets)

    for path in twin_paths():
        for a, b in zip(*run_on(path, run)):
            assert_close(a, b, dtype)


def _adamw_reference(p, g, m, v, lr, b1, b2, eps, wd, step):
    """AdamW written out in float64, independently of kernels.py."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
    p = p * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), weight_decay=st.sampled_from([0.0, 0.1]), lr=st.sampled_from([1e-3, 0.1]))
def test_adamw_twins_match_the_math(dtype, data, weight_decay, lr):
    """The twins of gpt.optim.adamw_update against AdamW in float64 (the NumPy math itself is
    checked in tests/gpt/test_optim.py, through AdamW, on every path)."""
    shape = data.draw(shapes(min_dims=1, max_dims=2, max_side=6))
    p0 = data.draw(float_arrays(dtype, -2, 2, shape))
    grads = [data.draw(float_arrays(dtype, -2, 2, shape)) for _ in range(3)]
    hyper = {"lr": lr, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": weight_decay}

    def run(path):
        kernels.use_kernels(path)
        update = kernels.adamw_kernel(p0.size)
        p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        for step, g in enumerate(grads, start=1):
            update(p, g, m, v, step=step, **hyper)  # in place on p, m, v
        return p, m, v

    ref = (p0.astype(np.float64), np.zeros(shape), np.zeros(shape))
    for step, g in enumerate(grads, start=1):
        p, m, v = ref
        ref = _adamw_reference(p, g.astype(np.float64), m, v, lr, 0.9, 0.95, 1e-8, weight_decay,
                               step)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for path in twin_paths():
        for got, want in zip(run(path), ref):
            assert got.dtype == dtype
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=path)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), v=st.integers(1, 6), c=st.integers(1, 4))
def test_scatter_add_rows_matches_add_at_on_every_path(dtype, data, v, c):
    n = data.draw(st.integers(0, 12))
    indices = np.array(data.draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n)),
                       dtype=np.int64)
    rows = data.draw(float_arrays(dtype, shape=(n, c)))
    start = data.draw(float_arrays(dtype, shape=(v, c)))
    want = start.copy()
    np.add.at(want, indices, rows)
    for path in twin_paths() + ["numpy"]:
        kernels.use_kernels(path)
        got = start.copy()
        kernels.scatter_add_rows(got, indices, rows)
        assert_close(got, want, dtype)


def _exact_square_sum(arrays) -> float:
    return sum(float(np.sum(np.square(a.astype(np.float64)))) for a in arrays)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), count=st.integers(1, 4), lists=st.integers(0, 3))
def test_add_square_sum_matches_the_reference_on_every_path(dtype, data, count, lists):
    """totals[i] += others[k][i] (the same bits as NumPy's +=, list after list), and the sum of
    the results' squares to the dtype's rounding: checked against float64 arithmetic. With no
    others it only measures. Sizes cross the C loops' blocks of 256 values."""
    shapes_ = [data.draw(shapes(max_dims=2, max_side=40)) for _ in range(count)]
    totals = [data.draw(float_arrays(dtype, -3, 3, s)) for s in shapes_]
    others = [[data.draw(float_arrays(dtype, -3, 3, s)) for s in shapes_] for _ in range(lists)]
    want = [t.copy() for t in totals]
    for more in others:
        for w, o in zip(want, more):
            w += o
    saved = [[o.copy() for o in more] for more in others]
    for path in twin_paths() + ["numpy"]:
        kernels.use_kernels(path)
        got = [t.copy() for t in totals]
        squares = kernels.add_square_sum(got, *others)
        assert isinstance(squares, float), path
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w, err_msg=path)
        exact = _exact_square_sum(want)
        assert squares == pytest.approx(exact, rel=TOL[dtype], abs=1e-30), path
        assert kernels.add_square_sum(got) == pytest.approx(exact, rel=TOL[dtype], abs=1e-30)
        for more, more0 in zip(others, saved):  # what is added in is never written
            for o, o0 in zip(more, more0):
                np.testing.assert_array_equal(o, o0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_square_sum_on_a_large_float32_gradient_is_summed_as_in_double(dtype):
    """A million values: a float32 running sum would be off by ~1e-4 of the result; the
    compiled twins (blocks of float32, their sums in double) stay within ~1e-7."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(1_000_003).astype(dtype) for _ in range(2))
    exact = _exact_square_sum([a + b])
    for path in [p for p in twin_paths() if p != "numexpr"]:
        kernels.use_kernels(path)
        total = a.copy()
        assert kernels.add_square_sum([total], [b]) == pytest.approx(exact, rel=1e-7), path
        assert kernels.add_square_sum([total]) == pytest.approx(exact, rel=1e-7), path


def test_add_square_sum_propagates_nan_and_inf():
    """A NaN or inf in any gradient reaches the norm (training stops on a non-finite norm)."""
    for path in twin_paths() + ["numpy"]:
        kernels.use_kernels(path)
        for bad in (np.nan, np.inf):
            for dtype in DTYPES:
                totals = [np.ones(300, dtype), np.ones((3, 4), dtype)]
                other = [np.ones(300, dtype), np.ones((3, 4), dtype)]
                other[0][257] = bad  # in the second block of the C loop
                squares = kernels.add_square_sum(totals, other)
                assert np.isnan(squares) if np.isnan(bad) else squares == np.inf, (path, bad)
                assert np.isnan(totals[0][257]) == np.isnan(bad)
                assert np.isnan(kernels.add_square_sum(totals)) == np.isnan(bad), (path, bad)


@pytest.mark.parametrize("path", ["c"])
def test_add_square_sum_twins_run_the_reference_where_arrays_overlap_or_do_not_fit(path):
    """Arrays added into a total that overlap it (the C arguments are restrict), strided, read-only, of another dtype or shape, or mixed dtypes
    across the totals: the reference's results, or its error."""
    if not c_available():
        pytest.skip(f"the {path} kernels cannot load here (CI installs what they need)")
    rng = np.random.default_rng(0)
    base = rng.standard_normal(800)
    read_only = base[:5].copy()
    read_only.flags.writeable = False
    cases = {  # name: (totals, others) built fresh for each run
        "itself": lambda b: ([b[:300]], [b[:300]]),
        "shifted view": lambda b: ([b[1:301]], [b[:300]]),  # a loop would add what it wrote
        "another total": lambda b: ([b[:100], b[100:400]], [b[100:200], b[400:700]]),
        "strided other": lambda b: ([b[:100]], [b[200::4]]),
        "strided total": lambda b: ([b[::2]], [b[:300].copy()]),
        "other dtype": lambda b: ([b[:10]], [b[10:20].astype(np.float32)]),
        "float16": lambda b: ([b[:10].astype(np.float16)], []),
        "mixed dtypes": lambda b: ([b[:10], b[10:20].astype(np.float32)], []),
        "other shape": lambda b: ([b[:10].reshape(2, 5)], [b[10:15]]),
        "list lengths": lambda b: ([b[:10], b[10:20]], [b[20:30]]),
    }
    for name, make in cases.items():
        outcomes = []
        for p in (path, "numpy"):
            kernels.use_kernels(p)
            b = base.copy()
            try:
                totals, others = make(b)
                outcomes.append((kernels.add_square_sum(totals, *([others] if others else [])), b))
            except (ValueError, TypeError, IndexError) as e:
                outcomes.append((type(e), None))
        (got, got_b), (want, want_b) = outcomes
        assert got == (want if isinstance(want, type) else pytest.approx(want, rel=1e-12)), name
        if want_b is not None:
            np.testing.assert_array_equal(got_b, want_b, err_msg=name)
    kernels.use_kernels(path)
    with pytest.raises(ValueError, match="read-only"):
        kernels.add_square_sum([read_only], [np.ones(5)])
    assert kernels.add_square_sum([read_only]) == pytest.approx(float(read_only @ read_only))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_square_sum_gives_the_same_bits_wherever_its_arrays_lie(dtype):
    """The norm decides the clipping scale, so it must not depend on where NumPy put the
    gradients: the C loops' sums (vectorized) give the same bits at every offset."""
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    kernels.use_kernels("c")
    rng = np.random.default_rng(1)
    n = 1000
    x, y = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    arena = np.zeros(3 * n + 64, dtype)
    results = set()
    for offset in range(64 // arena.itemsize + 8):
        total, other = arena[offset:offset + n], arena[n + 40 + offset:2 * n + 40 + offset]
        total[:], other[:] = x, y
        squares = kernels.add_square_sum([total], [other])
        results.add((squares, kernels.add_square_sum([total]), total.tobytes()))
    assert len(results) == 1


def test_nan_reaches_the_outputs_of_the_fused_kernels():
    """A NaN must not be swallowed (the training loop stops on a NaN loss)."""
    x = np.ones((2, 4, 6), dtype=np.float32)
    x[1, 2, 3] = np.nan
    w = np.ones(6, dtype=np.float32)
    for path in twin_paths() + ["numpy"]:
        kernels.use_kernels(path)
        assert np.isnan(kernels.relu_squared(x)).any()
        assert np.isnan(F.rms_norm_forward(x, w, 1e-5)[0]).any()
        assert np.isnan(F.cross_entropy_forward(x.reshape(8, 6), np.zeros(8, dtype=int))[0])
        assert np.isnan(F.causal_self_attention_forward(x, 1, 0.5)[0]).any()


# ---- the ops that call kernels: same values and gradients on every path ---------------------------
KERNEL_OPS = {
    "exp": lambda t: t.exp(),
    "tanh": lambda t: t.tanh(),
    "sigmoid": lambda t: t.sigmoid(),
    "relu_squared": lambda t: F.relu_squared(t),
    "softmax": lambda t: F.softmax(t),
    "rms_norm": lambda t: F.rms_norm(t, t[0] * 0.5 + 1),
    "cross_entropy": lambda t: F.cross_entropy(t.reshape(-1, t.shape[-1]),
                                               np.arange(t.size // t.shape[-1]) % t.shape[-1]),
    "attention": lambda t: F.scaled_dot_product_attention(t, t, t),
    "causal_self_attention": lambda t: F.causal_self_attention(t.reshape(1, 2, 6), 2),
    "embedding": lambda t: F.embedding(np.array([[0, 1], [1, 1]]), t[:2] * 2),
}


@pytest.mark.parametrize("name", list(KERNEL_OPS))
@given(x=arrays(shape=st.just((2, 6)), away_from=0.0, margin=1e-3))
def test_ops_give_the_same_values_and_gradients_on_every_path(name, x):
    fn = KERNEL_OPS[name]
    u = np.random.default_rng(0).standard_normal(fn(Tensor(x)).shape)

    def run():
        t = Tensor(x.copy(), requires_grad=True)
        out = fn(t)
        out.backward(u)
        return out.data, t.grad

    for path in twin_paths():
        (ya, ga), (yb, gb) = run_on(path, run)
        assert_close(ya, yb, np.float64)
        assert_close(ga, gb, np.float64)


@pytest.mark.parametrize("name", list(KERNEL_OPS))
def test_gradients_match_finite_differences_on_the_active_path(name):
    """The property tests elsewhere run on the default path; this runs each op's gradient
    check on the path CI chose for this run (TENSORLITE_KERNELS) and on numexpr."""
    x = np.random.default_rng(1).uniform(-1.5, 1.5, (2, 6))
    assert_gradients_match(KERNEL_OPS[name], x)
    kernels.use_kernels("numexpr")
    assert_gradients_match(KERNEL_OPS[name], x)


# ---- the compiled kernels' caches --------------------------------------------------------------------
RELU_CODE = ("import numpy as np, tensorlite.functional as F\n"
             "from tensorlite import kernels\n"
             "print(kernels.kernel_path())\n"
             "print(F.relu_squared(np.array([-1.0, 2.0], dtype=np.float32)).data)")


def run_in_a_package_copy(tmp_path: Path, times: int, **env_vars: str):
    """Run RELU_CODE `times` times in fresh processes, on a copy of tensorlite whose
    `__pycache__` cannot be written (it is a file), with an empty user cache folder."""
    pkg = tmp_path / "site"
    if not pkg.exists():
        shutil.copytree(REPO / "tensorlite", pkg / "tensorlite",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (pkg / "tensorlite" / "__pycache__").write_text("not a folder")
    cache = tmp_path / "user-cache"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TENSORLITE_KERNELS", "NUMBA_CACHE_DIR", "CC")}  # the defaults, unless
    env.update(PYTHONPATH=str(pkg), XDG_CACHE_HOME=str(cache), **env_vars)  # given here
    return cache, [subprocess.run([sys.executable, "-c", RELU_CODE], capture_output=True,
                                  text=True, env=env, cwd=tmp_path, timeout=600, check=False)
                   for _ in range(times)]


def test_the_c_kernels_compile_once_and_say_so_then_load_from_a_user_cache(tmp_path):
    """The default path, on a fresh install whose package folder is read-only: the first run
    compiles into the user cache folder and says so in two lines, the second says nothing."""
    if not c_available():
        pytest.skip("no C compiler here (CI installs one); the fallback test covers this")
    cache, runs = run_in_a_package_copy(tmp_path, 2)
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["c", "[0.", "4.]"]
    first, second = runs[0].stderr.splitlines(), runs[1].stderr
    assert len(first) == 2, first
    assert first[0] == (f"tensorlite: compiling C kernels for this CPU (once; cached in "
                        f"{cache / 'tensorlite'}) ...")
    assert first[1].startswith("tensorlite: C kernels compiled in ") and first[1].endswith(" s")
    assert second == ""
    libraries = list((cache / "tensorlite").glob("kernels_c-*.so"))
    assert len(libraries) == 1 and not list((cache / "tensorlite").glob("*.tmp"))


def test_without_a_c_compiler_the_numpy_references_run_with_one_line(tmp_path):
    cache, (run,) = run_in_a_package_copy(tmp_path, 1, CC="/nonexistent/cc")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["numpy", "[0.", "4.]"]
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith("tensorlite: C kernels unavailable (CompilerError: no C compiler")
    assert run.stderr.rstrip().endswith("running the NumPy reference kernels")
    assert not cache.exists() or not list(cache.rglob("*.so"))


def test_a_compiler_that_fails_falls_back_with_one_line_per_message(tmp_path):
    """A compiler that exits with an error: the 'compiling' line, then why it failed."""
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'cc: fatal: no' >&2; exit 1\n")
    fake.chmod(0o755)
    _, (run,) = run_in_a_package_copy(tmp_path, 1, CC=str(fake))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["numpy", "[0.", "4.]"]
    lines = run.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("tensorlite: compiling C kernels")
    assert lines[1].startswith("tensorlite: C kernels unavailable (CompilerError: ")
    assert "cc: fatal: no" in lines[1]


def test_a_compiler_without_march_native_builds_the_portable_kernels(tmp_path):
    """A compiler that rejects -march=native (older clang on ARM) gets the flags without it."""
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\n"
                    "for a in \"$@\"; do [ \"$a\" = -march=native ] && echo 'unknown: -march' >&2 && exit 1; done\n"
                    f"exec {shutil.which(os.environ.get('CC') or 'cc')} \"$@\"\n")
    fake.chmod(0o755)
    _, runs = run_in_a_package_copy(tmp_path, 2, CC=str(fake))
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["c", "[0.", "4.]"]
    assert runs[0].stderr.splitlines()[1].startswith("tensorlite: C kernels compiled in")
    assert runs[1].stderr == ""


def test_two_processes_compiling_at_once_both_get_the_kernels(tmp_path):
    """Each compiles to a temporary name and renames it into place in one step, so neither
    loads half a file; one library is left, and no temporary."""
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    run_in_a_package_copy(tmp_path, 0)  # the package copy, no run
    env = {k: v for k, v in os.environ.items() if k not in ("TENSORLITE_KERNELS", "CC")}
    env.update(PYTHONPATH=str(tmp_path / "site"), XDG_CACHE_HOME=str(tmp_path / "user-cache"))
    procs = [subprocess.Popen([sys.executable, "-c", RELU_CODE], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert out.split() == ["c", "[0.", "4.]"]
    folder = tmp_path / "user-cache" / "tensorlite"
    assert len(list(folder.glob("kernels_c-*.so"))) == 1 and not list(folder.glob("*.tmp"))


def test_a_damaged_cached_library_is_rebuilt(tmp_path):
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    cache, _ = run_in_a_package_copy(tmp_path, 1)
    (library,) = (cache / "tensorlite").glob("kernels_c-*.so")
    library.write_bytes(b"not a shared library")
    _, (run,) = run_in_a_package_copy(tmp_path, 1)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["c", "[0.", "4.]"]
    assert run.stderr.splitlines()[0].startswith("tensorlite: compiling C kernels")
    assert library.read_bytes() != b"not a shared library"


def test_ci_has_the_c_kernels():
    """CI installs a C compiler (.ci/run), so there the default path must be the C one."""
    if os.environ.get("CI"):
        assert c_available()
    assert kernels.DEFAULT_PATH == "c"


# ---- threads --------------------------------------------------------------------------------------
def _all_c_kernels(rng, dtype):
    """One call of every C kernel on fresh inputs, returning every output (copied)."""
    B, T, C, H, V = 2, 9, 12, 3, 7
    qkv = rng.standard_normal((B, T, 3 * C)).astype(dtype)
    dy = rng.standard_normal((B, T, C)).astype(dtype)
    w = rng.standard_normal(C).astype(dtype)
    targets = rng.integers(0, V, B * T)
    logits = rng.standard_normal((B * T, V)).astype(dtype)
    out = list(F.causal_self_attention_forward(qkv, H, 0.3))
    out.append(F.causal_self_attention_backward(dy, qkv, out[1].copy(), H, 0.3))
    out += F.rms_norm_forward(dy, w[::-1], 1e-5)  # a strided weight: copied for the C call
    out += F.rms_norm_backward(qkv[..., :C], dy, out[-1], w)
    loss, probs = F.cross_entropy_forward(logits, targets)
    out += [loss, probs.copy(), F.cross_entropy_backward(np.asarray(1.5, dtype), probs, targets)]
    out += [kernels.relu_squared(dy), kernels.relu_squared_backward(dy, qkv[..., C:2 * C])]
    table = np.zeros((V, C), dtype=dtype)
    kernels.scatter_add_rows(table, targets, dy.reshape(-1, C))
    p, m, v = w.copy(), np.zeros_like(w), np.zeros_like(w)
    kernels.adamw_kernel(p.size)(p, qkv[0, 0, ::3], m, v, 0.1, 0.9, 0.95, 1e-8, 0.1, 1)
    return [np.array(a, copy=True) for a in out + [table, p, m, v]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_c_kernels_called_from_two_threads_at_once_give_the_serial_results(dtype):
    """The C kernels keep no state between calls, so threads may share them (training splits
    a batch over threads): each thread's results equal the same calls made one by one. (This
    caught a scratch array freed before the C call that wrote into it: the other thread's
    next array got that memory.)"""
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    kernels.use_kernels("c")
    seeds = list(range(2 * 100))
    serial = [_all_c_kernels(np.random.default_rng(s), dtype) for s in seeds]
    threaded: dict[int, list] = {}
    barrier = threading.Barrier(2)

    def work(mine):
        barrier.wait()  # start together
        for s in mine:
            threaded[s] = _all_c_kernels(np.random.default_rng(s), dtype)

    threads = [threading.Thread(target=work, args=(seeds[k::2],)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in seeds:
        for a, b in zip(threaded[s], serial[s]):
            np.testing.assert_array_equal(a, b)


def test_c_kernel_calls_release_the_gil():
    """ctypes releases the GIL around a call unless the library was loaded as a PyDLL; the
    threads that share a batch rely on it."""
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    import ctypes

    from tensorlite import kernels_c

    assert type(kernels_c._lib) is ctypes.CDLL
    fn = kernels_c._fn("relu_squared", np.dtype(np.float32))
    assert not fn._flags_ & ctypes._FUNCFLAG_PYTHONAPI


@pytest.mark.parametrize("dtype", DTYPES)
def test_c_kernels_take_read_only_strided_and_empty_inputs(dtype):
    """Inputs the fast pointer route refuses (read-only, empty) or that need a copy first
    (strided, another dtype) give the reference's results."""
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    x = np.linspace(-2, 2, 24).astype(dtype).reshape(4, 6)
    x.flags.writeable = False
    cases = {
        "read-only": lambda: (kernels.relu_squared(x), F.rms_norm_forward(x, x[0], 1e-5)[0]),
        "strided": lambda: (kernels.relu_squared(x[:, ::2]), F.rms_norm_forward(x.T, x[:, 0], 1e-5)[0]),
        "empty": lambda: (kernels.relu_squared(x[:0]), F.rms_norm_forward(x[:0], x[0], 1e-5)[0]),
        "other dtype": lambda: (kernels.relu_squared_backward(x.astype(np.float16), x),
                                F.rms_norm_forward(x, x[0].astype(np.float16), 1e-5)[0]),
    }
    for name, run in cases.items():
        for a, b in zip(*run_on("c", run)):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=TOL[dtype], err_msg=name)


def test_c_kernels_reject_out_of_range_indices_without_writing():
    """Indices are checked in C before anything is read or written out of bounds."""
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    kernels.use_kernels("c")
    table = np.zeros((3, 2))
    with pytest.raises(IndexError, match="index 3 is out of bounds"):
        kernels.scatter_add_rows(table, np.array([0, 3]), np.ones((2, 2)))
    assert not table.any()
    kernels.scatter_add_rows(table, np.array([-1, 0]), np.ones((2, 2)))  # as NumPy: from the end
    np.testing.assert_array_equal(table, [[1, 1], [0, 0], [1, 1]])
    with pytest.raises(IndexError, match="index 7 is out of bounds"):
        F.cross_entropy_forward(np.zeros((2, 4)), np.array([1, 7]))
    probs = np.full((2, 4), 0.25)
    with pytest.raises(IndexError, match="index -5 is out of bounds"):
        F.cross_entropy_backward(1.0, probs, np.array([1, -5]))
    np.testing.assert_array_equal(probs, 0.25)


def test_set_num_threads_sets_blas_and_numexpr():
    before = tl.get_num_threads()
    numexpr_before = kernels.ne.get_num_threads()
    try:
        tl.set_num_threads(1)
        assert tl.get_num_threads() == 1 and kernels.ne.get_num_threads() == 1
        tl.set_num_threads(2)
        assert tl.get_num_threads() == 2 and kernels.ne.get_num_threads() == 2
        # results do not depend on the thread count
        a = np.random.default_rng(0).standard_normal((64, 64))
        tl.set_num_threads(1)
        one = (Tensor(a) @ Tensor(a)).data
        tl.set_num_threads(2)
        np.testing.assert_allclose((Tensor(a) @ Tensor(a)).data, one, rtol=1e-12)
    finally:
        tl.set_num_threads(before)
        kernels.ne.set_num_threads(numexpr_before)
    assert tl.set_num_threads is kernels.set_num_threads


@pytest.mark.parametrize("bad", [0, -2])
def test_set_num_threads_rejects_less_than_one(bad):
    with pytest.raises(ValueError, match=">= 1"):
        tl.set_num_threads(bad)


# ---- the allocator ----------------------------------------------------------------------------------
def test_tune_allocator_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(kernels, "_allocator_tuned", False)
    monkeypatch.setenv("TENSORLITE_TUNE_MALLOC", "0")
    assert kernels.tune_allocator() is False
    monkeypatch.delenv("TENSORLITE_TUNE_MALLOC")
    result = kernels.tune_allocator()
    assert isinstance(result, bool) and kernels.tune_allocator() is result  # idempotent


def test_the_c_loop_in_the_docs_is_the_one_in_kernels_c():
    """docs/performance.md ("How a kernel is written") shows the C twin of rms_norm_forward:
    it must not drift from the code."""
    doc = (REPO / "docs" / "performance.md").read_text()
    shown = doc.split("```c\n", 1)[1].split("```", 1)[0]
    assert "KERNEL(rms_norm_forward)" in shown
    assert shown in (REPO / "tensorlite" / "kernels.c").read_text()


# ---- where the buffers lie ------------------------------------------------------------------------
def _c_kernel_calls(dtype) -> list:
    """(kernel, buffers, written, arguments) for one call of each C kernel with two float
    buffers or more (all but cross_entropy_backward, which writes in place), at the sizes of
    the tiny GPT in the checkpoint tests (16 rows of 8 values; 4 attention matrices 8 x 8).
    buffers: the float buffers' initial values by name; written: those the kernel writes;
    arguments(p, ix): the call's arguments, p the placed buffers' addresses by name, ix the
    address of an int64 index array."""
    rng = np.random.default_rng(0)
    rows, c, n, t, v = 16, 8, 4, 8, 5
    st = np.triu(rng.standard_normal((n, t, t))).astype(dtype)

    def f(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x, w = f(rows, c), f(c)
    r = (1 / np.sqrt((x * x).mean(1) + 1e-5)).astype(dtype)
    z = np.zeros
    u = _attention_unit(np.dtype(dtype))  # one head of u values, u positions
    pt = np.triu(rng.random((u, u))).astype(dtype)
    return [
        ("causal_attention_forward", {"qkv": f(u, 3 * u), "y": z(u * u), "pt": z(u * u),
                                      "qt": z(u * u), "m": z(u), "sum": z(u)}, "y pt qt m sum",
         lambda p, ix: (p["qkv"], 1, u, 1, u, 0.3, p["y"], p["pt"], p["qt"], p["m"], p["sum"])),
        ("causal_attention_backward", {"dy": f(u, u), "qkv": f(u, 3 * u), "pt": pt,
                                       "dqkv": z(3 * u * u), "ds": z(u * u), "dt": z(u * u),
                                       "cs": z(u)}, "dqkv ds dt cs",
         lambda p, ix: (p["dy"], p["qkv"], p["pt"], 1, u, 1, u, 0.3, p["dqkv"], p["ds"], p["dt"],
                        p["cs"])),
        ("relu_squared", {"x": x, "y": z(x.size)}, "y", lambda p, ix: (p["x"], p["y"], x.size)),
        ("relu_squared_backward", {"d": f(rows, c), "x": x, "dx": z(x.size)}, "dx",
         lambda p, ix: (p["d"], p["x"], p["dx"], x.size)),
        ("rms_norm_forward", {"x": x, "w": w, "y": z(x.size), "r": z(rows)}, "y r",
         lambda p, ix: (p["x"], p["w"], 1e-5, rows, c, p["y"], p["r"])),
        ("rms_norm_backward", {"d": f(rows, c), "x": x, "r": r, "w": w, "dx": z(x.size),
                               "dw": z(c)}, "dx dw",
         lambda p, ix: (p["d"], p["x"], p["r"], p["w"], rows, c, p["dx"], p["dw"])),
        ("causal_softmax_columns", {"st": st, "m": z(t), "sum": z(t)}, "st m sum",
         lambda p, ix: (p["st"], n, t, 0.3, p["m"], p["sum"])),
        ("softmax_backward_columns", {"d": f(n, t, t), "pt": np.abs(st), "s": z(t)}, "d s",
         lambda p, ix: (p["d"], p["pt"], n, t, 0.3, p["s"])),
        ("cross_entropy_forward", {"l": f(rows, v), "p": z((rows, v)), "loss": z(rows)}, "p loss",
         lambda p, ix: (p["l"], ix, rows, v, p["p"], p["loss"])),
        ("scatter_add_rows", {"table": f(v, c), "rows": f(rows, c)}, "table",
         lambda p, ix: (p["table"], v, ix, p["rows"], rows, c)),
        ("adamw_update", {"p": w, "g": f(c), "m": f(c), "v": np.abs(f(c))}, "p m v",
         lambda p, ix: (p["p"], p["g"], p["m"], p["v"], c, 0.9, 0.95, 0.1, 0.05, 0.99, 0.01,
                        20.0, 1e-8)),
    ]


def _layouts(sizes: dict, written: list, k: int):
    """Offsets of buffers in one arena: each written buffer beside each other buffer (before
    it, after it, 0 to k values apart), every other buffer far away."""
    far = 3 * max(sizes.values()) + 4 * k
    home = {name: i * far + far // 2 for i, name in enumerate(sizes)}
    for out in written:
        for near, size in sizes.items():
            if near == out:
                continue
            for at in range(home[near] - sizes[out] - k, home[near] + size + k + 1):
                if at + sizes[out] <= home[near] or at >= home[near] + size:
                    yield {**home, out: at}


@pytest.mark.parametrize("dtype", DTYPES)
def test_c_kernels_give_the_same_bits_wherever_their_buffers_lie(dtype):
    """Same inputs, same bits, whatever the buffers' addresses. The compiler vectorizes a
    loop with two versions when it cannot tell whether an output overlaps an input, and
    picks one at run time from the addresses; rms_norm_backward's row sums (reassociated
    into SIMD lanes) then came out a few ulps apart when NumPy happened to allocate dw
    within 64 bytes after the weight: the tiny GPT built twice in one process got different
    float32 weights after one step about twice in 100 builds. (Now every argument is restrict.)"""
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    from tensorlite import kernels_c

    kernels.use_kernels("c")
    k = 64 // np.dtype(dtype).itemsize + 8  # a 64-byte vector's values, and some
    ix = np.array([0, 4, 1, 4, 2, 2, 3, 0, 1, 1, 4, 3, 0, 2, 3, 4])  # 16 indices < 5
    for name, buffers, written, arguments in _c_kernel_calls(dtype):
        fn = kernels_c._fn(name, np.dtype(dtype))
        sizes = {b: a.size for b, a in buffers.items()}
        results = set()
        for layout in _layouts(sizes, written.split(), k):
            arena = np.full(max(layout.values()) + 3 * max(sizes.values()) + 4 * k, np.nan, dtype)
            placed = {b: arena[at:at + sizes[b]] for b, at in layout.items()}
            for b, a in buffers.items():
                placed[b][:] = a.ravel()
            fn(*arguments({b: kernels_c._ptr(a) for b, a in placed.items()}, kernels_c._ptr(ix)))
            results.add(b"".join(placed[b].tobytes() for b in written.split()))
        assert len(results) == 1, f"{name}: {len(results)} different results"


ALIASED_INDICES = """
import sys
import numpy as np
from tensorlite import kernels
from tensorlite.functional import cross_entropy_backward
assert kernels.use_kernels(sys.argv[1]) == sys.argv[1]

def scatter(f):  # the indices are target's own first two values (0.0: index 0)
    t = np.zeros((5, 3))
    f(t, t.view(np.int64)[0, :2], np.full((2, 3), 0.5))
    return t

def cross_entropy(f):  # the targets are probs' first three values: 1, 0, 0
    p = np.zeros((3, 4))
    p[0, 0] = 5e-324  # the float whose bits are the int64 1
    return f(np.asarray(1.0), p, p.view(np.int64).reshape(-1)[:3]).copy()

for run, twin in ((scatter, kernels.scatter_add_rows), (cross_entropy, cross_entropy_backward)):
    print(np.array_equal(run(twin), run(twin.reference), equal_nan=True))
"""


@pytest.mark.parametrize("path", ["c"])
def test_compiled_twins_never_let_a_write_change_the_indices_they_read(path):
    """The C loops check every index, then read them again while they write: indices that
    are bytes of the array written to (a view) turned into huge ones in between, and the loop wrote outside the array (heap
    corruption). The twins hand those to the reference. In a subprocess: before the fix
    this crashed the interpreter."""
    if not c_available():
        pytest.skip(f"the {path} kernels cannot load here (CI installs what they need)")
    out = subprocess.run([sys.executable, "-c", ALIASED_INDICES, path], capture_output=True,
                         text=True, timeout=300, check=False)
    assert (out.returncode, out.stdout.split()) == (0, ["True", "True"]), out.stderr


def test_c_twins_never_hand_the_c_loops_overlapping_buffers():
    """The C arguments are restrict (they never overlap). Where a caller's arrays do, the
    twin runs the reference instead (softmax_backward_columns, scatter_add_rows) or refuses
    (adamw_update: its arguments are the optimizer's own four arrays)."""
    if not c_available():
        pytest.skip("no C compiler here (CI installs one)")
    kernels.use_kernels("c")
    rng = np.random.default_rng(0)
    st, table = rng.random((2, 4, 4)), rng.random((5, 3))
    runs = {
        F.softmax_backward_columns: lambda f, a, _: f(a, a, 0.5),  # dst is pt
        kernels.scatter_add_rows: lambda f, _, t: (f(t, np.array([4, 0]), t[1:3]), t)[1],  # t rows
    }
    for twin, run in runs.items():
        np.testing.assert_array_equal(run(twin, st.copy(), table.copy()),
                                      run(twin.reference, st.copy(), table.copy()))
    p = np.ones(6)
    with pytest.raises(ValueError, match="separate arrays"):
        kernels.adamw_kernel(p.size)(p, p, np.zeros(6), np.zeros(6), 0.1, 0.9, 0.99, 1e-8, 0, 1)
