"""`python -m gpt.train`: a tiny end-to-end run, exact resume, Ctrl-C, and bad input (each
through a subprocess: one line on stderr, exit != 0, no traceback, nothing destroyed)."""

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gpt import train as gt
from gpt.checkpoint import load_checkpoint, load_model
from gpt.config import PRESETS, TrainConfig, leaf_fields
from tensorlite.references import round_to_bfloat16

REPO = Path(__file__).resolve().parents[2]
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "2", "--log-interval", "2", "--eval-interval", "10",
        "--warmup-iters", "5"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text((REPO / "train.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder (to prove nothing was touched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main(*args) -> int:
    """gpt.train.main in this process (paths may be Path objects)."""
    return gt.main([str(a) for a in args])


def run_cli(args, cwd, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "gpt.train", *map(str, args)], cwd=cwd,
                          capture_output=True, check=False, text=True, env=env, timeout=120)


def main_error(capsys, *args) -> SimpleNamespace:
    """gpt.train.main in this process, as a finished process would look."""
    rc = main(*args)
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=captured.out, stderr=captured.err)


def nan_at(monkeypatch, step: int) -> None:
    """Make the loss of the `step`-th step of the next run read as NaN (as an overflow would)."""
    real = gt.make_grad_fn

    def make_grad_fn(model, cfg):
        fns = real(model, cfg)
        loss_and_grads, calls = fns.loss_and_grads, itertools.count(1)

        def with_nan(x, y, rng):
            loss = loss_and_grads(x, y, rng)
            return float("nan") if next(calls) == step else loss

        fns.loss_and_grads = with_nan
        return fns

    monkeypatch.setattr(gt, "make_grad_fn", make_grad_fn)


def assert_one_line_error(proc, *words):
    err = proc.stderr.strip()
    assert proc.returncode not in (0, None), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err


# ---- the command line --------------------------------------------------------------------------
def test_every_config_field_is_a_flag_with_help():
    text = gt.build_parser().format_help()
    for _, f, _ in leaf_fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert f.metadata["help"].split()[0] in text
    for flag in ("--data", "--out-dir", "--n-layer", "--n-head", "--n-embd", "--block-size",
                 "--batch-size", "--max-iters", "--lr", "--min-lr", "--warmup-iters",
                 "--weight-decay", "--beta1", "--beta2", "--grad-clip", "--dropout",
                 "--eval-interval", "--eval-iters", "--log-interval", "--seed", "--resume",
                 "--dtype", "--workers"):
        assert flag in text


def test_parse_args_knows_which_flags_were_given():
    cfg, given = gt.parse_args(["--n-embd", "64", "--resume", "--lr", "3e-4"])
    assert given == {"n_embd", "resume", "lr"}
    assert cfg.model.n_embd == 64 and cfg.resume and cfg.lr == 3e-4 and cfg.model.n_layer == 4


def test_a_preset_sets_its_fields_and_flags_given_beside_it_win():
    cfg, given = gt.parse_args(["--preset", "baby", "--n-layer", "2"])
    assert cfg.model.n_layer == 2 and cfg.model.n_head == 4 and cfg.batch_size == 12
    assert given == set(PRESETS["baby"])
    assert "--preset NAME" in gt.build_parser().format_help()
    for name, values in PRESETS.items():  # every preset builds a valid config
        cfg, _ = gt.parse_args(["--preset", name])
        assert cfg.validate().to_dict().items() >= values.items()


def test_every_flag_shows_its_default():
    text = " ".join(gt.build_parser().format_help().split())
    assert "--max-iters N number of optimizer steps (default: 1000)" in text
    assert "--n-head N attention heads H per block (divides n_embd) (default: 8)" in text


