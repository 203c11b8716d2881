"""bfloat16 products: the rounding helper against ml_dtypes, the fast (AVX512_BF16, where this
CPU has it) and the fallback (forced everywhere) paths against the float64 reference over
hypothesis-chosen shapes and layouts, NaN/inf/subnormal inputs, tl.autocast, and the
gradients of MatMulBF16 against float64 finite differences of its semantics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tensorlite as tl
from tensorlite import Tensor, kernels, references
from tensorlite.precision import MatMulBF16, autocast_dtype

FAST = kernels.bf16_fast_available()
PATHS = ["fallback", pytest.param("fast", marks=pytest.mark.skipif(
    not FAST, reason="this CPU has no AVX512_BF16 (the fallback runs the same tests)"))]


def test_the_cpu_says_which_paths_run(capsys):
    """(Not skippable: the log of every run names the path each CPU tested.)"""
    with capsys.disabled():
        print(f"\nbf16 paths tested here: fallback{' and fast' if FAST else ''}")
    assert kernels.bf16_path() in kernels.BF16_PATHS


# ---- rounding -----------------------------------------------------------------------------------
def test_round_to_nearest_even_worked_examples():
    # 1 + 2**-8 is exactly half-way between 1 and 1 + 2**-7: ties go to the even one (1).
    # 1 + 3 * 2**-8 is half-way between 1 + 2**-7 (odd) and 1 + 2**-6 (even): up.
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 3.14159265, -2.5e-3], np.float32)
    got = references.round_to_bfloat16(x)
    assert got.tolist() == [1.0, 1 + 2**-6, 1 + 2**-7, 3.140625, -0.00250244140625]
    assert references.bfloat16_bits(np.float32(1.0)) == 0x3F80
    assert references.bfloat16_bits(np.float32(-2.0)) == 0xC000


def test_rounding_special_values():
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4e38, 1e-40, -1e-45], np.float32)
    got = references.round_to_bfloat16(x)
    assert np.isnan(got[:2]).all()
    assert got[2:4].tolist() == [np.inf, -np.inf]
    assert got[4] == 0 and np.signbit(got[5])
    assert got[6] == np.inf  # past bf16's largest finite value (~3.39e38)
    assert 0 < got[7] < 2.0**-126  # a subnormal rounds like any number
    operand = references.bf16_operand(x)  # as the product reads it: subnormals are zero
    assert operand[7] == 0 and operand[8] == 0 and np.signbit(operand[8])
    assert np.isnan(operand[:2]).all() and operand[6] == np.inf


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=50))
def test_rounding_matches_ml_dtypes(values):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array(values, dtype=np.float32)
    expected = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(references.round_to_bfloat16(x), expected)


def test_rounding_every_bit_pattern_near_one_against_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = (np.arange(0x3F7F0000, 0x3F820000, dtype=np.uint32)).view(np.float32)  # ~0.996..1.016
    np.testing.assert_array_equal(references.round_to_bfloat16(x),
                                  x.astype(ml_dtypes.bfloat16).astype(np.float32))


# ---- the product against the reference ----------------------------------------------------------
def _tolerance(a, b) -> np.ndarray:
    """float32 accumulation of k exact products: each partial sum rounds once (2**-24
    relative), so |error| <= k * 2**-24 * sum |a_ip b_pj|; plus products below float32's
    smallest normal, flushed by the fast path (2**-126 each)."""
    mag = np.abs(references.bf16_operand(a)).astype(np.float64) @ np.abs(references.bf16_operand(b))
    k = a.shape[-1]
    return (k + 2) * 2.0**-24 * mag + k * 2.0**-126


def _layout(x: np.ndarray, how: str) -> np.ndarray:
    """x with the same values in another memory layout."""
    if how == "transposed":  # Fortran order: a transposed view of a C array
        return np.asfortranarray(x)
    if how == "strided":  # every other row and column of a bigger array
        big = np.zeros((2 * x.shape[0], 2 * x.shape[1]), dtype=x.dtype)
        big[::2, ::2] = x
        return big[::2, ::2]
    if how == "reversed":
        return x[::-1, ::-1].copy()[::-1, ::-1]
    return x


SIDES = st.one_of(st.integers(1, 40), st.sampled_from([1, 15, 16, 17, 31, 32, 33, 47, 97, 257, 300]))


@pytest.mark.parametrize("path", PATHS)
@given(m=SIDES, k=SIDES, n=SIDES, layouts=st.tuples(*[st.sampled_from(
    ["contiguous", "transposed", "strided", "reversed"])] * 2), seed=st.integers(0, 2**16))
def test_product_matches_the_reference(path, m, k, n, layouts, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32) * 3
    expected = references.matmul_bf16_reference(a, b)
    got = kernels.matmul_bf16(_layout(a, layouts[0]), _layout(b, layouts[1]), path=path)
    assert got.dtype == np.float32 and got.shape == (m, n)
    assert np.all(np.abs(got - expected) <= _tolerance(a, b))


@pytest.mark.skipif(not FAST, reason="this CPU has no AVX512_BF16")
@pytest.mark.parametrize("layouts", [("transposed", "transposed"), ("strided", "reversed"),
                                     ("contiguous", "transposed")])
def test_the_fast_product_gives_the_same_bits_for_every_layout(layouts):
    """The C loops pack both operands before multiplying (a transposed B column by column),
    so how the operands lie in memory cannot change a bit of the result."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((70, 300)).astype(np.float32)
    b = rng.standard_normal((300, 97)).astype(np.float32)
    want = kernels.matmul_bf16(a, b, path="fast")
    got = kernels.matmul_bf16(_layout(a, layouts[0]), _layout(b, layouts[1]), path="fast")
    assert np.array_equal(got, want)


