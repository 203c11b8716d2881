"""`python -m gpt.convert`: GPT-2 in and out of the Hugging Face folder format.

    python -m gpt.convert --from-hf HF_DIR --out-dir RUN   # a transformers GPT-2 -> a run folder
    python -m gpt.convert --to-hf RUN --out HF_DIR         # a GPT-2-shaped run -> transformers

A Hugging Face GPT-2 folder holds config.json, model.safetensors, vocab.json and merges.txt.
Its weights carry our names under a "transformer." prefix, in our layout: transformers keeps
GPT-2's linear layers as Conv1D, whose weight is (in, out) like ours, so nothing is
transposed, and c_attn's q | k | v are fused in the order we split them. The head is tied to
wte (no lm_head.weight in the file) unless config.json says tie_word_embeddings false; an
untied lm_head is an nn.Linear, (out, in), the one weight that is transposed. docs/gpt.md
("GPT-2 in and out") has the whole table.

Every file is read bounded and checked before it is used, as a checkpoint is: sizes against
what config.json implies, the safetensors header against the data, names and shapes against
the model. A pickle (pytorch_model.bin) is never loaded: unpickling can run code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np

from . import cli
from .bpe import ENDOFTEXT, GPT2Tokenizer
from .checkpoint import (
    HEADER_PER_TENSOR,
    JSON_LIMIT,
    TOKENIZER_LIMIT,
    Checkpoint,
    atomic_write,
    has_checkpoint,
    load_checkpoint,
    load_model,
    read_regular_file,
    save_checkpoint,
    tensors_from_bytes,
    tensors_to_bytes,
)
from .config import GPTConfig, TrainConfig
from .errors import UserError
from .model import GPT

HF_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
PREFIX = "transformer."  # GPT2LMHeadModel's names; a bare GPT2Model's have none
BUFFERS = (".attn.bias", ".attn.masked_bias")  # older files keep the causal mask: not weights
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # transformers' names for GPT-2's tanh GELU


# ---- Hugging Face -> ours -----------------------------------------------------------------------
def _hf_file(folder: str, name: str, limit: int) -> bytes:
    path = os.path.join(folder, name)
    if not os.path.lexists(path):
        raise UserError(f"{folder} has no {name}; a Hugging Face GPT-2 folder holds "
                        f"{', '.join(HF_FILES)}")
    return read_regular_file(path, limit, follow_links=True)  # the Hub's cache links to blobs


def _refuse_pickle(folder: str) -> None:
    if (not os.path.exists(os.path.join(folder, "model.safetensors"))
            and os.path.exists(os.path.join(folder, "pytorch_model.bin"))):
        raise UserError(
            f"{folder} holds pytorch_model.bin, a pickle, which gpt never loads (unpickling can "
            "run code): convert it once with transformers, python -c \"from transformers import "
            f"GPT2LMHeadModel as M; M.from_pretrained('{folder}').save_pretrained('{folder}', "
            "safe_serialization=True)\", and run this again")


def hf_config(d: dict, file: str) -> GPTConfig:
    """Our GPTConfig for a transformers GPT2Config dict, or UserError naming what does not fit."""
    def get(key, default=None):
        return d.get(key, default)

    if not isinstance(d, dict) or get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{file} is not a GPT-2 config (model_type "
                        f"{d.get('model_type') if isinstance(d, dict) else None!r})")
    checks = [
        ("activation_function", get("activation_function", "gelu_new") in GELU_TANH,
         "GPT-2's tanh GELU (gelu_new)"),
        ("layer_norm_epsilon", get("layer_norm_epsilon", 1e-5) == 1e-5, "1e-5"),
        ("n_inner", get("n_inner") in (None, 4 * (get("n_embd") or 0)), "4 * n_embd"),
        ("scale_attn_weights", get("scale_attn_weights", True) is True, "true"),
        ("scale_attn_by_inverse_layer_idx", get("scale_attn_by_inverse_layer_idx", False)
         is False, "false"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise UserError(f"{file}: {key} is {d.get(key)!r}; gpt's GPT-2 needs {want}")
    try:
        config = GPTConfig(vocab_size=get("vocab_size"), block_size=get("n_positions"),
                           n_layer=get("n_layer"), n_head=get("n_head"), n_embd=get("n_embd"),
                           norm="layernorm", activation="gelu", bias=True,
                           tied_head=bool(get("tie_word_embeddings", True))).validate()
    except ValueError as e:
        raise UserError(f"{file} describes no model gpt can build ({e})") from None
    return config


def weights_from_hf(tensors: dict[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """Our {name: array} from a transformers GPT-2 state dict: the prefix dropped, the causal
    mask buffers skipped, an untied lm_head transposed to (C, V); nothing else changes."""
    out = {}
    for key, array in tensors.items():
        name = key.removeprefix(PREFIX)
        if name.endswith(BUFFERS):
            continue
        if name == "lm_head.weight":
            if config.tied_head:
                continue  # a copy of wte that some savers write anyway
            array = array.T  # nn.Linear (V, C) -> our (C, V)
        out[name.removesuffix(".weight") if name in ("wte.weight", "wpe.weight") else name] = array
    return out


def read_hf(folder: str, dtype=np.float32) -> tuple[GPTConfig, dict[str, np.ndarray],
                                                    GPT2Tokenizer]:
    """(config, weights of `dtype` under our names, tokenizer) of a Hugging Face GPT-2 folder,
    every file bounded and checked before use; UserError (one line) on anything wrong."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder; give a Hugging Face GPT-2 folder (holding "
                        f"{', '.join(HF_FILES)})")
    _refuse_pickle(folder)
    config_file = os.path.join(folder, "config.json")
    try:
        d = json.loads(_hf_file(folder, "config.json", JSON_LIMIT).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{config_file} is not valid JSON") from None
    config = hf_config(d, config_file)
    tokenizer = read_hf_tokenizer(folder)
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f"{folder}: vocab.json has {tokenizer.vocab_size} tokens but config.json "
                        f"says vocab_size {config.vocab_size}; they must be equal")
    specs = GPT.param_specs(config)
    P = sum(math.prod(shape) for _, shape, _ in specs)
    masks = config.n_layer * config.block_size**2  # the mask buffers older files hold
    limit = 8 * (P + masks + config.vocab_size * config.n_embd) + 8 + HEADER_PER_TENSOR * (
        3 * len(specs) + 1)
    model_file = os.path.join(folder, "model.safetensors")
    tensors = tensors_from_bytes(_hf_file(folder, "model.safetensors", limit), model_file,
                                 bf16=True)
    weights = weights_from_hf(tensors, config)
    bad = sorted(k for k, v in weights.items() if v.dtype.kind != "f")
    if bad:
        raise UserError(f"{model_file}: {bad[0]} holds {weights[bad[0]].dtype}, not floats")
    weights = {k: v.astype(dtype, copy=False) for k, v in weights.items()}
    try:
        GPT(config, dtype=dtype, weights=weights)  # checks every name, shape and dtype
    except ValueError as e:
        raise UserError(f"{model_file} does not fit {config_file}: {e}") from None
    return config, weights, tokenizer


