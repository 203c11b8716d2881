"""Draw every picture in docs/img/ from the project's own code, in one command:

    python docs/pictures.py                  # rewrites docs/img/*.png
    python docs/pictures.py --out-dir /tmp   # somewhere else
    python docs/pictures.py --from-run baby  # first refresh docs/data/ from a new baby run

The graphs are tensorlite's `to_dot()` text, parsed and laid out here and drawn with
matplotlib (no Graphviz needed); the backward frames come from `tl.trace_backward`; the
attention numbers, the head split and the model's shapes are computed by the same calls the
model makes; the mask is tensorlite's own; the float layouts are pi's bits,
rounded to bfloat16 by tensorlite.references. The baby run's loss and attention are drawn from
its numbers kept in docs/data/ (a 2,000-step run is too slow for a test; --from-run renews
them), the digit-reversal attention from a 100-step run made here. gpt.serve's page is a
screenshot: the default run is trained here (`python -m gpt.train`, about 35 s on an idle
machine) and served, and the browser test (tests/gpt/test_serve_page.py: headless Chromium)
types a prompt and keeps its screenshot. matplotlib is the optional `plot` extra; the page
needs the `test` extra and Debian's chromium + chromium-driver. tests/test_pictures.py runs
this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import tensorlite as tl
from gpt.config import GPTConfig
from gpt.model import GPT, attention_probabilities
from tensorlite import functional as F
from tensorlite.functional import softmax
from tensorlite.graph import _tensors_in_order as tensors_in_order
from tensorlite.references import causal_bias

IMG = Path(__file__).resolve().parent / "img"


# ---- DOT text -> nodes and edges -------------------------------------------------------------
def parse_dot(text: str) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """Nodes {id: {"lines": [...], "op": bool, "leaf": bool, "const": bool}} and edges
    [(src, dst)] of the DOT text `tensorlite.graph.to_dot` writes."""
    nodes, edges = {}, []
    for line in text.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(\w+) -> (\w+);", line):
            edges.append((m.group(1), m.group(2)))
        elif (m := re.fullmatch(r"(\w+) \[(.*)\];", line)) and m.group(1) != "node":
            attrs = m.group(2)
            label = re.search(r'label="((?:[^"\\]|\\.)*)"', attrs).group(1)
            lines = [s.replace('\\"', '"').replace("\\\\", "\\") for s in label.split("\\n")]
            nodes[m.group(1)] = {
                "lines": lines,
                "op": "ellipse" in attrs,
                "leaf": "filled" in attrs,
                "const": "dashed" in attrs,
            }
    return nodes, edges


def layout(nodes: dict, edges: list) -> dict[str, tuple[float, float]]:
    """(x, y) per node, left to right: x is the length of the longest path from an input,
    except that an input sits just left of its first consumer; y spreads each column."""
    inputs = {n: [s for s, d in edges if d == n] for n in nodes}
    rank: dict[str, int] = {}
    pending = list(nodes)
    while pending:  # longest path from the sources (a DAG: every round places some node)
        for n in list(pending):
            if all(p in rank for p in inputs[n]):
                rank[n] = 1 + max((rank[p] for p in inputs[n]), default=-1)
                pending.remove(n)
    for n in nodes:
        if not inputs[n]:
            consumers = [rank[d] for s, d in edges if s == n]
            rank[n] = min(consumers) - 1 if consumers else rank[n]
    columns: dict[int, list[str]] = {}
    for n in nodes:  # DOT order (the output first, its inputs after) keeps siblings together
        columns.setdefault(rank[n], []).append(n)
    pos = {}
    for r in sorted(columns, reverse=True):  # from the output back, like backward
        col = columns[r]
        if r != max(columns):  # order a column by where its consumers are
            def key(n):
                ys = [pos[d][1] for s, d in edges if s == n and d in pos]
                return -np.mean(ys) if ys else 0.0
            col.sort(key=key)
        for i, n in enumerate(col):
            pos[n] = (float(r), (len(col) - 1) / 2 - i)
    return pos


def draw_graph(ax, nodes: dict, edges: list, pos: dict, lines: dict | None = None,
               fill: dict | None = None, red: set | None = None, fontsize: float = 9) -> None:
    """Draw parsed DOT nodes and edges on `ax` at `pos`: tensors as boxes (inputs that
    require grad blue, constants dashed), ops as rounded grey boxes, arrows input -> op ->
    output. `lines` replaces a node's text, `fill` its colour, and the edges in `red` are
    drawn red (the backward frames use them)."""
    lines, fill, red = lines or {}, fill or {}, red or set()
    width = max(x for x, _ in pos.values()) + 1
    height = max(abs(y) for _, y in pos.values()) * 2 + 1.6
    ax.set_xlim(-0.6, width - 0.4)
    ax.set_ylim(-height / 2, height / 2)
    ax.axis("off")
    artists = {}
    for n, node in nodes.items():
        x, y = pos[n]
        if node["op"]:
            box = {"boxstyle": "round,pad=0.4", "fc": fill.get(n, "#eeeeee"), "ec": "#555555"}
            artists[n] = ax.text(x, y, node["lines"][0], ha="center", va="center",
                                 fontsize=fontsize + 1, fontweight="bold", bbox=box)
        else:
            text = lines.get(n) or [s for s in node["lines"] if not s.startswith("shape")]
            box = {"boxstyle": "square,pad=0.4",
                   "fc": fill.get(n, "#cfe3f7" if node["leaf"] else "white"),
                   "ec": "black", "ls": "--" if node["const"] else "-"}
            artists[n] = ax.text(x, y, "\n".join(text), ha="center", va="center",
                                 fontsize=fontsize, family="monospace", bbox=box)
    for k, (s, d) in enumerate(edges):
        twins = [i for i, e in enumerate(edges) if e == (s, d)]  # x * x: two edges, two arcs
        if len(twins) > 1:
            rad = 0.3 * (twins.index(k) - (len(twins) - 1) / 2)
        else:  # an edge that jumps over a column arcs above it
            rad = -0.3 if pos[d][0] - pos[s][0] > 1 else 0.0
        color, lw = ("#c00000", 2.2) if (s, d) in red else ("#333333", 1.0)
        ax.annotate("", xy=(0, 0.5), xycoords=artists[d], xytext=(1, 0.5),
                    textcoords=artists[s],
                    arrowprops={"arrowstyle": "->", "color": color, "lw": lw, "shrinkA": 4,
                                "shrinkB": 4, "connectionstyle": f"arc3,rad={rad}"})


def draw_dot(text: str, path: Path, title: str = "") -> Path:
    """Draw `to_dot` text as a PNG (see draw_graph)."""
    nodes, edges = parse_dot(text)
    pos = layout(nodes, edges)
    width = max(x for x, _ in pos.values()) + 1
    height = max(abs(y) for _, y in pos.values()) * 2 + 1.6
    fig = new_figure((1.55 * width + 0.4, 1.15 * height + 0.5))
    ax = fig.add_axes((0, 0, 1, 0.92 if title else 1))
    draw_graph(ax, nodes, edges, pos)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, format="png")
    return path


def new_figure(size: tuple[float, float], **kwargs):
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, **kwargs)
    FigureCanvasAgg(fig)
    return fig


# ---- the two graphs of docs/autograd.md ------------------------------------------------------
def abcf_graph() -> tl.Tensor:
    """L = (a*b + c) * f after L.backward(), every node named and keeping its grad."""
    L = abcf_forward(retain=True)
    L.backward()
    return L


def diamond_graph() -> tl.Tensor:
    """y = h*h + h with h = exp(a), after y.backward(): h gets three gradient contributions."""
    a = tl.Tensor(2.0, requires_grad=True, name="a")
    h = a.exp()
    hh = h * h
    y = hh + h
    h.name, hh.name, y.name = "h", "h*h", "y"
    h.retain_grad(), hh.retain_grad(), y.retain_grad()
    y.backward()
    return y


# ---- attention's causal mask -----------------------------------------------------------------
def draw_causal_mask(path: Path, text: str = "to be!") -> Path:
    """Two T x T grids for the characters of `text`: the additive mask (0 where query i may
    look at key j, -inf after) and softmax(scores + mask) for random scores."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T = len(text)
    bias = causal_bias(T, T, np.dtype(np.float64))  # tensorlite's own mask
    scores = np.random.default_rng(0).standard_normal((T, T))
    probs = softmax(tl.Tensor(scores + bias)).data  # (T, T): rows sum to 1
    fig = Figure(figsize=(9.5, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    labels = [repr(ch)[1:-1] if ch != " " else "␣" for ch in text]
    left.imshow(np.isfinite(bias), cmap="Blues", vmin=-0.3, vmax=1.6)
    right.imshow(probs, cmap="Oranges", vmin=0, vmax=1)
    for i in range(T):
        for j in range(T):
            left.text(j, i, "0" if np.isfinite(bias[i, j]) else "−∞", ha="center",
                      va="center", fontsize=10, color="black" if j <= i else "#888888")
            right.text(j, i, f"{probs[i, j]:.2f}", ha="center", va="center", fontsize=9)
    for ax, title in ((left, "mask added to the scores"), (right, "softmax(scores + mask)")):
        ax.set_xticks(range(T), labels)
        ax.set_yticks(range(T), [f"{ch}  (t={t})" for t, ch in enumerate(labels)])
        ax.set_xlabel("key j (the position looked at)")
        ax.set_ylabel("query i (the position predicting)")
        ax.set_title(title)
    fig.savefig(path, format="png")
    return path


# ---- one transformer block, with shapes ------------------------------------------------------
BLOCK_STEPS = [  # (text, shape, kind): kind "x" the residual stream, "op" a step, "add" a sum
    ("x", "(B*T, C)", "x"),
    ("rms_norm(x) · ln_1.weight", "(B*T, C)", "op"),
    ("@ attn.c_attn.weight", "(B*T, 3C)", "op"),
    ("split q, k, v into H heads", "(B, H, T, hd) each", "op"),
    ("softmax(q kᵀ/√hd + mask) v", "(B, H, T, hd)", "op"),
    ("heads side by side", "(B*T, C)", "op"),
    ("@ attn.c_proj.weight", "(B*T, C)", "op"),
    ("x + attention", "(B*T, C)", "add"),
    ("rms_norm(x) · ln_2.weight", "(B*T, C)", "op"),
    ("@ mlp.c_fc.weight", "(B*T, 4C)", "op"),
    ("relu(·)²", "(B*T, 4C)", "op"),
    ("@ mlp.c_proj.weight", "(B*T, C)", "op"),
    ("x + mlp", "(B*T, C)", "add"),
]


def draw_block(path: Path) -> Path:
    """Block h.i of gpt/model.py top to bottom, its shapes on the right and the two residual
    connections on the left."""
    adds = [i for i, (_, _, kind) in enumerate(BLOCK_STEPS) if kind == "add"]
    return draw_steps(path, BLOCK_STEPS, "one transformer block (h.i)",
                      residuals=[(0, adds[0]), (adds[0], adds[1])])


# ---- backward on the a, b, c, f graph, frame by frame (tl.trace_backward) --------------------
def abcf_forward(retain: bool = False) -> tl.Tensor:
    """L = (a*b + c) * f before backward, every node named (with retain, the inner nodes
    e, d and L keep their grads after a backward)."""
    a = tl.Tensor(2.0, requires_grad=True, name="a")
    b = tl.Tensor(-3.0, requires_grad=True, name="b")
    c = tl.Tensor(10.0, requires_grad=True, name="c")
    f = tl.Tensor(-2.0, requires_grad=True, name="f")
    e = a * b
    d = e + c
    L = d * f
    e.name, d.name, L.name = "e", "d", "L"
    if retain:
        e.retain_grad(), d.retain_grad(), L.retain_grad()
    return L


def backward_frames() -> tuple[dict, list, list[dict]]:
    """The graph of abcf_forward() (parsed DOT nodes and edges) and one frame per step of
    tl.trace_backward: {"step", "grads" (DOT id -> gradient received so far), "node",
    "op", "red" (the edges the step's op sent gradients along)}."""
    L = abcf_forward()
    nodes, edges = parse_dot(L.to_dot())
    ids = {id(x): f"t{i}" for i, x in enumerate(tensors_in_order(L))}  # as to_dot numbers them
    grads = {ids[id(L)]: 1.0}
    frames = []
    for step in tl.trace_backward(L):
        me = ids[id(step.node)]
        red = set()
        for parent, g in step.sends:
            grads[ids[id(parent)]] = grads.get(ids[id(parent)], 0.0) + float(g)
            red.add((ids[id(parent)], f"op_{me}"))
        frames.append({"step": step, "grads": dict(grads), "node": me,
                       "op": f"op_{me}" if step.op else None, "red": red})
    return nodes, edges, frames


def draw_backward_frames(path: Path) -> Path:
    """A grid of frames, one per node that backward visits: the node orange, its op's edges
    red, every gradient known so far written in its box."""
    nodes, edges, frames = backward_frames()
    pos = layout(nodes, edges)
    cols, rows = 2, (len(frames) + 1) // 2
    fig = new_figure((13, 3.0 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, frame in zip(axes, frames):
        step = frame["step"]
        lines = {}
        for n, node in nodes.items():
            if not node["op"]:
                kept = [s for s in node["lines"] if not s.startswith(("shape", "grad"))]
                g = frame["grads"].get(n)
                lines[n] = kept + ([f"grad {g:g}"] if g is not None else ["grad ?"])
        fill = {frame["node"]: "#f9c784"}
        if frame["op"]:
            fill[frame["op"]] = "#f9c784"
        draw_graph(ax, nodes, edges, pos, lines=lines, fill=fill, red=frame["red"], fontsize=8)
        name = step.node.name
        if step.op:
            sent = ", ".join(f"{p.name} {float(g):g}" for p, g in step.sends)
            what = f"{name} has its whole gradient {float(step.grad):g}; {step.op}.backward sends {sent}"
        else:
            what = f"{name} is a leaf: its gradient {float(step.grad):g} goes into {name}.grad"
        ax.set_title(f"step {step.index + 1}: {what}", fontsize=9.5)
    for ax in axes[len(frames):]:
        ax.axis("off")
    fig.suptitle("backward on L = (a·b + c)·f, one node at a time (tl.trace_backward(L))",
                 fontsize=12)
    fig.savefig(path, format="png")
    return path


# ---- the T = 3 attention example of gpt.md, with its numbers ---------------------------------
def attention_example() -> dict[str, np.ndarray]:
    """Every intermediate of gpt.md's example, computed the way the model does: qkv = x @
    c_attn, scores, the causal mask, softmax, P v (checked against F.causal_self_attention)."""
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (T, C)
    c_attn = np.hstack([np.eye(2), 2 * np.eye(2), np.eye(2)])  # (C, 3C)
    qkv = x @ c_attn  # (T, 3C)
    q, k, v = qkv[:, 0:2], qkv[:, 2:4], qkv[:, 4:6]
    scores = q @ k.T / np.sqrt(2)  # (T, T)
    masked = scores + causal_bias(3, 3, np.dtype(np.float64))
    P = softmax(tl.Tensor(masked)).data
    y = P @ v
    fused = F.causal_self_attention(tl.Tensor(qkv[None]), 1).data[0]  # the op training calls
    assert np.allclose(y, fused) and np.allclose(P, attention_probabilities(q, k))
    return {"x": x, "q": q, "k": k, "v": v, "scores": scores, "masked": masked, "P": P, "y": y}


def matrix_panel(ax, a: np.ndarray, title: str, cmap: str = "Blues", fmt: str = "{:.3g}") -> None:
    """A small matrix with its numbers written in the cells (-inf shown as −∞, greyed)."""
    finite = np.where(np.isfinite(a), a, np.nan)
    ax.imshow(finite, cmap=cmap, vmin=min(0.0, np.nanmin(finite)), vmax=np.nanmax(finite) * 1.6 + 1e-9)
    for (i, j), value in np.ndenumerate(a):
        text = "−∞" if np.isneginf(value) else fmt.format(round(float(value), 3))
        ax.text(j, i, text, ha="center", va="center", fontsize=10,
                color="#888888" if np.isneginf(value) else "black")
    ax.set_xticks(range(a.shape[1]))
    ax.set_yticks(range(a.shape[0]), [f"t={i}" for i in range(a.shape[0])])
    ax.set_title(title, fontsize=10)


def draw_attention_numbers(path: Path) -> Path:
    """gpt.md's T = 3 example in eight panels, each an intermediate with its real numbers."""
    ex = attention_example()
    fig = new_figure((13, 6.4), layout="constrained")
    axes = fig.subplots(2, 4)
    panels = [("x", "x (T, C): the input rows", "Greys"),
              ("q", "q = x @ c_attn[:, 0:2]", "Blues"),
              ("k", "k = x @ c_attn[:, 2:4]", "Greens"),
              ("v", "v = x @ c_attn[:, 4:6]", "Purples"),
              ("scores", "scores = q kᵀ / √hd (query i, key j)", "Oranges"),
              ("masked", "+ causal mask: −∞ where j > i", "Oranges"),
              ("P", "P = softmax by row (rows sum to 1)", "Reds"),
              ("y", "P v: each row a weighted mean of v", "Purples")]
    for ax, (key, title, cmap) in zip(axes.ravel(), panels):
        matrix_panel(ax, ex[key], title, cmap)
    fig.suptitle("attention with numbers (docs/gpt.md, T = 3, one head, hd = 2): "
                 "top row x → q, k, v; bottom row scores → mask → softmax → P v", fontsize=11)
    fig.savefig(path, format="png")
    return path


# ---- heads split and joined ------------------------------------------------------------------
def heads_example(T: int = 4, H: int = 2, hd: int = 3) -> dict[str, np.ndarray]:
    """Which feature column of q (B*T, C) each head sees, by the reshape gpt/model.py and
    tensorlite.functional use: (B, T, 3, H, hd) transposed to (3, B, H, T, hd), B = 1."""
    C = H * hd
    qkv = np.tile(np.arange(3 * C, dtype=float), (T, 1))  # (T, 3C): each cell its column index
    heads = qkv.reshape(1, T, 3, H, hd).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hd): views
    q_heads = heads[0, 0]  # (H, T, hd)
    joined = q_heads[None].transpose(0, 2, 1, 3).reshape(T, C)  # heads side by side again
    assert np.shares_memory(heads, qkv) and np.array_equal(joined, qkv[:, :C])
    return {"q": qkv[:, :C], "heads": q_heads, "joined": joined}


def draw_heads(path: Path, T: int = 4, H: int = 2, hd: int = 3) -> Path:
    """q's C = H·hd columns coloured by head, each head's (T, hd) slice, and the join."""
    from matplotlib.patches import Rectangle

    ex = heads_example(T, H, hd)
    colors = ["#cfe3f7", "#fde2c8", "#d9f2d0", "#eadcf2"]
    fig = new_figure((12, 3.6), layout="constrained")
    axes = fig.subplots(1, H + 2, width_ratios=[H * hd] + [hd] * H + [H * hd])

    def grid(ax, cols: np.ndarray, title: str) -> None:
        ax.set_xlim(-0.5, cols.shape[1] - 0.5)
        ax.set_ylim(cols.shape[0] - 0.5, -0.5)
        for (i, j), c in np.ndenumerate(cols):
            head = int(c) // hd
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fc=colors[head % len(colors)],
                                   ec="white", lw=2))
            ax.text(j, i, f"c{int(c)}", ha="center", va="center", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks(range(cols.shape[0]), [f"t={i}" for i in range(cols.shape[0])])
        ax.set_title(title, fontsize=10)

    grid(axes[0], ex["q"], f"q (T, C), C = {H * hd}: feature c of position t")
    for h in range(H):
        grid(axes[1 + h], ex["heads"][h], f"head {h}: (T, hd) = (T, {hd})")
    grid(axes[-1], ex["joined"], "heads side by side again (T, C)")
    fig.suptitle(f"split into H = {H} heads (views, no copies) → each attends on its own → joined: "
                 "c_proj then mixes the heads", fontsize=11)
    fig.savefig(path, format="png")
    return path


# ---- the whole model, token ids to loss ------------------------------------------------------
def model_steps(config: GPTConfig, B: int) -> list[tuple[str, str, str]]:
    """(text, shape, kind) from token ids to the loss, with this config's numbers; the
    shapes of the logits and the loss are checked by running the model once."""
    C, V, T, L = config.n_embd, config.vocab_size, config.block_size, config.n_layer
    logits, loss = GPT(config)(np.zeros((B, T), dtype=np.int64), np.zeros((B, T), dtype=np.int64))
    assert logits.shape == (B, T, V) and loss.shape == ()
    return [
        ("idx: token ids", f"(B, T) = ({B}, {T})", "x"),
        ("wte[idx]: one row of wte per token", f"(B*T, C) = ({B * T}, {C})", "op"),
        ("+ wpe[0:T]: one row per position", f"(B*T, C) = ({B * T}, {C})", "add"),
        ("dropout (training only)", f"(B*T, C) = ({B * T}, {C})", "op"),
        (f"{L} blocks h.0 … h.{L - 1}, one after another", f"(B*T, C) = ({B * T}, {C})", "block"),
        ("rms_norm(x) · ln_f.weight", f"(B*T, C) = ({B * T}, {C})", "op"),
        ("@ lm_head.weight: logits", f"(B*T, V) = ({B * T}, {V})", "op"),
        ("cross_entropy(logits, targets)", "targets: idx shifted by one", "op"),
        ("loss: mean over B*T positions", "() a scalar", "x"),
    ]


def draw_steps(path: Path, steps: list, title: str, residuals: list[tuple[int, int]] = ()) -> Path:
    """Boxes top to bottom with their shapes on the right, arrows between, and red
    residual lines on the left from step i to step j for each (i, j) in `residuals`."""
    n = len(steps)
    fig = new_figure((7.2, 0.62 * n + 0.6))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-3.2, 5.0)
    ax.set_ylim(-n + 0.3, 1.1)
    ax.axis("off")
    colors = {"x": "#cfe3f7", "op": "#eeeeee", "add": "#fde2c8", "block": "#d9f2d0"}
    ys = [-i for i in range(n)]
    boxes = []
    for (text, shape, kind), y in zip(steps, ys):
        boxes.append(ax.text(0, y, text, ha="center", va="center", fontsize=10,
                             bbox={"boxstyle": "round,pad=0.35", "fc": colors[kind], "ec": "#555555"}))
        ax.text(2.45, y, shape, ha="left", va="center", fontsize=9.5, family="monospace",
                color="#1f4e79")
    for y0, y1 in itertools.pairwise(ys):
        ax.annotate("", xy=(0, y1 + 0.28), xytext=(0, y0 - 0.28),
                    arrowprops={"arrowstyle": "->", "color": "#333333"})
    fig.canvas.draw()  # now the boxes have sizes: the residual lines start at their left edges
    to_data = ax.transData.inverted()

    def left_edge(box) -> float:
        return to_data.transform(box.get_bbox_patch().get_window_extent())[0, 0]

    red = "#c0504d"
    for start, end in residuals:
        x1, y0, y1 = left_edge(boxes[end]), ys[start], ys[end]
        ax.plot([left_edge(boxes[start]), -2.3, -2.3], [y0, y0, y1], color=red, lw=1.6)
        ax.annotate("", xy=(x1, y1), xytext=(-2.3, y1),
                    arrowprops={"arrowstyle": "->", "color": red, "lw": 1.6, "shrinkA": 0, "shrinkB": 0})
        ax.text(-2.4, (y0 + y1) / 2, "residual", rotation=90, ha="right", va="center",
                fontsize=9, color=red)
    ax.text(0.9, 0.8, title, ha="center", fontsize=11, fontweight="bold")
    fig.savefig(path, format="png")
    return path


def draw_model(path: Path) -> Path:
    """The whole GPT of the default run (train.txt's 55 symbols), token ids to loss."""
    config = GPTConfig(vocab_size=55, block_size=64, n_layer=4, n_head=8, n_embd=128)
    return draw_steps(path, model_steps(config, B=12),
                      "the whole model, token ids to loss (the default run's sizes)")


# ---- pictures of trained runs: the baby run (from its saved numbers), the digit reversal -----
DATA = Path(__file__).resolve().parent / "data"
BABY_PROMPT = "ROMEO: Is she dead? Speak!"


def save_baby_data(run: Path) -> None:
    """Keep what the baby run's two pictures need in docs/data/ (small files): its metrics,
    its config, and the attention maps of its best checkpoint on BABY_PROMPT."""
    from gpt.checkpoint import load_model
    from gpt.metrics import read_metrics
    from gpt.plot import run_config

    DATA.mkdir(exist_ok=True)
    records = read_metrics(run / "metrics.jsonl")
    (DATA / "baby-metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = run_config(run)
    train = config.get("train", {})  # paths of this machine: kept as the README writes them
    train.update(data=Path(train.get("data", "shakespeare.txt")).name, out_dir="baby")
    (DATA / "baby-config.json").write_text(json.dumps(config, indent=1) + "\n")
    model, tokenizer = load_model(str(run))
    ids = tokenizer.encode(BABY_PROMPT)
    np.savez_compressed(DATA / "attention-baby.npz", maps=model.attention_maps(ids).astype(np.float32),
                        labels=np.array([tokenizer.decode([i]) for i in ids]))


def draw_baby_loss(path: Path) -> Path:
    from gpt.metrics import read_metrics
    from gpt.plot import plot_metrics, run_title

    config = json.loads((DATA / "baby-config.json").read_text())
    records = read_metrics(DATA / "baby-metrics.jsonl")
    return plot_metrics(records, path, title=run_title(Path("baby"), config),
                        vocab_size=config["model"]["vocab_size"])


def draw_baby_attention(path: Path) -> Path:
    """Layers 0 and the last of the baby run's attention on BABY_PROMPT, at a size whose
    labels read at page width; previous-token heads framed (gpt.plot.plot_attention)."""
    from gpt.plot import plot_attention

    saved = np.load(DATA / "attention-baby.npz")
    maps, labels = saved["maps"], [str(s) for s in saved["labels"]]
    last = maps.shape[0] - 1
    return plot_attention(maps[[0, last]], labels, path, layers=[0, last], columns=2,
                          title=f"the baby run's attention on {BABY_PROMPT!r} "
                                f"(layers 0 and {last} of {last + 1}, 4 heads each)")


def draw_reverse_attention(path: Path) -> Path:
    """The digit-reversal toy of gpt.md, trained here (100 steps, seed 0), on one string."""
    spec = importlib.util.spec_from_file_location(
        "reverse_digits", Path(__file__).resolve().parent.parent / "examples" / "reverse_digits.py")
    reverse_digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reverse_digits)
    model, _ = reverse_digits.train(100, seed=0, verbose=False)
    reverse_digits.draw_attention(model, str(path))
    return path


# ---- number formats: float32, bfloat16, float16 (docs/mixed-precision.md) ----------------------
def float_layouts(x: float = np.pi) -> list[tuple[str, str, tuple[int, int, int]]]:
    """(name, bit string, (sign, exponent, mantissa) widths) of x in float32, bfloat16 (by
    tensorlite.bf16's rounding) and float16."""
    from tensorlite.references import bfloat16_bits

    f32 = int(np.float32(x).view(np.uint32))
    bf16 = int(bfloat16_bits(np.float32(x)))
    f16 = int(np.float16(x).view(np.uint16))
    return [("float32", f"{f32:032b}", (1, 8, 23)), ("bfloat16", f"{bf16:016b}", (1, 8, 7)),
            ("float16", f"{f16:016b}", (1, 5, 10))]


def draw_float_layouts(path: Path, x: float = np.pi) -> Path:
    """The bits of x in float32, bfloat16 and float16, sign / exponent / mantissa coloured:
    bf16 is float32's upper half (the same exponent range), float16 trades exponent bits
    for mantissa bits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = float_layouts(x)
    fig = Figure(figsize=(10.5, 3.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-5.5, 38.5)
    ax.set_ylim(-3.5, 1.5)
    ax.axis("off")
    colors = ("#f4b6b6", "#b9d7f0", "#c9e8c1")  # sign, exponent, mantissa
    for r, (name, bits, widths) in enumerate(rows):
        y = -r * 1.1
        ax.text(-0.5, y + 0.4, name, ha="right", va="center", fontsize=11, family="monospace")
        field = np.repeat([0, 1, 2], widths)
        for i, bit in enumerate(bits):
            ax.add_patch(Rectangle((i, y), 1, 0.8, fc=colors[field[i]], ec="#555555", lw=0.6))
            ax.text(i + 0.5, y + 0.4, bit, ha="center", va="center", fontsize=9, family="monospace")
        if name == "bfloat16":  # its bits are the upper half of a float32
            value = float(np.array(int(bits, 2) << 16, dtype=np.uint32).view(np.float32))
        else:
            value = float(np.float32(x) if name == "float32" else np.float16(x))
        ax.text(len(bits) + 0.4, y + 0.4, f"= {value:.7g}", va="center", fontsize=9.5)
    for k, label in enumerate(("sign", "exponent", "mantissa (fraction)")):
        ax.add_patch(Rectangle((4 + 9 * k, 0.95), 0.8, 0.3, fc=colors[k], ec="#555555", lw=0.6))
        ax.text(5 + 9 * k, 1.1, label, va="center", fontsize=9.5)
    ax.text(16.5, -3.1, f"x = {x:.10g}: bfloat16 keeps float32's sign and 8 exponent bits and rounds "
            "the mantissa to 7", ha="center", fontsize=9.5)
    fig.savefig(path, format="png")
    return path


def draw_serve_page(path: Path) -> Path:
    """gpt.serve's page after streaming a completion: the default run trained into a scratch
    folder (named `story`, the name the page shows), served on loopback, and the browser test's
    screenshot of it kept."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "story"
        steps = [([sys.executable, "-m", "gpt.train", "--out-dir", str(run)], {}),
                 ([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "tests/gpt/test_serve_page.py"],
                  {"GPT_SCREENSHOT": str(path.resolve()), "GPT_SCREENSHOT_RUN": str(run)})]
        for command, env in steps:
            r = subprocess.run(command, cwd=root, env={**os.environ, **env}, capture_output=True,
                               text=True, check=False)
            if r.returncode != 0:
                last = (r.stdout + r.stderr).strip().splitlines()[-1:] or ["no output"]
                raise SystemExit(f"error: {path.name}: `{' '.join(command[1:4])}` failed "
                                 f"({last[0][:200]}); the page needs the test extra and "
                                 "chromium + chromium-driver")
    return path


PICTURES = {  # every picture in docs/img/, and the function that draws it
    "float-layouts.png": draw_float_layouts,
    "graph-abcf.png": lambda p: draw_dot(abcf_graph().to_dot(), p, "L = (a·b + c)·f after L.backward()"),
    "graph-diamond.png": lambda p: draw_dot(diamond_graph().to_dot(), p, "y = h·h + h, h = exp(a)"),
    "backward-frames.png": draw_backward_frames,
    "causal-mask.png": draw_causal_mask,
    "attention-numbers.png": draw_attention_numbers,
    "heads.png": draw_heads,
    "block.png": draw_block,
    "model.png": draw_model,
    "baby-loss.png": draw_baby_loss,
    "attention-baby.png": draw_baby_attention,
    "attention-reverse.png": draw_reverse_attention,
    "serve-page.png": draw_serve_page,
}
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the pictures of docs/ into docs/img/.")
    parser.add_argument("--out-dir", default=str(IMG), help="folder to write into (default docs/img)")
    parser.add_argument("--from-run", metavar="RUN",
                        help="first refresh docs/data/ from a baby run's folder (gpt.train --preset "
                             "baby on Tiny Shakespeare): its metrics, config and attention maps")
    args = parser.parse_args(argv)
    if args.from_run:
        save_baby_data(Path(args.from_run))
    out = Path(args.out_dir)
    if not out.is_dir():
        print(f"error: folder {out} does not exist: create it or pick another --out-dir",
              file=sys.stderr)
        return 1
    for name, draw in PICTURES.items():
        print(f"wrote {draw(out / name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
