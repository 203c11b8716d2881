"""Checkpoints: tensors in safetensors files (written and read by the official `safetensors`
package), JSON for the rest, a folder swap so that a crash at any instant leaves one whole
checkpoint on disk, and a loader that checks what a folder claims before it reads or builds it.

A training run's folder OUT holds `metrics.jsonl` and the checkpoint folder `OUT/checkpoint/`:

    model.safetensors      the weights, nanoGPT names ("wte", "h.0.attn.c_attn.weight", ...)
    optimizer.safetensors  AdamW's state: "step" (0-d int64), "m.<name>" and "v.<name>"
    config.json            {"model": GPTConfig fields, "train": TrainConfig fields}
    tokenizer.json         the tokenizer's to_dict() (kind "char" or "bpe")
    state.json             iteration, RNG states, losses, and the size and sha256 of each file

docs/gpt.md explains the safetensors layout byte by byte. A checkpoint folder may come from
anywhere, so loading trusts nothing in it: every file must be a regular file (no symlink, FIFO
or device) listed in state.json with its size and sha256; sizes are compared with the file
and with the model that config.json describes before a byte is read, and config.json and
tokenizer.json are validated before any array is made.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy

from .errors import UserError

CHECKPOINT_DIR = "checkpoint"  # the latest checkpoint: what --resume continues
BEST_DIR = "best"  # the checkpoint with the lowest validation loss so far: what sampling takes
FILES = ("model.safetensors", "optimizer.safetensors", "config.json", "tokenizer.json")
STATE = "state.json"
FORMAT_VERSION = 1
JSON_LIMIT = 1 << 20  # bytes of config.json or state.json
TOKENIZER_LIMIT = 64 << 20  # bytes of tokenizer.json (a BPE of a million merges fits)
HEADER_PER_TENSOR = 256  # bytes of safetensors header allowed per tensor (names, shapes)


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


def checkpoint_path(out_dir: str, best: bool = False) -> str:
    """OUT/checkpoint (the latest), or OUT/best with best=True."""
    return os.path.join(out_dir, BEST_DIR if best else CHECKPOINT_DIR)


def tensors_to_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file holding `tensors` (the safetensors package writes it)."""
    return safetensors.numpy.save({k: np.asarray(v).copy(order="C") if not
                                   np.asarray(v).flags.c_contiguous else np.asarray(v)
                                   for k, v in tensors.items()})


SAFETENSORS_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I32": "<i4", "I64": "<i8",
                      "BF16": "<u2"}  # BF16: its bits, widened by tensors_from_bytes(bf16=True)


def tensors_from_bytes(data: bytes | memoryview, name: str, bf16: bool = False,
                       writable: bool = False) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file's bytes, as read-only arrays that are views of `data`
    (no copy: a model's weights are in memory once; writable=True, with a writable buffer,
    leaves them writable); UserError naming `name` if the bytes are
    not a valid file: the 8-byte header length, the JSON header, a known dtype for every
    tensor, its size equal to its shape's, and the tensors tiling the data exactly, with no gap
    or overlap. BF16 tensors (which NumPy lacks) are refused, or with bf16=True widened to
    float32 (new arrays)."""
    try:
        if len(data) < 8:
            raise ValueError("shorter than the 8-byte header length")
        n = int.from_bytes(data[:8], "little")
        if n > min(len(data) - 8, JSON_LIMIT + HEADER_PER_TENSOR * (1 << 16)):
            raise ValueError(f"header length {n:,} does not fit the file")
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        header.pop("__metadata__", None)
        start, out, spans = 8 + n, {}, []
        for key, entry in header.items():
            dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
            shape, (a, b) = entry["shape"], entry["data_offsets"]
            if not all(type(v) is int and v >= 0 for v in (*shape, a, b)):
                raise ValueError(f"tensor {key!r} has a bad shape or offsets")
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if b - a != count * dtype.itemsize:
                raise ValueError(f"tensor {key!r}: {b - a} bytes for shape {shape}")
            if start + b > len(data):
                raise ValueError(f"tensor {key!r} runs past the end of the file")
            spans.append((a, b))
            array = np.frombuffer(data, dtype=dtype, count=count, offset=start + a).reshape(shape)
            array.flags.writeable = writable and array.flags.writeable
            if entry["dtype"] == "BF16":
                if not bf16:
                    raise ValueError(f"tensor {key!r} is BF16, which is not read here")
                array = (array.astype(np.uint32) << 16).view(np.float32)
            out[key] = array
        end = 0
        for a, b in sorted(spans):
            if a != end:
                raise ValueError("the tensors overlap or leave a gap")
            end = b
        if start + end != len(data):
            raise ValueError(f"{len(data) - start - end} bytes after the last tensor")
        return out
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            why = f"missing or unknown {why}"
        raise UserError(f"{name} is truncated or corrupt ({why})") from None


def _file_bytes(ckpt: Checkpoint) -> dict[str, bytes]:
    def js(obj: Any) -> bytes:
        return (json.dumps(obj, indent=2) + "\n").encode("utf-8")

    return {
        "model.safetensors": tensors_to_bytes(ckpt.model),
        "optimizer.safetensors": tensors_to_bytes(ckpt.optimizer),
        "config.json": js(ckpt.config),
        "tokenizer.json": js(ckpt.tokenizer),
    }


def _remove(path: str) -> None:
    """Delete a folder, or only the link when `path` is a symbolic link to one."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _recover(final: str) -> None:
    """If a crash hit between the two renames of a save, put the previous checkpoint back."""
    old = final + ".old"
    if not os.path.isdir(final) and os.path.isdir(old):
        os.replace(old, final)


