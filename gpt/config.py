"""The settings, as dataclasses, with their defaults in one place: `GPTConfig` (the model's
shape, saved with every checkpoint), `TrainConfig` (one training run; it holds a GPTConfig)
and `SampleConfig` (one `python -m gpt.sample`). Every field is one command-line flag
(`out_dir` -> `--out-dir`; gpt/cli.py builds them from the annotations and the `help` of
`setting(...)`), and `PRESETS` names sets of them (`--preset baby`).

A TrainConfig is saved flat ({"data": .., "n_layer": .., "lr": ..}), as it always was.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Literal

from .errors import UserError

Dtype = Literal["float32", "float64", "bfloat16"]
SampleDtype = Literal["checkpoint", "float32", "float64", "bfloat16"]
Tokenizer = Literal["char", "bpe", "gpt2"]
Backend = Literal["loky", "dask"]
Norm = Literal["rmsnorm", "layernorm"]
Activation = Literal["relu2", "gelu"]


def setting(default, help: str, *, shown=None, metavar: str | None = None,
            fixed: bool = False, default_factory=None):
    """A dataclass field that is also a flag: `help` is its help text, `shown` the default as
    --help prints it (if not the value itself), `fixed` marks a field a resumed run must keep
    (it decides the model's shape or the meaning of its token ids)."""
    meta = {"help": help, "shown": default if shown is None else shown, "fixed": fixed}
    if metavar:
        meta["metavar"] = metavar
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---- flat views of nested settings (the CLI and the saved config use them) -------------------
def leaf_fields(cls: type) -> list[tuple[type, dataclasses.Field, typing.Any]]:
    """(owning class, field, resolved annotation) of every field of the dataclass `cls`, the
    fields of a nested dataclass in its place. Names must be unique across the nesting."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_fields(hints[f.name])
        else:
            out.append((cls, f, hints[f.name]))
    return out


def from_flat(cls: type, values: dict):
    """Build `cls` from a flat {field name: value}, refusing names it does not know (a typo
    would go unnoticed); missing names keep their defaults."""
    unknown = sorted(set(values) - {f.name for _, f, _ in leaf_fields(cls)})
    if unknown:
        raise UserError(f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = from_flat(hints[f.name], {k: v for k, v in values.items()
                                                       if k in _names(hints[f.name])})
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def to_flat(obj) -> dict:
    """{field name: value} of a settings dataclass, nested ones flattened in place."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out.update(to_flat(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return out


def _names(cls: type) -> set[str]:
    return {f.name for _, f, _ in leaf_fields(cls)}


def fixed_fields(cls: type) -> list[str]:
    """The fields marked fixed: a resumed run must keep them."""
    return [f.name for _, f, _ in leaf_fields(cls) if f.metadata.get("fixed")]


# ---- checks of single values ------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Upper limits of the model's shape: far beyond what a NumPy GPT can train, low enough that
# a hostile config.json or a typo (--n-layer 100000000) is refused before anything is built.
LIMITS = {"vocab_size": 1 << 20, "block_size": 1 << 16, "n_layer": 1 << 10, "n_head": 1 << 10,
          "n_embd": 1 << 16}


def check_positive(obj, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not _is_int(value) or value <= 0:
            raise UserError(f"must be a positive integer, got {value!r}", field=name)
        if value > LIMITS.get(name, value):
            raise UserError(f"is {value}, above the limit {LIMITS[name]:,}", field=name)


def check_choice(obj, name: str) -> None:
    """A Literal-annotated field holds one of its values."""
    choices = typing.get_args(typing.get_type_hints(type(obj))[name])
    if getattr(obj, name) not in choices:
        raise UserError(f"must be one of {', '.join(choices)}, got {getattr(obj, name)!r}",
                        field=name)


# ---- the model --------------------------------------------------------------------------------
@dataclass
class GPTConfig:
    """The shape of a GPT: everything needed to rebuild its parameters."""

    vocab_size: int = setting(512, "vocabulary size V (trained by --tokenizer bpe; the char "
                              "tokenizer takes the text's characters)", fixed=True)
    block_size: int = setting(64, "context length T_max in tokens (rows of wpe)", fixed=True)
    n_layer: int = setting(4, "number of transformer blocks", fixed=True)
    n_head: int = setting(8, "attention heads H per block (divides n_embd)", fixed=True)
    n_embd: int = setting(128, "width C of the residual stream", fixed=True)
    dropout: float = setting(0.0, "dropout probability in training")
    # The architecture: the defaults are ours; GPT-2 is layernorm, gelu, bias, tied_head
    # (docs/gpt.md, "GPT-2 in and out", says what each changes and why GPT-2 chose it).
    norm: Norm = setting("rmsnorm", "normalisation: rmsnorm, or layernorm (GPT-2's: the row's "
                         "mean subtracted, and a bias)", fixed=True)
    activation: Activation = setting("relu2", "MLP activation: relu2 (relu(x)**2), or gelu "
                                     "(GPT-2's tanh approximation)", fixed=True)
    bias: bool = setting(False, "a bias in every linear layer of the blocks (as GPT-2)",
                         fixed=True)
    tied_head: bool = setting(False, "the output head is the token embedding wte, transposed "
                              "(as GPT-2), instead of its own lm_head", fixed=True)

    def validate(self) -> GPTConfig:
        """Raise UserError (one line) if this config cannot build a model; return self."""
        check_positive(self, ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"))
        for name in ("norm", "activation"):
            check_choice(self, name)
        for name in ("bias", "tied_head"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"must be true or false, got {getattr(self, name)!r}", field=name)
        if self.n_embd % self.n_head:
            raise UserError(f"({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                            f"try n_head {_divisor_hint(self.n_embd, self.n_head)}",
                            field="n_embd", mentions=("n_head",))
        if not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"must be a number in [0, 1), got {self.dropout!r}", field="dropout")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def unlike_gpt2(self) -> list[str]:
        """What of this architecture GPT-2 cannot represent (empty: a GPT-2). (An untied head
        it can: transformers' tie_word_embeddings false.)"""
        gpt2 = {"norm": "layernorm", "activation": "gelu", "bias": True}
        return [f"{name} {getattr(self, name)!r} (GPT-2 has {want!r})"
                for name, want in gpt2.items() if getattr(self, name) != want]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        return from_flat(cls, d)


def _divisor_hint(n_embd: int, n_head: int) -> int:
    """The divisor of n_embd closest to n_head (for the error message); pairs d, n_embd // d
    up to sqrt(n_embd), so a huge n_embd cannot stall the message."""
    small = [d for d in range(1, min(math.isqrt(n_embd), 1 << 20) + 1) if n_embd % d == 0]
    divisors = small + [n_embd // d for d in small]
    return min(divisors, key=lambda d: (abs(d - n_head), d))


# ---- one training run -------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """One training run of `python -m gpt.train`; each field is one flag."""

    data: str = setting("train.txt", "UTF-8 text file to train on, or a folder of token "
                        "files made by python -m gpt.data prepare", metavar="PATH")
    out_dir: str = setting("out", "directory for the checkpoint and metrics.jsonl",
                           metavar="PATH")
    model: GPTConfig = field(default_factory=GPTConfig)
    batch_size: int = setting(12, "sequences per optimizer step")
    max_iters: int = setting(1000, "number of optimizer steps")
    lr: float = setting(1e-3, "peak learning rate (after warmup)")
    min_lr: float = setting(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = setting(100, "steps of linear warmup from 0 to lr")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay (2-D weights only)")
    beta1: float = setting(0.9, "AdamW beta1 (first-moment decay)")
    beta2: float = setting(0.99, "AdamW beta2 (second-moment decay)")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0: no clipping)")
    eval_interval: int = setting(200, "evaluate train/val loss every this many steps")
    eval_iters: int = setting(20, "batches averaged per evaluation")
    log_interval: int = setting(10, "print a progress line every N steps")
    seed: int = setting(1337, "random seed (init, batches, dropout)")
    resume: bool = setting(False, "continue from the checkpoint in --out-dir")
    init_from: str | None = setting(None, "fine-tune: start from the weights, shape and "
                                    "tokenizer of this run folder or Hugging Face GPT-2 folder "
                                    "(a fresh optimizer)", metavar="PATH")
    dtype: Dtype = setting("float32", "floating-point type: float32, float64, or bfloat16 (mixed "
                           "precision: float32 weights, bf16 matmul operands)", fixed=True)
    workers: int = setting(1, "data-parallel workers, each computing a shard of the batch")
    threads: int | None = setting(None, "threads of this process, each computing a shard of "
                                  "the batch (with --workers 1)", shown="all cores")
    tokenizer: Tokenizer = setting("char", "tokenizer: char or bpe (gpt2: GPT-2's, which comes "
                                   "with --init-from)", fixed=True)
    backend: Backend = setting("loky", "process transport for --workers: loky or dask")
    scheduler: str | None = setting(None, "dask scheduler address (with --backend dask)",
                                    metavar="ADDRESS")

    def validate(self) -> TrainConfig:
        """Raise UserError (one line) on a setting that cannot work; return self."""
        self.model.validate()
        check_positive(self, ("batch_size", "max_iters", "eval_interval", "eval_iters",
                              "log_interval", "workers"))
        if self.threads is not None:
            check_positive(self, ("threads",))
        if not 0 < self.lr < math.inf:
            raise UserError(f"must be positive and finite, got {self.lr}", field="lr")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"must be in [0, lr={self.lr}], got {self.min_lr}", field="min_lr")
        if not _is_int(self.warmup_iters) or self.warmup_iters < 0:
            raise UserError(f"must be >= 0, got {self.warmup_iters!r}", field="warmup_iters")
        if not 0 <= self.weight_decay < math.inf:
            raise UserError(f"must be >= 0 and finite, got {self.weight_decay}",
                            field="weight_decay")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"must be in [0, 1), got {getattr(self, name)}", field=name)
        if not self.grad_clip >= 0:
            raise UserError(f"must be >= 0 (0 turns it off), got {self.grad_clip}",
                            field="grad_clip")
        for name in ("dtype", "tokenizer", "backend"):
            check_choice(self, name)
        return self

    def to_dict(self) -> dict:
        return to_flat(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return from_flat(cls, d)


# Named settings for --preset; flags given beside a preset win.
PRESETS: dict[str, dict] = {
    # seconds on a laptop: for trying the commands and in the docs' examples
    "tiny": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "batch_size": 8,
             "eval_iters": 2, "eval_interval": 20, "warmup_iters": 5, "log_interval": 5},
    # the project's quality benchmark on Tiny Shakespeare (docs/performance.md, benchmarks/)
    "baby": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12,
             "max_iters": 2000},
}


