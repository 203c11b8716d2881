"""Numerical gradient checking: compare the analytic gradient (backward) with central
finite differences, element by element, projected on a random cotangent `u`:

    d<u, f(x)>/dx_i  ~  (<u, f(x + eps e_i)> - <u, f(x - eps e_i)>) / (2 eps)

A random `u` (not a `.sum()`) catches bugs that are symmetric across output elements.
Run it in float64: float32 differences are too noisy to tell a bug from rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .autograd import no_grad
from .tensor import Tensor


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with finite differences (names where and by how much)."""


def _as_output(out) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out).__name__}")
    return out


def gradcheck(
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    seed: int = 0,
) -> bool:
    """Check d(fn)/d(input) for every input that requires grad. True, or GradcheckError.

    `fn(*inputs)` must return a Tensor. Each input that should be checked must have
    requires_grad=True (float64 recommended: the check runs in the inputs' dtype). The
    inputs' `.grad` is reset to None before and after the check.
    """
    inputs = list(inputs)
    for t in inputs:
        if not isinstance(t, Tensor):
            raise TypeError(f"gradcheck: inputs must be Tensors, got {type(t).__name__}")
    checked = [i for i, t in enumerate(inputs) if t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True, nothing to check")
    rng = np.random.default_rng(seed)

    for t in inputs:
        t.grad = None
    out = _as_output(fn(*inputs))
    u = rng.standard_normal(out.shape).astype(out.dtype)
    if not out.requires_grad:
        raise GradcheckError("gradcheck: the output does not depend on any input that requires grad")
    out.backward(u)
    analytic = {i: (inputs[i].grad if inputs[i].grad is not None else np.zeros_like(inputs[i].data))
                for i in checked}
    for t in inputs:
        t.grad = None

    def projected() -> float:
        with no_grad():
            return float(np.sum(u * _as_output(fn(*inputs)).data, dtype=np.float64))

    for i in checked:
        x = inputs[i].data  # nudged in place, element by element, then restored
        for where in np.ndindex(x.shape):
            orig = x[where]
            x[where] = orig + eps
            plus = projected()
            x[where] = orig - eps
            minus = projected()
            x[where] = orig
            numeric = (plus - minus) / (2 * eps)
            a = float(analytic[i][where])
            if not abs(a - numeric) <= atol + rtol * abs(numeric):
                raise GradcheckError(
                    f"gradcheck: input {i} (shape {x.shape}), element {where}: "
                    f"analytic {a:.8g} vs numeric {numeric:.8g} "
                    f"(|diff| {abs(a - numeric):.3g} > atol {atol} + rtol {rtol} * |numeric|)"
                )
    return True
