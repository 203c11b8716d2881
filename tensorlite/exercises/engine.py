"""The graders of the engine's exercises (docs/autograd.md, derivations.md, higher-order.md):
a slope by nudging, the backward driver, the backward of Mul, MatMul, Max, softmax,
cross-entropy, RMSNorm and causal attention, a Hessian-vector product, and softmax's JVP.

Each `grade_NAME(module, examples)` checks the learner's module, raises Failure with the
smallest counterexample found, and returns what it checked. Gradients are judged by
tensorlite.testing's check_vjp / check_jvp (finite differences in float64, random
cotangents and tangents); the forward passes they need are tensorlite's own ops.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from .. import functional as F
from ..tensor import Tensor
from ..testing import arrays, broadcastable_shapes
from .grader import Failure, Stop, call, compare, jvp, search, show, vjp


def _data(t: Tensor) -> np.ndarray:
    return np.asarray(t.data, dtype=np.float64)


# ---- slope_by_nudging ------------------------------------------------------------------------
def grade_slope_by_nudging(mod: ModuleType, examples: int) -> list[str]:
    def check(draw):
        x = draw(arrays(shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=3)), label="x")
        w = draw(arrays(shape=x.shape), label="w")
        a = draw(arrays(shape=x.shape), label="a")

        def f(z):  # sum(w sin z) + (sum(a z))**2: a gradient known in closed form
            return float(np.sum(w * np.sin(z)) + np.sum(a * z) ** 2)

        expected = w * np.cos(x) + 2 * np.sum(a * x) * a
        kept = x.copy()
        got = call(mod, "numerical_gradient", (f, x, 1e-3), ("f", "x", "eps"))
        if not np.array_equal(x, kept):
            raise Failure("numerical_gradient changed x (nudge a copy, or put the value back)")
        compare("numerical_gradient(f, x, eps=1e-3)", expected, got,
                ("x", "f = sum(w * sin(x)) + sum(a * x)**2 with w", "and a"), (x, w, a),
                atol=1e-5, rtol=1e-5)

    search(check, examples)
    return [(f"numerical_gradient(f, x, eps=1e-3) of f = sum(w sin x) + sum(a x)^2 against its "
            f"exact gradient (central differences are that close; one-sided ones are not), on "
            f"{examples} random shapes (0-d to 3-d) and values")]


# ---- backward_driver -------------------------------------------------------------------------
@st.composite
def _graphs(draw):
    """A random DAG: (leaves, [(parent indices, local grads)] per inner node); the last node is
    the root. Parents repeat (x * x) and diamonds appear; some nodes lead nowhere."""
    leaves = draw(st.integers(1, 3), label="leaves")
    inner = []
    for i in range(draw(st.integers(1, 6), label="inner nodes")):
        n = leaves + i
        parents = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2), label=f"n{n} parents")
        grads = [draw(st.integers(-3, 3), label="local grad") / 2 for _ in parents]
        inner.append((parents, grads))
    return leaves, inner


def _build(mod: ModuleType, leaves: int, inner: list) -> list:
    node = getattr(mod, "Node", None)
    if node is None:
        raise Failure(f"{mod.__name__}.py has no class Node (keep the one the starter gives)")
    nodes = [node(float(i + 1)) for i in range(leaves)]
    for parents, grads in inner:
        nodes.append(node(0.0, [nodes[p] for p in parents], grads))
    return nodes


def _graph_text(leaves: int, inner: list) -> str:
    lines = [f"  leaves n0..n{leaves - 1}" if leaves > 1 else "  leaf n0"]
    for i, (parents, grads) in enumerate(inner):
        args = ", ".join(f"n{p} (local grad {g:g})" for p, g in zip(parents, grads))
        lines.append(f"  n{leaves + i} made from {args}")
    return "\n".join(lines) + f"\n  root: n{leaves + len(inner) - 1}"


def grade_backward_driver(mod: ModuleType, examples: int) -> list[str]:
    def check(draw):
        leaves, inner = draw(_graphs(), label="graph")
        nodes = _build(mod, leaves, inner)
        root, n = nodes[-1], len(nodes)
        parents = [[] for _ in range(leaves)] + [p for p, _ in inner]
        leads = {n - 1}  # the nodes the root was made from, directly or not
        for i in reversed(range(n)):
            if i in leads:
                leads.update(parents[i])
        order = call(mod, "topological_order", (root,), ("root",), outputs=0)
        graph = f"\n  on the graph\n{_graph_text(leaves, inner)}"
        index = {id(nd): i for i, nd in enumerate(nodes)}
        try:
            got = [index[id(nd)] for nd in order]
        except (KeyError, TypeError):
            raise Failure(f"topological_order must return a list of the graph's nodes{graph}") from None
        names = "[" + ", ".join(f"n{i}" for i in got) + "]"
        if sorted(got) != sorted(leads):
            raise Failure(f"topological_order returned {names}: it must hold each node that leads "
                          f"to the root exactly once, and no other{graph}")
        seen = set()
        for i in got:
            if not set(parents[i]) <= seen:
                raise Failure(f"topological_order returned {names}: n{i} comes before its "
                              f"parents{graph}")
            seen.add(i)
        expected = [0.0] * n
        expected[-1] = 1.0
        for i in reversed(range(leaves, n)):
            for p, g in zip(*inner[i - leaves]):
                expected[p] += expected[i] * g
        call(mod, "backward", (root,), ("root",), outputs=0)
        grads = np.array([float(nd.grad) for nd in nodes])
        expected = np.array([e if i in leads else 0.0 for i, e in enumerate(expected)])
        wrong = np.flatnonzero(~np.isclose(grads, expected, rtol=1e-12, atol=1e-12))
        if wrong.size:
            i = wrong[0]
            raise Failure(f"after backward(root), n{i}.grad is {grads[i]:g}, expected "
                          f"{expected[i]:g}\n  grads: {show(grads)}\n  expected: {show(expected)}"
                          f"{graph}")

    search(check, examples)
    _deep_chain(mod)
    return [(f"topological_order and backward on {examples} random graphs (repeated parents, "
            "diamonds, nodes that do not lead to the root): order, each node once, every .grad"),
            (f"a chain of 3000 nodes (recursion limit {sys.getrecursionlimit()}): no RecursionError, "
            "the gradient 1.0001**2999")]


def _deep_chain(mod: ModuleType) -> None:
    nodes = _build(mod, 1, [([i], [1.0001]) for i in range(2999)])
    try:
        call(mod, "topological_order", (nodes[-1],), ("root",), outputs=0)
        call(mod, "backward", (nodes[-1],), ("root",), outputs=0)
    except Failure as e:
        raise Failure(f"on a chain of 3000 nodes: {e}\n  (walk the graph with a stack of your "
                      "own, not by recursion)") from None
    if not np.isclose(float(nodes[0].grad), 1.0001**2999, rtol=1e-9):
        raise Failure(f"on a chain of 3000 nodes, each x * 1.0001: the leaf's grad is "
                      f"{float(nodes[0].grad):.8g}, expected 1.0001**2999 = {1.0001**2999:.8g}")


# ---- mul_backward ----------------------------------------------------------------------------
def grade_mul_backward(mod: ModuleType, examples: int) -> list[str]:
    def spread(x, y):  # x copied out to the broadcast shape; y only fixes that shape
        return np.broadcast_to(x, np.broadcast_shapes(x.shape, y.shape)) + 0 * y

    def spread_vjp(dout, x, y):
        return call(mod, "unbroadcast", (dout, x.shape), ("grad", "shape")), np.zeros_like(y)

    vjp(spread, spread_vjp, broadcastable_shapes(2), ("x", "y (only its shape counts)"), examples)
    vjp(lambda x, y: x * y,
        lambda dout, x, y: call(mod, "mul_backward", (dout, x, y), ("dout", "x", "y"), 2),
        broadcastable_shapes(2), ("x", "y"), examples)
    return [(f"unbroadcast: the gradient of broadcast_to(x, shape) on {examples} random shape "
            "pairs that broadcast (new leading axes, size-1 axes)"),
            (f"mul_backward: the gradient of x * y for both inputs, {examples} random broadcasting "
            "shapes, values and cotangents dout, against finite differences (check_vjp)")]


# ---- matmul_backward -------------------------------------------------------------------------
@st.composite
def _linear_shapes(draw):
    batch = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3), label="batch dims")
    n, c, k = (draw(st.integers(1, 4), label=s) for s in "NCK")
    return (*batch, n, c), (c, k)


def grade_matmul_backward(mod: ModuleType, examples: int) -> list[str]:
    vjp(lambda x, w: x @ w,
        lambda dout, x, w: call(mod, "matmul_backward", (dout, x, w), ("dout", "x", "w"), 2),
        _linear_shapes(), ("x", "w"), examples)
    return [(f"matmul_backward: the gradient of x @ w, x (..., N, C) with 0 to 2 batch axes, "
            f"w (C, K), for both inputs, on {examples} random shapes, values and cotangents "
            "(check_vjp)")]


# ---- max_backward ----------------------------------------------------------------------------
def grade_max_backward(mod: ModuleType, examples: int) -> list[str]:
    def check(draw):
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), label="shape")
        # small integers: ties are common, and a tie is where max's gradient needs a choice
        x = draw(hnp.arrays(np.float64, shape, elements=st.integers(-2, 2).map(float)), label="x")
        axis = draw(st.integers(-x.ndim, x.ndim - 1), label="axis")
        dout = draw(arrays(shape=np.max(x, axis=axis).shape), label="dout")
        t = Tensor(x, requires_grad=True)
        t.max(axis=axis).backward(dout)
        got = call(mod, "max_backward", (dout, x, axis), ("dout", "x", "axis"))
        compare("dx", t.grad, got, ("x", "axis", "dout"), (x, axis, dout))

    search(check, examples)
    return [(f"max_backward(dout, x, axis) against tensorlite's Max on {examples} random shapes, "
            "axes and cotangents, with many ties (each tied maximum gets an equal share)")]


# ---- softmax_backward ------------------------------------------------------------------------
_rows = hnp.array_shapes(min_dims=1, max_dims=3, max_side=4).map(lambda s: (s,))


def _softmax(x: np.ndarray) -> np.ndarray:
    return _data(F.softmax(Tensor(x)))


def grade_softmax_backward(mod: ModuleType, examples: int) -> list[str]:
    vjp(_softmax, lambda dout, x: call(mod, "softmax_backward", (dout, x), ("dout", "x")),
        _rows, ("x",), examples, min_value=-4.0, max_value=4.0)
    return [(f"softmax_backward: the gradient of softmax over the last axis on {examples} random "
            "shapes (1-d to 3-d), values and cotangents dout (check_vjp)")]


# ---- cross_entropy ---------------------------------------------------------------------------
def _targets(n: int, v: int, rule: int) -> np.ndarray:
    """Targets that vary with the row, fixed by the shape (check_vjp draws only floats)."""
    rows = np.arange(n)
    return (3 * rows + 1) % v if rule == 0 else (v - 1 - rows) % v


def _cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(F.cross_entropy(Tensor(logits), targets).data)


def grade_cross_entropy(mod: ModuleType, examples: int) -> list[str]:
    def forward(draw):
        n, v = draw(st.integers(1, 4), label="N"), draw(st.integers(1, 5), label="V")
        logits = draw(arrays(shape=(n, v), min_value=-5.0, max_value=5.0), label="logits")
        logits = logits + draw(st.sampled_from([0.0, 800.0, -800.0]), label="offset")
        targets = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, v - 1)), label="targets")
        got = call(mod, "cross_entropy", (logits, targets), ("logits", "targets"))
        compare("the loss", _cross_entropy(logits, targets), got, ("logits", "targets"),
                (logits, targets), atol=1e-9, rtol=1e-9)

    search(forward, examples)
    for rule, text in ((0, "(3n + 1) % V"), (1, "(V - 1 - n) % V")):
        try:
            vjp(lambda z, rule=rule: _cross_entropy(z, _targets(*z.shape, rule)),
                lambda dout, z, rule=rule: call(mod, "cross_entropy_backward",
                                                (dout, z, _targets(*z.shape, rule)),
                                                ("dout", "logits", "targets"), 1),
                [("N", "V")], ("logits",), max(examples // 2, 5), max_value=5.0, min_value=-5.0)
        except Failure as e:
            raise Failure(f"{e}\n  targets[n] = {text} for row n") from None
    return [(f"cross_entropy: the mean loss on {examples} random (N, V) logits and targets, "
            "also shifted by +-800 (where exp overflows unless the row max is subtracted)"),
            ("cross_entropy_backward: the gradient for logits on random shapes, values and "
            "scalar cotangents dout, two target patterns (check_vjp)")]


# ---- rms_norm_backward -----------------------------------------------------------------------
@st.composite
def _norm_shapes(draw):
    rows = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3), label="row dims")
    c = draw(st.integers(1, 5), label="C")
    return (*rows, c), (c,)


def grade_rms_norm_backward(mod: ModuleType, examples: int) -> list[str]:
    vjp(lambda x, w: _data(F.rms_norm(Tensor(x), Tensor(w))),
        lambda dout, x, w: call(mod, "rms_norm_backward", (dout, x, w), ("dout", "x", "w"), 2),
        _norm_shapes(), ("x", "w"), examples)
    return [(f"rms_norm_backward: the gradient of rms_norm(x, w) (eps 1e-5) for x (..., C) and "
            f"w (C,), on {examples} random shapes, values and cotangents (check_vjp)")]


# ---- attention_backward ----------------------------------------------------------------------
def _attention(q, k, v) -> np.ndarray:
    return _data(F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), causal=True))


def grade_attention_backward(mod: ModuleType, examples: int) -> list[str]:
    vjp(_attention,
        lambda dout, q, k, v: call(mod, "attention_backward", (dout, q, k, v),
                                   ("dout", "q", "k", "v"), 3),
        [("H", "T", "D")] * 3, ("q", "k", "v"), examples)
    return [(f"attention_backward: dq, dk, dv of causal attention softmax(q k^T / sqrt(D) + mask) v "
            f"on {examples} random (H, T, D), values and cotangents (check_vjp)")]


# ---- hessian_vector_product ------------------------------------------------------------------
@contextlib.contextmanager
def _without_hvp(mod: ModuleType):
    """tl.hvp is this exercise's answer: calling it fails the check."""
    def refused(*args, **kwargs):
        raise Stop("hessian_vector_product called tl.hvp, which is the answer itself: "
                      "write it with tl.grad, twice")

    package = sys.modules["tensorlite"]
    original = package.hvp
    home = sys.modules[original.__module__]  # the module that defines it
    if any(value is original for value in vars(mod).values()):
        raise Failure(f"{Path(mod.__file__).name} imports hvp from tensorlite, which is the "
                      "answer itself: write it with tl.grad, twice")
    package.hvp = home.hvp = refused
    try:
        yield
    finally:
        package.hvp = home.hvp = original


