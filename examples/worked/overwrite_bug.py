"""Exercise 3 of docs/autograd.md: overwrite instead of add.

The simplified driver of docs/autograd.md section 4, with a switch: `accumulate=False`
stores each incoming gradient with `=` instead of adding it (the bug of tinygrad's first
tensor version). On the diamond y = h*h + h, h = exp(a), at a = 2, the right answer is
dy/da = 2e^4 + e^2 = 116.585. The overwriting driver visits Add first (h gets 1), then Mul,
whose two contributions h and h each overwrite the slot: only the last one, h = e^2,
survives, and da = e^2 * e^2 = e^4 = 54.598.

    python examples/worked/overwrite_bug.py
"""

from __future__ import annotations

import numpy as np

import tensorlite as tl
from tensorlite.autograd import topological_order


def simple_backward(root: tl.Tensor, accumulate: bool = True) -> None:
    grads = {id(root): np.ones_like(root.data)}
    for node in reversed(topological_order(root)):
        dout = grads.pop(id(node), None)
        if dout is None:
            continue
        if node._ctx is None:
            node.grad = dout
            continue
        dins = node._ctx.backward(dout)
        dins = dins if isinstance(dins, tuple) else (dins,)
        for parent, g in zip(node._ctx.parents, dins):
            if g is None or not parent.requires_grad:
                continue
            if accumulate:
                grads[id(parent)] = grads.get(id(parent), 0) + g
            else:
                grads[id(parent)] = g  # the bug: earlier contributions are lost


def diamond_grad(accumulate: bool) -> float:
    a = tl.Tensor(np.float64(2.0), requires_grad=True)
    h = a.exp()
    simple_backward(h * h + h, accumulate)
    return a.grad.item()


def main() -> None:
    right, wrong = diamond_grad(True), diamond_grad(False)
    print(f"adding:      dy/da = {right:.3f}  (2e^4 + e^2 = {2 * np.exp(4) + np.exp(2):.3f})")
    print(f"overwriting: dy/da = {wrong:.3f}  (e^4 = {np.exp(4):.3f}: one Mul contribution)")
    assert np.isclose(right, 2 * np.exp(4) + np.exp(2))
    assert np.isclose(wrong, np.exp(4))
    print("ok")


if __name__ == "__main__":
    main()
