"""gpt.checkpoint: standard safetensors files, atomic saves, a full disk, and loading that
refuses hostile or corrupt folders before it allocates anything."""

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpt import checkpoint as ck
from gpt.config import GPTConfig
from gpt.errors import UserError
from gpt.model import GPT
from gpt.optim import AdamW
from gpt.tokenizer import CharTokenizer


def spec_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """safetensors bytes built straight from the format description, independently of ck."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    names = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<i8"): "I64"}
    for name, arr in tensors.items():
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


TENSORS = {
    "wte": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "h.0.ln_1.weight": np.array([1.5, -2.25], dtype=np.float64),
    "step": np.array(41, dtype=np.int64),  # 0-d
    "empty": np.zeros((0, 3), dtype=np.float32),
}


def test_written_files_follow_the_spec_and_spec_files_are_read():
    buf = ck.tensors_to_bytes(TENSORS)
    n = struct.unpack("<Q", buf[:8])[0]
    header = json.loads(buf[8 : 8 + n])
    assert header["wte"]["dtype"] == "F32" and header["wte"]["shape"] == [3, 4]
    begin, end = header["wte"]["data_offsets"]
    assert buf[8 + n + begin : 8 + n + end] == TENSORS["wte"].tobytes()  # raw little-endian
    assert header["step"]["shape"] == [] and header["step"]["dtype"] == "I64"
    for data in (buf, spec_bytes({k: v for k, v in TENSORS.items() if k != "empty"})):
        got = ck.tensors_from_bytes(data, "f")
        for k, v in got.items():
            assert v.dtype == TENSORS[k].dtype and v.shape == TENSORS[k].shape
            np.testing.assert_array_equal(v, TENSORS[k])


@pytest.mark.parametrize("damage", [
    lambda b: b[:5], lambda b: b[:-3], lambda b: b + b"\0" * 8,
    lambda b: struct.pack("<Q", 10**6) + b[8:], lambda b: b[:8] + b"x" + b[9:],
])
def test_corrupt_bytes_give_one_line_errors(damage):
    with pytest.raises(UserError, match="model.safetensors is truncated or corrupt") as e:
        ck.tensors_from_bytes(damage(ck.tensors_to_bytes(TENSORS)), "model.safetensors")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("shape", [[1e30], ["Infinity"], [2**62, 2**62], [-1]])
def test_hostile_shapes_in_a_header_are_refused(shape):
    head = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}).encode()
    with pytest.raises(UserError, match="truncated or corrupt"):
        ck.tensors_from_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 4, "f")



# ---- whole checkpoints ------------------------------------------------------------------------
def make_ckpt(iter_: int, seed: int = 0) -> tuple[ck.Checkpoint, GPT, CharTokenizer]:
    tok = CharTokenizer.from_text("hello world")
    model = GPT(GPTConfig(tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=seed)
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.1)
    model.zero_grad()
    _, loss = model(np.zeros((2, 8), dtype=np.int64), np.ones((2, 8), dtype=np.int64))
    loss.backward()
    opt.step()
    rng = np.random.default_rng(5)
    rng.random(3)
    c = ck.Checkpoint(model=model.state_dict(), optimizer=opt.state_dict(),
                      config={"model": model.config.to_dict(), "train": {}},
                      tokenizer=tok.to_dict(),
                      state={"iter": iter_, "rng": {"data": rng.bit_generator.state}})
    return c, model, tok


def files_of(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def test_save_and_load_round_trip(tmp_path):
    c, model, tok = make_ckpt(7)
    path = ck.save_checkpoint(str(tmp_path), c)
    assert sorted(os.listdir(path)) == sorted(ck.FILES + (ck.STATE,))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]  # no temp debris
    got = ck.load_checkpoint(str(tmp_path))
    assert got.state["iter"] == 7 and got.tokenizer == tok.to_dict()
    for k, v in c.model.items():
        np.testing.assert_array_equal(got.model[k], v)
    assert int(got.optimizer["step"]) == 1
    for k, v in c.optimizer.items():
        np.testing.assert_array_equal(got.optimizer[k], v)
    rng = np.random.default_rng()
    rng.bit_generator.state = got.state["rng"]["data"]  # JSON round trip of a 128-bit state
    ref = np.random.default_rng(5)
    ref.random(3)
    assert rng.random() == ref.random()
    model2, tok2 = ck.load_model(str(tmp_path))
    x = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(model2(x)[0].data, model(x)[0].data)
    assert tok2.decode(tok2.encode("hello")) == "hello"


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    # Each checkpoint is built once and saved again and again: this test is about the
    # saves, so the bytes compared must not depend on a model being rebuilt bit for bit.
    (first, _, _), (second, _, _) = make_ckpt(1), make_ckpt(2, seed=1)
    out = str(tmp_path)
    ck.save_checkpoint(out, first)
    before = files_of(os.path.join(out, "checkpoint"))
    real_replace = os.replace
    for fail_at in range(1, 8):  # crash at the 1st, 2nd, ... rename of the next save
        calls = []

        def flaky(src, dst, _n=fail_at, _calls=calls):
            _calls.append(src)
            if len(_calls) == _n:
                raise OSError("simulated crash")
            return real_replace(src, dst)

        monkeypatch.setattr(ck.os, "replace", flaky)
        # the five file writes fail as a UserError (temp folder removed); the folder swap
        # itself as the OSError, with the debris left for the next save or load to recover
        with pytest.raises((OSError, UserError), match="simulated") as err:
            ck.save_checkpoint(out, second)
        if err.type is UserError:
            assert "intact" in str(err.value) and sorted(os.listdir(out)) == ["checkpoint"]
        monkeypatch.setattr(ck.os, "replace", real_replace)
        got = ck.load_checkpoint(out)  # whole, and still the old one
        assert got.state["iter"] == 1
        folder = got.path
        assert files_of(folder) == before
        ck.save_checkpoint(out, first)  # recovers debris, back to the start
        assert sorted(os.listdir(out)) == ["checkpoint"]
    # the crash between the two folder renames: only checkpoint.old exists
    os.replace(os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.old"))
    assert ck.has_checkpoint(out) and ck.load_checkpoint(out).state["iter"] == 1
    ck.save_checkpoint(out, make_ckpt(3)[0])
    assert sorted(os.listdir(out)) == ["checkpoint"]
    assert ck.load_checkpoint(out).state["iter"] == 3


def test_a_mistyped_run_folder_is_said_not_to_exist(tmp_path):
    """gpt.sample --out-dir with a typo: the message says the folder does not exist (not just
    that it holds no checkpoint) and names both folders it looked for, best/ too."""
    with pytest.raises(UserError, match="does not exist") as e:
        ck.load_model(str(tmp_path / "ouy"))
    assert "best/" in str(e.value) and "checkpoint/" in str(e.value)
    with pytest.raises(UserError) as e:  # the folder is there, the checkpoint is not
        ck.load_model(str(tmp_path))
    assert "does not exist" not in str(e.value) and "best/" in str(e.value)


def test_missing_and_damaged_checkpoints_are_named(tmp_path):
    out = str(tmp_path)
    with pytest.raises(UserError, match="no checkpoint"):
        ck.load_checkpoint(out)
    folder = ck.save_checkpoint(out, make_ckpt(1)[0])
    model_file = os.path.join(folder, "model.safetensors")
    good = Path(model_file).read_bytes()

    Path(model_file).write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="truncated"):
        ck.load_checkpoint(out)

    flipped = bytearray(good)
    flipped[-1] ^= 0xFF  # same size, valid header, different bytes
    Path(model_file).write_bytes(bytes(flipped))
    with pytest.raises(UserError, match="sha256"):
        ck.load_checkpoint(out)

    os.remove(model_file)
    with pytest.raises(UserError, match="missing"):
        ck.load_checkpoint(out)

    Path(folder, "state.json").write_text("{not json")
    with pytest.raises(UserError, match="state.json is corrupt"):
        ck.load_checkpoint(out)


# ---- a full disk --------------------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["model.safetensors", "tokenizer.json", "state.json"])
def test_disk_full_names_the_file_keeps_the_previous_checkpoint_and_cleans_up(
        tmp_path, monkeypatch, victim):
    out = str(tmp_path)
    ck.save_checkpoint(out, make_ckpt(1)[0])
    before = files_of(os.path.join(out, "checkpoint"))
    real_write = ck.atomic_write

    def full_disk(path, data):
        if os.path.basename(path) == victim:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, data)

    monkeypatch.setattr(ck, "atomic_write", full_disk)
    with pytest.raises(UserError) as err:
        ck.save_checkpoint(out, make_ckpt(2, seed=1)[0])
    msg = str(err.value)
    assert victim in msg and "disk is full" in msg and "previous checkpoint" in msg
    assert "intact" in msg and "\n" not in msg
    assert sorted(os.listdir(out)) == ["checkpoint"]  # no checkpoint.tmp left behind
    assert files_of(os.path.join(out, "checkpoint")) == before
    assert ck.load_checkpoint(out).state["iter"] == 1


def test_disk_full_on_the_first_save_says_nothing_was_written(tmp_path, monkeypatch):
    def full_disk(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "atomic_write", full_disk)
    with pytest.raises(UserError, match="no checkpoint was written"):
        ck.save_checkpoint(str(tmp_path), make_ckpt(1)[0])
    assert os.listdir(tmp_path) == []


def test_a_symlinked_checkpoint_folder_does_not_wedge_saves(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    ck.save_checkpoint(str(elsewhere), make_ckpt(1)[0])
    out.mkdir()
    (out / "checkpoint").symlink_to(elsewhere / "checkpoint")
    assert ck.load_checkpoint(str(out)).state["iter"] == 1  # read through the link
    for it in (2, 3):  # the first save replaces the link by a folder; the next one works too
        ck.save_checkpoint(str(out), make_ckpt(it)[0])
        assert ck.load_checkpoint(str(out)).state["iter"] == it
    assert not (out / "checkpoint").is_symlink() and sorted(os.listdir(out)) == ["checkpoint"]
    assert ck.load_checkpoint(str(elsewhere)).state["iter"] == 1  # the link's target is kept


# ---- hostile or corrupt folders: refused before anything big is read or built ------------------
def rewrite(folder: Path, name: str, data: bytes, list_it: bool = True) -> None:
    """Replace one file of a checkpoint and (by default) record its new size and hash, as a
    careful forger would, so that the check under test is the one that must catch it."""
    (folder / name).write_bytes(data)
    if list_it:
        state = json.loads((folder / "state.json").read_text())
        state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (folder / "state.json").write_text(json.dumps(state))


def saved(tmp_path) -> Path:
    return Path(ck.save_checkpoint(str(tmp_path), make_ckpt(1)[0]))


def load_error(tmp_path) -> str:
    with pytest.raises(UserError) as err:
        ck.load_model(str(tmp_path))
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("field, value, words", [
    ("n_layer", 10**9, "n_layer is 1000000000, above the limit"),
    ("n_embd", 10**12 + 1, "n_embd is 1000000000001, above the limit"),
    ("block_size", 2**40, "block_size"),
    ("n_head", "8", "n_head must be a positive integer"),
    ("vocab_size", True, "vocab_size must be a positive integer"),
    ("dropout", [0.1], "dropout must be a number"),
    ("n_embd", 31, "divisible"),
])
def test_config_fields_out_of_limits_are_named(tmp_path, field, value, words):
    folder = saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model"][field] = value
    rewrite(folder, "config.json", json.dumps(config).encode())
    assert words in load_error(tmp_path) and "config.json" in load_error(tmp_path)


def test_a_config_that_does_not_match_the_weights_is_refused_before_building(tmp_path):
    folder = saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["n_layer"] = 1000  # within limits, but the file holds one layer
    rewrite(folder, "config.json", json.dumps(config).encode())
    assert "needs" in load_error(tmp_path) and "parameters" in load_error(tmp_path)


@pytest.mark.parametrize("tokenizer, words", [
    ({"kind": "bpe", "merges": [[97, 97]] + [[256 + i, 256 + i] for i in range(60)]},
     "spell out more than"),
    ({"kind": "bpe", "merges": [[1, 300]]}, "two earlier token ids"),
    ({"kind": "bpe", "merges": [[1.5, 2]]}, "two earlier token ids"),
    ({"kind": "bpe", "merges": 7}, "not a BPE tokenizer"),
    ({"kind": "char", "chars": "ab"}, "tokens but config.json"),
    ({"kind": "char", "chars": ["a"]}, "not a char tokenizer"),
    ([1, 2], "unknown tokenizer kind"),
])
def test_hostile_tokenizers_are_refused_quickly(tmp_path, tokenizer, words):
    folder = saved(tmp_path)
    rewrite(folder, "tokenizer.json", json.dumps(tokenizer).encode())
    assert words in load_error(tmp_path)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "outside", "folder"])
def test_only_regular_files_are_read(tmp_path, kind):
    folder = saved(tmp_path / "run")
    target = folder / "model.safetensors"
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev-zero":
        target.symlink_to("/dev/zero")
    elif kind == "outside":
        good = saved(tmp_path / "other") / "model.safetensors"
        target.symlink_to(good)
    else:
        target.mkdir()
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(str(tmp_path / "run"))
    assert re.search("symbolic link|not a regular file", str(err.value))


def test_every_file_must_be_listed_with_size_and_hash(tmp_path):
    folder = saved(tmp_path)
    state = json.loads((folder / "state.json").read_text())
    for name in ck.FILES:
        for broken in ({}, {"bytes": "12", "sha256": "x"}, None):
            files = dict(state["files"])
            if broken is None:
                del files[name]
            else:
                files[name] = broken
            (folder / "state.json").write_text(json.dumps(dict(state, files=files)))
            with pytest.raises(UserError, match=f"no valid size and sha256 for {name}"):
                ck.load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("text", ["[" * 100000 + "]" * 100000, '{"files": [1, 2]}', "7",
                                  '{"files": {"model.safetensors": 3}}'])
def test_hostile_state_json_is_one_line(tmp_path, text):
    folder = saved(tmp_path)
    (folder / "state.json").write_text(text)
    assert "state.json" in load_error(tmp_path)


def test_sizes_are_checked_before_reading(tmp_path, monkeypatch):
    folder = saved(tmp_path)
    state = json.loads((folder / "state.json").read_text())
    state["files"]["model.safetensors"]["bytes"] = 10**12  # claims a terabyte
    (folder / "state.json").write_text(json.dumps(state))
    reads = []
    real_read = os.read
    monkeypatch.setattr(ck.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(UserError, match="state.json says 1,000,000,000,000 bytes"):
        ck.load_checkpoint(str(tmp_path))
    assert max(reads) < 1 << 20  # only the small JSON files were read


def test_a_bad_optimizer_step_is_corruption(tmp_path):
    c = make_ckpt(1)[0]
    c.optimizer["step"] = np.array([1, 2, 3])
    ck.save_checkpoint(str(tmp_path), c)
    with pytest.raises(UserError, match="no valid 'step'"):
        ck.load_checkpoint(str(tmp_path))


# ---- readers during saves; best vs latest ---------------------------------------------------------
def test_readers_never_see_a_half_written_checkpoint_nor_false_corruption(tmp_path):
    """A thread saves over and over (alternating two checkpoints) while this one loads: every
    load must succeed and return one whole checkpoint, never a mix of the two."""
    out = str(tmp_path)
    a, b = make_ckpt(1, seed=1)[0], make_ckpt(2, seed=2)[0]
    ck.save_checkpoint(out, a)
    stop, saves, errors = threading.Event(), [0], []

    def saver():
        try:
            while not stop.is_set():
                ck.save_checkpoint(out, b if saves[0] % 2 else a)
                saves[0] += 1
        except (OSError, ValueError) as e:  # reported below, in the test's thread
            errors.append(e)

    thread = threading.Thread(target=saver)
    thread.start()
    try:
        # until enough of both have interleaved: counted, not timed (a loaded machine only
        # takes longer); the deadline only bounds a saver that stopped
        loads, deadline = 0, time.monotonic() + 60
        while time.monotonic() < deadline and (loads < 100 or saves[0] < 30) and not errors:
            got = ck.load_checkpoint(out)
            ref = a if got.state["iter"] == 1 else b
            np.testing.assert_array_equal(got.model["wte"], ref.model["wte"])
            loads += 1
    finally:
        stop.set()
        thread.join()
    assert not errors and saves[0] > 10 and loads > 10


def test_a_reader_that_finds_neither_folder_between_two_saves_looks_again(tmp_path, monkeypatch):
    """Saves in quick succession: one moves checkpoint/ to checkpoint.old/, the next removes
    that .old; a reader looking in between finds neither for a moment (this made the test
    above fail about once in 20 full-suite runs). It must look again, not report no checkpoint."""
    out = str(tmp_path)
    ck.save_checkpoint(out, make_ckpt(1, seed=1)[0])
    real, hidden = os.path.isdir, [4]  # the first 4 looks at the checkpoint folders miss

    def flaky_isdir(path):
        if "checkpoint" in os.path.basename(str(path)) and hidden[0] > 0:
            hidden[0] -= 1
            return False
        return real(path)

    monkeypatch.setattr(ck.os.path, "isdir", flaky_isdir)
    assert ck.load_checkpoint(out).state["iter"] == 1
    assert hidden[0] == 0


def test_best_and_latest_are_separate_folders(tmp_path):
    out = str(tmp_path)
    best, latest = make_ckpt(5, seed=1), make_ckpt(9, seed=2)
    ck.save_checkpoint(out, latest[0])
    assert not ck.uses_best(out)
    model, _ = ck.load_model(out)  # no best yet: the latest
    np.testing.assert_array_equal(model.params["wte"].data, latest[1].params["wte"].data)
    ck.save_checkpoint(out, best[0], best=True)
    assert sorted(os.listdir(out)) == ["best", "checkpoint"]
    assert ck.load_checkpoint(out, best=True).state["iter"] == 5
    assert ck.load_checkpoint(out).state["iter"] == 9  # --resume takes the latest
    model, _ = ck.load_model(out)  # sampling takes the best...
    np.testing.assert_array_equal(model.params["wte"].data, best[1].params["wte"].data)
    model, _ = ck.load_model(out, latest=True)  # ...unless told otherwise
    np.testing.assert_array_equal(model.params["wte"].data, latest[1].params["wte"].data)


# ---- a checkpoint written by an older version ---------------------------------------------------
OLD_RUN = Path(__file__).parent / "data" / "old_run"  # 4 steps of a tiny model, Nov 2026 format


def test_an_older_checkpoint_loads_samples_and_resumes(tmp_path, capsys):
    """The folder was written before the config held a GPTConfig and before the optimizer file
    lost its "skeleton" metadata; it must still load, sample and resume."""
    from gpt import train
    from gpt.sample import generate

    model, tok = ck.load_model(str(OLD_RUN))
    assert model.config.n_layer == 1 and model.config.n_embd == 16 and model.config.dropout == 0.1
    assert len(generate(model, tok, "the", 10, temperature=0, seed=0)) >= 3
    out = tmp_path / "run"
    shutil.copytree(OLD_RUN, out)
    data = Path(__file__).resolve().parents[2] / "train.txt"
    text = data.read_text(encoding="utf-8")[:20_000]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    rc = train.main(["--resume", "--out-dir", str(out), "--data", str(tmp_path / "text.txt"),
                     "--max-iters", "8"])
    assert rc == 0, capsys.readouterr().err
    state = ck.load_checkpoint(str(out)).state
    assert state["iter"] == 8
    saved = json.loads((out / "checkpoint" / "config.json").read_text())
    assert saved["train"]["n_layer"] == 1 and saved["train"]["max_iters"] == 8


# ---- the safetensors reader ------------------------------------------------------------------
def _forged(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_tensors_from_bytes_reads_what_safetensors_writes_as_views_and_refuses_forgeries():
    import safetensors.numpy

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(5),
               "c": rng.standard_normal(()), "d": np.zeros((0, 3), np.float32)}
    buf = safetensors.numpy.save(tensors, metadata={"format": "pt"})
    got = ck.tensors_from_bytes(buf, "f")
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
    assert not got["a"].flags.writeable and got["a"].base is not None  # a view of buf
    f32 = {"dtype": "F32", "shape": [2]}
    cases = {
        "overlap": ({"x": dict(f32, data_offsets=[0, 8]), "y": dict(f32, data_offsets=[4, 12])},
                    12, "overlap or leave a gap"),
        "gap": ({"x": dict(f32, data_offsets=[0, 8]), "y": dict(f32, data_offsets=[12, 20])},
                20, "overlap or leave a gap"),
        "bytes after": ({"x": dict(f32, data_offsets=[0, 8])}, 12, "4 bytes after"),
        "size vs shape": ({"x": dict(f32, data_offsets=[0, 12])}, 12, "12 bytes for shape"),
        "dtype": ({"x": {"dtype": "Q8", "shape": [2], "data_offsets": [0, 8]}}, 8, "Q8"),
        "bf16": ({"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, 4, "BF16"),
        "negative": ({"x": dict(f32, shape=[-2], data_offsets=[0, 8])}, 8, "bad shape"),
    }
    for header, size, message in cases.values():
        with pytest.raises(UserError, match=f"f is truncated or corrupt.*{message}"):
            ck.tensors_from_bytes(_forged(header, bytes(size)), "f")
    bf16 = _forged({"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}},
                   np.array([0x3F80, 0xC000], "<u2").tobytes())  # 1.0 and -2.0
    np.testing.assert_array_equal(ck.tensors_from_bytes(bf16, "f", bf16=True)["x"], [1.0, -2.0])
    with pytest.raises(UserError, match="header length"):
        ck.tensors_from_bytes(struct.pack("<Q", 1 << 40) + b"{}", "f")


def test_lay_out_by_rows_rewrites_a_weight_in_place_with_the_same_values():
    from gpt.model import by_rows, lay_out_by_rows

    buffer = np.arange(24, dtype=np.float32)
    w = buffer[:12].reshape(3, 4)  # (in, out), a view of the buffer
    want = w.copy()
    got = lay_out_by_rows(w)
    np.testing.assert_array_equal(got, want)
    assert np.shares_memory(got, buffer) and got.flags.f_contiguous
    np.testing.assert_array_equal(buffer[:12], want.T.reshape(-1))  # now the rows of w.T
    np.testing.assert_array_equal(by_rows(got), want.T)
    assert by_rows(want) is None
    frozen = want.copy()
    frozen.flags.writeable = False
    assert lay_out_by_rows(frozen) is frozen and lay_out_by_rows(want.T) is not None


@pytest.mark.parametrize("arch", [{}, {"norm": "layernorm", "activation": "gelu", "bias": True,
                                       "tied_head": True}])
def test_load_model_lays_out_large_weights_by_rows_and_samples_the_same(tmp_path, monkeypatch,
                                                                          arch):
    """Linear weights holding at least BY_ROWS_BYTES together load as (in, out) views of
    (out, in) rows, in the file's one buffer, 64-byte aligned and read-only; the model, its
    decoder (up to 4 positions at a time: row_dots; more: BLAS) and sampling give what the
    plain layout gives."""
    import gpt.model
    from gpt.model import by_rows
    from gpt.sample import sample_tokens

    tok = CharTokenizer.from_text("hello world")
    model = GPT(GPTConfig(tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16, **arch),
                seed=3)
    opt = AdamW(model.params, lr=1e-2)
    ck.save_checkpoint(str(tmp_path), ck.Checkpoint(
        model=model.state_dict(), optimizer=opt.state_dict(),
        config={"model": model.config.to_dict(), "train": {}}, tokenizer=tok.to_dict(),
        state={"iter": 0}))
    plain, _ = ck.load_model(str(tmp_path))  # weights this small stay as they are
    assert all(by_rows(p.data) is None for p in plain.params.values())
    monkeypatch.setattr(gpt.model, "BY_ROWS_BYTES", 1)
    loaded, _ = ck.load_model(str(tmp_path))
    for name, p in loaded.params.items():
        a = p.data
        assert not a.flags.writeable and a.ctypes.data % 64 == 0
        np.testing.assert_array_equal(a, model.params[name].data)
        assert (by_rows(a) is not None) == (a.ndim == 2 and name not in ("wte", "wpe")), name
    ids = np.array([[1, 2, 3, 4, 5, 6]])
    np.testing.assert_allclose(loaded(ids)[0].data, model(ids)[0].data, rtol=1e-5, atol=1e-6)
    ours, theirs = loaded.decoder(), model.decoder()
    for chunk in ([1, 2, 3], [4], [5, 6, 7, 8, 9, 0, 1, 2, 3, 4], [5]):
        np.testing.assert_allclose(ours(chunk), theirs(chunk), rtol=1e-5, atol=1e-6)
    kwargs = {"temperature": 0.8, "eos_id": None}
    assert (list(sample_tokens(loaded, [1, 2], 40, rng=np.random.default_rng(0), **kwargs))
            == list(sample_tokens(model, [1, 2], 40, rng=np.random.default_rng(0), **kwargs)))


@pytest.mark.parametrize("dtype", [np.float64, "bfloat16"])
@pytest.mark.parametrize("tied", [True, False])
def test_weights_laid_out_by_rows_decode_as_the_plain_layout_in_every_dtype(tmp_path, monkeypatch,
                                                                            dtype, tied):
    """load_model(dtype=float64) lays out its own copies, "bfloat16" the file's float32 views,
    which the Decoder then rounds (bf16 copies that must keep the layout): its logits, for 1 to
    6 positions a call (row_dots up to ROW_DOTS_ROWS, BLAS past it) and for the server's
    batched step (3 and 5 rows), are the plain layout's."""
    import gpt.model
    from gpt.batching import BatchDecoder
    from gpt.model import by_rows

    tok = CharTokenizer.from_text("hello world")
    model = GPT(GPTConfig(tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=24,
                          tied_head=tied), seed=3)
    ck.save_checkpoint(str(tmp_path), ck.Checkpoint(
        model=model.state_dict(), optimizer=AdamW(model.params, lr=1e-2).state_dict(),
        config={"model": model.config.to_dict(), "train": {}}, tokenizer=tok.to_dict(),
        state={"iter": 0}))
    plain, _ = ck.load_model(str(tmp_path), dtype)
    monkeypatch.setattr(gpt.model, "BY_ROWS_BYTES", 1)
    loaded, _ = ck.load_model(str(tmp_path), dtype)
    ours, theirs = loaded.decoder(), plain.decoder()
    assert by_rows(ours.layers[0][1][0]) is not None and ours.head_rows.flags.c_contiguous
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == np.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for n in range(1, 7):
        chunk = [(3 * n + i) % tok.vocab_size for i in range(n)]
        np.testing.assert_allclose(ours(chunk), theirs(chunk), **tol)
    for rows in (3, 5):
        batches = BatchDecoder(loaded, rows), BatchDecoder(plain, rows)
        for b in batches:
            for slot in range(rows):
                b.prefill(slot, [1 + slot, 2])
        steps = [b.step(list(range(rows)), list(range(rows))) for b in batches]
        np.testing.assert_allclose(*steps, **tol)
