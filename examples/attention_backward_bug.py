"""Find the bug in a hand-written NumPy backward with `tensorlite.testing.check_vjp`.

Causal self-attention in plain NumPy, with two backward passes: one that sends the gradient
to the queries only (a bug a hand port of a GPT really had: its K and V gradients were wrong,
and the model still trained, just worse) and the right one. check_vjp needs no tensorlite:
it lets hypothesis choose the sizes T and D, the inputs and the upstream gradient, compares
each gradient element with central finite differences, and shrinks a failure to a minimal
case.

    python examples/attention_backward_bug.py   # prints what check_vjp says about each backward

Import it to reuse the pieces: `from attention_backward_bug import attention, attention_backward`.
"""

from __future__ import annotations

import numpy as np

from tensorlite.testing import GradcheckError, check_vjp

SHAPES = [("T", "D"), ("T", "D"), ("T", "D")]  # q, k, v: T positions, D features each


def _probabilities(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """P = softmax(q k^T / sqrt(D) + causal mask), (T, T): row i weighs keys 0..i."""
    t, d = q.shape
    scores = q @ k.T / np.sqrt(d)  # (T, T)
    scores = np.where(np.tri(t, dtype=bool), scores, -np.inf)  # no peeking at later keys
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """out = P v, (T, D)."""
    return _probabilities(q, k) @ v


def attention_backward(dout, q, k, v):
    """dv = P^T dout,  dP = dout v^T,  dS = P * (dP - rowsum(dP * P)),
    dq = dS k / sqrt(D),  dk = dS^T q / sqrt(D)"""
    p = _probabilities(q, k)
    dv = p.T @ dout
    dp = dout @ v.T
    ds = p * (dp - (dp * p).sum(axis=1, keepdims=True)) / np.sqrt(q.shape[1])
    return ds @ k, ds.T @ q, dv


def attention_backward_q_only(dout, q, k, v):
    """The bug: dq is right, but k and v are treated as constants (zero gradients)."""
    dq, _, _ = attention_backward(dout, q, k, v)
    return dq, np.zeros_like(k), np.zeros_like(v)


def verdict(backward, max_examples: int | None = None) -> str:
    """What check_vjp says about `backward`: 'passes', or the (shrunk) failure."""
    try:
        check_vjp(attention, backward, SHAPES, max_examples=max_examples)
    except GradcheckError as e:
        return f"caught:\n{e}"
    return "passes"


def main() -> None:
    print("Q-only backward:", verdict(attention_backward_q_only))
    print("right backward:", verdict(attention_backward))


if __name__ == "__main__":
    main()