@pytest.mark.parametrize("path", PATHS)
def test_model_shapes_and_threads(path, monkeypatch):
    """Sizes past the C loops' blocks (KC 256, MC 96), split over 1 and 2 threads."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((517, 600)).astype(np.float32)
    b = rng.standard_normal((600, 130)).astype(np.float32)
    expected = references.matmul_bf16_reference(a, b)
    for threads in (1, 2):
        monkeypatch.setattr(tl.kernels.kernels_c, "threads", threads)
        got = kernels.matmul_bf16(a, b, path=path)
        assert np.all(np.abs(got - expected) <= _tolerance(a, b))


@pytest.mark.parametrize("path", PATHS)
def test_rows_of_a_stack_times_a_matrix(path):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 5, 20)).astype(np.float32)
    b = rng.standard_normal((20, 7)).astype(np.float32)
    got = kernels.matmul_bf16(a, b, path=path)
    assert got.shape == (3, 5, 7)
    assert np.all(np.abs(got - references.matmul_bf16_reference(a, b)) <= _tolerance(a, b))


@pytest.mark.parametrize("path", PATHS)
def test_nan_inf_and_subnormals_as_the_reference(path):
    a = np.array([[np.nan, 1.0, 0.0], [np.inf, 1.0, 0.0], [1e-39, 2.0, -1e-40],
                  [1.0, np.inf, 0.0], [1e-20, 0.0, 0.0]], np.float32)
    b = np.array([[1.0, 0.0], [1.0, -1.0], [3.0, 1e-39]], np.float32)
    b2 = b.copy()
    b2[0, 1] = 1e-20
    with np.errstate(invalid="ignore"):  # inf * 0 and inf - inf make NaNs, as they should
        got = kernels.matmul_bf16(a, b2, path=path)
        expected = references.matmul_bf16_reference(a, b2)
        tolerance = _tolerance(a, b2)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))  # nan, inf * 0, inf - inf
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    assert np.all(np.abs(got[finite] - expected[finite]) <= tolerance[finite])
    assert got[2, 0] == 2.0  # the subnormal operands count as zero (1e-39 * 1 would be 1e-39)
    assert abs(got[4, 1]) <= 2.0**-126  # 1e-20 * 1e-20: a product below float32's normals


def test_fast_and_fallback_agree_at_float32_accumulation_order():
    if not FAST:
        pytest.skip("this CPU has no AVX512_BF16: only the fallback runs")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((300, 384)).astype(np.float32)
    b = rng.standard_normal((384, 200)).astype(np.float32)
    fast, slow = (kernels.matmul_bf16(a, b, path=p) for p in ("fast", "fallback"))
    assert np.all(np.abs(fast - slow) <= 2 * _tolerance(a, b))


def test_the_env_var_forces_the_fallback(monkeypatch):
    monkeypatch.setenv("TENSORLITE_BF16", "fallback")
    assert kernels.bf16_path() == "fallback"
    with pytest.raises(ValueError, match="path must be one of"):
        kernels.matmul_bf16(np.ones((2, 2)), np.ones((2, 2)), path="avx")


def test_no_speedup_line_on_a_cpu_without_the_instructions():
    code = ("import tensorlite as tl, tensorlite.kernels as k; k.bf16_fast_available = lambda: False\n"
            "with tl.autocast('bfloat16'): pass\nwith tl.autocast('bfloat16'): pass\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.count("no AVX512_BF16") == 1, out.stderr


# ---- autocast and the op ------------------------------------------------------------------------
def test_autocast_turns_float32_matmuls_into_bf16_and_back():
    x = Tensor(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4) + 1 / 3)
    w = Tensor(np.linspace(1, 2, 8, dtype=np.float32).reshape(4, 2) + 1 / 7)
    plain = (x @ w).data
    assert autocast_dtype() is None
    with tl.autocast("bfloat16"):
        assert autocast_dtype() == "bfloat16"
        mixed = (x @ w).data
        with tl.autocast("float32"):
            np.testing.assert_array_equal((x @ w).data, plain)
        wide = (Tensor(x.data.astype(np.float64)) @ Tensor(w.data.astype(np.float64))).data
    assert autocast_dtype() is None
    assert mixed.dtype == np.float32 and not np.array_equal(mixed, plain)
    np.testing.assert_allclose(mixed, references.matmul_bf16_reference(x.data, w.data), rtol=1e-6)
    assert wide.dtype == np.float64  # float64 products are left alone
    with pytest.raises(ValueError, match="dtype must be one of"), tl.autocast("float16"):
        pass


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shapes", [((5, 7), (7, 3)), ((2, 3, 4), (4, 5)), ((4,), (4, 3)),
                                    ((3, 4), (4,)), ((2, 3, 4), (2, 4, 2)), ((33, 17), (17, 40))])
def test_matmul_bf16_gradients_against_finite_differences(path, shapes, monkeypatch):
    """The op's gradients are those of the product taken at the rounded operands, with the
    incoming gradient rounded. At operands and a cotangent that are bf16 numbers already,
    they equal float64 central differences of <dout, x @ y> up to float32 sums."""
    monkeypatch.setenv("TENSORLITE_BF16", path)
    rng = np.random.default_rng(4)
    x, y = (references.round_to_bfloat16(rng.standard_normal(s)).astype(np.float64) for s in shapes)
    out_shape = np.matmul(x, y).shape
    dout = references.round_to_bfloat16(rng.standard_normal(out_shape)).astype(np.float64)
    tx, ty = Tensor(x.astype(np.float32), requires_grad=True), Tensor(y.astype(np.float32), requires_grad=True)
    out = MatMulBF16.apply(tx, ty)
    out.backward(dout.astype(np.float32))
    eps = 1e-3  # the function is bilinear: central differences are exact but for rounding
    for arg, t in ((0, tx), (1, ty)):
        expected = np.zeros(t.shape)
        for where in np.ndindex(t.shape):
            xs = [x.copy(), y.copy()]
            xs[arg][where] += eps
            plus = np.sum(dout * np.matmul(*xs))
            xs[arg][where] -= 2 * eps
            minus = np.sum(dout * np.matmul(*xs))
            expected[where] = (plus - minus) / (2 * eps)
        assert t.grad.dtype == np.float32
        np.testing.assert_allclose(t.grad, expected, rtol=1e-5, atol=1e-5)


def test_gradients_round_the_incoming_gradient_and_the_operands():
    """At values that are not bf16 numbers, the gradients are the reference's bf16 products."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((6, 9)).astype(np.float32), rng.standard_normal((9, 4)).astype(np.float32)
    dout = rng.standard_normal((6, 4)).astype(np.float32)
    tx, ty = Tensor(x, requires_grad=True), Tensor(y, requires_grad=True)
    with tl.autocast("bfloat16"):
        out = tx @ ty
    out.backward(dout)
    np.testing.assert_allclose(tx.grad, references.matmul_bf16_reference(dout, y.T), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ty.grad, references.matmul_bf16_reference(x.T, dout), rtol=1e-5, atol=1e-6)
    assert not np.allclose(tx.grad, dout @ y.T, rtol=1e-5, atol=1e-6)  # it did round


def test_second_order_and_forward_mode_run_in_bf16():
    x = Tensor(references.round_to_bfloat16(np.arange(6.0).reshape(2, 3) / 7), requires_grad=True)
    y = Tensor(references.round_to_bfloat16(np.arange(12.0).reshape(3, 4) / 5), requires_grad=True)
    with tl.autocast("bfloat16"):
        (gx,) = tl.grad(((x @ y) ** 2).sum(), [x], create_graph=True)
    expected = 2 * (x.data @ y.data) @ y.data.T
    np.testing.assert_allclose(gx.data, expected, rtol=2e-2)  # the inner x @ y rounds to bf16
    (gy,) = tl.grad(gx.sum(), [y])
    assert gy.shape == (3, 4) and np.all(np.isfinite(gy.data))
