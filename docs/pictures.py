"""Draw the pictures in docs/img/ from the project's own code:

    python docs/pictures.py                  # rewrites docs/img/{graph-abcf,graph-diamond,causal-mask,block,float-layouts}.png
    python docs/pictures.py --out-dir /tmp   # somewhere else

The two graphs are tensorlite's `to_dot()` text, parsed and laid out here and drawn with
matplotlib, so no Graphviz is needed (`dot -Tpng` draws the same text if you have it).
The mask is tensorlite's own causal bias; the block diagram lists gpt/model.py's steps; the
float layouts are pi's bits, rounded to bfloat16 by tensorlite.bf16.
matplotlib is the optional `plot` extra. (tests/test_pictures.py runs this script.)
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import tensorlite as tl
from tensorlite.functional import softmax
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


def draw_dot(text: str, path: Path, title: str = "") -> Path:
    """Draw `to_dot` text as a PNG: tensors as boxes (inputs that require grad blue,
    constants dashed), ops as rounded grey boxes, arrows input -> op -> output."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nodes, edges = parse_dot(text)
    pos = layout(nodes, edges)
    width = max(x for x, _ in pos.values()) + 1
    height = max(abs(y) for _, y in pos.values()) * 2 + 1.6
    fig = Figure(figsize=(1.55 * width + 0.4, 1.15 * height + 0.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 0.92 if title else 1))
    ax.set_xlim(-0.6, width - 0.4)
    ax.set_ylim(-height / 2, height / 2)
    ax.axis("off")
    artists = {}
    for n, node in nodes.items():
        x, y = pos[n]
        if node["op"]:
            box = {"boxstyle": "round,pad=0.4", "fc": "#eeeeee", "ec": "#555555"}
            artists[n] = ax.text(x, y, node["lines"][0], ha="center", va="center",
                                 fontsize=10, fontweight="bold", bbox=box)
        else:
            lines = [s for s in node["lines"] if not s.startswith("shape")]  # all 0-d here
            box = {"boxstyle": "square,pad=0.4", "fc": "#cfe3f7" if node["leaf"] else "white",
                       "ec": "black", "ls": "--" if node["const"] else "-"}
            artists[n] = ax.text(x, y, "\n".join(lines), ha="center", va="center",
                                 fontsize=9, family="monospace", bbox=box)
    for k, (s, d) in enumerate(edges):
        twins = [i for i, e in enumerate(edges) if e == (s, d)]  # x * x: two edges, two arcs
        if len(twins) > 1:
            rad = 0.3 * (twins.index(k) - (len(twins) - 1) / 2)
        else:  # an edge that jumps over a column arcs above it
            rad = -0.3 if pos[d][0] - pos[s][0] > 1 else 0.0
        ax.annotate("", xy=(0, 0.5), xycoords=artists[d], xytext=(1, 0.5),
                    textcoords=artists[s],
                    arrowprops={"arrowstyle": "->", "color": "#333333", "shrinkA": 4, "shrinkB": 4,
                                    "connectionstyle": f"arc3,rad={rad}"})
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, format="png")
    return path


# ---- the two graphs of docs/autograd.md ------------------------------------------------------
def abcf_graph() -> tl.Tensor:
    """L = (a*b + c) * f after L.backward(), every node named and keeping its grad."""
    a = tl.Tensor(2.0, requires_grad=True, name="a")
    b = tl.Tensor(-3.0, requires_grad=True, name="b")
    c = tl.Tensor(10.0, requires_grad=True, name="c")
    f = tl.Tensor(-2.0, requires_grad=True, name="f")
    e = a * b
    d = e + c
    L = d * f
    e.name, d.name, L.name = "e", "d", "L"
    e.retain_grad(), d.retain_grad(), L.retain_grad()
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(BLOCK_STEPS)
    fig = Figure(figsize=(6.4, 0.62 * n + 0.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-3.2, 4.2)
    ax.set_ylim(-n + 0.3, 1.1)
    ax.axis("off")
    colors = {"x": "#cfe3f7", "op": "#eeeeee", "add": "#fde2c8"}
    ys = [-i for i in range(n)]
    boxes = []
    for (text, shape, kind), y in zip(BLOCK_STEPS, ys):
        boxes.append(ax.text(0, y, text, ha="center", va="center", fontsize=10,
                             bbox={"boxstyle": "round,pad=0.35", "fc": colors[kind], "ec": "#555555"}))
        ax.text(2.35, y, shape, ha="left", va="center", fontsize=9.5, family="monospace",
                color="#1f4e79")
    for y0, y1 in itertools.pairwise(ys):
        ax.annotate("", xy=(0, y1 + 0.28), xytext=(0, y0 - 0.28),
                    arrowprops={"arrowstyle": "->", "color": "#333333"})
    fig.canvas.draw()  # now the boxes have sizes: the residual lines start at their left edges
    to_data = ax.transData.inverted()

    def left_edge(box) -> float:
        return to_data.transform(box.get_bbox_patch().get_window_extent())[0, 0]

    adds = [i for i, (_, _, kind) in enumerate(BLOCK_STEPS) if kind == "add"]
    red = "#c0504d"
    for start, end in ((0, adds[0]), (adds[0], adds[1])):
        x0, x1, y0, y1 = left_edge(boxes[start]), left_edge(boxes[end]), ys[start], ys[end]
        ax.plot([x0, -2.3, -2.3], [y0, y0, y1], color=red, lw=1.6)
        ax.annotate("", xy=(x1, y1), xytext=(-2.3, y1),
                    arrowprops={"arrowstyle": "->", "color": red, "lw": 1.6, "shrinkA": 0, "shrinkB": 0})
        ax.text(-2.4, (y0 + y1) / 2, "residual", rotation=90, ha="right", va="center",
                fontsize=9, color=red)
    ax.text(0, 0.8, "one transformer block (h.i)", ha="center", fontsize=11, fontweight="bold")
    fig.savefig(path, format="png")
    return path


def float_layouts(x: float = np.pi) -> list[tuple[str, str, tuple[int, int, int]]]:
    """(name, bit string, (sign, exponent, mantissa) widths) of x in float32, bfloat16 (by
    tensorlite.bf16's rounding) and float16."""
    from tensorlite.bf16 import bfloat16_bits

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


PICTURES = {
    "graph-abcf.png": lambda p: draw_dot(abcf_graph().to_dot(), p, "L = (a·b + c)·f after L.backward()"),
    "graph-diamond.png": lambda p: draw_dot(diamond_graph().to_dot(), p, "y = h·h + h, h = exp(a)"),
    "causal-mask.png": draw_causal_mask,
    "block.png": draw_block,
    "float-layouts.png": draw_float_layouts,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the pictures of docs/ into docs/img/.")
    parser.add_argument("--out-dir", default=str(IMG), help="folder to write into (default docs/img)")
    args = parser.parse_args(argv)
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
