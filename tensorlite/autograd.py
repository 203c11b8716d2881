"""The autograd machinery: `Function` (one op = forward + backward), the shared
broadcasting rule `unbroadcast`, `no_grad`, and the iterative reverse-mode driver
`backward` that walks the recorded graph in topological order.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .tensor import Tensor

_grad_mode = threading.local()  # per thread, like PyTorch's: a server's sampling threads
# each enter and leave no_grad on their own; a global flag would let one thread's exit switch
# recording back on under another thread still inside its block.
_profile = None  # set by tensorlite.profiler.profile(): {(op name, "forward"|"backward"): [calls, s]}


def is_grad_enabled() -> bool:
    """Whether ops in this thread record the graph (True unless inside no_grad)."""
    return getattr(_grad_mode, "enabled", True)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside this block ops record no graph: results never require grad (in this thread)."""
    previous, _grad_mode.enabled = is_grad_enabled(), False
    try:
        yield
    finally:
        _grad_mode.enabled = previous


def _record(op: str, phase: str, seconds: float) -> None:
    entry = _profile.setdefault((op, phase), [0, 0.0])
    entry[0] += 1
    entry[1] += seconds


def unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum `grad` back down to `shape`: the one broadcasting rule every binary op uses.

    Broadcasting copies an input along new leading axes and along its size-1 axes, so the
    gradient of that input is the sum over exactly those axes.
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if ones:
        grad = grad.sum(axis=ones, keepdims=True)
    return grad


class Function:
    """One differentiable op.  Subclasses write, next to each other:

        forward(self, *arrays, **options) -> ndarray   # save what backward needs on self
        backward(self, dout) -> one gradient per input  # ndarray, or None for "no gradient"

    `apply` wraps the arrays in and out of Tensors and records the graph.
    """

    parents: tuple = ()

    @classmethod
    def apply(cls, *inputs, **options) -> Tensor:
        from .tensor import Tensor, as_tensor

        tensors = tuple(as_tensor(t) for t in inputs)
        fn = cls()
        if _profile is None:
            data = fn.forward(*(t.data for t in tensors), **options)
        else:
            t0 = time.perf_counter()
            data = fn.forward(*(t.data for t in tensors), **options)
            _record(cls.__name__, "forward", time.perf_counter() - t0)
        needs_grad = is_grad_enabled() and any(t.requires_grad for t in tensors)
        out = Tensor(data, requires_grad=needs_grad)
        if needs_grad:
            fn.parents = tensors
            fn.versions = tuple(t._version for t in tensors)  # checked again by backward
            out._ctx = fn
        return out

    def forward(self, *arrays, **options):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dout):  # pragma: no cover - abstract
        raise NotImplementedError

    def needs(self, i: int) -> bool:
        """Does input i want a gradient? (Skip work for inputs that don't.)"""
        return self.parents[i].requires_grad

    def release(self) -> None:
        """Drop the saved arrays once backward has used them (they can be large)."""
        parents = self.parents
        self.__dict__.clear()
        self.parents = parents
        self.released = True


def topological_order(root: Tensor) -> list:
    """Nodes that lead to `root` and require grad, each after all of its inputs.

    Iterative depth-first search (no recursion limit: a 10,000-op chain works).
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        if node._ctx is not None:
            for parent in node._ctx.parents:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order


def backward(root: Tensor, grad: np.ndarray) -> None:
    """Reverse-mode autodiff from `root`, seeded with `grad` (dL/droot).

    Walk the graph from the output back to the leaves. Each node's gradient is complete
    by the time we reach it (topological order), so we hand it to the node's Function,
    which returns one gradient per input; those are summed into the inputs' slots.
    Leaves (tensors the user made with requires_grad=True) keep theirs in `.grad`.
    """
    order = topological_order(root)
    grads = {id(root): grad}  # id(tensor) -> gradient so far
    owned = set()  # ids whose gradient buffer is ours to add into in place
    for node in reversed(order):
        dout = grads.pop(id(node), None)
        is_owned = id(node) in owned
        owned.discard(id(node))
        fn = node._ctx
        if fn is None or node._retain_grad:
            _accumulate_into_leaf(node, dout, is_owned and fn is None)
        if fn is None or dout is None:
            continue
        if getattr(fn, "released", False):
            raise RuntimeError(
                "backward() through a graph that was already freed: call backward() once "
                "per forward pass (intermediate buffers are released after backward)"
            )
        check_unchanged(node, fn)
        if _profile is None:
            input_grads = fn.backward(dout)
        else:
            t0 = time.perf_counter()
            input_grads = fn.backward(dout)
            _record(type(fn).__name__, "backward", time.perf_counter() - t0)
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        for parent, g in zip(fn.parents, input_grads):
            if g is None or not parent.requires_grad:
                continue
            key = id(parent)
            if key not in grads:
                grads[key] = g
                if g is not dout and g.base is None and g.flags.writeable:
                    owned.add(key)
            elif key in owned:
                grads[key] += g  # in place: no new buffer
            else:
                grads[key] = grads[key] + g
                owned.add(key)
        fn.release()


def check_unchanged(node: Tensor, fn: Function) -> None:
    """Refuse to differentiate `fn` if its output or an input had `.data` assigned since the
    forward pass: the arrays it saved would no longer be the ones it computed with."""
    saved = ((node, 0, "output"),) + tuple(
        (t, v, f"input {i}") for i, (t, v) in enumerate(zip(fn.parents, fn.versions)))
    for t, version, role in saved:
        if t._version != version:
            label = repr(t.name) if t.name else f"of shape {t.shape}"
            raise RuntimeError(
                f"backward through {type(fn).__name__}: its {role}, the tensor {label}, was "
                f"changed in place after the forward pass (version {t._version}, saved at "
                f"{version}); redo the forward pass after changing .data, or change a copy")


def _accumulate_into_leaf(node: Tensor, g, owned: bool = False) -> None:
    if g is None:
        return
    if g.shape != node.data.shape:
        raise RuntimeError(f"gradient of shape {g.shape} for a tensor of shape {node.data.shape}")
    if node.grad is None:
        # Keep the buffer if backward made it fresh for us; otherwise copy (it may be a view).
        if owned and g.dtype == node.data.dtype:
            node.grad = g
        else:
            node.grad = np.array(g, dtype=node.data.dtype, copy=True)
    else:
        node.grad += g  # .grad accumulates across backward calls (PyTorch's rule)
