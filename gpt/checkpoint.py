"""Checkpoints: safetensors files written and read here (no dependency), JSON for the rest,
and a folder swap so that a crash at any instant leaves one whole checkpoint on disk.

A training run's folder OUT holds `metrics.jsonl` and the checkpoint folder `OUT/checkpoint/`:

    model.safetensors      the weights, nanoGPT names ("wte", "h.0.attn.c_attn.weight", ...)
    optimizer.safetensors  AdamW's state_dict: "step" (0-d int64), "m.<name>", "v.<name>"
    config.json            {"model": GPTConfig fields, "train": TrainConfig fields}
    tokenizer.json         the tokenizer's to_dict() (kind "char" or "bpe")
    state.json             iteration, RNG states, losses, and the size and sha256 of each file

A safetensors file is: 8 bytes (little-endian uint64) giving the header's length N, then N bytes
of JSON `{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}` (plus an
optional "__metadata__" map of strings), then the raw little-endian bytes of every tensor; the
offsets count from the end of the header and tile the data with no gaps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import UserError

CHECKPOINT_DIR = "checkpoint"
FILES = ("model.safetensors", "optimizer.safetensors", "config.json", "tokenizer.json")
STATE = "state.json"
FORMAT_VERSION = 1

# safetensors dtype names <-> NumPy dtypes (always stored little-endian)
_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


# ---- writing files atomically -----------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one:
    a temporary file in the same folder, fsync, then os.replace (atomic on POSIX and Windows)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


# ---- safetensors ------------------------------------------------------------------------------
def encode_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding `tensors` (in the given order)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        little = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if little not in _NAMES:
            raise TypeError(f"safetensors cannot store dtype {arr.dtype} ({name})")
        raw = np.ascontiguousarray(arr, dtype=little).tobytes()
        header[name] = {"dtype": _NAMES[little], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # pad with spaces so the data starts 8-byte aligned
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def decode_safetensors(buf: bytes, name: str = "file") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes -> ({name: array}, metadata), checking every length and offset.
    Raises UserError naming `name` when the bytes are truncated or inconsistent."""

    def bad(why: str) -> UserError:
        return UserError(f"{name} is truncated or corrupt ({why})")

    if len(buf) < 8:
        raise bad(f"{len(buf)} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(buf[:8], "little")
    if 8 + n > len(buf):
        raise bad(f"header says {n} bytes of JSON but the file has {len(buf)} bytes")
    try:
        header = json.loads(buf[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON: {e.__class__.__name__}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(buf)[8 + n :]
    tensors, spans = {}, []
    for key, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {key!r} lacks a known dtype, a shape or data_offsets") from None
        size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != size:
            raise bad(f"entry {key!r}: offsets {begin}..{end} do not fit shape {list(shape)}")
        if end > len(data):
            raise bad(f"entry {key!r} ends at byte {end} but only {len(data)} data bytes remain")
        spans.append((begin, end))
        tensors[key] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape).copy()
    spans.sort()
    covered = 0
    for begin, end in spans:  # the spec: the tensors tile the data buffer, no holes or overlaps
        if begin != covered:
            raise bad(f"data offsets leave a gap or overlap at byte {covered}")
        covered = end
    if covered != len(data):
        raise bad(f"tensors cover {covered} data bytes but the file has {len(data)}")
    return tensors, metadata


# ---- a whole checkpoint -----------------------------------------------------------------------
@dataclass
class Checkpoint:
    """Everything a checkpoint holds, as plain data (arrays and JSON-able dicts)."""

    model: dict[str, np.ndarray]  # the model's state_dict()
    optimizer: dict  # the optimizer's state_dict()
    config: dict  # {"model": {...}, "train": {...}}
    tokenizer: dict  # tokenizer.to_dict()
    state: dict = field(default_factory=dict)  # {"iter": .., "rng": {..}, ..}
    path: str = ""  # the folder it was read from


def checkpoint_path(out_dir: str) -> str:
    return os.path.join(out_dir, CHECKPOINT_DIR)


def _file_bytes(ckpt: Checkpoint) -> dict[str, bytes]:
    def js(obj: Any) -> bytes:
        return (json.dumps(obj, indent=2) + "\n").encode("utf-8")

    return {
        "model.safetensors": encode_safetensors(ckpt.model),
        "optimizer.safetensors": encode_safetensors(ckpt.optimizer),
        "config.json": js(ckpt.config),
        "tokenizer.json": js(ckpt.tokenizer),
    }


def _recover(out_dir: str) -> None:
    """If a crash hit between the two renames of a save, put the previous checkpoint back."""
    final, old = checkpoint_path(out_dir), checkpoint_path(out_dir) + ".old"
    if not os.path.isdir(final) and os.path.isdir(old):
        os.replace(old, final)


def save_checkpoint(out_dir: str, ckpt: Checkpoint) -> str:
    """Write `ckpt` to OUT/checkpoint so that a crash at any point leaves one whole checkpoint.

    1. write every file into a fresh OUT/checkpoint.tmp (each fsynced; state.json, which lists
       the size and sha256 of the others, last);
    2. rename OUT/checkpoint -> OUT/checkpoint.old, then OUT/checkpoint.tmp -> OUT/checkpoint;
    3. delete OUT/checkpoint.old.
    A crash in 1 leaves the old folder untouched; between the two renames of 2, load_checkpoint
    (and the next save) find OUT/checkpoint.old and use it. Returns the checkpoint's path.
    """
    os.makedirs(out_dir, exist_ok=True)
    _recover(out_dir)
    final = checkpoint_path(out_dir)
    tmp, old = final + ".tmp", final + ".old"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)  # debris of an earlier crash during step 1
    os.makedirs(tmp)
    files = {}
    for name, data in _file_bytes(ckpt).items():
        atomic_write(os.path.join(tmp, name), data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state = dict(ckpt.state, format_version=FORMAT_VERSION, files=files)
    atomic_write(os.path.join(tmp, STATE), (json.dumps(state, indent=2) + "\n").encode("utf-8"))
    if os.path.isdir(old):
        shutil.rmtree(old)  # only reached when `final` exists (see _recover), so this is stale
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    if os.path.isdir(old):
        shutil.rmtree(old)
    return final


def has_checkpoint(out_dir: str) -> bool:
    path = checkpoint_path(out_dir)
    return os.path.isdir(path) or os.path.isdir(path + ".old")


def load_checkpoint(out_dir: str) -> Checkpoint:
    """Read and verify OUT/checkpoint (or OUT/checkpoint.old after an interrupted save).
    Never writes anything. Raises UserError (one line) if anything is missing or corrupt."""
    path = checkpoint_path(out_dir)
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        path += ".old"
    if not os.path.isdir(path):
        raise UserError(f"no checkpoint in {out_dir} (looked for {path}/); "
                              "train without --resume first, or point --out-dir at a run's folder")
    state_file = os.path.join(path, STATE)
    try:
        with open(state_file, "rb") as f:
            state = json.loads(f.read().decode("utf-8"))
        files = state["files"]
    except FileNotFoundError:
        raise UserError(f"{state_file} is missing; the checkpoint is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{state_file} is corrupt (not the JSON a checkpoint writes)") from None
    raw = {}
    for name in FILES:
        file = os.path.join(path, name)
        try:
            with open(file, "rb") as f:
                raw[name] = f.read()
        except FileNotFoundError:
            raise UserError(f"{file} is missing; the checkpoint is incomplete") from None
        expect = files.get(name, {}) if isinstance(files, dict) else {}
        if expect.get("bytes") not in (None, len(raw[name])):
            raise UserError(f"{file} is truncated or corrupt ({len(raw[name])} bytes, "
                                  f"state.json says {expect['bytes']})")
        if name.endswith(".safetensors"):
            decode_safetensors(raw[name], file)  # names what is wrong before the hash does
        if expect.get("sha256") not in (None, hashlib.sha256(raw[name]).hexdigest()):
            raise UserError(f"{file} is corrupt (its sha256 differs from state.json's)")

    def js(name: str) -> dict:
        try:
            return json.loads(raw[name].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{os.path.join(path, name)} is not valid JSON") from None

    model, _ = decode_safetensors(raw["model.safetensors"], os.path.join(path, "model.safetensors"))
    # (older checkpoints also carry a "skeleton" entry in its metadata: unused, the state is flat)
    optimizer, _ = decode_safetensors(raw["optimizer.safetensors"],
                                      os.path.join(path, "optimizer.safetensors"))
    state = {k: v for k, v in state.items() if k not in ("files", "format_version")}
    return Checkpoint(model=model, optimizer=optimizer, config=js("config.json"),
                      tokenizer=js("tokenizer.json"), state=state, path=path)


def load_model(out_dir: str, dtype: Any = None):
    """(model, tokenizer) from a training run's folder, ready to sample from.
    `dtype` defaults to the dtype the weights were saved in."""
    from .config import GPTConfig
    from .model import GPT
    from .tokenizer import tokenizer_from_dict

    ckpt = load_checkpoint(out_dir)
    try:
        config = GPTConfig.from_dict(ckpt.config["model"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{ckpt.path}/config.json has no valid model config ({e})") from None
    if dtype is None:
        dtype = ckpt.model["wte"].dtype if "wte" in ckpt.model else np.float32
    model = GPT(config, dtype=dtype)
    model.load_state_dict({k: v.astype(dtype, copy=False) for k, v in ckpt.model.items()})
    return model, tokenizer_from_dict(ckpt.tokenizer)
