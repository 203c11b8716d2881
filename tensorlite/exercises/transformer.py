"""The graders of the model's exercises (docs/gpt.md): one AdamW step, top-p filtering, and
one KV-cache decode step that must match the full forward.

The expected values come from the formulas written out below (AdamW, top-p) and from
tensorlite's causal_self_attention, the op the model trains with (the decode step).
tensorlite does not import gpt, so these few lines restate gpt/optim.py's and gpt/sample.py's
math; tests/tensorlite/test_exercises.py checks them against gpt's.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from .. import functional as F
from ..tensor import Tensor
from ..testing import arrays
from .grader import Failure, call, compare, search


# ---- adamw_step ------------------------------------------------------------------------------
def adamw(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """AdamW at step t (1, 2, ...): new (p, m, v); the weight decay is decoupled (it scales p
    directly, it is not added to the gradient)."""
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
    return p - lr * weight_decay * p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def grade_adamw_step(mod: ModuleType, examples: int) -> list[str]:
    names = ("p", "g", "m", "v", "t", "lr", "beta1", "beta2", "eps", "weight_decay")

    def check(draw):
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=3), label="shape")
        p, g, m = (draw(arrays(shape=shape), label=n) for n in "pgm")
        v = draw(arrays(shape=shape, min_value=0.0, max_value=2.0), label="v")
        t = draw(st.integers(1, 12), label="t")
        lr = draw(st.sampled_from([1e-3, 1e-2, 0.3]), label="lr")
        beta1, beta2 = draw(st.sampled_from([(0.9, 0.99), (0.9, 0.999), (0.5, 0.75)]), label="betas")
        wd = draw(st.sampled_from([0.0, 0.1, 0.5]), label="weight_decay")
        args = (p, g, m, v, t, lr, beta1, beta2, 1e-8, wd)
        got = call(mod, "adamw_step", args, names, outputs=3)
        for what, e, o in zip(("the new p", "the new m", "the new v"), adamw(*args), got):
            compare(what, e, o, names, args, atol=1e-12, rtol=1e-7)

    search(check, examples)
    return [(f"adamw_step: the new p, m and v on {examples} random parameters, gradients, "
            "moments, steps t (the bias corrections), learning rates, betas and weight decays")]


# ---- top_p -----------------------------------------------------------------------------------
def top_p(probs: np.ndarray, p: float) -> np.ndarray:
    """Keep the most probable tokens, most probable first (ties: lower id first), until their
    total reaches p; zero the rest and renormalise."""
    order = np.argsort(-probs, kind="stable")
    total = np.cumsum(probs[order])
    keep = min(int(np.searchsorted(total, p, side="left")) + 1, len(probs))
    out = np.zeros_like(probs)
    out[order[:keep]] = probs[order[:keep]]
    return out / out.sum()


def grade_top_p(mod: ModuleType, examples: int) -> list[str]:
    def check(draw):
        # small integer weights: ties and zeros are common
        weights = draw(hnp.arrays(np.float64, st.integers(1, 8), elements=st.integers(0, 4)
                                  .map(float)), label="weights")
        assume(weights.sum() > 0)
        probs = weights / weights.sum()
        p = draw(st.floats(0.01, 1.0), label="p")
        # a p that a running total hits exactly to within rounding would make "reaches"
        # depend on how the sum was added up: not what this exercise is about
        assume(np.min(np.abs(np.cumsum(np.sort(probs)[::-1]) - p)) > 1e-9)
        got = call(mod, "top_p_filter", (probs, p), ("probs", "p"))
        compare("the filtered probabilities", top_p(probs, p), got, ("probs", "p"), (probs, p),
                atol=1e-12, rtol=1e-9)

    search(check, examples)
    return [(f"top_p_filter on {examples} random distributions (ties and zeros included) and "
            "thresholds p: which tokens are kept, and the renormalised probabilities")]


# ---- kv_cache_decode -------------------------------------------------------------------------
def full_forward(x: np.ndarray, w_qkv: np.ndarray, w_out: np.ndarray, n_head: int) -> np.ndarray:
    """The layer on all T positions at once, (T, C) -> (T, C), by tensorlite's op."""
    qkv = (x @ w_qkv)[None]  # (1, T, 3C)
    return np.asarray(F.causal_self_attention(Tensor(qkv), n_head).data[0] @ w_out)


def grade_kv_cache_decode(mod: ModuleType, examples: int) -> list[str]:
    def check(draw):
        h, hd, T = (draw(st.integers(1, n), label=s) for n, s in ((2, "H"), (3, "hd"), (5, "T")))
        c = h * hd
        x = draw(arrays(shape=(T, c)), label="x")
        w_qkv = draw(arrays(shape=(c, 3 * c)), label="w_qkv")
        w_out = draw(arrays(shape=(c, c)), label="w_out")
        expected = full_forward(x, w_qkv, w_out, h)
        cache_class = getattr(mod, "KVCache", None)
        if cache_class is None:
            raise Failure("kv_cache_decode.py has no class KVCache (keep the one the starter gives)")
        cache = call(mod, "KVCache", (h, T, hd), ("n_head", "max_len", "head_dim"), outputs=0)
        names = ("x_new", "cache", "w_qkv", "w_out", "n_head")
        for t in range(T):
            got = call(mod, "decode_step", (x[t], cache, w_qkv, w_out, h), names)
            case = ("x (all positions)", "w_qkv", "w_out", "n_head"), (x, w_qkv, w_out, h)
            compare(f"decode_step's output at position {t} (after {t} cached positions)",
                    expected[t], got, *case, atol=1e-9, rtol=1e-7)
            if getattr(cache, "length", None) != t + 1:
                raise Failure(f"after decode_step at position {t}, cache.length is "
                              f"{getattr(cache, 'length', None)!r}, expected {t + 1}")

    search(check, examples)
    return [(f"decode_step, one position at a time, against the full causal attention layer "
            f"(tensorlite's causal_self_attention) at every position, on {examples} random "
            "sizes (heads, head size, length), inputs and weights; cache.length after each step")]
