"""AdamW against a plain NumPy reference, the warmup+cosine schedule at known points, and
global-norm clipping."""

import itertools
import math

import numpy as np
import pytest

from gpt.config import TrainConfig
from gpt.optim import AdamW, clip_grad_norm, lr_at
from tensorlite import Tensor, kernels


def _params(rng, dtype=np.float64):
    shapes = {"w": (4, 3), "gain": (3,), "emb": (5, 2)}
    return {n: Tensor(rng.standard_normal(s).astype(dtype), requires_grad=True)
            for n, s in shapes.items()}


def _reference_adamw(p, grads, lr, b1, b2, eps, wd):
    """Textbook AdamW, written independently: one array, a list of gradients, lr per step."""
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t, (g, step_lr) in enumerate(zip(grads, lr), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - step_lr * wd * p - step_lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("path", ["numpy", "c", "numexpr"])
def test_adamw_matches_numpy_reference_over_several_steps(path):
    rng = np.random.default_rng(0)
    params = _params(rng)
    start = {n: p.data.copy() for n, p in params.items()}
    steps = 7
    grads = {n: [rng.standard_normal(p.shape) for _ in range(steps)] for n, p in params.items()}
    lrs = [lr_at(i, 6, 0.01, 0.001, 2) for i in range(steps)]
    opt = AdamW(params, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    before = kernels.kernel_path()
    kernels.use_kernels(path)
    try:
        for i in range(steps):
            for n, p in params.items():
                p.grad = grads[n][i].copy()
            opt.step(lr=lrs[i])
    finally:
        kernels.use_kernels(before)
    for n, p in params.items():
        wd = 0.1 if p.ndim == 2 else 0.0  # decay on 2-D weights only
        expected = _reference_adamw(start[n], grads[n], lrs, 0.9, 0.95, 1e-8, wd)
        np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-14, err_msg=n)
    assert opt.t == steps


def test_weight_decay_skips_1d_gains_and_default_lr_is_used():
    params = {"w": Tensor(np.ones((2, 2)), requires_grad=True),
              "g": Tensor(np.ones(2), requires_grad=True)}
    for p in params.values():
        p.grad = np.zeros_like(p.data)  # zero gradient: only decay can move a weight
    AdamW(params, lr=0.1, weight_decay=0.5).step()
    np.testing.assert_allclose(params["w"].data, 1 - 0.1 * 0.5)
    np.testing.assert_array_equal(params["g"].data, 1.0)


def test_parameters_without_grad_are_left_alone():
    rng = np.random.default_rng(1)
    params = _params(rng)
    before = params["gain"].data.copy()
    params["w"].grad = np.ones((4, 3))
    AdamW(params, lr=0.1).step()
    np.testing.assert_array_equal(params["gain"].data, before)


def test_state_dict_resume_gives_identical_updates():
    rng = np.random.default_rng(2)
    a, b = _params(rng, np.float32), None
    b = {n: Tensor(p.data.copy(), requires_grad=True) for n, p in a.items()}
    grads = [{n: rng.standard_normal(p.shape).astype(np.float32) for n, p in a.items()}
             for _ in range(6)]
    opt_a = AdamW(a, lr=0.01, weight_decay=0.1)
    opt_b = AdamW(b, lr=0.01, weight_decay=0.1)
    for i, g in enumerate(grads):
        if i == 3:  # b "restarts" from a saved state
            saved = opt_b.state_dict()
            assert saved["step"].dtype == np.int64 and int(saved["step"]) == 3
            assert all(isinstance(v, np.ndarray) for v in saved.values())
            opt_b = AdamW(b, lr=0.01, weight_decay=0.1)
            opt_b.load_state_dict(saved)
        for params, opt in ((a, opt_a), (b, opt_b)):
            for n, p in params.items():
                p.grad = g[n].copy()
            opt.step()
    for n in a:
        np.testing.assert_array_equal(a[n].data, b[n].data)


def test_load_state_dict_errors():
    params = _params(np.random.default_rng(3))
    opt = AdamW(params)
    state = opt.state_dict()
    del state["v.gain"]
    with pytest.raises(ValueError, match=r"missing v\.gain"):
        opt.load_state_dict(state)
    state = opt.state_dict()
    state["m.w"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"m\.w has shape \(3, 3\), expected \(4, 3\)"):
        opt.load_state_dict(state)
    with pytest.raises(ValueError, match=r"unexpected m\.other"):
        opt.load_state_dict(dict(opt.state_dict(), **{"m.other": np.zeros(1)}))
    with pytest.raises(TypeError, match="dict"):
        AdamW(list(params.values()))


def test_schedule_at_known_points():
    lr, min_lr, warmup, n = 1e-3, 1e-4, 100, 2000
    assert lr_at(0, n, lr, min_lr, warmup) == pytest.approx(lr / 100)
    assert lr_at(49, n, lr, min_lr, warmup) == pytest.approx(lr / 2)
    assert lr_at(99, n, lr, min_lr, warmup) == pytest.approx(lr)
    assert lr_at(100, n, lr, min_lr, warmup) == pytest.approx(lr)  # cosine starts at the top
    assert lr_at(1050, n, lr, min_lr, warmup) == pytest.approx((lr + min_lr) / 2)  # half way
    quarter = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_at(100 + 475, n, lr, min_lr, warmup) == pytest.approx(quarter)
    assert lr_at(2000, n, lr, min_lr, warmup) == pytest.approx(min_lr)
    assert lr_at(5000, n, lr, min_lr, warmup) == min_lr
    values = [lr_at(i, n, lr, min_lr, warmup) for i in range(n + 1)]
    assert all(a <= b for a, b in itertools.pairwise(values[:100]))  # warmup climbs
    assert all(a >= b for a, b in itertools.pairwise(values[100:]))  # then decays


def test_schedule_from_config_and_without_warmup():
    cfg = TrainConfig(max_iters=10, lr=0.5, min_lr=0.1, warmup_iters=0)
    assert lr_at(0, cfg) == pytest.approx(0.5)
    assert lr_at(5, cfg) == pytest.approx(0.3)
    assert lr_at(10, cfg) == pytest.approx(0.1)
    assert lr_at(3, cfg) == lr_at(3, 10, 0.5, 0.1, 0)


def test_clip_grad_norm_scales_to_max_norm_and_returns_norm_before():
    a = Tensor(np.zeros(2), requires_grad=True)
    b = Tensor(np.zeros((2, 2)), requires_grad=True)
    c = Tensor(np.zeros(3), requires_grad=True)  # no grad: ignored
    a.grad = np.array([3.0, 0.0])
    b.grad = np.array([[0.0, 4.0], [0.0, 12.0]])
    norm = clip_grad_norm([a, b, c], 6.5)
    assert norm == pytest.approx(13.0)
    new = math.sqrt(np.sum(a.grad**2) + np.sum(b.grad**2))
    assert new == pytest.approx(6.5, rel=1e-6)
    np.testing.assert_allclose(a.grad, [1.5, 0.0], rtol=1e-6)  # direction kept
    np.testing.assert_allclose(b.grad, [[0.0, 2.0], [0.0, 6.0]], rtol=1e-6)


def test_clip_grad_norm_takes_a_norm_already_measured():
    """Given the norm, clip_grad_norm does not measure again: it clips by that norm (here
    deliberately not the gradients' own, to see which one it used), returns it, and keeps
    the rules: a non-finite norm scales nothing, max_norm <= 0 only returns it."""
    a = Tensor(np.zeros(2), requires_grad=True)
    a.grad = np.array([3.0, 4.0])
    assert clip_grad_norm([a], 2.0, norm=10.0) == 10.0
    np.testing.assert_allclose(a.grad, np.array([3.0, 4.0]) * 2.0 / (10.0 + 1e-6), rtol=1e-12)
    before = a.grad.copy()
    for norm, max_norm in ((math.nan, 1.0), (math.inf, 1.0), (10.0, 0.0), (10.0, -1.0)):
        result = clip_grad_norm([a], max_norm, norm)
        assert result == norm or (math.isnan(result) and math.isnan(norm))
        np.testing.assert_array_equal(a.grad, before)
    assert clip_grad_norm([a], 100.0, norm=np.float32(5.0)) == 5.0  # below max_norm: as is
    assert type(clip_grad_norm([a], 100.0, norm=np.float32(5.0))) is float
    np.testing.assert_array_equal(a.grad, before)


def test_clip_grad_norm_leaves_small_gradients_and_accepts_a_dict():
    a = Tensor(np.zeros(2, np.float32), requires_grad=True)
    a.grad = np.array([0.3, 0.4], np.float32)
    assert clip_grad_norm({"a": a}, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(a.grad, np.array([0.3, 0.4], np.float32))
    assert a.grad.dtype == np.float32
    assert clip_grad_norm([a], 0.0) == pytest.approx(0.5)  # 0: measure only
    a.grad = np.array([np.nan, 1.0], np.float32)
    assert math.isnan(clip_grad_norm([a], 1.0))
