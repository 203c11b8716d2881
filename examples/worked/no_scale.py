"""Exercise 2 of docs/gpt.md: attention without 1/sqrt(head size).

If the entries of q and k have variance 1, a score q·k sums hd such products and has
variance hd. For hd = 64 that is a standard deviation of 8: the softmax of such scores puts
nearly all its mass on one key, and its backward, dS = P ⊙ (dP - rowsum(dP ⊙ P)), is near
zero for every key but that one, so attention hardly learns where it is saturated. Dividing
by sqrt(hd) brings the variance back to 1. Measured here on random unit-variance q, k: the
mean largest probability of a row, and the mean |dL/dS| that reaches the scores.

    python examples/worked/no_scale.py
"""

from __future__ import annotations

import numpy as np

import tensorlite.functional as F
from tensorlite import Tensor


def saturation(scale: bool, hd: int = 64, T: int = 32) -> tuple[float, float]:
    """(mean max probability per row, mean |dL/dscores|) for random q, k, v, dout."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((8, T, hd)) for _ in range(3))
    scores = q @ np.swapaxes(k, -1, -2) / (np.sqrt(hd) if scale else 1.0)  # (8, T, T)
    S = Tensor(scores + np.triu(np.full((T, T), -np.inf), k=1), requires_grad=True)
    P = F.softmax(S)
    (P @ Tensor(v)).backward(rng.standard_normal((8, T, hd)))
    rows = slice(T // 2, None)  # queries that see at least 16 keys
    return float(P.data[:, rows].max(-1).mean()), float(np.abs(S.grad[:, rows]).mean())


def main() -> None:
    (p_scaled, g_scaled), (p_raw, g_raw) = saturation(True), saturation(False)
    print(f"with 1/sqrt(hd): mean max probability {p_scaled:.2f}, mean |dL/dS| {g_scaled:.4f}")
    print(f"without:         mean max probability {p_raw:.2f}, mean |dL/dS| {g_raw:.4f}")
    assert p_raw > 0.8 and p_scaled < 0.5  # saturated vs spread out
    assert g_raw < 0.7 * g_scaled  # less gradient reaches the scores
    print("ok")


if __name__ == "__main__":
    main()