def read_hf_tokenizer(folder: str) -> GPT2Tokenizer:
    """The GPT2Tokenizer of vocab.json + merges.txt in `folder`, bounded and checked."""
    try:
        vocab = _hf_file(folder, "vocab.json", TOKENIZER_LIMIT).decode("utf-8")
        merges = _hf_file(folder, "merges.txt", TOKENIZER_LIMIT).decode("utf-8")
        return GPT2Tokenizer.from_files(vocab, merges)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{folder}: vocab.json and merges.txt are not a GPT-2 tokenizer "
                        f"({' '.join(str(e).split())[:200]})") from None


def from_hf(hf_dir: str, out_dir: str) -> str:
    """Convert a Hugging Face GPT-2 folder into the run folder `out_dir` (its checkpoint holds
    the weights in float32, the tokenizer, and no optimizer state). Returns the checkpoint path."""
    if has_checkpoint(out_dir):
        raise UserError(f"{out_dir} already holds a checkpoint; choose a new --out-dir",
                        field="out_dir")
    config, weights, tokenizer = read_hf(hf_dir)
    train = TrainConfig(data="", out_dir=out_dir, model=config, tokenizer="gpt2",
                        init_from=os.path.abspath(hf_dir))
    return save_checkpoint(out_dir, Checkpoint(
        model=weights, optimizer={}, tokenizer=tokenizer.to_dict(),
        config={"model": config.to_dict(), "train": train.to_dict()},
        state={"iter": 0, "converted_from": os.path.abspath(hf_dir)}))


