"""Exercise 4 of docs/verifying-gradients.md: why gradients are checked in float64.

`tl.gradcheck` works in the inputs' own dtype. Give it float32 inputs and a CORRECT op
(tensorlite's softmax) fails: a central difference (f(x+eps) - f(x-eps)) / 2eps has a
rounding error of about (float32 epsilon 1.2e-7) * |f| / eps. With eps = 1e-6 that is ~0.1,
as big as the gradient itself; with eps = 1e-2 the rounding error is ~1e-5 but the
truncation error (~eps^2 * f''') is ~1e-4. float64's epsilon 2.2e-16 leaves room for both:
eps = 1e-6 gives errors near 1e-10. (assert_gradients_match copies to float64 for you.)

    python examples/worked/float32_check.py
"""

from __future__ import annotations

import numpy as np

import tensorlite as tl
from tensorlite import functional as F


def passes(dtype, eps: float, atol: float = 1e-6, rtol: float = 1e-4) -> bool:
    x = tl.Tensor(np.random.default_rng(0).standard_normal((3, 5)).astype(dtype),
                  requires_grad=True)
    try:
        return tl.gradcheck(F.softmax, [x], eps=eps, atol=atol, rtol=rtol)
    except tl.GradcheckError:
        return False


def main() -> None:
    results = {
        ("float64", 1e-6): passes(np.float64, 1e-6),
        ("float32", 1e-6): passes(np.float32, 1e-6),
        ("float32", 1e-2): passes(np.float32, 1e-2),
        ("float32", 1e-2, "atol 1e-3"): passes(np.float32, 1e-2, atol=1e-3, rtol=1e-2),
    }
    for key, ok in results.items():
        print(f"{', '.join(map(str, key)):28} {'passes' if ok else 'fails'}")
    assert results[("float64", 1e-6)]
    assert not results[("float32", 1e-6)] and not results[("float32", 1e-2)]
    assert results[("float32", 1e-2, "atol 1e-3")]  # only with tolerances 1000x looser
    print("ok")


if __name__ == "__main__":
    main()