def _save_failed(e: OSError, file: str, final: str, had_previous: bool) -> UserError:
    """The one-line message of a save that could not write `file` (the temp folder is gone)."""
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (
        e.strerror or str(e) or type(e).__name__)
    kept = (f"the previous checkpoint in {final} is intact" if had_previous
            else "no checkpoint was written")
    return UserError(f"could not save the checkpoint: writing {file} failed ({why}); "
                           f"{kept}; free some space (or fix the folder) and run again")


def save_checkpoint(out_dir: str, ckpt: Checkpoint, best: bool = False) -> str:
    """Write `ckpt` to OUT/checkpoint (OUT/best with best=True) so that a crash at any point
    leaves one whole checkpoint.

    1. write every file into a fresh OUT/checkpoint.tmp (each fsynced; state.json, which lists
       the size and sha256 of the others, last);
    2. rename OUT/checkpoint -> OUT/checkpoint.old, then OUT/checkpoint.tmp -> OUT/checkpoint;
    3. delete OUT/checkpoint.old.
    A crash in 1 leaves the old folder untouched; between the two renames of 2, load_checkpoint
    (and the next save) find OUT/checkpoint.old and use it. An error while writing in 1 (a full
    disk) removes OUT/checkpoint.tmp and raises UserError naming the file. A symlinked
    OUT/checkpoint is replaced by a real folder (the link goes, the folder it pointed to stays).
    Returns the checkpoint's path.
    """
    os.makedirs(out_dir, exist_ok=True)
    final = checkpoint_path(out_dir, best)
    _recover(final)
    tmp, old = final + ".tmp", final + ".old"
    if os.path.lexists(final) and not os.path.isdir(final):
        raise UserError(f"{final} exists but is not a folder; move it away and run again")
    _remove(tmp)  # debris of an earlier crash during step 1
    had_previous = os.path.isdir(final)
    file = tmp
    try:
        os.makedirs(tmp)
        files = {}
        for name, data in _file_bytes(ckpt).items():
            file = os.path.join(tmp, name)
            atomic_write(file, data)
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        state = dict(ckpt.state, format_version=FORMAT_VERSION, files=files)
        file = os.path.join(tmp, STATE)
        atomic_write(file, (json.dumps(state, indent=2) + "\n").encode("utf-8"))
    except OSError as e:
        _remove(tmp)
        raise _save_failed(e, file, final, had_previous) from None
    _remove(old)  # only reached when `final` exists (see _recover), so this is stale
    if had_previous:
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    _remove(old)
    return final


def has_checkpoint(out_dir: str, best: bool = False) -> bool:
    path = checkpoint_path(out_dir, best)
    return os.path.isdir(path) or os.path.isdir(path + ".old")