# ---- sampling ---------------------------------------------------------------------------------
@dataclass
class SampleConfig:
    """What `python -m gpt.sample` generates; each field is one flag."""

    out_dir: str = setting("out", "the training run's folder", metavar="PATH")
    prompt: str = setting("", "text to continue", shown="start from BOS", metavar="TEXT")
    max_new_tokens: int = setting(200, "tokens to generate per sample")
    temperature: float = setting(1.0, "softmax temperature; 0 means greedy (argmax)")
    top_k: int | None = setting(None, "keep only the k most likely tokens", shown="all")
    top_p: float | None = setting(None, "keep the smallest set reaching probability p",
                                  shown="1, all")
    num_samples: int = setting(1, "how many samples to print")
    seed: int | None = setting(None, "random seed", shown="fresh")
    no_kv_cache: bool = setting(False, "recompute the whole context at every step")
    latest: bool = setting(False, "sample the latest checkpoint (OUT/checkpoint) instead of "
                           "the one with the lowest val loss (OUT/best, when it exists)")
    dtype: SampleDtype = setting("checkpoint", "compute in float32, float64 or bfloat16 (bf16 "
                                 "matmul operands); checkpoint: as the run trained")

    def validate(self) -> SampleConfig:
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        check_positive(self, ("num_samples",))
        check_choice(self, "dtype")
        return self


MIN_TEMPERATURE = 1e-6  # below it, sampling is greedy in all but name: use 0


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   max_new_tokens: int = 0) -> None:
    """Raise UserError (one line) for sampling settings that make no sense."""
    if not temperature >= 0:  # also catches NaN
        raise UserError(f"must be >= 0 (0 means greedy), got {temperature}", field="temperature")
    if 0 < temperature < MIN_TEMPERATURE:  # logits / 1e-320 overflows to inf, then NaN
        raise UserError(f"is {temperature:g}, too small to divide by: use 0 for greedy sampling "
                        f"or at least {MIN_TEMPERATURE:g}", field="temperature")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise UserError(f"must be an integer >= 1, got {top_k}", field="top_k")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"must be in (0, 1], got {top_p}", field="top_p")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise UserError(f"must be an integer >= 0, got {max_new_tokens}",
                        field="max_new_tokens")
