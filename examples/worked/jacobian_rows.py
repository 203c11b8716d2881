"""Exercise 2 of docs/autograd.md: the Jacobian, one backward at a time.

Backward computes dx = doutᵀ J. With dout the one-hot vector e_i, that is row i of J. For
out = x @ W, x (3,), W (3, 2), two backward calls give the whole 2 x 3 Jacobian, which is
Wᵀ. (Reverse mode pays one backward per OUTPUT: cheap for a scalar loss, as here for 2.)

    python examples/worked/jacobian_rows.py
"""

from __future__ import annotations

import numpy as np

import tensorlite as tl


def jacobian_by_backward(x0: np.ndarray, W: np.ndarray) -> np.ndarray:
    """J[i, j] = d out_i / d x_j of out = x @ W, one backward per output i."""
    rows = []
    for e in np.eye(W.shape[1]):
        x = tl.Tensor(x0, requires_grad=True)
        (x @ tl.Tensor(W)).backward(e)  # dout = e_i: picks row i
        rows.append(x.grad)
    return np.stack(rows)


def main() -> None:
    rng = np.random.default_rng(0)
    x0, W = rng.standard_normal(3), rng.standard_normal((3, 2))
    J = jacobian_by_backward(x0, W)
    print("J from two backward calls:\n", J, "\nW.T:\n", W.T)
    assert J.shape == (2, 3) and np.allclose(J, W.T)
    print("ok")


if __name__ == "__main__":
    main()
