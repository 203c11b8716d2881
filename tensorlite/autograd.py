"""The autograd machinery: `Function` (one op = forward + backward, plus the rules for
higher-order and forward mode), the shared broadcasting rule `unbroadcast`, `no_grad`, and
the iterative reverse-mode driver `backward` that walks the recorded graph in topological
order. (`grad`, `jvp` and `hvp`, built on it, are in higher_order.py.)

This module sits below tensor.py, ops.py and everything else in tensorlite and imports none
of them: tensor.py hands over its `Tensor` class (`use_tensor_class`), which `Function.apply`
wraps every op's output in.
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

_Tensor = None  # tensor.Tensor, handed over by tensor.py (see use_tensor_class)
_profile = None  # set by tensorlite.profiler.profile(): {(op name, "forward"|"backward"): [calls, s]}


def use_tensor_class(cls: type) -> None:
    """Make `cls` the class of every op's result. tensor.py calls this once, right after it
    defines Tensor: Tensor's operators call the ops, which are Functions defined on top of
    this module, so this module cannot import tensor.py back."""
    global _Tensor
    _Tensor = cls


class _GradMode(threading.local):
    """Per thread, like PyTorch's: a server's sampling threads each enter and leave no_grad
    on their own; a global flag would let one thread's exit switch recording back on under
    another thread still inside its block. The defaults are class attributes, so reading
    them costs no failed lookup (every op reads `enabled`)."""

    enabled = True
    tangents = None  # inside tensorlite.jvp (in this thread): {id(tensor): (tensor, tangent)}


_grad_mode = _GradMode()


def is_grad_enabled() -> bool:
    """Whether ops in this thread record the graph (True unless inside no_grad)."""
    return _grad_mode.enabled


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside this block ops record no graph: results never require grad (in this thread)."""
    with _recording(False):
        yield


@contextlib.contextmanager
def _recording(enabled: bool) -> Iterator[None]:
    previous, _grad_mode.enabled = is_grad_enabled(), enabled
    try:
        yield
    finally:
        _grad_mode.enabled = previous


_profile_lock = threading.Lock()  # ops of several threads (gpt.threaded) may finish at once


def _record(op: str, phase: str, seconds: float) -> None:
    with _profile_lock:
        entry = _profile.setdefault((op, phase), [0, 0.0])
        entry[0] += 1
        entry[1] += seconds


def unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum `grad` back down to `shape`: the one broadcasting rule every binary op uses.

    Broadcasting copies an input along new leading axes and along its size-1 axes, so the
    gradient of that input is the sum over exactly those axes. Works on ndarrays (backward)
    and on Tensors (backward_graph: then the sum is recorded and can be differentiated).
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
        backward_graph(self, dout) -> the same gradients, computed with Tensor ops from
            `self.parents` (the input Tensors) and a Tensor dout, so that they are recorded
            and can be differentiated again (create_graph=True: gradients of gradients)
        jvp(self, *tangents) -> d(out) for these input tangents (forward mode; ndarrays,
            one per input Tensor, zeros for inputs without one)

    `apply` wraps the arrays in and out of Tensors and records the graph.  Training only
    ever calls forward and backward: the other two serve `grad(create_graph=True)`, `hvp`
    and `jvp`.
    """

    parents: tuple = ()

    @classmethod
    def apply(cls, *inputs, **options) -> Tensor:
        tensors = tuple(t if isinstance(t, _Tensor) else _Tensor(t) for t in inputs)
        fn = cls()
        if _profile is None:
            data = fn.forward(*(t.data for t in tensors), **options)
        else:
            t0 = time.perf_counter()
            data = fn.forward(*(t.data for t in tensors), **options)
            _record(cls.__name__, "forward", time.perf_counter() - t0)
        needs_grad = is_grad_enabled() and any(t.requires_grad for t in tensors)
        out = _Tensor(data, requires_grad=needs_grad)
        if needs_grad:
            fn.parents = tensors
            fn.versions = tuple(t._version for t in tensors)  # checked again by backward
            out._ctx = fn
        if _grad_mode.tangents is not None:  # inside tensorlite.jvp: push tangents too
            _push_tangents(_grad_mode.tangents, fn, tensors, out)
        return out

    def forward(self, *arrays, **options):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dout):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward_graph(self, dout):
        raise NotImplementedError(
            f"{type(self).__name__} has no backward_graph (its backward written with Tensor "
            "ops), so it cannot be differentiated twice (create_graph=True, hvp)"
        )

    def jvp(self, *tangents):
        raise NotImplementedError(
            f"{type(self).__name__} has no jvp rule, so it cannot run in forward mode (jvp)"
        )

    def needs(self, i: int) -> bool:
        """Does input i want a gradient? (Skip work for inputs that don't.)"""
        return self.parents[i].requires_grad

    def release(self) -> None:
        """Drop the saved arrays once backward has used them (they can be large)."""
        parents = self.parents
        self.__dict__.clear()
        self.parents = parents
        self.released = True


def topological_order(root) -> list:
    """Nodes that lead to `root` (a Tensor, or a list of them) and require grad, each after
    all of its inputs.

    Iterative depth-first search (no recursion limit: a 10,000-op chain works).
    """
    order, visited = [], set()
    stack = [(r, False) for r in reversed(root if isinstance(root, (list, tuple)) else [root])]
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


def backward(root, grad, create_graph: bool = False, collect: dict | None = None) -> None:
    """Reverse-mode autodiff from `root` (a Tensor or a list), seeded with `grad` (dL/droot,
    one per root): order the graph, then walk it once, from the output back to the leaves.

    Each node's gradient is complete by the time we reach it (topological order), so we hand
    it to the node's Function, which returns one gradient per input; those are summed into
    the inputs' gradients. Leaves (tensors made with requires_grad=True) keep theirs in
    `.grad`; or, when `collect` ({id(tensor): None}) is given, the wanted tensors' gradients
    are put there instead and no `.grad` is touched (that is `tensorlite.grad`).

    create_graph=False (training): gradients are ndarrays, each Function's `backward` runs,
    buffers are added into in place and released as soon as they are used.
    create_graph=True: gradients are Tensors, each Function's `backward_graph` runs (Tensor
    ops, recorded like any others), and the graph is kept, since the new one refers to it.
    """
    if create_graph and not is_grad_enabled():  # the backward pass must be recorded
        with _recording(True):
            return backward(root, grad, create_graph, collect)
    roots, seeds = (root, grad) if isinstance(root, (list, tuple)) else ([root], [grad])
    order = topological_order(roots)
    if collect is not None:
        order = _leading_to(order, collect)
    grads = _Gradients(roots, seeds)
    for node in reversed(order):
        dout, owned = grads.pop(node)
        _keep(node, dout, owned, create_graph, collect)
        fn = node._ctx
        if fn is None or dout is None:
            continue
        input_grads = _run_backward(fn, node, dout, create_graph)
        for parent, g in zip(fn.parents, input_grads):
            if g is not None and parent.requires_grad:
                grads.add(parent, g, fresh=_made_for(g, input_grads, dout, create_graph))
        if not create_graph:
            fn.release()  # the arrays it saved for backward are no longer needed


class _Gradients:
    """The gradients backward has summed so far, by tensor, and which of those buffers are
    backward's own: made fresh for that tensor alone, so that later contributions may be
    added into them in place, and a leaf may keep one as its .grad without a copy."""

    def __init__(self, roots, seeds):
        self.sums: dict = {}  # id(tensor) -> its gradient so far
        self.owned: set = set()  # ids whose buffer is ours to add into
        for r, seed in zip(roots, seeds):  # the caller's seeds are never ours
            self.sums[id(r)] = seed if id(r) not in self.sums else self.sums[id(r)] + seed

    def add(self, tensor, g, fresh: bool) -> None:
        key = id(tensor)
        if key not in self.sums:
            self.sums[key] = g
            if fresh:
                self.owned.add(key)
        elif key in self.owned:
            self.sums[key] += g  # in place: no new buffer
        else:
            self.sums[key] = self.sums[key] + g  # a new buffer, ours from now on
            self.owned.add(key)

    def pop(self, node) -> tuple:
        """(node's gradient or None, whether its buffer is ours), forgetting both."""
        owned = id(node) in self.owned
        self.owned.discard(id(node))
        return self.sums.pop(id(node), None), owned


def _made_for(g, input_grads: tuple, dout, create_graph: bool) -> bool:
    """Whether backward made `g` for this one input: a new writable array, not dout passed
    through, not a view, not one array handed to two inputs (then it may be added into)."""
    return (not create_graph and g is not dout and g.base is None and g.flags.writeable
            and sum(h is g for h in input_grads) == 1)


def _keep(node, dout, owned: bool, create_graph: bool, collect: dict | None) -> None:
    """Where a gradient is kept: a wanted tensor's goes into `collect` (tensorlite.grad),
    a leaf's (or a retain_grad() tensor's) into its .grad."""
    fn = node._ctx
    if collect is not None:
        if id(node) in collect and dout is not None:
            # as for .grad below: keep a buffer backward made fresh for us, else copy it
            fresh = create_graph or (owned and fn is None)
            collect[id(node)] = dout if fresh else np.array(dout, copy=True)
    elif fn is None or node._retain_grad:
        if create_graph and dout is not None:  # .grad stays an ndarray; dout goes on
            _accumulate_into_leaf(node, dout.data, False)  # as a Tensor to the parents
        else:
            _accumulate_into_leaf(node, dout, owned and fn is None)


def _run_backward(fn: Function, node, dout, create_graph: bool) -> tuple:
    """fn's gradients for its inputs (a tuple), from its output's gradient dout: its backward,
    or its backward_graph (recorded Tensor ops) with create_graph."""
    if getattr(fn, "released", False):
        raise RuntimeError(
            "backward() through a graph that was already freed: call backward() once "
            "per forward pass (intermediate buffers are released after backward)"
        )
    check_unchanged(node, fn)
    step = fn.backward_graph if create_graph else fn.backward
    if _profile is None:
        input_grads = step(dout)
    else:
        t0 = time.perf_counter()
        input_grads = step(dout)
        _record(type(fn).__name__, "backward", time.perf_counter() - t0)
    return input_grads if isinstance(input_grads, tuple) else (input_grads,)


def _leading_to(order: list, wanted: dict) -> list:
    """The nodes of `order` (topological) from which some wanted tensor can be reached:
    backward needs to visit only those."""
    keep = set(wanted)
    for node in order:
        if node._ctx is not None and any(id(p) in keep for p in node._ctx.parents):
            keep.add(id(node))
    return [node for node in order if id(node) in keep]


def check_unchanged(node: Tensor, fn: Function) -> None:
    """Refuse to differentiate `fn` if its output or an input had `.data` assigned since the
    forward pass: the arrays it saved would no longer be the ones it computed with."""
    saved = ((node, 0), *zip(fn.parents, fn.versions))
    for k, (t, version) in enumerate(saved):
        if t._version != version:  # the names are spelled out only for the error
            role = "output" if k == 0 else f"input {k - 1}"
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


def _push_tangents(table: dict, fn: Function, inputs: tuple, out: Tensor) -> None:
    """Forward mode, one op: out's tangent from its inputs' tangents (fn.jvp)."""
    tangents = [table.get(id(t)) for t in inputs]
    if all(t is None for t in tangents):
        return
    tangents = [np.zeros_like(t.data) if tan is None else tan[1] for t, tan in zip(inputs, tangents)]
    tangent = fn.jvp(*tangents)
    table[id(out)] = (out, np.asarray(tangent, dtype=out.dtype))
