"""Exercise 1 of docs/autograd.md: slopes by nudging.

For L = (a*b + c) * f at a=2, b=-3, c=10, f=-2, estimate dL/dx for each leaf by a central
difference and compare with what backward stored in .grad. Then see why the step size
matters: float32 numbers near 2 are 2.4e-7 apart (1.2e-7 just below 2), so with
eps = 1e-7, 2 + eps rounds back to 2 and 2 - eps to 2 - 1.2e-7: the nudge is not the one
we divide by (and L's own roundings add up), so the slopes come out 4.8 for a and 0 for b
and c. float64 has room for it.

    python examples/worked/slope_by_nudging.py
"""

from __future__ import annotations

import numpy as np

import tensorlite as tl

POINT = {"a": 2.0, "b": -3.0, "c": 10.0, "f": -2.0}


def loss(v: dict) -> float:
    return (v["a"] * v["b"] + v["c"]) * v["f"]


def numeric_grads(dtype, eps: float) -> dict[str, float]:
    """(L(x + eps) - L(x - eps)) / (2 eps) for each leaf, computed in `dtype`."""
    point = {k: dtype(x) for k, x in POINT.items()}
    grads = {}
    for name, value in point.items():
        up, down = dict(point), dict(point)
        up[name] = value + dtype(eps)
        down[name] = value - dtype(eps)
        grads[name] = float((loss(up) - loss(down)) / (dtype(2) * dtype(eps)))
    return grads


def backward_grads() -> dict[str, float]:
    leaves = {k: tl.Tensor(x, requires_grad=True) for k, x in POINT.items()}
    loss(leaves).backward()
    return {k: t.grad.item() for k, t in leaves.items()}


def main() -> None:
    exact = backward_grads()
    print("backward:", exact)
    for dtype, eps in ((np.float64, 1e-6), (np.float32, 1e-2), (np.float32, 1e-7), (np.float64, 1e-7)):
        est = numeric_grads(dtype, eps)
        worst = max(abs(est[k] - exact[k]) for k in exact)
        print(f"{dtype.__name__:8} eps {eps:g}: {est}  worst error {worst:.2g}")
    assert exact == {"a": 6.0, "b": -4.0, "c": -2.0, "f": 4.0}
    assert max(abs(numeric_grads(np.float64, 1e-6)[k] - exact[k]) for k in exact) < 1e-6
    assert max(abs(numeric_grads(np.float32, 1e-2)[k] - exact[k]) for k in exact) < 1e-2
    assert np.float32(2) + np.float32(1e-7) == np.float32(2)  # the nudge up is lost
    assert abs(numeric_grads(np.float32, 1e-7)["a"] - 6.0) > 1.0
    assert abs(numeric_grads(np.float64, 1e-7)["a"] - 6.0) < 1e-6
    print("ok")


if __name__ == "__main__":
    main()
