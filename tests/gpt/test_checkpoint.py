"""gpt.checkpoint: the safetensors format byte for byte, corrupt files, atomic saves."""

import json
import os
import shutil
import struct
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


def test_safetensors_round_trip_and_layout():
    buf = ck.encode_safetensors(TENSORS, {"note": "hi"})
    n = struct.unpack("<Q", buf[:8])[0]
    assert (8 + n) % 8 == 0  # data starts aligned
    header = json.loads(buf[8 : 8 + n])
    assert header["__metadata__"] == {"note": "hi"}
    assert header["wte"] == {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}
    assert header["step"]["shape"] == [] and header["step"]["dtype"] == "I64"
    assert buf[8 + n : 8 + n + 48] == TENSORS["wte"].tobytes()  # raw little-endian bytes
    got, meta = ck.decode_safetensors(buf)
    assert meta == {"note": "hi"} and list(got) == list(TENSORS)
    for k, v in TENSORS.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)


def test_reads_files_written_from_the_spec():
    tensors = {"a": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
               "b": np.array([3, -4], dtype=np.int64)}
    got, meta = ck.decode_safetensors(spec_bytes(tensors, {"k": "v"}))
    assert meta == {"k": "v"}
    np.testing.assert_array_equal(got["a"], tensors["a"])
    np.testing.assert_array_equal(got["b"], tensors["b"])


def test_big_endian_input_is_stored_little_endian():
    be = np.array([1.0, 2.0], dtype=">f4")
    got, _ = ck.decode_safetensors(ck.encode_safetensors({"x": be}))
    assert got["x"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(got["x"], [1.0, 2.0])


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[:5], "shorter than the 8-byte"),
    (lambda b: b[:-3], "remain"),
    (lambda b: b + b"\0" * 8, "cover"),
    (lambda b: struct.pack("<Q", 10**6) + b[8:], "header says"),
    (lambda b: b[:8] + b"x" + b[9:], "not JSON"),
])
def test_corrupt_bytes_give_one_line_errors(damage, words):
    buf = ck.encode_safetensors(TENSORS)
    with pytest.raises(UserError, match=words) as err:
        ck.decode_safetensors(damage(buf), "model.safetensors")
    assert "\n" not in str(err.value) and "model.safetensors" in str(err.value)


def test_offsets_that_do_not_match_the_shape_are_refused():
    head = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}
    raw = json.dumps(head).encode()
    buf = struct.pack("<Q", len(raw)) + raw + b"\0" * 4
    with pytest.raises(UserError, match="do not fit shape"):
        ck.decode_safetensors(buf)
    head = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}  # a gap at 0..4
    raw = json.dumps(head).encode()
    with pytest.raises(UserError, match="gap"):
        ck.decode_safetensors(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)


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
    out = str(tmp_path)
    ck.save_checkpoint(out, make_ckpt(1)[0])
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
        with pytest.raises(OSError, match="simulated"):
            ck.save_checkpoint(out, make_ckpt(2, seed=1)[0])
        monkeypatch.setattr(ck.os, "replace", real_replace)
        got = ck.load_checkpoint(out)  # whole, and still the old one
        assert got.state["iter"] == 1
        folder = got.path
        assert files_of(folder) == before
        ck.save_checkpoint(out, make_ckpt(1)[0])  # recovers debris, back to the start
        assert sorted(os.listdir(out)) == ["checkpoint"]
    # the crash between the two folder renames: only checkpoint.old exists
    os.replace(os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.old"))
    assert ck.has_checkpoint(out) and ck.load_checkpoint(out).state["iter"] == 1
    ck.save_checkpoint(out, make_ckpt(3)[0])
    assert sorted(os.listdir(out)) == ["checkpoint"]
    assert ck.load_checkpoint(out).state["iter"] == 3


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
