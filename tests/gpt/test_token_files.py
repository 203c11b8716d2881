"""Token files: `python -m gpt.data prepare TEXT --out DIR` (streamed, atomic, one-line
errors), `load_token_dir` (refuses files that disagree with meta.json), and `gpt.train --data
DIR`, which takes the same batches and losses as training on TEXT itself."""

import io
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gpt.data as gd
from gpt import train as gt
from gpt.bpe import CHUNK_PATTERN, BPETokenizer
from gpt.cli import describe
from gpt.errors import UserError
from gpt.shards import cut_batch, cut_windows
from gpt.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parents[2]
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "2", "--log-interval", "2", "--eval-interval", "6",
        "--warmup-iters", "2", "--max-iters", "12", "--threads", "1"]
# letters, digits, spaces, newlines, symbols and multi-byte characters: every kind of chunk
ALPHABET = "ab Z09 \n\n\t_.,!'é€😀"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text((REPO / "train.txt").read_text(encoding="utf-8")[:20_000] + "é€😀",
                    encoding="utf-8")
    return path


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def assert_one_line_error(proc, *words):
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- streaming reads the text exactly as a whole read would ---------------------------------
@given(st.text(alphabet=ALPHABET, min_size=1, max_size=80), st.integers(1, 9))
def test_pieces_and_chunks_are_those_of_the_whole_text(text, piece_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.txt")
        with open(path, "wb") as f:
            f.write(text.encode("utf-8"))
        if not text.strip():
            with pytest.raises(UserError, match="empty"):
                list(gd.read_pieces(path, piece_bytes))
            return
        pieces = list(gd.read_pieces(path, piece_bytes))
        assert "".join(p for p, _ in pieces) == text  # characters split by a read come whole
        assert pieces[-1][1] == len(text.encode("utf-8"))
        chunks = [c for cs, _ in gd.text_chunks(iter(pieces)) for c in cs]
        assert chunks == re.findall(CHUNK_PATTERN, text)


def test_bad_utf8_is_named_at_its_offset_across_reads(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("héllo wörld".encode() + b"\xe2\x82" + b" more")  # a cut-off euro sign
    for piece_bytes in (1, 2, 3, 5, 64):
        with pytest.raises(UserError, match=r"not UTF-8 text \(bad byte 0xe2 at offset 13\)"):
            list(gd.read_pieces(str(path), piece_bytes))


# ---- prepare -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, vocab_size", [("char", None), ("bpe", 300)])
def test_prepare_writes_the_ids_the_whole_text_gives(tmp_path, text_file, monkeypatch, kind,
                                                     vocab_size):
    monkeypatch.setattr(gd, "PIECE_BYTES", 997)  # many pieces, cut anywhere
    meta = gd.prepare(text_file, tmp_path / "d", kind, vocab_size, progress=None)
    text = text_file.read_text(encoding="utf-8")
    tok = (CharTokenizer.from_text(text) if kind == "char" else BPETokenizer.train(text, 300))
    train, val = gd.split_ids(tok.encode(text))
    data = gd.load_token_dir(tmp_path / "d")
    assert data.tokenizer.to_dict() == tok.to_dict()
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    np.testing.assert_array_equal(data.train, train)
    np.testing.assert_array_equal(data.val, val)
    assert meta == data.meta and meta["tokenizer"] == kind
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no temporary folder left beside it
    assert sorted(os.listdir(tmp_path / "d")) == ["meta.json", "tokenizer.json", "train.bin",
                                                  "val.bin"]


def test_token_dtype_is_uint16_while_the_vocabulary_fits():
    assert gd.token_dtype(2) == gd.token_dtype(65536) == np.uint16
    assert gd.token_dtype(65537) == np.uint32


def test_a_vocabulary_above_uint16_is_stored_as_uint32(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000]
    (tmp_path / "t.txt").write_text("".join(chars), encoding="utf-8")
    meta = gd.prepare(tmp_path / "t.txt", tmp_path / "d", progress=None)
    data = gd.load_token_dir(tmp_path / "d")
    assert meta["dtype"] == "uint32" and data.train.dtype == np.uint32
    assert data.tokenizer.vocab_size == len(chars) + 2 > 65536
    ids = np.concatenate([data.train, data.val])
    np.testing.assert_array_equal(ids, np.arange(len(chars)))  # sorted distinct characters


def test_large_inputs_get_a_progress_line(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(gd, "PROGRESS_BYTES", 1)
    stream = io.StringIO()
    gd.prepare(text_file, tmp_path / "d", progress=stream)
    lines = stream.getvalue().splitlines()
    assert any(line.startswith("pass 1 of 2, vocabulary:") for line in lines), lines
    assert re.search(r"pass 2 of 2, token ids: 0 of 0 MB \(100%\)", stream.getvalue())
    small = io.StringIO()
    monkeypatch.setattr(gd, "PROGRESS_BYTES", 1 << 30)
    gd.prepare(text_file, tmp_path / "e", progress=small)
    assert small.getvalue() == ""


def test_an_interrupted_prepare_leaves_nothing(tmp_path, text_file, monkeypatch):
    def interrupted(path, tokenizer):
        yield np.zeros(5, dtype=np.int64), 5
        raise KeyboardInterrupt

    monkeypatch.setattr(gd, "_encoded_pieces", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gd.prepare(text_file, tmp_path / "d", progress=None)
    assert os.listdir(tmp_path) == []


def test_an_empty_folder_may_be_the_output(tmp_path, text_file):
    (tmp_path / "d").mkdir()
    gd.prepare(text_file, tmp_path / "d", progress=None)
    assert gd.load_token_dir(tmp_path / "d").meta["val_tokens"] > 0


def test_the_prepare_command(tmp_path, text_file):
    proc = cli("gpt.data", "prepare", text_file, "--out", tmp_path / "d", "--tokenizer", "bpe",
               "--vocab-size", "270")
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"wrote .*d: [\d,]+ train and [\d,]+ val tokens \(uint16, bpe vocabulary "
                    r"of 270\) from 0\.0 MB in [\d.]+ s \([\d.,]+ MB/s\)", proc.stdout)
    assert gd.load_token_dir(tmp_path / "d").tokenizer.vocab_size == 270


@pytest.mark.parametrize("content, flags, words", [
    (None, [], ["not found"]),
    (b"", [], ["is empty"]),
    (b" \n\t", [], ["is empty"]),
    (b"abc\xff", [], ["not UTF-8", "0xff at offset 3"]),
    (b"a", [], ["1 token(s): too few to split 90/10"]),
    (b"hello", ["--vocab-size", "300"], ["--vocab-size is for --tokenizer bpe"]),
    (b"hello", ["--tokenizer", "bpe", "--vocab-size", "100"], ["--vocab-size must be in [258"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, content, flags, words):
    text = tmp_path / "t.txt"
    if content is not None:
        text.write_bytes(content)
    before = sorted(os.listdir(tmp_path))
    proc = cli("gpt.data", "prepare", text, "--out", tmp_path / "d", *flags)
    assert_one_line_error(proc, *words)
    assert sorted(os.listdir(tmp_path)) == before


def test_a_folder_with_files_or_a_file_as_out_is_never_written_over(tmp_path, text_file):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep me")
    assert_one_line_error(cli("gpt.data", "prepare", text_file, "--out", tmp_path / "d"),
                          "--out", "is not empty")
    assert os.listdir(tmp_path / "d") == ["mine.txt"]
    (tmp_path / "f").write_text("a file")
    assert_one_line_error(cli("gpt.data", "prepare", text_file, "--out", tmp_path / "f"),
                          "is a file")
    assert (tmp_path / "f").read_text() == "a file"
    assert sorted(os.listdir(tmp_path)) == ["d", "f"]


# ---- load_token_dir refuses what disagrees with meta.json ---------------------------------------
@pytest.fixture
def prepared(tmp_path, text_file) -> Path:
    gd.prepare(text_file, tmp_path / "d", progress=None)
    return tmp_path / "d"


def edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


def truncate(folder: Path) -> None:
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(folder / "train.bin") - 2)


def grow(folder: Path) -> None:
    with open(folder / "val.bin", "ab") as f:
        f.write(b"\0\0")


def out_of_vocabulary(folder: Path) -> None:
    ids = np.memmap(folder / "val.bin", dtype=np.uint16, mode="r+")
    ids[7] = json.loads((folder / "meta.json").read_text())["vocab_size"]
    ids.flush()


@pytest.mark.parametrize("damage, words", [
    (truncate, ["train.bin of", "it is truncated"]),
    (grow, ["val.bin of", "it is longer than written"]),
    (out_of_vocabulary, ["token id", "at position 7 of val.bin, outside the vocabulary"]),
    (lambda d: edit_meta(d, vocab_size=500), ["tokenizer.json has", "vocab_size 500"]),
    (lambda d: edit_meta(d, train_tokens=12), ["train.bin of", "12 uint16 tokens"]),
    (lambda d: edit_meta(d, dtype="uint32"), ["train.bin of", "uint32 tokens"]),
    (lambda d: edit_meta(d, dtype="float64"), ["dtype is 'float64'"]),
    (lambda d: edit_meta(d, format="other/9"), ["of format 'other/9'"]),
    (lambda d: (d / "meta.json").write_text("{"), ["unreadable meta.json"]),
    (lambda d: (d / "tokenizer.json").write_text('{"kind": "x"}'), ["invalid tokenizer.json"]),
    (lambda d: (d / "val.bin").unlink(), ["has no val.bin"]),
    (lambda d: (d / "meta.json").unlink(), ["holds no meta.json"]),
])
def test_damaged_token_files_are_refused_in_one_line(prepared, damage, words):
    damage(prepared)
    with pytest.raises(UserError) as e:
        gd.load_token_dir(prepared)
    message = describe(e.value)
    assert message.startswith("--data folder ") and "\n" not in message
    for w in words:
        assert w in message, message


def test_train_refuses_damaged_token_files_in_one_line_before_writing(prepared, tmp_path):
    out_of_vocabulary(prepared)
    proc = cli("gpt.train", "--data", prepared, "--out-dir", tmp_path / "run", *TINY)
    assert_one_line_error(proc, "--data folder", "outside the vocabulary")
    assert not (tmp_path / "run").exists()


# ---- gpt.train --data DIR ---------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [[], ["--tokenizer", "bpe", "--vocab-size", "300"]])
def test_training_from_token_files_takes_the_losses_of_training_on_the_text(
        tmp_path, text_file, flags, capsys):
    assert gt.main(["--data", str(text_file), "--out-dir", str(tmp_path / "text"), *TINY,
                    *flags]) == 0
    gd.prepare(text_file, tmp_path / "d", *(["bpe", 300] if flags else []), progress=None)
    assert gt.main(["--data", str(tmp_path / "d"), "--out-dir", str(tmp_path / "files"),
                    *TINY]) == 0  # the folder brings its tokenizer: no --tokenizer needed
    capsys.readouterr()
    keys = ("iter", "train_loss", "grad_norm", "eval_train_loss", "val_loss")
    from_text = [{k: r.get(k) for k in keys} for r in metrics(tmp_path / "text")]
    from_files = [{k: r.get(k) for k in keys} for r in metrics(tmp_path / "files")]
    assert from_text == from_files and len(from_text) == 6 and from_text[-1]["val_loss"]
    saved = json.loads((tmp_path / "files" / "checkpoint" / "config.json").read_text())
    assert saved["train"]["tokenizer"] == ("bpe" if flags else "char")
    # and it resumes from the folder (which is the checkpoint's vocabulary)
    assert gt.main(["--data", str(tmp_path / "d"), "--out-dir", str(tmp_path / "files"),
                    "--resume", "--max-iters", "14"]) == 0


def test_train_refuses_a_folder_of_another_tokenizer(tmp_path, text_file, capsys):
    gd.prepare(text_file, tmp_path / "d", progress=None)
    assert gt.main(["--data", str(tmp_path / "d"), "--out-dir", str(tmp_path / "r"), *TINY,
                    "--tokenizer", "bpe"]) == 2
    assert "--tokenizer is bpe, but" in capsys.readouterr().err
    assert gt.main(["--data", str(tmp_path / "d"), "--out-dir", str(tmp_path / "r"),
                    *TINY]) == 0
    gd.prepare(text_file, tmp_path / "b", "bpe", 270, progress=None)
    capsys.readouterr()
    assert gt.main(["--data", str(tmp_path / "b"), "--out-dir", str(tmp_path / "r"),
                    "--resume", "--max-iters", "20"]) == 2
    assert "another vocabulary than the checkpoint" in capsys.readouterr().err


def mapped_kb(path: Path) -> int:
    """Resident KB of this process's mappings of `path` (Linux's /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0]:  # a mapping's first line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux's /proc/self/smaps")
def test_forget_pages_unmaps_what_batches_touched_and_keeps_the_values(prepared):
    data = gd.load_token_dir(prepared)
    path = (prepared / "train.bin").resolve()
    before = np.array(data.train)  # reads every page: all of them resident
    assert mapped_kb(path) >= os.path.getsize(path) // 1024 - 4
    gd.forget_pages(data.train)
    assert mapped_kb(path) == 0
    np.testing.assert_array_equal(data.train, before)  # read again from the file cache
    gd.forget_pages(data.train)
    x, _ = gd.get_batch(data.train, 16, 8, np.random.default_rng(0))  # batches unmap as they go
    assert mapped_kb(path) == 0
    np.testing.assert_array_equal(x, gd.get_batch(before, 16, 8, np.random.default_rng(0))[0])
    gd.forget_pages(np.arange(5))  # an array in memory: nothing to do


# ---- worker processes read their rows from the token files -------------------------------------
def test_a_file_shard_reads_the_rows_a_sent_shard_carries_in_a_few_bytes(prepared):
    data = gd.load_token_dir(prepared)
    starts = gd.batch_starts(len(data.train), 256, 64, np.random.default_rng(0))
    x, y = gd.windows(data.train, starts, 256)
    by_reference = gd.TokenWindows.of(data.train, starts, 256)
    assert gd.TokenWindows.of(np.array(data.train), starts, 256) is None  # ids in memory
    sent, read = cut_batch(x, y, 3, seed=5), cut_windows(by_reference, 3, seed=5)
    for a, b in zip(sent, read, strict=True):
        assert (a.k, a.weight, a.seed) == (b.k, b.weight, b.seed)
        for rows, again in zip(a.batch(), b.batch()):
            np.testing.assert_array_equal(rows, again)
        assert len(pickle.dumps(b)) * 50 < len(pickle.dumps(a))


def test_the_fingerprint_tells_another_corpus_and_a_changed_file_from_the_same_one(tmp_path):
    """Two corpora of the same length that differ in one character: told apart by the
    sha256 prepare records alone (with one sample, of the first 4 KB, which they share); a
    copy of a file: the same; an id changed inside a sample: told apart though meta.json is
    unchanged."""
    text = "".join(np.random.default_rng(0).choice(list("abcdefgh"), 200_000))
    middle = len(text) // 2
    other = text[:middle] + ("a" if text[middle] != "a" else "b") + text[middle + 1:]
    for name, t in (("a", text), ("b", other)):
        (tmp_path / f"{name}.txt").write_text(t)
        gd.prepare(tmp_path / f"{name}.txt", tmp_path / name, progress=None)
    fp = {name: gd.file_fingerprint(str(tmp_path / name / "train.bin")) for name in "ab"}
    assert fp["a"] != fp["b"]
    assert gd.file_fingerprint(str(tmp_path / "b" / "train.bin"), samples=1) != \
        gd.file_fingerprint(str(tmp_path / "a" / "train.bin"), samples=1)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["train_sha256"] != json.loads((tmp_path / "b" / "meta.json").read_text())[
        "train_sha256"] and len(meta["val_sha256"]) == 64
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("train.bin", "meta.json"):
        (copy / name).write_bytes((tmp_path / "a" / name).read_bytes())
    assert gd.file_fingerprint(str(copy / "train.bin")) == fp["a"]
    ids = np.fromfile(copy / "train.bin", dtype=np.uint16)
    ids[10] = (ids[10] + 1) % 8  # inside the first sample
    ids.tofile(copy / "train.bin")
    assert gd.file_fingerprint(str(copy / "train.bin")) != fp["a"]


def test_worker_processes_read_the_token_files_and_log_the_same_losses(tmp_path, text_file,
                                                                       monkeypatch, capsys):
    workers = ["--workers", "2", "--max-iters", "6"]
    assert gt.main(["--data", str(text_file), "--out-dir", str(tmp_path / "text"), *TINY,
                    *workers]) == 0
    gd.prepare(text_file, tmp_path / "d", progress=None)
    real, calls = gt.make_grad_fn, []

    def counting(model, cfg):
        fns = real(model, cfg)
        from_files = fns.loss_and_grads_from
        fns.loss_and_grads_from = lambda windows, rng: calls.append(windows) or from_files(
            windows, rng)
        return fns

    monkeypatch.setattr(gt, "make_grad_fn", counting)
    assert gt.main(["--data", str(tmp_path / "d"), "--out-dir", str(tmp_path / "small"), *TINY,
                    *workers]) == 0
    assert calls == []  # 4 x 16 tokens: cheaper to send as rows
    monkeypatch.setattr(gt, "BY_REFERENCE_TOKENS", 64)
    assert gt.main(["--data", str(tmp_path / "d"), "--out-dir", str(tmp_path / "files"), *TINY,
                    *workers]) == 0
    capsys.readouterr()
    assert len(calls) == 6 and all(w.path == str((tmp_path / "d" / "train.bin").resolve())
                                   for w in calls)
    keys = ("iter", "train_loss", "grad_norm", "val_loss")
    assert ([{k: r.get(k) for k in keys} for r in metrics(tmp_path / "text")]
            == [{k: r.get(k) for k in keys} for r in metrics(tmp_path / "files")])


def test_loky_and_dask_workers_are_both_sent_windows_by_reference(monkeypatch):
    """Both backends take batches by reference (DaskCluster then asks each worker whether it
    has the files: test_dask_token_files.py); a single process does not."""
    from gpt.config import GPTConfig, TrainConfig
    from gpt.model import GPT

    class Workers:  # stands in for gpt.parallel.DataParallel: no process started
        def __init__(self, model, **settings):
            self.grad_norm = None

        def loss_and_grads(self, x, y, rng):
            return 0.0

        def loss_and_grads_from(self, windows, rng):
            return 0.0

        def close(self):
            pass

    monkeypatch.setattr("gpt.parallel.DataParallel", Workers)
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0)
    loky = gt.make_grad_fn(model, TrainConfig(workers=2, backend="loky", batch_size=4))
    dask = gt.make_grad_fn(model, TrainConfig(workers=2, backend="dask", batch_size=4))
    assert loky.loss_and_grads_from is not None and dask.loss_and_grads_from is not None
    assert gt.make_grad_fn(model, TrainConfig(workers=1, batch_size=4)).loss_and_grads_from is None
