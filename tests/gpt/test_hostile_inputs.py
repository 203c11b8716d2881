"""A corpus of hostile inputs through every command (gpt.train, gpt.sample, gpt.data,
gpt.plot), each run as a real subprocess. Every case must end with a non-zero exit, exactly one
line on stderr, no traceback, and the run folder exactly as it was (nothing written, nothing
deleted). The cases: absurd sizes, wrong JSON types, deep nesting, self-doubling BPE merges,
FIFOs and devices in place of files, files missing from state.json, forged safetensors
headers, numbers too small or too large to compute with."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError


def run_cmd(module: str, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, timeout=120, check=False, cwd=cwd)


def snapshot(folder: Path) -> dict:
    """Every entry under `folder`: a link's target, a regular file's bytes, a FIFO's mark."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root, name)
            key = str(p.relative_to(folder))
            if p.is_symlink():
                out[key] = ("link", os.readlink(p))
            elif p.is_fifo():
                out[key] = ("fifo",)
            elif p.is_file():
                out[key] = ("file", p.read_bytes())
            else:
                out[key] = ("dir",)
    return out


def assert_refused(proc: subprocess.CompletedProcess, before: dict, folder: Path, *words):
    err = proc.stderr.strip()
    assert proc.returncode not in (0, None), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err
    assert snapshot(folder) == before  # nothing in the run folder changed


# ---- breaking a checkpoint, as a careful forger would (sizes and hashes kept consistent) ------
def forge(folder: Path, name: str, data: bytes) -> None:
    """Replace `name` in the checkpoint folder and list its true size and sha256."""
    (folder / name).write_bytes(data)
    state_file = folder / "state.json"
    state = json.loads(state_file.read_text())
    state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state_file.write_text(json.dumps(state))


def edit_json(folder: Path, name: str, change) -> None:
    data = json.loads((folder / name).read_text())
    change(data)
    forge(folder, name, json.dumps(data).encode())


def header_only(tensor: dict, name: str = "wte") -> bytes:
    head = json.dumps({name: tensor}).encode()
    return struct.pack("<Q", len(head)) + head + b"\0" * 16


def replace_by(kind: str):
    def change(folder: Path, name: str) -> None:
        (folder / name).unlink()
        if kind == "fifo":
            os.mkfifo(folder / name)
        else:
            (folder / name).symlink_to(kind)
    return change


DOUBLING = {"kind": "bpe", "merges": [[97, 97]] + [[256 + i, 256 + i] for i in range(60)]}
CHECKPOINT_CASES = {  # name -> (how to break OUT/checkpoint, words the message must hold)
    "n_layer 1e9": (lambda f: edit_json(f, "config.json",
                                        lambda c: c["model"].update(n_layer=10**9)), "n_layer"),
    "n_embd 1e12+1": (lambda f: edit_json(f, "config.json",
                                          lambda c: c["model"].update(n_embd=10**12 + 1)),
                      "n_embd"),
    "n_head a string": (lambda f: edit_json(f, "config.json",
                                            lambda c: c["model"].update(n_head="2")), "n_head"),
    "config deeply nested": (lambda f: forge(f, "config.json", DEEP.encode()), "config.json"),
    "doubling BPE merges": (lambda f: forge(f, "tokenizer.json", json.dumps(DOUBLING).encode()),
                            "tokenizer.json"),
    "model a FIFO": (lambda f: replace_by("fifo")(f, "model.safetensors"), "not a regular file"),
    "model -> /dev/zero": (lambda f: replace_by("/dev/zero")(f, "model.safetensors"),
                           "symbolic link"),
    "entry deleted from state.json": (
        lambda f: (f / "state.json").write_text(json.dumps(
            {**json.loads((f / "state.json").read_text()),
             "files": {k: v for k, v in json.loads((f / "state.json").read_text())["files"]
                       .items() if k != "model.safetensors"}})),
        "no valid size and sha256 for model.safetensors"),
    "state.json deeply nested": (lambda f: (f / "state.json").write_text(DEEP), "state.json"),
    "state files a list": (lambda f: (f / "state.json").write_text('{"files": [1]}'),
                           "state.json"),
    "shape Infinity": (lambda f: forge(f, "model.safetensors", header_only(
        {"dtype": "F32", "shape": ["Infinity"], "data_offsets": [0, 16]})), "model.safetensors"),
    "shape 1e30": (lambda f: forge(f, "model.safetensors", header_only(
        {"dtype": "F32", "shape": [1e30], "data_offsets": [0, 16]})), "model.safetensors"),
    "header deeply nested": (lambda f: forge(f, "model.safetensors", header_only(
        json.loads("[" * 50 + "]" * 50))), "model.safetensors"),
    "header length 2**63": (lambda f: forge(f, "model.safetensors", struct.pack("<Q", 2**63)
                                            + b"{}"), "model.safetensors"),
}
RESUME_ONLY = {  # read by --resume only (sampling does not need them)
    "optimizer step a vector": (lambda f: forge(f, "optimizer.safetensors", header_only(
        {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}, "step")),
        "optimizer.safetensors"),
    "optimizer without moments": (lambda f: forge(f, "optimizer.safetensors", header_only(
        {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}, "other")),
        "optimizer.safetensors"),
    "iter a string": (lambda f: edit_json(f, "state.json", lambda s: s.update(iter="x")),
                      "state.json"),
    "rng a number": (lambda f: edit_json(f, "state.json", lambda s: s.update(rng=5)),
                     "state.json"),
    "lr a string": (lambda f: edit_json(f, "config.json", lambda c: c["train"].update(lr="x")),
                    "config.json"),
}


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out, symlinks=True)
    return out


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES) + sorted(RESUME_ONLY))
def test_train_resume_refuses_a_hostile_checkpoint(run_copy, tiny_run, case):
    damage, words = {**CHECKPOINT_CASES, **RESUME_ONLY}[case]
    damage(run_copy / "checkpoint")
    before = snapshot(run_copy)
    proc = run_cmd("gpt.train", "--data", tiny_run.parent / "text.txt", "--out-dir", run_copy,
                   "--resume", "--max-iters", 100)
    assert_refused(proc, before, run_copy, words)


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_sample_refuses_a_hostile_checkpoint(run_copy, case):
    damage, words = CHECKPOINT_CASES[case]
    for folder in ("checkpoint", "best"):
        damage(run_copy / folder)
    before = snapshot(run_copy)
    assert_refused(run_cmd("gpt.sample", "--out-dir", run_copy), before, run_copy, words)


