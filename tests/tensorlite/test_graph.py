"""graph.py: the DOT text and the text tree describe the recorded graph (structure, not
exact strings): one node per tensor and per op, edges input -> op -> output, shared
inputs drawn once, names/shapes/gradients shown, deep chains without recursion."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

import tensorlite as tl
from tensorlite.graph import MAX_DEPTH, show_graph, to_dot


def _parse_dot(text: str):
    """(nodes: id -> attribute text, edges: [(src, dst)]) from our DOT output."""
    nodes, edges = {}, []
    for line in text.splitlines():
        line = line.strip()
        m = re.fullmatch(r"(\w+) -> (\w+);", line)
        if m:
            edges.append((m.group(1), m.group(2)))
            continue
        m = re.fullmatch(r"(\w+) \[(.*)\];", line)
        if m and m.group(1) != "node":
            nodes[m.group(1)] = m.group(2)
    return nodes, edges


def _label(attrs: str) -> str:
    return re.search(r'label="((?:[^"\\]|\\.)*)"', attrs).group(1)


def _mlp_loss():
    x = tl.Tensor(np.ones((4, 3)), name="x")  # a constant input
    w = tl.Tensor(np.full((3, 2), 0.5), requires_grad=True, name="w")
    b = tl.Tensor(np.zeros(2), requires_grad=True, name="b")
    loss = ((x @ w + b).tanh()).sum()
    return loss


def test_dot_has_one_node_per_tensor_and_op_with_edges_through_ops():
    loss = _mlp_loss()
    text = loss.to_dot()
    assert text.startswith("digraph") and text.rstrip().endswith("}")
    nodes, edges = _parse_dot(text)
    ops = {k: _label(v) for k, v in nodes.items() if "ellipse" in v}
    tensors = {k: v for k, v in nodes.items() if "box" in v}
    assert sorted(ops.values()) == ["Add", "MatMul", "Sum", "Tanh"]
    assert len(tensors) == 7  # x, w, b, x@w, +b, tanh, sum
    # every edge joins a tensor and an op, never two of a kind
    for src, dst in edges:
        assert (src in tensors) != (src in ops) and (dst in ops) == (src in tensors)
    # each op has exactly one outgoing edge, to its output; MatMul and Add take two inputs
    for op, name in ops.items():
        assert sum(1 for s, _ in edges if s == op) == 1
        n_in = sum(1 for _, d in edges if d == op)
        assert n_in == (2 if name in ("Add", "MatMul") else 1)
    # the named leaves feed MatMul and Add
    by_name = {re.search(r"'(\w+)'", _label(v)).group(1): k for k, v in tensors.items()
               if "'" in _label(v)}
    matmul = next(k for k, v in ops.items() if v == "MatMul")
    add = next(k for k, v in ops.items() if v == "Add")
    assert (by_name["x"], matmul) in edges and (by_name["w"], matmul) in edges
    assert (by_name["b"], add) in edges
    assert "(3, 2)" in _label(tensors[by_name["w"]])
    assert "dashed" in tensors[by_name["x"]]  # a constant looks different from a parameter


def test_dot_shows_gradients_once_backward_has_run():
    loss = _mlp_loss()
    assert "grad" not in loss.to_dot()
    loss.backward()
    nodes, _ = _parse_dot(to_dot(loss))
    with_grad = [_label(v) for v in nodes.values() if "grad" in _label(v)]
    assert len(with_grad) == 2  # w and b, the leaves that require grad
    assert all("'w'" in s or "'b'" in s for s in with_grad)
    # after backward the Functions are released but the structure is still drawn
    assert len([v for v in nodes.values() if "ellipse" in v]) == 4


def test_dot_escapes_quotes_in_names():
    t = tl.Tensor([1.0], requires_grad=True, name='say "hi"')
    nodes, _ = _parse_dot((t * 2).to_dot())
    assert any('say \\"hi\\"' in _label(v) for v in nodes.values())


def test_shared_input_is_one_node_with_two_edges():
    a = tl.Tensor([1.0, 2.0], requires_grad=True, name="a")
    y = a * a
    nodes, edges = _parse_dot(to_dot(y))
    assert len(nodes) == 3  # a, the Mul, y
    a_id = next(k for k, v in nodes.items() if "'a'" in v)
    assert sum(1 for s, _ in edges if s == a_id) == 2


def test_show_graph_prints_and_returns_a_tree():
    loss = _mlp_loss()
    buf = io.StringIO()
    text = show_graph(loss, file=buf)
    assert buf.getvalue() == text + "\n"
    lines = text.splitlines()
    assert len(lines) == 7
    assert "Sum" in lines[0] and "()" in lines[0]
    depth = {name: next(len(re.match(r"[│├└─ ]*", s).group(0)) for s in lines if name in s)
             for name in ("Sum", "Tanh", "Add", "MatMul", "'x'", "'w'", "'b'")}
    assert depth["Sum"] < depth["Tanh"] < depth["Add"] < depth["MatMul"] < depth["'x'"]
    assert depth["'x'"] == depth["'w'"] and depth["'b'"] == depth["MatMul"]
    assert tl.show_graph is show_graph


def test_show_graph_draws_a_diamond_once_and_shows_grads():
    a = tl.Tensor([1.0, 2.0, 3.0], requires_grad=True, name="a")
    h = a.exp()
    out = (h * 2 + h).sum()
    out.backward()
    text = show_graph(out, file=io.StringIO())
    assert text.count("Exp") == 1  # the shared branch is expanded once...
    assert text.count("see above") == 1  # ...and referred to the second time
    assert "'a'" in text and "grad" in text


def test_leaf_and_no_grad_results_are_single_nodes():
    t = tl.Tensor(np.zeros((2, 2)), requires_grad=True)
    assert len(show_graph(t, file=io.StringIO()).splitlines()) == 1
    with tl.no_grad():
        u = t * 3
    nodes, edges = _parse_dot(u.to_dot())
    assert len(nodes) == 1 and edges == []


def test_a_deep_chain_is_walked_without_recursion():
    x = tl.Tensor([1.0], requires_grad=True)
    y = x
    for _ in range(3000):  # deeper than Python's default recursion limit (1000)
        y = y * 1.0
    nodes, _ = _parse_dot(y.to_dot())
    assert len([v for v in nodes.values() if "ellipse" in v]) == 3000
    lines = show_graph(y, file=io.StringIO()).splitlines()
    drawn = [s for s in lines if not s.endswith(("(see above)", "(continued below)"))]
    assert len(drawn) == 6001  # 3000 Mul, 3000 constants, one leaf: each drawn once
    numbers = [int(re.search(r"#(\d+) ", s).group(1)) for s in drawn]
    assert sorted(numbers) == list(range(6001))


def test_show_graph_text_grows_linearly_with_depth():
    def chain_text(n):
        y = tl.Tensor([1.0], requires_grad=True)
        for _ in range(n):
            y = y * 1.0
        return show_graph(y, file=io.StringIO())

    small, big = chain_text(2000), chain_text(8000)
    assert len(big) < 4.2 * len(small)  # a fully indented tree: 16x
    assert max(len(s) for s in big.splitlines()) < 4 * (MAX_DEPTH + 2) + 60
    deferred = re.findall(r"#(\d+) \(continued below\)", big)
    assert deferred and all(re.search(rf"^#{k} <- Mul", big, re.MULTILINE) for k in deferred)


# ---- trace_backward: backward one node at a time ----------------------------------------------
def abcf():
    a, b, c, f = (tl.Tensor(v, requires_grad=True, name=n)
                  for v, n in ((2.0, "a"), (-3.0, "b"), (10.0, "c"), (-2.0, "f")))
    e = a * b
    d = e + c
    L = d * f
    e.name, d.name, L.name = "e", "d", "L"
    return L, (a, b, c, f)


def test_trace_backward_visits_output_first_and_says_what_each_op_sends():
    L, leaves = abcf()
    steps = list(tl.trace_backward(L))
    assert [s.node.name for s in steps] == ["L", "d", "e", "a", "b", "c", "f"]
    assert [s.index for s in steps] == list(range(7))
    assert [s.op for s in steps] == ["Mul", "Add", "Mul", None, None, None, None]
    sends = {(s.node.name, p.name): float(g) for s in steps for p, g in s.sends}
    assert sends == {("L", "d"): -2.0, ("L", "f"): 4.0, ("d", "e"): -2.0, ("d", "c"): -2.0,
                     ("e", "a"): 6.0, ("e", "b"): -4.0}
    assert [float(t.grad) for t in leaves] == [6.0, -4.0, -2.0, 4.0]
    assert str(steps[0]) == "L: grad 1.  -> Mul.backward -> d += -2., f += 4."
    assert str(steps[3]) == "a: grad 6.  (a leaf: kept in .grad)"


def test_a_node_is_visited_once_its_gradient_is_complete():
    """The diamond y = h*h + h: h is visited after Mul and Add, with the sum of the three."""
    a = tl.Tensor(2.0, requires_grad=True, name="a")
    h = a.exp()
    h.name = "h"
    y = h * h + h
    steps = list(tl.trace_backward(y))
    (at_h,) = [s for s in steps if s.node is h]
    users = [s for s in steps if any(p is h for p, _ in s.sends)]
    assert all(s.index < at_h.index for s in users) and len(users) == 2
    contributions = [float(g) for s in users for p, g in s.sends if p is h]
    assert len(contributions) == 3 and np.isclose(float(at_h.grad), sum(contributions))
    assert np.isclose(float(a.grad), 2 * np.exp(4) + np.exp(2), rtol=1e-6)


def test_trace_backward_gives_backward_s_gradients_on_a_random_graph():
    rng = np.random.default_rng(0)
    x0, w0, dout = rng.standard_normal((4, 3)), rng.standard_normal((3, 5)), rng.standard_normal((4, 5))

    def run(walk):
        x = tl.Tensor(x0, requires_grad=True)
        w = tl.Tensor(w0, requires_grad=True)
        h = (x @ w).tanh()
        y = tl.functional.softmax(h * h + w.sum(axis=0))  # w used twice, broadcasting
        walk(y)
        return x.grad, w.grad

    traced = run(lambda y: list(tl.trace_backward(y, dout)))
    plain = run(lambda y: y.backward(dout))
    for t, p in zip(traced, plain):
        np.testing.assert_allclose(t, p, rtol=1e-12)


def test_trace_backward_is_a_walk_you_take_once_and_refuses_what_backward_refuses():
    L, _ = abcf()
    list(tl.trace_backward(L))
    with pytest.raises(RuntimeError, match="already freed"):
        list(tl.trace_backward(L))
    x = tl.Tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="needs a grad"):
        next(tl.trace_backward(x * 2))
    with pytest.raises(RuntimeError, match="does not require grad"):
        next(tl.trace_backward(tl.Tensor(1.0)))
    w = tl.Tensor([1.0, 2.0], requires_grad=True)
    y = (w * w).sum()
    w.data *= 10
    with pytest.raises(RuntimeError, match="changed in place"):
        list(tl.trace_backward(y))
