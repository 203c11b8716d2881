"""The optimizer side of training: AdamW (bias-corrected, decoupled weight decay on 2-D
weights only), the learning-rate schedule (linear warmup, then cosine decay to min_lr), and
global-norm gradient clipping. The update's math is `adamw_update` below, in NumPy; where a
faster twin pays (tensorlite.kernels.adamw_kernel: the C loop on the default path), that one
runs instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from tensorlite import Tensor, kernels


class AdamW:
    """AdamW (Loshchilov & Hutter): for each parameter p with gradient g, at step t = 1, 2, ...

        m = b1*m + (1-b1)*g               v = b2*v + (1-b2)*g*g
        p = p - lr*wd*p - lr * (m / (1-b1**t)) / (sqrt(v / (1-b2**t)) + eps)

    Weight decay applies to 2-D weights (embeddings and linear layers) only, not to the
    RMSNorm gains. A parameter whose .grad is None is left untouched at that step.
    """

    def __init__(self, params: dict[str, Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not isinstance(params, dict):
            raise TypeError("AdamW: params must be a dict {name: Tensor} (e.g. model.params)")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.t = 0  # number of steps taken (the t in the bias corrections)
        self.m = {n: np.zeros_like(p.data) for n, p in params.items()}  # first moments
        self.v = {n: np.zeros_like(p.data) for n, p in params.items()}  # second moments

    def step(self, lr: float | None = None) -> None:
        """One update of every parameter that has a gradient, at `lr` (default self.lr)."""
        lr = self.lr if lr is None else lr
        self.t += 1
        b1, b2 = self.betas
        for name, p in self.params.items():
            if p.grad is None:
                continue
            decay = self.weight_decay if p.ndim == 2 else 0.0
            update = kernels.adamw_kernel(p.size) or adamw_update
            update(p.data, p.grad, self.m[name], self.v[name], lr, b1, b2, self.eps, decay,
                   self.t)

    def state_dict(self) -> dict[str, np.ndarray]:
        """A flat {key: ndarray}: "step" (0-d int64), "m.<name>" and "v.<name>" per parameter,
        so it can be stored like the weights. Hyperparameters come from the run's config."""
        state = {"step": np.array(self.t, dtype=np.int64)}
        for n in self.params:
            state[f"m.{n}"] = self.m[n].copy()
            state[f"v.{n}"] = self.v[n].copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore moments and step count; names and shapes must match (ValueError, one line)."""
        expected = ["step"] + [f"{k}.{n}" for n in self.params for k in ("m", "v")]
        missing = [k for k in expected if k not in state]
        extra = [k for k in state if k not in set(expected)]
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unexpected {', '.join(extra)}"] if extra else [])
            raise ValueError(f"optimizer state does not fit these parameters: {'; '.join(parts)}")
        for n, p in self.params.items():
            for k in ("m", "v"):
                if np.shape(state[f"{k}.{n}"]) != p.shape:
                    raise ValueError(
                        f"optimizer state does not fit these parameters: {k}.{n} has shape "
                        f"{np.shape(state[f'{k}.{n}'])}, expected {p.shape}"
                    )
        for n in self.params:
            self.m[n][...] = state[f"m.{n}"]
            self.v[n][...] = state[f"v.{n}"]
        self.t = int(state["step"])


def adamw_update(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float,
                 beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """One AdamW step of one parameter, in place on p, m, v (t = step):

        m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g*g
        p = p*(1 - lr*wd) - lr * (m / (1-b1**t)) / (sqrt(v / (1-b2**t)) + eps)

    The scalars are cast to p's dtype, and every array op writes into an existing buffer (one
    temporary, `denom`), so a float32 model stays float32 and a step allocates little."""
    t = p.dtype.type
    b1, b2, c1, c2 = t(beta1), t(beta2), t(1 - beta1), t(1 - beta2)
    decay, step_size = t(1 - lr * weight_decay), t(lr / (1 - beta1**step))
    inv_bc2, eps_ = t(1 / (1 - beta2**step)), t(eps)
    m *= b1
    m += c1 * g  # m = b1*m + (1-b1)*g
    v *= b2
    v += c2 * (g * g)  # v = b2*v + (1-b2)*g*g
    denom = v * inv_bc2
    np.sqrt(denom, out=denom)
    denom += eps_  # sqrt(v / (1-b2**t)) + eps
    if decay != 1:
        p *= decay  # decoupled weight decay
    upd = np.divide(m, denom, out=denom)
    upd *= step_size  # lr * m / (1-b1**t) / denom
    p -= upd


def lr_at(it: int, max_iters, lr: float | None = None, min_lr: float | None = None,
          warmup_iters: int | None = None) -> float:
    """The learning rate at iteration `it` (0-based): linear warmup, then cosine decay.

        it < warmup_iters:        lr * (it + 1) / warmup_iters
        warmup_iters <= it <= N:  min_lr + (lr - min_lr) * (1 + cos(pi * r)) / 2,
                                  r = (it - warmup_iters) / max(1, N - warmup_iters)
        it > N:                   min_lr                                   (N = max_iters)

    So the rate climbs to lr at it = warmup_iters - 1, stays continuous there, and reaches
    min_lr at it = max_iters. Call as lr_at(it, max_iters, lr, min_lr, warmup_iters) or
    lr_at(it, cfg) with anything that has those four attributes (a TrainConfig).
    """
    if lr is None:
        cfg = max_iters
        max_iters, lr, min_lr, warmup_iters = cfg.max_iters, cfg.lr, cfg.min_lr, cfg.warmup_iters
    if min_lr is None or warmup_iters is None:
        raise TypeError("lr_at: give max_iters, lr, min_lr and warmup_iters (or a config)")
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    if it > max_iters:
        return min_lr
    r = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * r))


def clip_grad_norm(params: Iterable[Tensor] | dict[str, Tensor], max_norm: float,
                   norm: float | None = None) -> float:
    """Scale all gradients together so their global L2 norm is at most `max_norm`.

    norm = sqrt(sum over parameters of sum(g**2)); if norm > max_norm every g is multiplied
    by max_norm / (norm + 1e-6), in place. Returns the norm measured BEFORE clipping.
    max_norm <= 0 only measures. A non-finite norm is returned as is, nothing scaled.

    `norm`: that norm where the caller already knows it, so the gradients are not read once
    more just to measure it: gpt.threaded measures it while it sums the shards' gradients
    (ThreadShards.grad_norm). It must be the norm of the gradients as they are now.
    """
    if isinstance(params, dict):
        params = params.values()
    grads = [p.grad for p in params if p.grad is not None]
    total = math.sqrt(kernels.add_square_sum(grads)) if norm is None else float(norm)
    if max_norm > 0 and math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g *= g.dtype.type(scale)
    return total