@pytest.mark.parametrize("flags, words", [
    (["--n-layer", 100_000_000], "--n-layer is 100000000, above the limit"),
    (["--n-embd", 1_000_000_000_001], "--n-embd is 1000000000001, above the limit"),
    (["--n-embd", 1_000_000], "--n-embd is 1000000"),
    (["--n-embd", 65536, "--n-head", 8], "GB of memory"),  # within limits; does not fit
    (["--batch-size", 10**12], "GB of memory"),
    (["--n-layer", "1e30"], "--n-layer"),
    (["--max-iters", "Infinity"], "--max-iters"),
    (["--lr", "inf"], "--lr"),
    (["--dropout", "nan"], "--dropout"),
    (["--data", "/dev/zero"], "not a file"),
])
def test_train_refuses_hostile_flags_up_front(tiny_run, tmp_path, flags, words):
    out = tmp_path / "fresh"
    proc = run_cmd("gpt.train", "--data", tiny_run.parent / "text.txt", "--out-dir", out,
                   *flags)
    assert_refused(proc, {}, tmp_path / "nothing", words)
    assert not out.exists()  # not even the folder was made


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "1e-320"], "too small to divide by"),
    (["--temperature", "nan"], "--temperature"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--top-k", "0"], "--top-k"),
    (["--num-samples", "0"], "--num-samples"),
    (["--prompt", "\u2603"], "does not know"),
])
def test_sample_refuses_hostile_flags(run_copy, flags, words):
    before = snapshot(run_copy)
    assert_refused(run_cmd("gpt.sample", "--out-dir", run_copy, *flags), before, run_copy, words)


def test_a_second_trainer_is_refused_naming_the_first(run_copy, tiny_run):
    from gpt.lock import RunLock

    with RunLock(str(run_copy)):
        before = snapshot(run_copy)
        proc = run_cmd("gpt.train", "--data", tiny_run.parent / "text.txt", "--out-dir",
                       run_copy, "--resume", "--max-iters", 100)
        assert_refused(proc, before, run_copy, f"is in use by pid {os.getpid()}")


# ---- gpt.plot and gpt.data -------------------------------------------------------------------
PLOT_CASES = {
    "a FIFO": lambda m: (m.unlink(), os.mkfifo(m)),
    "a link to /dev/zero": lambda m: (m.unlink(), m.symlink_to("/dev/zero")),
    "deeply nested": lambda m: m.write_text(DEEP + "\n" + m.read_text()),
    "iter a string": lambda m: m.write_text('{"iter": "x", "train_loss": 1}\n{"iter": 2}\n'),
    "not UTF-8": lambda m: m.write_bytes(b"\xff\xfe\n" * 3),
    "empty": lambda m: m.write_text(""),
}


@pytest.mark.parametrize("case", sorted(PLOT_CASES))
def test_plot_refuses_hostile_metrics(run_copy, case):
    PLOT_CASES[case](run_copy / "metrics.jsonl")
    before = snapshot(run_copy)
    assert_refused(run_cmd("gpt.plot", run_copy), before, run_copy)


def test_plot_refuses_an_output_in_a_missing_folder(run_copy):
    before = snapshot(run_copy)
    proc = run_cmd("gpt.plot", run_copy, "--output", run_copy / "no" / "such" / "loss.png")
    assert_refused(proc, before, run_copy, "--output")


@pytest.mark.parametrize("case", ["fifo", "dev-zero", "wrong text", "a folder", "bad url",
                                  "closed port"])
def test_data_refuses_hostile_sources(tmp_path, case):
    src, out = tmp_path / "src", tmp_path / "out"
    out.mkdir()
    target = out / "input.txt"
    if case == "fifo":
        os.mkfifo(src)
        url = src.as_uri()
    elif case == "dev-zero":
        url = "file:///dev/zero"
    elif case == "wrong text":
        src.write_text("not Shakespeare\n")
        url = src.as_uri()
    elif case == "a folder":
        target, url = out, "file:///dev/null"
    elif case == "bad url":
        url = "no-such-scheme://x"
    else:
        url = "http://127.0.0.1:9/input.txt"  # discard port: nothing listens
    before = snapshot(out)
    proc = run_cmd("gpt.data", "shakespeare", "--out", target, "--url", url)
    assert_refused(proc, before, out)
