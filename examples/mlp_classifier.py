"""A tiny MLP learns to separate two interleaved half-moons: micrograd's demo, on tensors.

Everything is visible: the data is made with NumPy, the model is three weight matrices,
the loss is `tensorlite.functional.cross_entropy`, and the optimizer is four lines of SGD.

    python examples/mlp_classifier.py                 # 300 steps, a couple of seconds
    python examples/mlp_classifier.py --steps 50 --seed 1
"""

from __future__ import annotations

import argparse
from itertools import pairwise

import numpy as np

import tensorlite as tl
from tensorlite.functional import cross_entropy


def make_moons(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles in 2-D: points (n, 2) float64, labels (n,) in {0, 1}."""
    half = n // 2
    angle = rng.uniform(0, np.pi, size=n)
    upper = np.stack([np.cos(angle[:half]), np.sin(angle[:half])], axis=1)  # (n/2, 2)
    lower = np.stack([1 - np.cos(angle[half:]), 0.5 - np.sin(angle[half:])], axis=1)
    x = np.concatenate([upper, lower]) + noise * rng.standard_normal((n, 2))
    x = (x - x.mean(axis=0)) / x.std(axis=0)  # centred, unit variance: easier to learn
    y = np.concatenate([np.zeros(half, dtype=np.int64), np.ones(n - half, dtype=np.int64)])
    return x, y


class MLP:
    """Linear -> tanh -> Linear -> tanh -> Linear, producing one logit per class."""

    def __init__(self, sizes: list[int], rng: np.random.Generator):
        self.layers = []
        for n_in, n_out in pairwise(sizes):
            w = rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)  # keeps activations O(1)
            self.layers.append((tl.Tensor(w, requires_grad=True),
                                tl.Tensor(np.zeros(n_out), requires_grad=True)))

    def __call__(self, x: tl.Tensor) -> tl.Tensor:
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b  # (N, n_in) @ (n_in, n_out) + (n_out,) -> (N, n_out)
            if i < len(self.layers) - 1:
                x = x.tanh()
        return x  # (N, classes) logits

    def parameters(self) -> list[tl.Tensor]:
        return [p for layer in self.layers for p in layer]


def accuracy(logits: tl.Tensor, y: np.ndarray) -> float:
    return float((logits.data.argmax(axis=1) == y).mean())


def ascii_picture(model: MLP, x: np.ndarray, y: np.ndarray, rows: int = 15, cols: int = 48) -> str:
    """The learned decision regions (' ' and '.') with the data on top ('o' and 'x')."""
    lo, hi = x.min(axis=0) - 0.2, x.max(axis=0) + 0.2
    gx = np.linspace(lo[0], hi[0], cols)
    gy = np.linspace(hi[1], lo[1], rows)  # top row = largest y
    grid = np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2)  # (rows*cols, 2)
    with tl.no_grad():
        region = model(tl.Tensor(grid)).data.argmax(axis=1).reshape(rows, cols)
    canvas = np.where(region == 0, " ", ".").astype("<U1")
    col = np.clip(((x[:, 0] - lo[0]) / (hi[0] - lo[0]) * (cols - 1)).round().astype(int), 0, cols - 1)
    row = np.clip(((hi[1] - x[:, 1]) / (hi[1] - lo[1]) * (rows - 1)).round().astype(int), 0, rows - 1)
    canvas[row, col] = np.where(y == 0, "o", "x")
    return "\n".join("|" + "".join(line) + "|" for line in canvas)


def main(steps: int = 300, seed: int = 0, lr: float = 0.5, verbose: bool = True) -> float:
    """Train on 200 moons points with full-batch SGD; return the accuracy on 200 new points."""
    rng = np.random.default_rng(seed)
    x_np, y = make_moons(200, noise=0.15, rng=rng)
    x = tl.Tensor(x_np)  # (N, 2); data, so no gradient
    model = MLP([2, 16, 16, 2], rng)

    for step in range(steps + 1):
        logits = model(x)  # (N, 2)
        loss = cross_entropy(logits, y)
        if verbose and step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  accuracy {accuracy(logits, y):.3f}")
        if step == steps:
            break
        for p in model.parameters():
            p.grad = None  # .grad accumulates across backward calls, so clear it first
        loss.backward()
        for p in model.parameters():
            p.data -= lr * p.grad  # plain SGD: a small step downhill

    x_test, y_test = make_moons(200, noise=0.15, rng=rng)  # points the model never saw
    with tl.no_grad():
        test_acc = accuracy(model(tl.Tensor(x_test)), y_test)
    if verbose:
        print("decision regions: blank = class 0, '.' = class 1; data: o = class 0, x = class 1")
        print(ascii_picture(model, x_np, y))
        print(f"train accuracy {accuracy(logits, y):.3f}, test accuracy {test_acc:.3f}")
    return test_acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="SGD steps (full batch)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data and the weights")
    parser.add_argument("--lr", type=float, default=0.5, help="learning rate")
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed, lr=args.lr)
