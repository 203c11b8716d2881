"""Exercise 5 of docs/verifying-gradients.md: stay away from kinks.

relu has a kink at 0: the slope is 0 on the left and 1 on the right. A central difference
that straddles it measures (relu(eps) - relu(-eps)) / 2eps = 1/2, which matches neither
side, so a check that draws values close to 0 fails on a correct op. Drawing values at least
`margin` away from the kink (`tensors(away_from=0.0)`, margin 1e-2 >> eps 1e-6) fixes it.

    python examples/worked/relu_kink.py
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings

import tensorlite as tl
from tensorlite.testing import GradcheckError, assert_gradients_match, tensors


def relu(x):
    return x.relu()


def main() -> None:
    try:
        assert_gradients_match(relu, np.array([-1.0, 3e-7, 2.0]))  # 3e-7 < eps: straddled
        at_kink = "passes"
    except GradcheckError as e:
        at_kink = str(e)
    x = tl.Tensor(np.array([3e-7]), requires_grad=True)
    x.relu().backward(np.array([1.0]))
    numeric = ((3e-7 + 1e-6) - 0.0) / 2e-6  # relu(x + eps) - relu(x - eps), over 2 eps

    @settings(max_examples=50, deadline=None, derandomize=True)
    @given(tensors(away_from=0.0, margin=1e-2))
    def away_from_the_kink(t):
        assert_gradients_match(relu, t)

    away_from_the_kink()
    print("near the kink:", at_kink)
    print(f"backward says {x.grad[0]:.2f}, the central difference {numeric:.2f}")
    print("away from the kink (hypothesis, 50 examples): passes")
    assert at_kink != "passes" and x.grad[0] == 1.0 and abs(numeric - 0.65) < 1e-9
    print("ok")


if __name__ == "__main__":
    main()
