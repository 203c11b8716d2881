"""Exercise 2 of docs/verifying-gradients.md: a GELU op, verified.

GELU in its tanh form (GPT-2's): y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).
With t = tanh(u), the product and chain rules give
    dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2).
Forward saves x and t (t appears twice in the derivative; recomputing it costs a tanh).

    python examples/worked/gelu.py
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings

import tensorlite as tl
from tensorlite.autograd import Function
from tensorlite.testing import assert_gradients_match, tensors

K = math.sqrt(2 / math.pi)


class Gelu(Function):
    """out = 0.5 x (1 + tanh(k (x + 0.044715 x^3))).
    dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 0.134145 x^2)),  t the tanh"""

    def forward(self, x):
        self.x = x
        self.t = np.tanh(K * (x + 0.044715 * x**3))
        return 0.5 * x * (1 + self.t)

    def backward(self, dout):
        x, t = self.x, self.t
        return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * K * (1 + 3 * 0.044715 * x * x))


def gelu(x):
    return Gelu.apply(x)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(tensors(min_value=-6.0, max_value=6.0))
def check_gradients(x) -> None:
    assert_gradients_match(gelu, x)


def main() -> None:
    check_gradients()
    x = np.linspace(-4, 4, 9)
    y = gelu(tl.Tensor(x)).data
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))  # the erf form
    assert np.abs(y - exact).max() < 1e-3  # the tanh form is a close approximation
    assert y[0] > -1e-3 and np.isclose(y[-1], 4.0, atol=1e-3)  # ~0 far left, ~x far right
    print(f"GELU: gradients match; max |tanh form - erf form| = {np.abs(y - exact).max():.1e}")
    print("ok")


if __name__ == "__main__":
    main()
