"""The two configurations, as dataclasses: `GPTConfig` (the model's shape, saved with every
checkpoint) and `TrainConfig` (one training run). Defaults live here and nowhere else; the
`python -m gpt.train` flags are built from TrainConfig's fields (`out_dir` -> `--out-dir`),
each field's `help` metadata becoming the flag's help text.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

DTYPES = ("float32", "float64")
TOKENIZERS = ("char", "bpe")
BACKENDS = ("loky", "dask")


# Upper limits of the model's shape: far beyond what a NumPy GPT can train, low enough that
# a hostile config.json or a typo (--n-layer 100000000) is refused before anything is built.
LIMITS = {"vocab_size": 1 << 20, "block_size": 1 << 16, "n_layer": 1 << 10, "n_head": 1 << 10,
          "n_embd": 1 << 16}


def _check_positive(obj, names: tuple[str, ...], as_flags: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        shown = "--" + name.replace("_", "-") if as_flags else name
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{shown} must be a positive integer, got {value!r}")
        if value > LIMITS.get(name, value):
            raise ValueError(f"{shown} is {value}, above the limit {LIMITS[name]:,}")


def _from_dict(cls, d: dict):
    """Build `cls` from a dict, refusing names it does not know (a typo would go unnoticed)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    return cls(**d)


@dataclass
class GPTConfig:
    """The shape of a GPT: everything needed to rebuild its parameters."""

    vocab_size: int  # V: number of token ids
    block_size: int = 64  # T_max: the longest context the model sees (rows of wpe)
    n_layer: int = 4  # number of transformer blocks
    n_head: int = 8  # H: attention heads per block; head_dim = n_embd // n_head
    n_embd: int = 128  # C: width of the residual stream
    dropout: float = 0.0  # probability of zeroing an activation in training

    def validate(self) -> GPTConfig:
        """Raise ValueError (one line) if this config cannot build a model; return self."""
        _check_positive(self, ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"))
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_head {_divisor_hint(self.n_embd, self.n_head)}"
            )
        if not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        return _from_dict(cls, d)


def _divisor_hint(n_embd: int, n_head: int) -> int:
    """The divisor of n_embd closest to n_head (for the error message); pairs d, n_embd // d
    up to sqrt(n_embd), so a huge n_embd cannot stall the message."""
    small = [d for d in range(1, min(math.isqrt(n_embd), 1 << 20) + 1) if n_embd % d == 0]
    divisors = small + [n_embd // d for d in small]
    return min(divisors, key=lambda d: (abs(d - n_head), d))


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    """One training run of `python -m gpt.train`; each field is one flag."""

    data: str = field(default="train.txt", metadata=_help("UTF-8 text file to train on"))
    out_dir: str = field(
        default="out", metadata=_help("directory for the checkpoint and metrics.jsonl")
    )
    n_layer: int = field(default=4, metadata=_help("number of transformer blocks"))
    n_head: int = field(default=8, metadata=_help("attention heads per block (divides n_embd)"))
    n_embd: int = field(default=128, metadata=_help("width of the residual stream"))
    block_size: int = field(default=64, metadata=_help("context length in tokens"))
    batch_size: int = field(default=12, metadata=_help("sequences per optimizer step"))
    max_iters: int = field(default=1000, metadata=_help("number of optimizer steps"))
    lr: float = field(default=1e-3, metadata=_help("peak learning rate (after warmup)"))
    min_lr: float = field(
        default=1e-4, metadata=_help("learning rate at the end of the cosine decay")
    )
    warmup_iters: int = field(
        default=100, metadata=_help("steps of linear warmup from 0 to lr")
    )
    weight_decay: float = field(
        default=0.1, metadata=_help("AdamW decoupled weight decay (2-D weights only)")
    )
    beta1: float = field(default=0.9, metadata=_help("AdamW beta1 (first-moment decay)"))
    beta2: float = field(default=0.99, metadata=_help("AdamW beta2 (second-moment decay)"))
    grad_clip: float = field(
        default=1.0, metadata=_help("clip the global gradient norm to this (0: no clipping)")
    )
    dropout: float = field(default=0.0, metadata=_help("dropout probability in training"))
    eval_interval: int = field(
        default=200, metadata=_help("evaluate train/val loss every this many steps")
    )
    eval_iters: int = field(default=20, metadata=_help("batches averaged per evaluation"))
    log_interval: int = field(default=10, metadata=_help("print a progress line every N steps"))
    seed: int = field(default=1337, metadata=_help("random seed (init, batches, dropout)"))
    resume: bool = field(
        default=False, metadata=_help("continue from the checkpoint in --out-dir")
    )
    dtype: str = field(
        default="float32", metadata=_help("floating-point type: float32 or float64")
    )
    workers: int = field(
        default=1, metadata=_help("data-parallel workers, each computing a shard of the batch")
    )
    tokenizer: str = field(default="char", metadata=_help("tokenizer: char or bpe"))
    vocab_size: int = field(
        default=512, metadata=_help("vocabulary size to train (bpe tokenizer only)")
    )
    backend: str = field(
        default="loky", metadata=_help("joblib backend for --workers: loky or dask")
    )
    scheduler: str | None = field(
        default=None, metadata=_help("dask scheduler address (with --backend dask)")
    )

    def validate(self) -> TrainConfig:
        """Raise ValueError (one line) on a setting that cannot work; return self."""
        _check_positive(
            self,
            ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
             "eval_interval", "eval_iters", "log_interval", "workers", "vocab_size"),
            as_flags=True,
        )
        if self.n_embd % self.n_head:
            raise ValueError(
                f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head}); "
                f"try --n-head {_divisor_hint(self.n_embd, self.n_head)}"
            )
        if not 0 < self.lr < math.inf:
            raise ValueError(f"--lr must be positive and finite, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be in [0, --lr={self.lr}], got {self.min_lr}")
        if not isinstance(self.warmup_iters, numbers.Integral) or self.warmup_iters < 0:
            raise ValueError(f"--warmup-iters must be >= 0, got {self.warmup_iters!r}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"--weight-decay must be >= 0 and finite, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.grad_clip >= 0:
            raise ValueError(f"--grad-clip must be >= 0 (0 turns it off), got {self.grad_clip}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(
                f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        return self

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The model this run trains, for a tokenizer with `vocab_size` ids."""
        return GPTConfig(
            vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
            n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return _from_dict(cls, d)
