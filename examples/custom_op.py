"""Write your own op and prove its gradient right: softplus as a `Function`, checked with
`tensorlite.testing` on random inputs drawn by hypothesis, plus a buggy twin the check catches.

    softplus(x) = log(1 + exp(x))        d softplus / dx = sigmoid(x) = 1 / (1 + exp(-x))

    python examples/custom_op.py         # prints each check; exit code 0 when all hold

Import it to reuse the pieces: `from custom_op import softplus, check_gradient`.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings

import tensorlite as tl
from tensorlite.autograd import Function
from tensorlite.testing import GradcheckError, assert_gradients_match, shapes, tensors


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), written with tanh so that exp never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class Softplus(Function):
    """out = log(1 + exp(x)).  dx = dout * sigmoid(x)"""

    def forward(self, x):  # a plain ndarray in, an ndarray out
        self.x = x  # what backward needs
        return np.logaddexp(0.0, x).astype(x.dtype, copy=False)  # log(e^0 + e^x), no overflow

    def backward(self, dout):  # dout = dL/d(out), shaped like out
        return dout * _sigmoid(self.x)


class SoftplusForgotDout(Softplus):
    """The same op with a classic bug: backward returns d(out)/dx but forgets to multiply
    by dout (the chain rule). Checked with a `.sum()` loss it looks right, since there
    dout is all ones; the random cotangent of assert_gradients_match catches it."""

    def backward(self, dout):
        return _sigmoid(self.x)  # BUG: should be dout * sigmoid(x)


def softplus(x: tl.Tensor) -> tl.Tensor:
    return Softplus.apply(x)


def softplus_buggy(x: tl.Tensor) -> tl.Tensor:
    return SoftplusForgotDout.apply(x)


def sum_of_ones_check(op) -> bool:
    """The naive check: d(sum(op(x)))/dx against the known derivative. Weak on purpose."""
    x = tl.Tensor(np.linspace(-3.0, 3.0, 7), requires_grad=True)
    op(x).sum().backward()
    return bool(np.allclose(x.grad, _sigmoid(x.data)))


def check_gradient(op, max_examples: int = 50) -> None:
    """Property-based check: for tensors of any small shape with values in [-20, 20],
    op's backward agrees with float64 finite differences. Raises GradcheckError if not."""

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True)
    @given(tensors(shape=shapes(max_dims=3), min_value=-20.0, max_value=20.0))
    def gradients_match(x):
        assert_gradients_match(op, x)

    gradients_match()


def check_forward() -> None:
    """The forward pass is right too: it matches log1p(exp(x)), and stays finite where
    exp(x) alone would overflow (x = 1000 gives 1000, not inf)."""
    x = np.linspace(-30.0, 30.0, 61)
    np.testing.assert_allclose(softplus(tl.Tensor(x)).data, np.log1p(np.exp(x)), rtol=1e-12)
    big = softplus(tl.Tensor(np.array([1000.0, -1000.0]))).data
    np.testing.assert_array_equal(big, [1000.0, 0.0])


def main(max_examples: int = 50) -> int:
    """Run every check and print what it found; 0 when the right op passes and the buggy
    op is caught."""
    check_forward()
    print("forward: softplus(x) matches log1p(exp(x)) and softplus(1000) = 1000  ok")

    check_gradient(softplus, max_examples)
    print(f"softplus: gradients match finite differences on {max_examples} hypothesis examples  ok")

    naive = sum_of_ones_check(softplus_buggy)
    print(f"buggy softplus, naive .sum() check: {'passes (the bug hides)' if naive else 'fails'}")
    try:
        check_gradient(softplus_buggy, max_examples)
    except GradcheckError as e:
        print("buggy softplus, assert_gradients_match: caught")
        print(f"  {e}")
    else:
        print("buggy softplus, assert_gradients_match: NOT caught (this should not happen)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
