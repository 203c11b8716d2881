"""Graded exercises: you write a piece of the engine or the model, a grader answers with the
smallest counterexample it can find. `python -m tensorlite.exercises list | start DIR |
check NAME | hint NAME` (see __main__.py and docs/exercises.md).

The starters ship in starters/ (one NAME.py each: the functions to write, raising
NotImplementedError); the graders live in engine.py and transformer.py; the reference
solutions are examples/exercises/NAME.py in the repository.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import engine, transformer

STARTERS = Path(__file__).parent / "starters"


@dataclass(frozen=True)
class Exercise:
    name: str
    title: str
    doc: str  # the page under docs/, e.g. "autograd.md"
    section: str  # a heading of that page, as written there
    hints: tuple[str, ...]
    grade: Callable  # grade(module, examples) -> what was checked; raises grader.Failure

    @property
    def starter(self) -> Path:
        return STARTERS / f"{self.name}.py"


EXERCISES = [
    Exercise(
        "slope_by_nudging", "A slope by nudging: the gradient by central differences",
        "autograd.md", "0. A gradient is a slope",
        ("Nudge one element at a time: copy x, add eps to that one element, and call f.",
         ("The slope along element i is (f(x + eps e_i) - f(x - eps e_i)) / (2 eps): a central "
         "difference. A one-sided (f(x + eps e_i) - f(x)) / eps is off by about eps * f''/2."),
         ("np.ndindex(x.shape) visits every element index, the 0-d shape () included; write the "
         "slopes into np.zeros_like(x) at the same index.")),
        engine.grade_slope_by_nudging),
    Exercise(
        "backward_driver", "The topological sort and the backward driver",
        "autograd.md", "4. How backward walks the graph",
        (("topological_order: a depth-first search that appends a node after all of its parents. "
         "Keep a set of the nodes already visited (by identity) so a node reached twice is "
         "listed once."),
         ("Without recursion: a stack of (node, expanded) pairs. Pop one; if expanded, append it "
         "to the order; else push (node, True), then (parent, False) for each unvisited parent."),
         ("backward: root.grad = 1.0, then walk the order in reverse, and for each parent p with "
         "local derivative g do p.grad += node.grad * g. Add, never assign: x * x lists x twice.")),
        engine.grade_backward_driver),
    Exercise(
        "mul_backward", "Mul's backward with broadcasting: unbroadcast",
        "autograd.md", "Broadcasting: one rule, `unbroadcast`",
        (("Broadcasting copies an input along new leading axes and along its size-1 axes; the "
         "gradient of a copied value is the sum of the gradients of its copies."),
         ("unbroadcast: first sum over the grad.ndim - len(shape) leading axes, then over each "
         "axis where shape has a 1 and grad does not, with keepdims=True."),
         "mul_backward: dx = unbroadcast(dout * y, x.shape), dy = unbroadcast(dout * x, y.shape)."),
        engine.grade_mul_backward),
    Exercise(
        "matmul_backward", "MatMul's backward: a linear layer over a batch",
        "autograd.md", "Matrix multiplication",
        (("Check shapes first: dx must be shaped like x (..., N, C), dw like w (C, K), and dout "
         "is (..., N, K)."),
         "dx = dout @ w.T. For dw, each batch element adds its own x_b.T @ dout_b.",
         "dw: fold the batch axes into the rows: x.reshape(-1, C).T @ dout.reshape(-1, K)."),
        engine.grade_matmul_backward),
    Exercise(
        "max_backward", "Max's backward, ties included",
        "autograd.md", "Reductions",
        ("The gradient flows only to the elements that are the maximum; all others get 0.",
         ("Put the reduced axis back with np.expand_dims(out, axis) (and the same for dout) so "
         "they broadcast against x; x == out marks the maxima."),
         ("With ties, split dout evenly: divide by the number of maxima along the axis, "
         "(x == out).sum(axis, keepdims=True).")),
        engine.grade_max_backward),
    Exercise(
        "softmax_backward", "Softmax's backward",
        "derivations.md", "Softmax",
        ("With p = softmax(x): dp_i/dx_j = p_i (delta_ij - p_j).",
         ("Contract that with dout: dx = p * (dout - sum(dout * p)), the sum over the last axis "
         "with keepdims=True.")),
        engine.grade_softmax_backward),
    Exercise(
        "cross_entropy", "Cross-entropy, forward (stable) and fused backward",
        "derivations.md", "Log-softmax and cross-entropy",
        (("loss_n = logsumexp(logits_n) - logits_n[target_n], and the loss is their mean. "
         "Subtract each row's max before exp: exp(800) overflows."),
         "dlogits = (softmax(logits) - onehot(targets)) / N, times dout (a scalar: dL/dloss).",
         "onehot in place: p[np.arange(N), targets] -= 1."),
        engine.grade_cross_entropy),
    Exercise(
        "rms_norm_backward", "RMSNorm's backward",
        "derivations.md", "RMSNorm",
        (("Name the pieces: r = 1/sqrt(mean(x**2) + eps) per row (keepdims), xhat = x * r, "
         "y = xhat * w."),
         "dw sums dout * xhat over every row (all axes but the last). Let dxhat = dout * w.",
         ("dx = r * (dxhat - xhat * mean(dxhat * xhat)), the mean over the last axis: r depends "
         "on every element of its row, hence the second term.")),
        engine.grade_rms_norm_backward),
    Exercise(
        "attention_backward", "Causal attention's backward for q, k and v",
        "derivations.md", "Causal attention",
        (("Recompute the forward: S = q k^T * s (s = 1/sqrt(D)), the mask, P = softmax(S), "
         "out = P v. Then go backward one product at a time."),
         "dv = P^T dout and dP = dout v^T. dS is softmax's backward: P * (dP - sum(dP * P, -1)).",
         "dq = dS k * s and dk = dS^T q * s. The masked entries have P = 0, so dS is 0 there."),
        engine.grade_attention_backward),
    Exercise(
        "hessian_vector_product", "A Hessian-vector product: differentiate the gradient",
        "higher-order.md", "2. Hessian-vector products",
        (("tl.grad(y, [x], create_graph=True) returns the gradient as a Tensor with a graph of "
         "its own, so it can be differentiated again."),
         ("H v is the gradient of <grad f(x), v> with v held constant: a scalar, so one more "
         "tl.grad gives it."),
         ("x = tl.Tensor(x, requires_grad=True); (g,) = tl.grad(f(x), [x], create_graph=True); "
          "(hv,) = tl.grad((g * v).sum(), [x]); return hv.data.")),
        engine.grade_hessian_vector_product),
    Exercise(
        "softmax_jvp", "A forward-mode rule: softmax's JVP",
        "higher-order.md", "4. Forward mode: Jacobian-vector products",
        ("A JVP pushes a tangent forward: dp = J dx, where J is softmax's Jacobian.",
         "dp_i = sum_j p_i (delta_ij - p_j) dx_j = p_i (dx_i - sum_j p_j dx_j).",
         "dp = p * (dx - sum(p * dx, axis=-1, keepdims=True))."),
        engine.grade_softmax_jvp),
    Exercise(
        "adamw_step", "One AdamW step with bias correction",
        "gpt.md", "AdamW",
        ("Update the moments first: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2.",
         ("Bias-correct with the step t (1 at the first step): m_hat = m / (1 - b1**t), "
         "v_hat = v / (1 - b2**t). At t = 1 with zero moments, m_hat = g."),
         ("p_new = p - lr * wd * p - lr * m_hat / (sqrt(v_hat) + eps): the decay scales p itself "
         "(decoupled), it is not added to g.")),
        transformer.grade_adamw_step),
    Exercise(
        "top_p", "Top-p (nucleus) filtering",
        "gpt.md", "Sampling and the KV cache",
        (("Sort the token ids by probability, most probable first; a stable sort of -probs keeps "
         "the lower id first among ties."),
         ("np.cumsum of the sorted probabilities; keep tokens up to and including the first "
         "whose running total reaches p (>= p), so at least one token is kept."),
         "Zero the others in a copy and divide by the kept total."),
        transformer.grade_top_p),
    Exercise(
        "kv_cache_decode", "One KV-cache decode step that matches the full forward",
        "gpt.md", "Sampling and the KV cache",
        (("Project the one new row: qkv = x_new @ w_qkv, (3C,); split into q, k, v of (H, hd) "
         "each, in the same layout attention_layer uses."),
         ("Write k and v at position cache.length of cache.k and cache.v, then add 1 to "
         "cache.length. The new query sees every cached key, itself included: no mask needed."),
         ("With L = cache.length keys (H, L, hd): scores = np.einsum('hd,hld->hl', q, keys) "
          "/ sqrt(hd); softmax over L; y = np.einsum('hl,hld->hd', weights, values); then "
          "y.reshape(C) @ w_out.")),
        transformer.grade_kv_cache_decode),
]

BY_NAME = {e.name: e for e in EXERCISES}