# ---- reading, trusting nothing -----------------------------------------------------------------
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_regular_file(path: str, limit: int, expect: int | None = None,
                      dir_fd: int | None = None, follow_links: bool = False,
                      mutable: bool = False) -> bytes | memoryview:
    """The bytes of `path`, which must be a regular file (not a symlink, FIFO, device or
    folder) of at most `limit` bytes, and of exactly `expect` bytes when given. The checks use
    the opened file's own fstat, before a byte is read; a FIFO does not block the open.
    With `dir_fd` (an open folder) the file is looked up in that folder, wherever it moved;
    with follow_links a symlink (a path the user gave) is followed to a regular file.
    mutable=True reads into a writable NumPy buffer instead (the same single copy, one the
    caller may rewrite in place). NumPy asks Linux to back large arrays with huge pages
    (madvise), where Python's bytes get 4 KiB pages: a decoder step, which streams every weight
    once, took 35 ms from the former and 57 ms from the latter at GPT-2 small's shape (AMD EPYC
    Zen 4, 1 thread; benchmarks/gemv.py). The buffer is also placed so that a
    safetensors file's tensor data starts on a 64-byte boundary (a whole cache line)."""
    nofollow = 0 if follow_links else getattr(os, "O_NOFOLLOW", 0)
    flags = os.O_RDONLY | nofollow | getattr(os, "O_NONBLOCK", 0)
    try:
        if dir_fd is None:
            fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
        else:
            fd = os.open(os.path.basename(path), flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the checkpoint is incomplete") from None
    except OSError as e:
        if os.path.islink(path):
            raise UserError(f"{path} is a symbolic link; a checkpoint holds regular files "
                                  "only") from None
        raise UserError(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{path} is not a regular file (a FIFO, device or folder); "
                            "only regular files are read")
        if expect is not None and st.st_size != expect:
            raise UserError(f"{path} is truncated or corrupt ({st.st_size} bytes, "
                                  f"state.json says {expect})")
        if st.st_size > limit:
            raise UserError(f"{path} is {st.st_size:,} bytes, more than the {limit:,} it "
                                  "can hold here; the checkpoint is corrupt")
        size, done, parts = st.st_size, 0, []
        buffer = None
        if mutable:
            head = os.read(fd, 8)  # safetensors: the header's length, then the header
            os.lseek(fd, 0, os.SEEK_SET)
            skip = 8 + int.from_bytes(head, "little") if len(head) == 8 else 0
            raw = np.empty(size + 64, dtype=np.uint8)
            start = -(raw.ctypes.data + skip) % 64
            buffer = memoryview(raw[start:start + size])
            reader = io.FileIO(fd, closefd=False)  # readinto: into the buffer, no copy
        while done < size:
            want = min(size - done, 1 << 30)
            if buffer is not None:
                got = reader.readinto(buffer[done:done + want])
            else:
                parts.append(os.read(fd, want))
                got = len(parts[-1])
            if not got:
                break
            done += got
    finally:
        os.close(fd)
    if done < size:
        raise UserError(f"{path} is truncated (it shrank while being read)")
    return buffer if buffer is not None else b"".join(parts)


def _parse_json(data: bytes, path: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{path} is corrupt (not the JSON a checkpoint writes)") from None


def _read_state(path: str, dir_fd: int | None) -> dict:
    """state.json, with a valid {"bytes", "sha256"} entry for every file of FILES."""
    file = os.path.join(path, STATE)
    state = _parse_json(read_regular_file(file, JSON_LIMIT, dir_fd=dir_fd), file)
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict):
        raise UserError(f"{file} is corrupt (not the JSON a checkpoint writes)")
    for name in FILES:
        entry = files.get(name)
        ok = (isinstance(entry, dict) and type(entry.get("bytes")) is int
              and entry["bytes"] >= 0 and isinstance(entry.get("sha256"), str)
              and _SHA256.fullmatch(entry["sha256"]))
        if not ok:
            raise UserError(f"{file} lists no valid size and sha256 for {name}; the "
                                  "checkpoint is corrupt")
    return state


def _read_listed(path: str, name: str, files: dict, limit: int, dir_fd: int | None,
                 mutable: bool = False) -> bytes | memoryview:
    """A file of the checkpoint, checked against its size and sha256 in state.json."""
    file = os.path.join(path, name)
    expect = files[name]["bytes"]
    data = read_regular_file(file, limit, expect, dir_fd, mutable=mutable)
    if hashlib.sha256(data).hexdigest() != files[name]["sha256"]:
        raise UserError(f"{file} is corrupt (its sha256 differs from state.json's)")
    return data


def _model_config(config: Any, file: str):
    """The GPTConfig in config.json, validated (every field within its limits)."""
    from .config import GPTConfig

    try:
        return GPTConfig.from_dict(config["model"]).validate()
    except (KeyError, TypeError, ValueError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{file} holds no valid model config ({msg})") from None


def _check_sizes(path: str, files: dict, config) -> tuple[int, int]:
    """Byte limits of the two safetensors files for the model that config.json describes:
    its P parameters in float32 or float64, and a header of at most HEADER_PER_TENSOR bytes a
    tensor. A size outside them is corruption, found before reading the file. (The optimizer
    file may be smaller: a checkpoint made only for sampling can hold no optimizer state.)"""
    from .model import GPT

    specs = GPT.param_specs(config)
    P = sum(int(np.prod(shape)) for _, shape, _ in specs)
    limits = []
    for name, values, tensors in (("model.safetensors", P, len(specs)),
                                  ("optimizer.safetensors", 2 * P, 2 * len(specs) + 1)):
        low = 4 * values if name == "model.safetensors" else 0
        high = 8 * values + 8 + 8 + HEADER_PER_TENSOR * (tensors + 1)
        size = files[name]["bytes"]
        if not low <= size <= high:
            raise UserError(f"{os.path.join(path, name)}: state.json says {size:,} bytes, "
                                  f"but the model in config.json ({P:,} parameters) needs "
                                  f"{low:,} to {high:,}; the checkpoint is corrupt")
        limits.append(high)
    return limits[0], limits[1]


LOAD_ATTEMPTS = 5  # reads of a checkpoint that a concurrent save may swap out under us


def _current_folder(out_dir: str, best: bool) -> str:
    """OUT/checkpoint, or OUT/checkpoint.old while a save is between its two renames.
    Looked for a few times: with saves in quick succession, a reader can find neither
    (the folder moved to .old by one save, and that .old removed by the next)."""
    path = checkpoint_path(out_dir, best)
    for attempt in range(LOAD_ATTEMPTS):
        for candidate in (path, path + ".old"):
            if os.path.isdir(candidate):
                return candidate
        if attempt + 1 < LOAD_ATTEMPTS and os.path.isdir(os.path.dirname(path) or "."):
            time.sleep(0.001 * 2**attempt)
    looked = (f"looked for {os.path.join(out_dir, BEST_DIR)}/ and "
              f"{os.path.join(out_dir, CHECKPOINT_DIR)}/")
    if not os.path.isdir(out_dir):
        raise UserError(f"{out_dir!r} does not exist, so it holds no checkpoint ({looked}): "
                        "check the path, or train a run there first", field="out_dir")
    raise UserError(f"{out_dir!r} holds no checkpoint ({looked}): point it at a run's "
                    "folder, or train a fresh run first", field="out_dir")


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def load_checkpoint(out_dir: str, best: bool = False, optimizer: bool = True,
                    writable_model: bool = False) -> Checkpoint:
    """Read and verify OUT/checkpoint (OUT/best with best=True; or the .old folder after an
    interrupted save).

    Never writes anything. Order: state.json (bounded), then config.json and tokenizer.json
    (bounded, hashed, validated), then the sizes of the tensor files against the model the
    config describes, and only then the tensors. Raises UserError (one line) if anything
    is missing, corrupt, hostile or inconsistent.

    A training may save while we read: the folder is opened once and every file is read from
    that folder (POSIX), and if reading fails because a save replaced the folder meanwhile,
    we read the new one (up to LOAD_ATTEMPTS times), so a reader never reports a checkpoint
    as corrupt because it was being replaced, nor mixes files of two checkpoints.
    optimizer=False leaves the optimizer's file unread (sampling needs only the weights): the
    Checkpoint's optimizer is then {}. writable_model=True makes the model's arrays writable
    views of a buffer of their own (load_model rearranges large weights in it, in place)."""
    by_fd = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")
    for attempt in range(LOAD_ATTEMPTS):
        path = _current_folder(out_dir, best)
        try:
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY) if by_fd else None
        except OSError:  # renamed or removed between the check and the open
            continue
        held = _identity(path) if dir_fd is None else (os.fstat(dir_fd).st_dev,
                                                        os.fstat(dir_fd).st_ino)
        try:
            return _read_checkpoint(path, dir_fd, optimizer, writable_model)
        except UserError:
            now = _identity(checkpoint_path(out_dir, best))
            if attempt + 1 < LOAD_ATTEMPTS and now != held:
                continue  # a save swapped the folder under us: read the new one
            raise
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
    return _read_checkpoint(_current_folder(out_dir, best), None, optimizer, writable_model)


def _read_checkpoint(path: str, dir_fd: int | None, with_optimizer: bool = True,
                     writable_model: bool = False) -> Checkpoint:
    """load_checkpoint's reading and checking of one folder (`dir_fd`: the folder, opened)."""
    from .tokenizer import tokenizer_from_dict

    state = _read_state(path, dir_fd)

    def read(name: str, limit: int, mutable: bool = False) -> bytes | memoryview:
        return _read_listed(path, name, state["files"], limit, dir_fd, mutable)

    config_file, tok_file = os.path.join(path, "config.json"), os.path.join(path, "tokenizer.json")
    config = _parse_json(read("config.json", JSON_LIMIT), config_file)
    model_config = _model_config(config, config_file)
    tokenizer = _parse_json(read("tokenizer.json", TOKENIZER_LIMIT), tok_file)
    try:
        vocab = tokenizer_from_dict(tokenizer).vocab_size
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{tok_file} is not a valid tokenizer ({e})") from None
    if vocab != model_config.vocab_size:
        raise UserError(f"{tok_file} has {vocab} tokens but config.json's model has "
                              f"vocab_size {model_config.vocab_size}; the checkpoint is corrupt")

    model_limit, opt_limit = _check_sizes(path, state["files"], model_config)
    model_file = os.path.join(path, "model.safetensors")
    model = tensors_from_bytes(read("model.safetensors", model_limit, writable_model), model_file,
                               writable=writable_model)
    opt_file = os.path.join(path, "optimizer.safetensors")
    optimizer = (tensors_from_bytes(read("optimizer.safetensors", opt_limit), opt_file)
                 if with_optimizer else {})
    step = optimizer.get("step", np.array(0)) if optimizer else np.array(0)
    if step.shape != () or step.dtype.kind not in "iu" or step < 0:
        raise UserError(f"{opt_file} has no valid 'step' (a 0-d integer >= 0); the "
                              "checkpoint is corrupt")
    state = {k: v for k, v in state.items() if k not in ("files", "format_version")}
    return Checkpoint(model=model, optimizer=optimizer, config=config, tokenizer=tokenizer,
                      state=state, path=path)


def uses_best(out_dir: str, latest: bool = False) -> bool:
    """Whether load_model(out_dir, latest=latest) takes OUT/best: it does when OUT/best exists
    and the latest was not asked for."""
    return not latest and has_checkpoint(out_dir, best=True)


def load_model(out_dir: str, dtype: Any = None, *, latest: bool = False):
    """(model, tokenizer) from a training run's folder, ready to sample from: the checkpoint
    with the lowest validation loss (OUT/best) when there is one, else the latest
    (OUT/checkpoint); latest=True always takes the latest. `dtype` (None or "checkpoint": as
    the run trained: the weights' dtype, or "bfloat16" for a mixed-precision run, whose
    float32 weights then multiply as bf16) is float32, float64 or "bfloat16"."""
    from .config import GPTConfig
    from .model import BY_ROWS_BYTES, GPT, lay_out_by_rows
    from .tokenizer import tokenizer_from_dict

    ckpt = load_checkpoint(out_dir, best=uses_best(out_dir, latest), optimizer=False,
                           writable_model=True)
    config = GPTConfig.from_dict(ckpt.config["model"])  # validated by load_checkpoint
    if dtype in (None, "checkpoint"):
        dtype = ckpt.model["wte"].dtype if "wte" in ckpt.model else np.float32
        if ckpt.config.get("train", {}).get("dtype") == "bfloat16":
            dtype = "bfloat16"
    if str(dtype) != "bfloat16" and np.dtype(dtype).kind != "f":
        raise UserError(f"{ckpt.path}/model.safetensors holds {np.dtype(dtype)} weights, "
                              "not floats; the checkpoint is corrupt")
    # the file's arrays themselves (views of its bytes): the weights are in memory once. The
    # linear weights of a large model are laid out for sampling, in place
    # (gpt.model.lay_out_by_rows).
    weights = {k: v.astype(np.float32 if str(dtype) == "bfloat16" else dtype, copy=False)
               for k, v in ckpt.model.items()}
    linear = [k for k, w in weights.items() if w.ndim == 2 and k not in ("wte", "wpe")]
    if sum(weights[k].nbytes for k in linear) >= BY_ROWS_BYTES:
        for k in linear:
            weights[k] = lay_out_by_rows(weights[k])
    for w in weights.values():
        w.flags.writeable = False
    try:
        model = GPT(config, dtype=dtype, weights=weights)
    except ValueError as e:
        raise UserError(f"{ckpt.path}/model.safetensors does not fit config.json: {e}") \
            from None
    return model, tokenizer_from_dict(ckpt.tokenizer)