# ---- ours -> Hugging Face -----------------------------------------------------------------------
def weights_to_hf(weights: dict[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """transformers' GPT2LMHeadModel state dict from ours (weights_from_hf's inverse)."""
    out = {}
    for name, array in weights.items():
        if name == "lm_head.weight":
            out[name] = np.ascontiguousarray(array.T)  # (C, V) -> nn.Linear's (V, C)
        else:
            out[PREFIX + (f"{name}.weight" if name in ("wte", "wpe") else name)] = array
    return out


def to_hf(run: str, out: str) -> str:
    """Write the run's model (its best checkpoint, else its latest) as a Hugging Face GPT-2
    folder `out` that GPT2LMHeadModel and GPT2TokenizerFast load. A run whose architecture
    or tokenizer GPT-2 cannot represent is refused, naming what. Returns `out`."""
    model, tokenizer = load_model(run)
    cfg = model.config
    unlike = cfg.unlike_gpt2()
    if unlike:
        raise UserError(f"{run}'s model has {', '.join(unlike)}: GPT-2 cannot represent that; "
                        "only a run converted from GPT-2 (or fine-tuned from one) converts back")
    if not isinstance(tokenizer, GPT2Tokenizer):
        raise UserError(f"{run}'s tokenizer is {tokenizer.to_dict()['kind']!r}; GPT-2's "
                        "tokenizer files can only carry a GPT-2 tokenizer (vocab.json + merges.txt)")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        raise UserError(f"{out} already holds a model.safetensors; choose a new --out",
                        field="out")
    os.makedirs(out, exist_ok=True)
    eot = tokenizer.eos_id
    hf_cfg = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": cfg.tied_head,
        "torch_dtype": str(model.dtype),
    }
    vocab, merges = tokenizer.to_files()
    tok_cfg = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": cfg.block_size,
               "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT,
               "add_prefix_space": False}
    weights = weights_to_hf({n: p.data for n, p in model.params.items()}, cfg)
    files = {"config.json": json.dumps(hf_cfg, indent=2) + "\n", "vocab.json": vocab,
             "merges.txt": merges, "tokenizer_config.json": json.dumps(tok_cfg, indent=2) + "\n"}
    for name, text in files.items():
        atomic_write(os.path.join(out, name), text.encode("utf-8"))
    atomic_write(os.path.join(out, "model.safetensors"), tensors_to_bytes(weights))
    return out


# ---- either kind of folder, for fine-tuning -----------------------------------------------------
def load_pretrained(path: str, dtype=np.float32) -> tuple[GPTConfig, dict[str, np.ndarray], object]:
    """(config, weights, tokenizer) of a run folder (its best checkpoint, else its latest) or
    of a Hugging Face GPT-2 folder: what `gpt.train --init-from PATH` starts from."""
    if has_checkpoint(path) or has_checkpoint(path, best=True):
        from .tokenizer import tokenizer_from_dict

        ckpt = load_checkpoint(path, best=has_checkpoint(path, best=True), optimizer=False)
        config = GPTConfig.from_dict(ckpt.config["model"])
        return config, ckpt.model, tokenizer_from_dict(ckpt.tokenizer)
    if os.path.isfile(os.path.join(path, "config.json")):
        return read_hf(path, dtype)
    raise UserError(f"{path} is neither a run folder (no {path}/checkpoint) nor a Hugging Face "
                    "GPT-2 folder (no config.json)", field="init_from")


def same_shape(ours: GPTConfig, pretrained: GPTConfig, given: set[str]) -> GPTConfig:
    """The pretrained model's config with our dropout, after checking that every shape or
    architecture flag given agrees with it (UserError naming the first that does not)."""
    for f in dataclasses.fields(GPTConfig):
        mine, theirs = getattr(ours, f.name), getattr(pretrained, f.name)
        if f.metadata.get("fixed") and f.name in given and mine != theirs:
            raise UserError(f"is {mine!r} but the model of --init-from has {theirs!r}; drop "
                            "the flag (the shape comes from it)", field=f.name)
    return dataclasses.replace(pretrained, dropout=ours.dropout)


# ---- the command line -------------------------------------------------------------------------
def build_parser() -> cli.Parser:
    p = cli.Parser("python -m gpt.convert",
                   "Convert a Hugging Face GPT-2 folder into a run folder, or back.")
    p.add_argument("--from-hf", metavar="HF_DIR", help="a transformers GPT-2 folder (config.json, "
                   "model.safetensors, vocab.json, merges.txt) to read")
    p.add_argument("--out-dir", metavar="RUN", help="the run folder to write (with --from-hf)")
    p.add_argument("--to-hf", metavar="RUN", help="a run folder of GPT-2's architecture to read")
    p.add_argument("--out", metavar="HF_DIR", help="the Hugging Face folder to write (with --to-hf)")
    return p


def convert(args: argparse.Namespace) -> int:
    if bool(args.from_hf) == bool(args.to_hf):
        raise UserError("give either --from-hf HF_DIR --out-dir RUN or --to-hf RUN --out HF_DIR "
                        "(see python -m gpt.convert --help)")
    if args.from_hf:
        if not args.out_dir or args.out:
            raise UserError("--from-hf needs --out-dir RUN (and no --out)")
        path = from_hf(args.from_hf, args.out_dir)
        print(f"wrote {path} from {args.from_hf}; sample it with python -m gpt.sample "
              f"--out-dir {args.out_dir}")
    else:
        if not args.out or args.out_dir:
            raise UserError("--to-hf needs --out HF_DIR (and no --out-dir)")
        print(f"wrote {to_hf(args.to_hf, args.out)} (config.json, model.safetensors, vocab.json, "
              "merges.txt) for transformers' GPT2LMHeadModel.from_pretrained")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: convert(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
