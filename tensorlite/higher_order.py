"""Derivatives built on the reverse-mode driver: `grad` (gradients as Tensors, to any order
with create_graph=True), `composed_backward` (a fused op's backward_graph from its
composition), `jvp` (forward mode) and `hvp` (Hessian-vector products). docs/higher-order.md
is the tour.
"""

from __future__ import annotations

import numpy as np

from .autograd import Function, _grad_mode, backward
from .tensor import Tensor, _to_array


def grad(outputs, inputs, grad_outputs=None, create_graph: bool = False) -> tuple:
    """The gradients of `outputs` (a Tensor or a sequence) with respect to `inputs` (a
    sequence of Tensors), seeded with `grad_outputs` (default: 1 for a scalar output).

    Returns a tuple of Tensors, one per input (zeros where the outputs do not depend on it),
    and leaves every `.grad` alone. With create_graph=True the returned Tensors carry a graph
    of their own, so `grad` can be applied to them again, to any order. With
    create_graph=False this is the training backward pass (ndarrays, fused kernels) and the
    graph is freed as it goes, as by `backward()`.
    """
    if isinstance(outputs, Tensor):
        outputs, grad_outputs = [outputs], [grad_outputs]
    else:
        outputs = list(outputs)
        grad_outputs = [None] * len(outputs) if grad_outputs is None else list(grad_outputs)
        if len(grad_outputs) != len(outputs):
            raise ValueError(f"grad: {len(outputs)} outputs but {len(grad_outputs)} grad_outputs")
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor) or not t.requires_grad:
            raise ValueError(f"grad: input {i} is not a Tensor with requires_grad=True")
    seeds = []
    for i, (out, g) in enumerate(zip(outputs, grad_outputs)):
        if g is None:
            if out.size != 1:
                raise RuntimeError(
                    f"grad: output {i} has shape {out.shape}; pass grad_outputs (one per output)"
                    " or reduce it to a scalar first"
                )
            g = np.ones_like(out.data)
        elif np.shape(_to_array(g)) != out.shape:
            raise ValueError(f"grad: grad_outputs[{i}] has shape {np.shape(g)}, output {out.shape}")
        if create_graph:
            seeds.append(g if isinstance(g, Tensor) else Tensor(_to_array(g).astype(out.dtype)))
        else:
            seeds.append(_to_array(g).astype(out.dtype, copy=False))
    collect = {id(t): None for t in inputs}
    # outputs that depend on nothing that requires grad contribute nothing
    live = [(out, s) for out, s in zip(outputs, seeds) if out.requires_grad or id(out) in collect]
    if live:
        backward([out for out, _ in live], [s for _, s in live], create_graph, collect)
    result = []
    for t in inputs:
        g = collect[id(t)]
        if g is None:
            g = np.zeros_like(t.data)
        result.append(g if isinstance(g, Tensor) else Tensor(g))
    return tuple(result)


def composed_backward(fn: Function, composed, dout) -> tuple:
    """A backward_graph for a fused op, from its composition: run `composed(*fn.parents)`
    (the same function written with differentiable Tensor ops) and differentiate it with
    create_graph=True. Slower than a hand-written rule, but it cannot disagree with the
    composition; None for inputs that do not require grad."""
    # One stand-in per input position (attention(h, h, h) has one tensor in three places,
    # each of which must get only its own share of the gradient).
    stand_ins = [p.reshape(p.shape) for p in fn.parents]
    wanted = [s for s in stand_ins if s.requires_grad]
    grads = iter(grad(composed(*stand_ins), wanted, grad_outputs=dout, create_graph=True))
    return tuple(next(grads) if s.requires_grad else None for s in stand_ins)


def jvp(fn, primals, tangents) -> tuple:
    """Forward mode: run `fn(*primals)` and push `tangents` (one per primal, same shapes)
    through every op with its `jvp` rule.

    Returns `(outputs, tangent_outputs)`: fn's output (a Tensor or a tuple of them) and the
    directional derivative J(primals) @ tangents in the same structure, as Tensors.
    Primals that are Tensors keep their requires_grad, so `fn` may itself call `grad`
    (forward-over-reverse); tangents are plain values (no graph through them).
    """
    if _grad_mode.tangents is not None:
        raise RuntimeError("jvp inside jvp (forward over forward) is not supported")
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    xs, table = [], {}
    for i, (p, v) in enumerate(zip(primals, tangents)):
        x = Tensor(p.data, requires_grad=p.requires_grad) if isinstance(p, Tensor) else Tensor(p)
        v = np.asarray(_to_array(v), dtype=x.dtype)
        if v.shape != x.shape:
            raise ValueError(f"jvp: tangent {i} has shape {v.shape}, primal {x.shape}")
        table[id(x)] = (x, v)
        xs.append(x)
    _grad_mode.tangents = table
    try:
        out = fn(*xs)
    finally:
        _grad_mode.tangents = None
    outs = [out] if isinstance(out, Tensor) else list(out)
    tangent_outs = tuple(
        Tensor(table[id(o)][1] if id(o) in table else np.zeros_like(o.data)) for o in outs
    )
    return out, (tangent_outs[0] if isinstance(out, Tensor) else tangent_outs)


def hvp(fn, inputs, vectors) -> tuple:
    """Hessian-vector products of a scalar `fn`: H(inputs) @ vectors, one Tensor per input.

    Reverse over reverse: g = grad(fn(x), x, create_graph=True), then the gradient of
    <g, v> (v held constant) is H v.
    """
    single = isinstance(inputs, Tensor)
    inputs, vectors = ([inputs], [vectors]) if single else (list(inputs), list(vectors))
    if len(inputs) != len(vectors):
        raise ValueError(f"hvp: {len(inputs)} inputs but {len(vectors)} vectors")
    xs = [Tensor(_to_array(x), requires_grad=True) for x in inputs]
    y = fn(*xs)
    if not isinstance(y, Tensor) or y.size != 1:
        raise ValueError(f"hvp: fn must return a scalar Tensor, got shape {np.shape(y)}")
    gs = grad(y, xs, create_graph=True)
    dot = sum((g * Tensor(np.asarray(_to_array(v), dtype=g.dtype))).sum() for g, v in zip(gs, vectors))
    return grad(dot, xs)
