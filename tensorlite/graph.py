"""Pictures of the recorded graph: `to_dot(t)` writes Graphviz DOT text (render it with
`dot -Tpng graph.dot -o graph.png`), `show_graph(t)` a text tree for the terminal, and
`trace_backward(t)` runs backward one node at a time, yielding what each step did.

Both walk back from `t` the way backward does: a tensor's producer is `t._ctx` (a Function,
or None for a leaf), the producer's inputs are `t._ctx.parents`. The walk is iterative,
so a 10,000-op chain draws as well as a 3-op one. No graphviz package is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .autograd import check_unchanged, topological_order

if TYPE_CHECKING:  # pragma: no cover
    from .tensor import Tensor


def _tensors_in_order(root: Tensor) -> list:
    """Every tensor that leads to `root` (root first), each once, depth-first."""
    order, seen, stack = [], set(), [root]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        order.append(t)
        if t._ctx is not None:
            stack.extend(reversed(t._ctx.parents))  # first input is visited first
    return order


def _kind(t: Tensor) -> str:
    if t._ctx is not None:
        return type(t._ctx).__name__
    return "leaf" if t.requires_grad else "const"


def summary(what: str, a: np.ndarray) -> str | None:
    """`what` and the values of `a` when it is small (<= 4 elements); else mean and max |a|
    for a gradient ("grad mean ..., max|g| ...") and nothing for data (shape says enough)."""
    if a.size <= 4:
        text = np.array2string(np.asarray(a), precision=4, separator=", ")
        return f"{what} " + " ".join(text.split())  # a 2-D one on one line too
    if what == "grad":
        return f"grad mean {a.mean():.4g}, max|g| {np.abs(a).max():.4g}"
    return None


def _describe(t: Tensor) -> list:
    """The facts about a tensor shown in both pictures: name, shape, dtype, data (when it
    has at most 4 elements), grad."""
    parts = [f"{t.name!r}"] if t.name else []
    parts.append(f"shape {t.shape} {t.dtype}")
    data = summary("data", t.data)
    if data is not None:
        parts.append(data)
    if t.grad is not None:
        parts.append(summary("grad", t.grad))
    return parts


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(t: Tensor) -> str:
    """Graphviz DOT text of the graph that produced `t`.

    Tensors are boxes (name, shape, dtype, data when small, gradient when `.grad` is set; leaves that
    require grad are filled, constants dashed), ops are ellipses named by their Function
    class (`MatMul`, `Sum`, ...). Edges run input -> op -> output.
    """
    tensors = _tensors_in_order(t)
    ids = {id(x): f"t{i}" for i, x in enumerate(tensors)}
    lines = ["digraph tensorlite {", "  node [fontname=Helvetica, fontsize=10];"]
    for x in tensors:
        style = {"leaf": ", style=filled, fillcolor=lightblue", "const": ", style=dashed"}
        label = "\\n".join(_dot_quote(p)[1:-1] for p in _describe(x))
        lines.append(f'  {ids[id(x)]} [shape=box, label="{label}"{style.get(_kind(x), "")}];')
    for x in tensors:
        if x._ctx is None:
            continue
        op = f"op_{ids[id(x)]}"  # one Function makes exactly one tensor
        lines.append(f"  {op} [shape=ellipse, label={_dot_quote(type(x._ctx).__name__)}];")
        for parent in x._ctx.parents:
            lines.append(f"  {ids[id(parent)]} -> {op};")
        lines.append(f"  {op} -> {ids[id(x)]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


MAX_DEPTH = 16  # show_graph indents at most this many levels; deeper inputs start a new tree


def show_graph(t: Tensor, file=None) -> str:
    """Print (to `file`, default stdout) and return a text tree of the graph that produced `t`.

    Each line is one tensor: `#k`, how it was made (`<- Op`, `leaf` or `const`) and its
    facts; its inputs hang below it. A tensor used twice is drawn once; later mentions say
    `#k (see above)`.

        #0 <- Sum  shape () float32
        └── #1 <- Mul  shape (3,) float32
            ├── #2 leaf  'x'  shape (3,) float32
            └── #2 (see above)

    Indentation stops at MAX_DEPTH levels: a tensor deeper than that is mentioned as
    `#k (continued below)` and drawn later as the root of its own tree. So every line is at
    most MAX_DEPTH indents wide and the text grows linearly with the graph (a 10,000-op chain
    is a few MB, not the 400 MB a fully indented tree would need).
    """
    number: dict[int, int] = {}
    drawn: set[int] = set()
    lines = []
    roots = [t]  # trees still to draw, in order
    while roots:
        root = roots.pop(0)
        if id(root) in drawn:
            continue  # reached at a shallower depth after being deferred
        stack = [(root, "", "", 0)]  # (tensor, prefix of its line, of its children's, depth)
        while stack:
            x, head, tail, depth = stack.pop()
            k = number.setdefault(id(x), len(number))
            if id(x) in drawn:
                lines.append(f"{head}#{k} (see above)")
                continue
            if depth > MAX_DEPTH and x._ctx is not None:  # leaves end a branch: drawn here
                lines.append(f"{head}#{k} (continued below)")
                roots.append(x)
                continue
            drawn.add(id(x))
            kind = _kind(x)
            made = f"<- {kind}" if x._ctx is not None else kind
            lines.append(f"{head}#{k} {made}  " + "  ".join(_describe(x)))
            parents = x._ctx.parents if x._ctx is not None else ()
            for i in reversed(range(len(parents))):  # pushed last-first, so popped in order
                last = i == len(parents) - 1
                branch, indent = ("└── ", "    ") if last else ("├── ", "│   ")
                stack.append((parents[i], tail + branch, tail + indent, depth + 1))
    text = "\n".join(lines)
    print(text, file=file)
    return text


# ---- watching backward, one node at a time ----------------------------------------------------
@dataclass
class BackwardStep:
    """One node of a backward pass, at the moment backward visits it (see trace_backward)."""

    index: int  # 0 for the output, then 1, 2, ... in the order backward visits the nodes
    node: Tensor  # the tensor whose gradient is now complete
    grad: np.ndarray  # dL/d(node): every use of the node has added its share by now
    op: str | None  # the Function that made the node ("Mul"); None for a leaf
    sends: list = field(default_factory=list)  # [(input Tensor, the gradient sent to it)]

    def __str__(self) -> str:
        name = self.node.name or f"#{self.index}"
        head = f"{name}: {summary('grad', self.grad)}"
        if self.op is None:
            return head + "  (a leaf: kept in .grad)"
        sent = ", ".join(f"{p.name or '?'} += {summary('grad', g).removeprefix('grad ')}"
                         for p, g in self.sends)
        return f"{head}  -> {self.op}.backward -> {sent}"


def trace_backward(root: Tensor, grad=None) -> Iterator[BackwardStep]:
    """Run root's backward pass one node at a time and yield a BackwardStep for each node
    as it is visited: output first, each node only after every node that uses it, so its
    gradient is complete. Each step says which gradient the node's op sends to each of its
    inputs. Leaves get their .grad as in root.backward() (tensors with retain_grad() too),
    and the graph's saved buffers are released as they are used, so the graph can be walked
    once, by this or by backward(). A plain loop over it is backward itself:

        for step in tl.trace_backward(L):
            print(step)

    `grad` is dL/d(root); by default 1 for a one-element root."""
    if not root.requires_grad:
        raise RuntimeError("trace_backward() on a tensor that does not require grad: create "
                           "the inputs with requires_grad=True")
    if grad is None and root.data.size != 1:
        raise RuntimeError(f"trace_backward() on a tensor of shape {root.shape} needs a grad "
                           "argument of that shape (or reduce it first, e.g. .sum())")
    seed = np.ones_like(root.data) if grad is None else np.asarray(grad, dtype=root.dtype)
    if seed.shape != root.shape:
        raise ValueError(f"trace_backward(grad): grad has shape {seed.shape}, root has {root.shape}")
    grads = {id(root): seed}  # id(tensor) -> its gradient so far
    index = 0
    for node in reversed(topological_order(root)):
        dout = grads.pop(id(node), None)
        if dout is None:  # nothing reached it (an input whose op sent it no gradient)
            continue
        fn = node._ctx
        if fn is None or node._retain_grad:  # kept, added to what an earlier backward left
            node.grad = np.array(dout, dtype=node.dtype) if node.grad is None else node.grad + dout
        step = BackwardStep(index, node, dout, None if fn is None else type(fn).__name__)
        if fn is not None:
            if getattr(fn, "released", False):
                raise RuntimeError("trace_backward() through a graph that was already freed: "
                                   "walk each forward pass's graph once")
            check_unchanged(node, fn)
            dins = fn.backward(dout)
            dins = dins if isinstance(dins, tuple) else (dins,)
            for parent, g in zip(fn.parents, dins):
                if g is not None and parent.requires_grad:
                    grads[id(parent)] = g if id(parent) not in grads else grads[id(parent)] + g
                    step.sends.append((parent, g))
            fn.release()
        yield step
        index += 1