def grade_hessian_vector_product(mod: ModuleType, examples: int) -> list[str]:
    def check(draw):
        x = draw(arrays(shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3)), label="x")
        v, w, a = (draw(arrays(shape=x.shape), label=n) for n in "vwa")
        c = draw(st.sampled_from([0.0, 0.25, 1.0]), label="c")

        def f(t):  # sum(w tanh x) + (sum(a x))^2 + c sum(x^4): H v known in closed form
            return (t.tanh() * w).sum() + (t * a).sum() ** 2 + (t ** 4).sum() * c

        th = np.tanh(x)
        expected = w * (-2 * th * (1 - th**2)) * v + 2 * a * np.sum(a * v) + 12 * c * x**2 * v
        names = ("x", "v", "f = sum(w * tanh(x)) + sum(a * x)**2 + c * sum(x**4) with w", "a", "c")
        got = call(mod, "hessian_vector_product", (f, x, v), ("f", "x", "v"))
        compare("H v", expected, got, names, (x, v, w, a, c), atol=1e-9, rtol=1e-7)

    with _without_hvp(mod):
        search(check, examples)
    return [(f"hessian_vector_product(f, x, v) against the exact H v of f = sum(w tanh x) + "
             f"(sum(a x))^2 + c sum(x^4), on {examples} random shapes (0-d to 2-d), points x, "
             "directions v and coefficients; tl.hvp itself refused")]


# ---- softmax_jvp -----------------------------------------------------------------------------
def grade_softmax_jvp(mod: ModuleType, examples: int) -> list[str]:
    jvp(_softmax, lambda tangents, x: call(mod, "softmax_jvp", (tangents[0], x), ("dx", "x")),
        _rows, ("x",), examples, min_value=-4.0, max_value=4.0)
    return [(f"softmax_jvp: d softmax(x) along random tangents dx, every output element, on "
            f"{examples} random shapes and values (check_jvp)")]