# ---- a real run, in process ------------------------------------------------------------------
def test_tiny_run_writes_metrics_checkpoint_and_sample(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    rc = main("--data", text_file, "--out-dir", out, "--max-iters", "12", *TINY)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "left" in printed and "sample" in printed
    recs = metrics(out)
    assert [r["iter"] for r in recs] == [2, 4, 6, 8, 10, 12]
    for r in recs:
        assert {"iter", "train_loss", "lr", "tokens_per_s"} <= set(r)
    evals = [r for r in recs if "val_loss" in r]
    assert [r["iter"] for r in evals] == [10, 12]  # every eval_interval, and the last step
    assert all(abs(r["val_ppl"] - 2.718281828 ** r["val_loss"]) < 1e-6 * r["val_ppl"]
               for r in evals)
    assert recs[0]["lr"] < recs[2]["lr"]  # warmup climbs
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["iter"] == 12


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_continues_exactly(tmp_path, text_file, capsys, monkeypatch, dtype):
    """A 30-step run that stops at step 23 (a NaN; the last checkpoint is at 20), resumed,
    logs the same losses as the straight 30-step run, with dropout on (and in bfloat16:
    the checkpoint's float32 master weights and AdamW state are the whole state)."""
    args = ["--data", text_file, "--max-iters", "30", "--dropout", "0.1", "--dtype", dtype, *TINY]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main(*args, "--out-dir", straight) == 0
    with monkeypatch.context() as m:
        nan_at(m, 23)
        assert main(*args, "--out-dir", broken) == 2
    err = capsys.readouterr().err
    assert "iter 23" in err and "last good checkpoint (iter 20)" in err
    assert [r["iter"] for r in metrics(broken)][-1] == 22  # logged past the checkpoint
    assert main("--resume", "--out-dir", broken) == 0  # the rest comes from the checkpoint
    a, b = metrics(straight), metrics(broken)
    assert [r["iter"] for r in a] == [r["iter"] for r in b]  # 22 was not logged twice
    for ra, rb in zip(a, b):
        assert abs(ra["train_loss"] - rb["train_loss"]) <= 1e-5, (ra, rb)
        assert ra["lr"] == rb["lr"]
        if "val_loss" in ra:
            assert abs(ra["val_loss"] - rb["val_loss"]) <= 1e-5


def test_a_bfloat16_run_keeps_float32_weights_records_its_dtype_and_samples_both_ways(
        tmp_path, text_file):
    out = tmp_path / "run"
    assert main("--data", text_file, "--out-dir", out, "--max-iters", "20", "--dtype", "bfloat16",
                *TINY) == 0
    ckpt = load_checkpoint(str(out))
    assert ckpt.config["train"]["dtype"] == "bfloat16"
    assert {a.dtype for a in ckpt.model.values()} == {np.dtype(np.float32)}
    moments = [a for a in _arrays(ckpt.optimizer) if a.dtype.kind == "f" and a.ndim > 0]
    assert moments and {a.dtype for a in moments} == {np.dtype(np.float32)}
    wte = ckpt.model["wte"]
    assert not np.array_equal(wte, round_to_bfloat16(wte))  # master weights, not bf16 copies
    model, _ = load_model(str(out))
    assert model.matmul_dtype == "bfloat16" and model.dtype == np.float32
    model32, _ = load_model(str(out), "float32")
    assert model32.matmul_dtype is None
    texts = {}
    for dtype in ("bfloat16", "float32"):
        proc = subprocess.run([sys.executable, "-m", "gpt.sample", "--out-dir", str(out), "--dtype",
                               dtype, "--seed", "3", "--max-new-tokens", "40"], capture_output=True,
                              text=True, timeout=120, check=False,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert proc.returncode == 0, proc.stderr
        texts[dtype] = proc.stdout
    assert all(len(t.strip()) > 0 for t in texts.values())


def _arrays(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _arrays(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _arrays(v)
    elif isinstance(tree, np.ndarray):
        yield tree


def test_resume_on_another_number_of_threads_says_the_steps_differ(tmp_path, text_file,
                                                                     capsys):
    """With dropout each shard draws its own masks: a run resumed with other --threads (the
    default is the cores, which differ between machines) says it will not replay the
    uninterrupted run, and how to; resumed with the same number it says nothing."""
    args = ["--data", text_file, "--max-iters", "4", "--dropout", "0.1", *TINY]
    for name in ("same", "other"):
        assert main(*args, "--out-dir", tmp_path / name, "--threads", "2") == 0
    capsys.readouterr()
    assert main("--resume", "--out-dir", tmp_path / "same", "--max-iters", "6") == 0
    assert "shards" not in capsys.readouterr().err
    assert main("--resume", "--out-dir", tmp_path / "other", "--max-iters", "6",
                "--threads", "1") == 0
    err = capsys.readouterr().err
    assert "split its batches into 2 shards and resumes with 1" in err
    assert "give --threads 2 to replay it exactly" in err


def test_resume_with_more_iterations_continues(tmp_path, text_file):
    out = tmp_path / "run"
    assert main("--data", text_file, "--out-dir", out, "--max-iters", "10", *TINY) == 0
    assert main("--resume", "--out-dir", out, "--max-iters", "14") == 0
    assert [r["iter"] for r in metrics(out)] == [2, 4, 6, 8, 10, 12, 14]


# ---- Ctrl-C --------------------------------------------------------------------------------------
def test_ctrl_c_saves_and_exits_cleanly(tmp_path, text_file):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt.train", "--data", str(text_file), "--out-dir", str(out),
         "--max-iters", "100000", *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("iter"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err
    assert "interrupted at iter" in err
    stopped = int(err.split("interrupted at iter ")[1].split(":")[0])
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["iter"] == stopped
    assert max(r["iter"] for r in metrics(out)) <= stopped


# ---- bad input: subprocess, one line, nothing destroyed ---------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file) -> Path:
    """A finished tiny run (10 steps), shared by the resume-refusal tests."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main("--data", str(text_file), "--out-dir", str(out), "--max-iters", "10",
                    *TINY) == 0
    return out


def test_bad_data_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (tmp_path / "short.txt").write_text("too short")
    cases = [("missing.txt", "not found"), ("empty.txt", "empty"), ("latin1.txt", "UTF-8"),
             ("short.txt", "too short")]
    for name, words in cases:
        proc = run_cli(["--data", name, "--out-dir", "o", *TINY], cwd=tmp_path)
        assert_one_line_error(proc, words)
    assert not (tmp_path / "o" / "checkpoint").exists()


def test_no_train_txt_says_how_to_get_data(tmp_path):
    proc = run_cli(["--max-iters", "1"], cwd=tmp_path)
    assert_one_line_error(proc, "--data", "python -m gpt.data shakespeare")


@pytest.mark.parametrize("flags, words", [
    (["--n-embd", "30", "--n-head", "4"], "divisible by --n-head (4); try --n-head "),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--n-layer", "0"], "--n-layer"),
    (["--block-size", "-3"], "--block-size"),
    (["--max-iters", "0"], "--max-iters"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--lr", "inf", "--min-lr", "0"], "--lr must be positive and finite"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--n-layer", "two"], "--n-layer"),
])
def test_bad_settings(tmp_path, text_file, flags, words):
    proc = run_cli(["--data", text_file, "--out-dir", "o", *TINY, *flags], cwd=tmp_path)
    assert_one_line_error(proc, words)


def test_resume_refusals_leave_the_checkpoint_untouched(trained, tmp_path, text_file):
    before = digest(trained)
    other = tmp_path / "other.txt"
    other.write_text("ÆØÅ æøå! " * 400, encoding="utf-8")
    cases = [
        (["--resume", "--n-embd", "32"], "--n-embd 32"),  # another shape
        (["--resume", "--n-layer", "2"], "--n-layer 2"),
        (["--resume", "--data", other], "vocabulary"),  # characters the checkpoint lacks
        (["--resume", "--max-iters", "5"], "--max-iters"),  # nothing left to do
        ([], "--resume"),  # a fresh run into a folder that holds a checkpoint
    ]
    for flags, words in cases:
        proc = run_cli([*flags, "--out-dir", trained], cwd=tmp_path)
        assert_one_line_error(proc, words)
        assert digest(trained) == before


def test_missing_or_truncated_checkpoint(trained, tmp_path):
    proc = run_cli(["--resume", "--out-dir", tmp_path / "nothing"], cwd=tmp_path)
    assert_one_line_error(proc, "no checkpoint")
    broken = tmp_path / "broken"
    (broken / "checkpoint").mkdir(parents=True)
    for f in (trained / "checkpoint").iterdir():
        data = f.read_bytes()
        (broken / "checkpoint" / f.name).write_bytes(data[:100] if f.name == "model.safetensors"
                                                     else data)
    before = digest(broken)
    proc = run_cli(["--resume", "--out-dir", broken], cwd=tmp_path)
    assert_one_line_error(proc, "model.safetensors", "truncated")
    assert digest(broken) == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, text_file, monkeypatch,
                                                           capsys):
    out = tmp_path / "run"
    nan_at(monkeypatch, 14)
    proc = main_error(capsys, "--data", text_file, "--out-dir", out, "--max-iters", "20", *TINY)
    assert_one_line_error(proc, "nan at iter 14", "last good checkpoint (iter 10)")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["iter"] == 10
    # NaN before the first checkpoint: said so, and no half-made checkpoint is left behind
    nan_at(monkeypatch, 1)
    proc = main_error(capsys, "--data", text_file, "--out-dir", tmp_path / "run2",
                      "--max-iters", "5", *TINY)
    assert_one_line_error(proc, "no checkpoint was written yet")
    assert not (tmp_path / "run2" / "checkpoint").exists()


def test_huge_learning_rate_is_caught(tmp_path, text_file):
    """Without the test hook: an absurd lr blows the weights up within a few steps."""
    proc = run_cli(["--data", text_file, "--out-dir", "o", "--max-iters", "40", *TINY,
                    "--warmup-iters", "0", "--lr", "1e30", "--min-lr", "0"], cwd=tmp_path)
    assert_one_line_error(proc, "became", "--lr")


def test_nan_at_eval_is_not_saved(tmp_path, text_file):
    """A step that leaves finite but exploded weights shows up first at the eval right after
    it; that eval must stop the run instead of saving the broken weights over a good one."""
    out = tmp_path / "run"
    proc = run_cli(["--data", text_file, "--out-dir", out, "--max-iters", "40", *TINY,
                    "--eval-interval", "1", "--warmup-iters", "0", "--lr", "1e9",
                    "--grad-clip", "0"], cwd=tmp_path)
    assert_one_line_error(proc, "became nan", "--lr")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["last_eval"]["val_loss"] < 10, state["last_eval"]
    assert all(json.loads(line)["val_loss"] < 10  # json.loads reads a NaN as nan: not < 10
               for line in (out / "metrics.jsonl").read_text().splitlines())


def test_evaluation_does_not_touch_the_training_stream(tmp_path, text_file):
    """Two runs that differ only in how often they evaluate take the same steps: evaluation
    draws its batches from its own generator, never from the training batches'."""
    args = ["--data", text_file, "--max-iters", "12", *TINY, "--log-interval", "1"]
    assert main(*args, "--out-dir", tmp_path / "often", "--eval-interval", "3") == 0
    assert main(*args, "--out-dir", tmp_path / "once", "--eval-interval", "12") == 0
    often, once = metrics(tmp_path / "often"), metrics(tmp_path / "once")
    assert [r["train_loss"] for r in often] == [r["train_loss"] for r in once]
    assert [r["iter"] for r in often if "val_loss" in r] == [3, 6, 9, 12]
    assert often[-1]["val_loss"] == once[-1]["val_loss"]


def tiny_train(tmp_path, max_iters: int, eval_interval: int) -> tuple[int, Path]:
    """gpt.train in this process on 5,000 characters of train.txt with a 1-layer model;
    (exit status, run folder)."""
    from gpt import train

    text = tmp_path / "text.txt"
    text.write_text((REPO / "train.txt").read_text(encoding="utf-8")[:5000], encoding="utf-8")
    out = tmp_path / "run"
    code = train.main(["--data", str(text), "--out-dir", str(out), "--max-iters",
                       str(max_iters), "--eval-interval", str(eval_interval), "--n-layer", "1",
                       "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size",
                       "4", "--log-interval", str(eval_interval)])
    return code, out


def test_the_best_checkpoint_is_kept_and_the_final_line_says_which_is_where(
        tmp_path, monkeypatch, capsys):
    """A run whose val loss goes down then up (overfitting) keeps the iter-4 weights in
    OUT/best while OUT/checkpoint moves on; sampling takes the best unless told otherwise."""
    from gpt import checkpoint, train

    val = iter([3.0, 2.0, 2.5])  # evals at iters 2, 4, 6
    monkeypatch.setattr(train, "estimate_loss", lambda *a: {"train": 1.0, "val": next(val)})
    code, out = tiny_train(tmp_path, 6, 2)
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("done:") and "val loss 2.5000 (iter 6) in" in last
    assert f"best 2.0000 (iter 4) in {out / 'best'}" in last and str(out / "checkpoint") in last
    assert sorted(os.listdir(out)) == ["best", "checkpoint", "metrics.jsonl"]  # no .lock left
    assert checkpoint.load_checkpoint(str(out), best=True).state["iter"] == 4
    assert checkpoint.load_checkpoint(str(out)).state["iter"] == 6
    best = checkpoint.load_checkpoint(str(out), best=True).model["wte"]
    model, _ = checkpoint.load_model(str(out))
    np.testing.assert_array_equal(model.params["wte"].data, best)
    model, _ = checkpoint.load_model(str(out), latest=True)
    assert not np.array_equal(model.params["wte"].data, best)


def test_workers_that_are_all_gone_stop_the_run_with_the_kept_checkpoint(
        tmp_path, monkeypatch, capsys):
    """DataParallel raises RuntimeError when no worker is left (see test_parallel); the run
    stops with one line naming the checkpoint it keeps."""
    from gpt import train

    real = train.make_grad_fn

    def failing_after_5(model, cfg):
        fns = real(model, cfg)
        fn = fns.loss_and_grads
        calls = itertools.count(1)

        def loss_and_grads(x, y, rng):
            if next(calls) > 5:
                raise RuntimeError("data-parallel worker failed at step 5: no dask worker left")
            return fn(x, y, rng)

        fns.loss_and_grads = loss_and_grads
        return fns

    monkeypatch.setattr(train, "make_grad_fn", failing_after_5)
    code, _ = tiny_train(tmp_path, 8, 4)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "no dask worker left" in err and "the last good checkpoint (iter 4) is kept" in err


def test_a_full_disk_during_a_save_stops_the_run_in_one_line_keeping_the_last_checkpoint(
        tmp_path, monkeypatch, capsys):
    import errno

    from gpt import checkpoint

    real_write, weights_written = checkpoint.atomic_write, itertools.count(1)

    def disk_full_at_the_third_weights(path, data):
        if path.endswith("model.safetensors") and next(weights_written) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # checkpoint/ at iter 4
        return real_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write", disk_full_at_the_third_weights)
    code, out = tiny_train(tmp_path, 6, 2)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    tmp_file = out / "checkpoint.tmp" / "model.safetensors"
    assert f"writing {tmp_file} failed (the disk is full)" in err
    assert f"the previous checkpoint in {out / 'checkpoint'} is intact" in err
    assert sorted(os.listdir(out)) == ["best", "checkpoint", "metrics.jsonl"]  # no .tmp, .lock
    assert checkpoint.load_checkpoint(str(out)).state["iter"] == 2


def test_a_bpe_run_reports_its_tokenizer_step_and_explains_broken_characters(
        tmp_path, monkeypatch, capsys):
    """The intro says what training the BPE did (merges, seconds, bytes per token); a final
    sample that shows U+FFFD (half a multi-byte character) is followed by a line saying why."""
    from gpt import train
    from gpt.bpe import REPLACEMENT_NOTE

    text = tmp_path / "text.txt"
    text.write_text((REPO / "train.txt").read_text(encoding="utf-8")[:5000] + " café é ü" * 50,
                    encoding="utf-8")
    monkeypatch.setattr(train, "sample_text", lambda *a, **k: "a broken \ufffd character")
    code = train.main(["--data", str(text), "--out-dir", str(tmp_path / "run"), "--tokenizer",
                       "bpe", "--vocab-size", "300", "--max-iters", "2", "--eval-interval", "2",
                       "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                       "--batch-size", "4", "--eval-iters", "1"])
    out = capsys.readouterr().out
    assert code == 0
    first = out.splitlines()[0]
    m = re.fullmatch(r"BPE tokenizer: (\d+) merges learned and the text encoded in [\d.]+ s; "
                     r"([\d.]+) bytes per token \(([\d,]+) bytes -> ([\d,]+) tokens\)", first)
    assert m, first
    assert int(m.group(1)) == 300 - 258
    n_bytes, n_tokens = (int(m.group(i).replace(",", "")) for i in (3, 4))
    assert n_bytes == len(text.read_bytes()) and float(m.group(2)) == round(n_bytes / n_tokens, 2)
    assert REPLACEMENT_NOTE in out
