"""Exercise 1 of docs/verifying-gradients.md: a LayerNorm op, verified.

    mu = mean(x),  var = mean((x - mu)**2),  rstd = 1 / sqrt(var + eps)   over the last axis
    xhat = (x - mu) * rstd,  y = xhat * w + b
    dw = sum over rows of dout * xhat,   db = sum over rows of dout,   dxhat = dout * w
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

(RMSNorm's derivation in docs/derivations.md, plus the mean: subtracting mu removes the
mean of dxhat.) Verified three ways: assert_gradients_match on hypothesis-drawn inputs, the
same function composed from primitive ops, and numpy's forward.

    python examples/worked/layer_norm.py
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorlite as tl
from tensorlite.autograd import Function
from tensorlite.testing import arrays, assert_gradients_match

EPS = 1e-5


class LayerNorm(Function):
    """out = (x - mean(x)) / sqrt(var(x) + eps) * w + b over the last axis.
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * w;
    dw = sum of dout * xhat over rows,  db = sum of dout over rows"""

    def forward(self, x, w, b):
        mu = x.mean(axis=-1, keepdims=True)
        self.rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + EPS)
        self.xhat, self.w = (x - mu) * self.rstd, w
        return self.xhat * w + b

    def backward(self, dout):
        xhat, c = self.xhat, self.xhat.shape[-1]
        dxhat = dout * self.w
        dx = self.rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                          - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        dw = (dout * xhat).reshape(-1, c).sum(axis=0)
        db = dout.reshape(-1, c).sum(axis=0)
        return dx, dw, db


def layer_norm(x, w, b):
    return LayerNorm.apply(x, w, b)


def layer_norm_composed(x, w, b):
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / ((centred * centred).mean(axis=-1, keepdims=True) + EPS).sqrt() * w + b


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.data())
def check_gradients(data) -> None:
    rows = data.draw(st.sampled_from([(2,), (3, 2), ()]))
    c = data.draw(st.integers(2, 6))
    x = data.draw(arrays(shape=rows + (c,)))
    if np.ptp(x, axis=-1).min() < 0.1:  # a (near-)constant row: var ~ 0, rstd ~ 316
        return
    assert_gradients_match(layer_norm, x, data.draw(arrays(shape=(c,))), data.draw(arrays(shape=(c,))))


def main() -> None:
    check_gradients()
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((4, 8)), rng.standard_normal(8), rng.standard_normal(8)
    ours = layer_norm(tl.Tensor(x), tl.Tensor(w), tl.Tensor(b)).data
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + EPS) * w + b
    assert np.allclose(ours, ref)
    ins_a = [tl.Tensor(a, requires_grad=True) for a in (x, w, b)]
    ins_b = [tl.Tensor(a.copy(), requires_grad=True) for a in (x, w, b)]
    dout = rng.standard_normal((4, 8))
    layer_norm(*ins_a).backward(dout)
    layer_norm_composed(*ins_b).backward(dout)
    assert all(np.allclose(p.grad, q.grad) for p, q in zip(ins_a, ins_b))
    print("LayerNorm: gradients match finite differences (hypothesis) and the composition")
    print("ok")


if __name__ == "__main__":
    main()
