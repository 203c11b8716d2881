"""The GPT: token + position embeddings, `n_layer` pre-norm transformer blocks (causal
self-attention and a relu(x)**2 MLP), a final RMSNorm and an untied linear head; or, with
GPTConfig's architecture options, GPT-2's: LayerNorm, GELU, biases and a tied head.
Built from tensorlite's fused ops; every parameter gets an exact gradient (checked against
finite differences in tests/gpt/test_model.py). Parameter names follow nanoGPT's.

Shapes: B batch, T time (<= block_size), C n_embd, H n_head, hd = C // H head size,
V vocab_size. Weights are stored (in, out) so a linear layer is `y = x @ W`. Between the
attention calls the residual stream is kept as a 2-D (B*T, C) array: every linear layer is
then ONE matrix product (np.matmul would loop over B for a 3-D x).
"""

from __future__ import annotations

import math
import os

import numpy as np

import tensorlite.functional as F
from tensorlite import Tensor, autocast, kernels, no_grad, references
from tensorlite.precision import autocast_dtype
from tensorlite.references import bf16_operand

from .config import GPTConfig


class GPT:
    """A decoder-only transformer language model.

        x = wte[idx] + wpe[0:T]                          (B*T, C)
        for each block:  x = x + attn(rms_norm(x, ln_1))
                         x = x + mlp(rms_norm(x, ln_2))
        logits = rms_norm(x, ln_f) @ lm_head             (B*T, V), returned as (B, T, V)

    GPT-2's architecture (GPTConfig norm "layernorm", activation "gelu", bias, tied_head)
    has layer_norm(x, w, b) for rms_norm, gelu for relu**2, x @ W + b in every linear layer
    of the blocks, and wte transposed for lm_head.

    Dropout (config.dropout, only when training) is applied in three places: to the
    embedding sum, and to the output of each attention and each MLP branch just before it
    is added to the residual stream. (Not to the attention probabilities.)

    >>> model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8))
    >>> logits, loss = model(np.zeros((2, 5), dtype=np.int64), np.zeros((2, 5), dtype=np.int64))
    >>> logits.shape
    (2, 5, 10)
    """

    def __init__(self, config: GPTConfig, dtype=np.float32, seed: int = 0,
                 weights: dict[str, np.ndarray] | None = None):
        """Parameters drawn from `seed`; or, with `weights` ({name: array} for every parameter,
        of this dtype and shape), those arrays themselves, not copied (nothing is drawn: how a
        checkpoint is loaded for sampling without a second copy of the weights)."""
        self.config = config.validate()
        # dtype "bfloat16" is mixed precision: float32 weights (and so gradients and AdamW
        # state), every linear layer's product in bf16 (tl.autocast), the rest float32
        self.matmul_dtype = "bfloat16" if str(dtype) == "bfloat16" else None
        self.dtype = np.dtype(np.float32 if self.matmul_dtype else dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"GPT: dtype must be a float type, got {self.dtype}")
        self._rng = np.random.default_rng(seed)  # dropout masks when no rng is passed
        self._attention_maps: list | None = None  # filled only inside attention_maps()
        self.params: dict[str, Tensor] = {}
        if weights is not None:
            self._check_state(weights, exact_dtype=True)
            for name, _, _ in self.param_specs(config):
                self.params[name] = Tensor(weights[name], requires_grad=True, name=name)
            return
        init = np.random.default_rng(seed)
        std = 0.02
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)  # residual projections: scaled down
        for name, shape, how in self.param_specs(config):
            if how in ("ones", "zeros"):
                data = np.ones(shape) if how == "ones" else np.zeros(shape)
            else:  # draw in float64, so float32 and float64 models start from the same numbers
                data = init.normal(0.0, proj_std if how == "proj" else std, size=shape)
            self.params[name] = Tensor(data.astype(self.dtype), requires_grad=True, name=name)

    @staticmethod
    def param_specs(config: GPTConfig) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, init) for every parameter, in the fixed order of `params`.
        init is "normal" (std 0.02), "proj" (std 0.02/sqrt(2*n_layer)), "ones" or "zeros".
        A norm's ".bias" exists with norm "layernorm", a linear layer's with bias=True, and
        "lm_head.weight" only without tied_head."""
        V, T, C = config.vocab_size, config.block_size, config.n_embd

        def norm(name):
            biased = config.norm == "layernorm"
            return [(f"{name}.weight", (C,), "ones")] + biased * [(f"{name}.bias", (C,), "zeros")]

        def linear(name, n_in, n_out, how):
            return ([(f"{name}.weight", (n_in, n_out), how)]
                    + config.bias * [(f"{name}.bias", (n_out,), "zeros")])

        specs = [("wte", (V, C), "normal"), ("wpe", (T, C), "normal")]
        for i in range(config.n_layer):
            h = f"h.{i}"
            specs += (norm(f"{h}.ln_1") + linear(f"{h}.attn.c_attn", C, 3 * C, "normal")
                      + linear(f"{h}.attn.c_proj", C, C, "proj") + norm(f"{h}.ln_2")
                      + linear(f"{h}.mlp.c_fc", C, 4 * C, "normal")
                      + linear(f"{h}.mlp.c_proj", 4 * C, C, "proj"))
        specs += norm("ln_f")
        if not config.tied_head:
            specs += [("lm_head.weight", (C, V), "normal")]
        return specs

    # ---- the forward pass ------------------------------------------------------------------
    def __call__(self, idx, targets=None, training: bool = False,
                 rng: np.random.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) for token ids `idx` (B, T), and the mean cross-entropy against
        `targets` (B, T) if given (else None). `training` turns dropout on; its masks come
        from `rng` (or the model's own generator). (Sampling one token at a time goes
        through `decoder()` instead: the same math with a KV cache, on plain arrays.)"""
        if self.matmul_dtype and autocast_dtype() != self.matmul_dtype:  # mixed precision
            with autocast(self.matmul_dtype):
                return self(idx, targets, training, rng)
        idx = self._check_ids(idx, "idx")
        B, T = idx.shape
        p, cfg = self.params, self.config
        drop = cfg.dropout if training else 0.0
        rng = rng if rng is not None else self._rng

        x = F.embedding(idx.reshape(-1), p["wte"])  # (B*T, C)
        x = x.reshape(B, T, cfg.n_embd) + p["wpe"][:T]  # (B, T, C): a row per position
        x = x.reshape(B * T, cfg.n_embd)  # (B*T, C) residual stream
        x = F.dropout(x, drop, training, rng)  # dropout 1: on the embedding sum
        for i in range(cfg.n_layer):
            a = self.attention(self.norm(x, f"h.{i}.ln_1"), i, B, T)  # (B*T, C)
            x = x + F.dropout(a, drop, training, rng)  # dropout 2: attention branch output
            m = self.mlp(self.norm(x, f"h.{i}.ln_2"), i)  # (B*T, C)
            x = x + F.dropout(m, drop, training, rng)  # dropout 3: MLP branch output
        x = self.norm(x, "ln_f")  # (B*T, C)
        if cfg.tied_head:  # GPT-2: the head is the embedding table, read the other way
            logits = x @ p["wte"].transpose(1, 0)  # (B*T, V)
        else:
            logits = x @ p["lm_head.weight"]  # (B*T, V)

        loss = None
        if targets is not None:
            targets = self._check_ids(targets, "targets")
            if targets.shape != (B, T):
                raise ValueError(f"targets have shape {targets.shape}, idx has shape {(B, T)}")
            loss = F.cross_entropy(logits, targets.reshape(-1))
        return logits.reshape(B, T, cfg.vocab_size), loss

    def norm(self, x: Tensor, name: str) -> Tensor:
        """The normalisation `name` ("h.0.ln_1", "ln_f") of x (B*T, C): rms_norm with its
        weight, or (norm "layernorm") layer_norm with its weight and bias."""
        p = self.params
        if self.config.norm == "layernorm":
            return F.layer_norm(x, p[f"{name}.weight"], p[f"{name}.bias"])
        return F.rms_norm(x, p[f"{name}.weight"])

    def linear(self, x: Tensor, name: str) -> Tensor:
        """x @ W for the linear layer `name` ("h.0.attn.c_attn"), + b when it has a bias."""
        y = x @ self.params[f"{name}.weight"]
        bias = self.params.get(f"{name}.bias")
        return y if bias is None else y + bias

    def attention(self, x: Tensor, i: int, B: int, T: int) -> Tensor:
        """Causal multi-head self-attention of block i on x (B*T, C) -> (B*T, C)."""
        C, H = self.config.n_embd, self.config.n_head
        qkv = self.linear(x, f"h.{i}.attn.c_attn").reshape(B, T, 3 * C)  # q | k | v
        if self._attention_maps is not None:  # attention_maps() is reading the probabilities
            q, k, _ = references.heads(qkv.data, H)  # each (B, H, T, hd), views of qkv
            self._attention_maps.append(attention_probabilities(q, k))  # (B, H, T, T)
        y = F.causal_self_attention(qkv, H)  # (B, T, C): one fused op does it all
        return self.linear(y.reshape(B * T, C), f"h.{i}.attn.c_proj")  # (B*T, C)

    def attention_maps(self, idx) -> np.ndarray:
        """The attention probabilities of every head for one sequence `idx`, (T,) or (1, T):
        an (n_layer, n_head, T, T) array whose [l, h, i, j] is how much position i's query
        weighs key j in head h of block l. Rows sum to 1; above the diagonal is 0 (causal)."""
        idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
        if idx.ndim == 1:
            idx = idx[None, :]
        if idx.ndim != 2 or idx.shape[0] != 1 or idx.shape[1] == 0:
            raise ValueError(f"attention_maps takes one sequence, (T,) or (1, T), got {idx.shape}")
        self._attention_maps = []
        try:
            with no_grad():
                self(idx)
            return np.stack([p[0] for p in self._attention_maps])  # (L, H, T, T)
        finally:
            self._attention_maps = None

    def mlp(self, x: Tensor, i: int) -> Tensor:
        """The feed-forward of block i: x (B*T, C) -> 4C -> relu(.)**2 (or gelu) -> (B*T, C)."""
        h = self.linear(x, f"h.{i}.mlp.c_fc")  # (B*T, 4C)
        h = F.gelu(h) if self.config.activation == "gelu" else F.relu_squared(h)
        return self.linear(h, f"h.{i}.mlp.c_proj")  # (B*T, C)

    def _check_ids(self, ids, what: str) -> np.ndarray:
        ids = np.asarray(ids.data if isinstance(ids, Tensor) else ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"{what} must be a (B, T) integer array, got {ids.dtype} {ids.shape}")
        if ids.shape[1] > self.config.block_size:
            raise ValueError(
                f"{what} has {ids.shape[1]} positions but block_size is "
                f"{self.config.block_size}; crop the context to the last block_size tokens"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"{what} has token ids {ids.min()}..{ids.max()} outside "
                f"[0, {self.config.vocab_size}); was it encoded with another tokenizer?"
            )
        return ids

    def decoder(self) -> Decoder:
        """A Decoder for sampling: this model's forward with a KV cache, one position of work
        per layer for each new token (see Decoder)."""
        return Decoder(self)

    # ---- parameters and their state ---------------------------------------------------------
    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def num_params(self) -> int:
        return sum(p.size for p in self.params.values())

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        """{name: a copy of the weights}, in the order of `params`."""
        return {name: p.data.copy() for name, p in self.params.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy weights in (cast to this model's dtype). Names and shapes must match exactly;
        nothing is changed unless all of them do."""
        arrays = self._check_state(state)
        for name, p in self.params.items():
            p.data[...] = arrays[name]

    def _check_state(self, state: dict[str, np.ndarray],
                     exact_dtype: bool = False) -> dict[str, np.ndarray]:
        """{name: array} of `state` after checking it holds exactly this model's parameters,
        of their shapes, as floats (of this model's dtype, with exact_dtype); else ValueError."""
        specs = {name: shape for name, shape, _ in self.param_specs(self.config)}
        missing = [n for n in specs if n not in state]
        extra = [n for n in state if n not in specs]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected {', '.join(extra)}")
            raise ValueError(f"state dict does not fit this model: {'; '.join(parts)}")
        arrays = {}
        for name, shape in specs.items():
            a = np.asarray(state[name])
            if a.shape != shape:
                raise ValueError(
                    f"state dict does not fit this model: {name} has shape {a.shape}, "
                    f"expected {shape}"
                )
            if a.dtype.kind != "f" or exact_dtype and a.dtype != self.dtype:
                raise ValueError(f"state dict: {name} has dtype {a.dtype}, expected "
                                 f"{self.dtype if exact_dtype else 'floats'}")
            arrays[name] = a
        return arrays


def attention_probabilities(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """softmax(q kᵀ / sqrt(hd) + causal mask), (..., Tq, Tk) for q (..., Tq, hd) and
    k (..., Tk, hd): what causal_self_attention weighs the values with (it keeps these
    inside its backward buffers; this computes them for reading), by the same reference."""
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    pt = references.causal_softmax_columns(k @ np.swapaxes(q, -1, -2), scale)  # P^T (.., Tk, Tq)
    return np.swapaxes(pt, -1, -2)


# ---- weights laid out for sampling ----------------------------------------------------------
# load_model lays out every linear weight by rows when together they hold at least this much:
# far beyond any last-level cache, so a step streams them from memory (GPT-2 small: 340 MB). A
# model whose weights sit in cache stays as it is: there BLAS's GEMV was faster (about 2x for
# 384 x 1536 on 1 row, from L2/L3), and a step costs calls more than bytes.
BY_ROWS_BYTES = 64 << 20
# A decoder call on at most this many positions reads them with row_dots; on more, BLAS. From
# memory (GPT-2 small's mlp.c_fc, 1 thread, Zen 4) row_dots read 22, 20, 15, 12 GB/s for 1-4
# rows and 4 for 8, BLAS's small-M sgemm 22 for 1 row and 6-7 for 2-8.
ROW_DOTS_ROWS = 4


def lay_out_by_rows(w: np.ndarray) -> np.ndarray:
    """A linear layer's (in, out) weight, C-contiguous and writable, rewritten in place as the
    rows of its transpose, (out, in), as PyTorch's Linear stores them; returns the (in, out)
    view of those rows (Fortran order): the same values, so every product reads the same.
    Any other array is returned as it is.

    Why: a decoder step on one position is a matrix-vector product per layer, bound by how
    fast the weights stream from memory. Read by rows (tensorlite's row_dots) GPT-2 small's
    weights streamed at 27-30 GB/s, BLAS's GEMV on the (in, out) layout at 19-24 (AMD EPYC
    Zen 4, 1 thread; benchmarks/gemv.py, docs/performance.md). Training's products are GEMMs, for
    which the layout does not matter, so only sampling's loader (checkpoint.load_model)
    lays weights out this way, one weight at a time (a transient copy of one weight)."""
    if w.ndim != 2 or not w.flags.c_contiguous or not w.flags.writeable:
        return w
    rows = np.ascontiguousarray(w.T)
    flat = w.reshape(-1)  # a view: w is C-contiguous
    flat[:] = rows.reshape(-1)
    return flat.reshape(rows.shape).T


def by_rows(w: np.ndarray) -> np.ndarray | None:
    """The (out, in) rows of an (in, out) weight laid out by lay_out_by_rows, else None."""
    t = w.T
    return t if w.ndim == 2 and t.flags.c_contiguous and not w.flags.c_contiguous else None


class KVCache:
    """The keys and values of the positions one sequence has seen so far, for each layer.

    k and v are (n_layer, H, block_size, hd) arrays, filled from position 0; `length`
    positions are valid. Positions are absolute (the model learned one wpe row per position),
    so the cache cannot be shifted: a context that must slide is re-read into a reset cache
    (see gpt/sample.py).
    """

    def __init__(self, config: GPTConfig, dtype=np.float32):
        shape = (config.n_layer, config.n_head, config.block_size, config.head_dim)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)
        self.length = 0

    def reset(self) -> None:
        """Forget every position (the arrays are kept and overwritten)."""
        self.length = 0

    def make_room(self, n: int) -> int:
        """Check that n new positions fit; return the first one's position."""
        if self.length + n > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.length} of {self.k.shape[2]} positions; "
                             f"cannot add {n}")
        return self.length


class Decoder:
    """GPT's forward pass for sampling: new tokens at the end of a sequence whose keys and
    values a KVCache holds, so each new token costs one position of work per layer.

    The same math as GPT.__call__ (tests/gpt/test_sample.py checks the logits against it at
    every position), on the weights' arrays: no Tensors, no graph. The formulas are
    tensorlite's NumPy references, the ones training's kernels are checked against (norms,
    activation, the attention's causal softmax); the products and the residual stream go
    into buffers made here, once per generation, with room for block_size positions (a call
    on n new positions uses their first n rows). One Decoder follows one sequence; threads sampling at once each make their own
    (the weights are only read).

        dec = model.decoder()
        logits = dec(prompt_ids)   # (V,): the next token's logits after the prompt
        logits = dec([token])      # after one more token
    """

    def __init__(self, model: GPT):
        cfg, dt = model.config, model.dtype
        T, C, H, V = cfg.block_size, cfg.n_embd, cfg.n_head, cfg.vocab_size
        w = {name: p.data for name, p in model.params.items()}  # the arrays themselves
        self.bf16 = model.matmul_dtype == "bfloat16"  # the linear layers' products in bf16
        if self.bf16:  # their weights rounded once here (a copy), their inputs per call
            w = {n: bf16_operand(a) if a.ndim == 2 and n not in ("wte", "wpe") else a
                 for n, a in w.items()}
        self.config = cfg
        self.wte, self.wpe = w["wte"], w["wpe"]
        # per block, (weight, bias) of each norm and linear layer; bias None where there is none
        self.layers = [tuple((w[f"h.{i}.{name}.weight"], w.get(f"h.{i}.{name}.bias")) for name in (
            "ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"))
            for i in range(cfg.n_layer)]
        self.ln_f = (w["ln_f.weight"], w.get("ln_f.bias"))
        # the head: lm_head (C, V), or (tied) the rows of wte (V, C), each row a token's
        # logit weights (for a bf16 model rounded like the linear layers' weights, a copy, as
        # the training forward's product)
        self.lm_head = w.get("lm_head.weight")
        self.head_rows = by_rows(self.lm_head) if self.lm_head is not None else (
            bf16_operand(w["wte"]) if self.bf16 else w["wte"])
        self.layernorm, self.gelu = cfg.norm == "layernorm", cfg.activation == "gelu"
        self.scale = dt.type(1.0 / math.sqrt(cfg.head_dim))
        self.cache = KVCache(cfg, dt)
        # the buffers, a row per new position
        self.x = np.zeros((T, C), dt)  # the residual stream
        self.xn = np.zeros((T, C), dt)  # its norm
        self.qkv = np.zeros((T, 3 * C), dt)  # q | k | v
        self.att = np.zeros(H * T * T, dt)  # attention scores, then probabilities, transposed
        self.y = np.zeros((T, C), dt)  # attention output, heads side by side
        self.branch = np.zeros((T, C), dt)  # a branch's output, before the residual add
        self.h = np.zeros((T, 4 * C), dt)  # the MLP's hidden layer
        self.logits = np.zeros(V, dt)

    @property
    def length(self) -> int:
        """How many positions the cache holds (the next token's position)."""
        return self.cache.length

    def reset(self) -> None:
        """Start a new sequence at position 0 (the buffers are kept)."""
        self.cache.reset()

    def __call__(self, ids) -> np.ndarray:
        """The logits (V,) that follow the new tokens `ids` (a non-empty list of ints), which
        sit at positions length, length + 1, ...; their keys and values join the cache.
        The result is this Decoder's own buffer: the next call overwrites it."""
        n, V = len(ids), self.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"token ids {min(ids)}..{max(ids)} outside [0, {V}); was the "
                             "text encoded with another tokenizer?")
        cache, H, hd = self.cache, self.config.n_head, self.config.head_dim
        t0 = cache.make_room(n)
        t1 = t0 + n  # the new positions are t0 .. t1-1; queries see keys 0 .. t1-1
        x, xn, qkv, y = self.x[:n], self.xn[:n], self.qkv[:n], self.y[:n]  # (n, C), (n, 3C)
        # (H, t1, n): keys along rows, as in training's attention; contiguous, so a one-token
        # step's scores are 12 x t1 adjacent values, not one per row of a (T, T) matrix (that
        # strided view cost 5 of a 29 ms GPT-2 small step at position 200)
        att = self.att[:H * t1 * n].reshape(H, t1, n)
        branch, h = self.branch[:n], self.h[:n]  # (n, C), (n, 4C)

        # (n, C): token embeddings. mode "clip": the ids were checked above, and the default
        # "raise" writes into a temporary first, a new (n, C) array per token.
        np.take(self.wte, ids, axis=0, out=x, mode="clip")
        x += self.wpe[t0:t1]  # + a position embedding per row
        for i, (ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj) in enumerate(self.layers):
            # x = x + attn(norm(x, ln_1))
            self.linear(self.norm(x, ln_1, xn), c_attn, qkv)  # (n, 3C): q | k | v
            heads = qkv.reshape(n, 3, H, hd)  # a view: [:, 0] is q, [:, 1] k, [:, 2] v
            cache.k[i, :, t0:t1] = heads[:, 1].transpose(1, 0, 2)  # (H, n, hd) into the cache
            cache.v[i, :, t0:t1] = heads[:, 2].transpose(1, 0, 2)
            q, k, v = heads[:, 0].transpose(1, 0, 2), cache.k[i, :, :t1], cache.v[i, :, :t1]
            np.matmul(k, q.transpose(0, 2, 1), out=att)  # S^T = k q^T per head, (H, t1, n)
            # -> P^T: query j, at position t0 + j, sees keys 0 .. t0 + j (training's softmax)
            references.causal_softmax_columns(att, self.scale)
            np.matmul(att.transpose(0, 2, 1), v, out=y.reshape(n, H, hd).transpose(1, 0, 2))  # P v
            x += self.linear(y, attn_proj, branch)  # (n, C)
            # x = x + mlp(norm(x, ln_2)), mlp = relu(. @ c_fc)**2 @ c_proj (or gelu)
            x += self.linear(self.activation(self.linear(self.norm(x, ln_2, xn), c_fc, h)),
                             mlp_proj, branch)  # (n, 4C) -> (n, C)
        cache.length = t1
        # the head, for the last position only: the one whose next token we sample
        last = self.norm(x[-1:], self.ln_f, xn[:1])  # (1, C)
        return self.head(last, self.logits[None])[0]  # (V,)

    # The steps of a layer on plain arrays, each written once: gpt/batching.py's batched
    # decoder calls them too. Without `out` they return a new array.
    def linear(self, x: np.ndarray, layer: tuple, out: np.ndarray | None = None) -> np.ndarray:
        """x @ W (+ b), for layer = (W, b or None); x is rounded to bf16 first (in place)
        for a bf16 model (see operand)."""
        weight, bias = layer
        rows = by_rows(weight) if len(x) <= ROW_DOTS_ROWS else None
        if rows is not None:  # a weight laid out for sampling, read by rows
            out = kernels.row_dots(self.operand(x), rows, out=out)
        else:
            out = np.matmul(self.operand(x), weight, out=out)
        if bias is not None:
            out += bias
        return out

    def activation(self, h: np.ndarray) -> np.ndarray:
        """The MLP's relu(h)**2, or gelu(h) (activation "gelu"), in place on h."""
        if self.gelu:
            h[...] = references.gelu_forward(h)[0]
        else:
            references.relu_squared(h, out=h)
        return h

    def head(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The logits (n, V) of normalised rows x (n, C): x @ lm_head, or x @ wte^T when tied
        (tensorlite's row_dots: wte read once, by rows, as it is stored; so is an lm_head
        laid out by rows); x is rounded to bf16 first (in place) for a bf16 model."""
        x = self.operand(x)
        if self.head_rows is None:
            return np.matmul(x, self.lm_head, out=out)
        if len(x) <= ROW_DOTS_ROWS:
            return kernels.row_dots(x, self.head_rows, out=out)
        return np.matmul(x, self.head_rows.T, out=out)

    def norm(self, x: np.ndarray, layer: tuple, out: np.ndarray | None = None) -> np.ndarray:
        """The model's normalisation of x, for layer = (weight, bias or None): rms_norm's
        reference, or layer_norm's (norm "layernorm"), into `out` if given."""
        weight, bias = layer  # (the references: on a few rows a twin's call costs more)
        if not self.layernorm:
            return references.rms_norm_forward(x, weight, 1e-5, out=out)[0]
        y = references.layer_norm_forward(x, weight, bias, 1e-5)[0]
        if out is None:
            return y
        out[...] = y
        return out

    def operand(self, a: np.ndarray) -> np.ndarray:
        """A linear layer's input: rounded to bf16 in place for a bf16 model (as MatMulBF16
        rounds it), else itself."""
        if self.bf16:
            a[...] = bf16_operand(a)
        return a


# ---- will it fit? ---------------------------------------------------------------------------
def training_memory(config: GPTConfig, batch_size: int, dtype=np.float32,
                    threads: int = 1) -> tuple[int, int]:
    """(parameter count, bytes a training step needs, roughly), computed from the shapes alone.

    bytes = 4 copies of the parameters (weights, gradients, AdamW's m and v)
          + with the batch split over `threads` > 1 threads (gpt.threaded), threads + 1 more:
            each thread's own gradients, and their sum
          + the activations backward keeps, per layer about 16 (B*T, C) arrays and two
            (B, H, T, T) attention matrices, and about 3 (B*T, V) arrays for the logits
            (split over the threads, the same in all).
    An estimate for refusing hopeless settings up front, not a promise."""
    P = sum(math.prod(shape) for _, shape, _ in GPT.param_specs(config))
    B, T, C, H = batch_size, config.block_size, config.n_embd, config.n_head
    copies = 4 + (threads + 1 if threads > 1 else 0)
    values = copies * P + config.n_layer * (16 * B * T * C + 2 * B * H * T * T)
    values += 3 * B * T * config.vocab_size
    return P, values * np.dtype(np.float32 if str(dtype) == "bfloat16" else dtype).itemsize


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable; elsewhere the
    physical memory), or None when the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits(config: GPTConfig, batch_size: int, dtype=np.float32, threads: int = 1) -> None:
    """Raise ValueError (one line, with the numbers) when training this model would need
    more memory than is available, before anything is allocated."""
    P, need = training_memory(config, batch_size, dtype, threads)
    have = available_memory()
    if have is not None and need > have:
        raise ValueError(
            f"this model has {P:,} parameters (n_layer {config.n_layer}, n_embd "
            f"{config.n_embd}, vocab {config.vocab_size}); training it with batch size "
            f"{batch_size} x block size {config.block_size}"
            + (f" on {threads} threads" if threads > 1 else "")
            + f" needs about {_gb(need)} of memory and {_gb(have)} is available: use a smaller "
            "n_embd, n_layer, batch_size or block_size"
            + (" (or fewer --threads: each holds its own gradients)" if threads > 1 else ""))


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"
