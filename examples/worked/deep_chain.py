"""Exercise 4 of docs/autograd.md: recursion depth.

The textbook topological sort recurses into each node's inputs. On a chain of 10,000 ops
that is 10,000 nested calls, past Python's default recursion limit (1,000): RecursionError.
tensorlite's sort keeps its own stack, so backward works, and the gradient of
y = x * 1.0001 * 1.0001 * ... (10,000 times) is 1.0001^10000 = e^0.99995.

    python examples/worked/deep_chain.py
"""

from __future__ import annotations

import numpy as np

import tensorlite as tl

N = 10_000


def recursive_order(node: tl.Tensor, seen: set | None = None, out: list | None = None) -> list:
    seen = set() if seen is None else seen
    out = [] if out is None else out
    if id(node) not in seen:
        seen.add(id(node))
        if node._ctx is not None:
            for parent in node._ctx.parents:
                recursive_order(parent, seen, out)
        out.append(node)
    return out


def chain(n: int = N) -> tuple[tl.Tensor, tl.Tensor]:
    x = tl.Tensor(np.float64(1.0), requires_grad=True)
    y = x
    for _ in range(n):
        y = y * 1.0001
    return x, y


def main() -> None:
    x, y = chain()
    try:
        recursive_order(y)
        recursion_failed = False
    except RecursionError:
        recursion_failed = True
    print(f"recursive sort of a {N}-op chain: {'RecursionError' if recursion_failed else 'fine'}")
    y.backward()
    print(f"backward: dy/dx = {x.grad.item():.10f}, 1.0001^{N} = {1.0001 ** N:.10f}")
    assert recursion_failed
    assert np.isclose(x.grad.item(), 1.0001**N, rtol=1e-9)
    print("ok")


if __name__ == "__main__":
    main()
