"""Exercise 5 of docs/autograd.md: learning rates.

Section 11's least-squares fit, 100 gradient-descent steps at three learning rates. The
loss's curvature (the Hessian 2/N XᵀX) has eigenvalues 1.16, 1.50 and 1.77 here; a step is
stable only below 2 / (largest eigenvalue), about 1.13. So 0.1 converges (below 1e-6),
0.01 is still far from done after 100 steps, and 1.5 overshoots further at every step.

    python examples/worked/learning_rate.py
"""

from __future__ import annotations

import numpy as np

import tensorlite as tl


def final_loss(lr: float, steps: int = 100) -> float:
    rng = np.random.default_rng(1)
    X = tl.Tensor(rng.standard_normal((32, 3)))
    target = X.data @ np.array([1.0, -2.0, 0.5])
    w = tl.Tensor(np.zeros(3), requires_grad=True)
    for _ in range(steps):
        loss = ((X @ w - target) ** 2).mean()
        loss.backward()
        w.data -= lr * w.grad
        w.grad = None
    return ((X.data @ w.data - target) ** 2).mean()


def main() -> None:
    losses = {lr: final_loss(lr) for lr in (0.01, 0.1, 1.5)}
    for lr, value in losses.items():
        print(f"lr {lr:<5} loss after 100 steps: {value:.3g}")
    assert losses[0.1] < 1e-6  # converged
    assert 1e-2 < losses[0.01] < 3.0  # on its way (it started at 3.8)
    assert not losses[1.5] < 1e6  # diverged (inf or huge)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((32, 3))
    assert 1.0 < 2 / np.linalg.eigvalsh(2 / 32 * X.T @ X).max() < 1.5  # the stability limit
    print("ok")


if __name__ == "__main__":
    main()
