"""`python -m gpt.train`: train a GPT on a text file, with evaluation, metrics, checkpoints
that resume exactly, and one-line errors for bad input.

    python -m gpt.train                                   # the bundled train.txt, a few minutes
    python -m gpt.train --data my.txt --out-dir my_run --max-iters 3000
    python -m gpt.train --out-dir my_run --resume --max-iters 5000   # continue a run

Every flag is a field of gpt.config.TrainConfig (`out_dir` -> `--out-dir`). One step:

    x, y = batch of B windows of T tokens (y is x shifted by one)
    loss = cross_entropy(model(x), y);  loss.backward()
    clip the global gradient norm to grad_clip;  AdamW step at lr_at(step)

Reproducibility: three random streams come from one seed (batches, dropout, evaluation
batches); the first two and the optimizer state are saved in every checkpoint, so a resumed
run takes exactly the steps the uninterrupted run would have taken. Evaluation draws its
batches from a fresh generator each time, so it never disturbs the training stream.

For tests, GPT_TRAIN_FAKE_NAN_AT=N makes the loss of step N read as NaN (see the NaN guard).
Set GPT_DEBUG=1 to see a traceback instead of the one-line error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any

import numpy as np

import tensorlite as tl

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write,
    checkpoint_path,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .data import GET_DATA_HINT as GET_DATA
from .data import get_batch
from .model import GPT
from .optim import AdamW, clip_grad_norm, lr_at

# Settings that decide the shape of the model or the meaning of its token ids: a resumed run
# must keep them. Everything else (lr, max_iters, eval settings, ...) may change on resume.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "tokenizer", "dtype")


class TrainError(ValueError):
    """Bad input or a failed run: the message is one line that says what to do."""


# ---- the command line, built from TrainConfig's fields -----------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"error: {message} (see python -m gpt.train --help)\n")


def _flag_type(f: dataclasses.Field):
    if isinstance(f.default, bool):
        return bool
    if isinstance(f.default, int):
        return int
    if isinstance(f.default, float):
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field. Defaults are SUPPRESSed so we can tell which flags were
    given: on --resume, flags not given are taken from the checkpoint's saved config."""
    p = _Parser(prog="python -m gpt.train",
                description="Train a character-level (or BPE) GPT on a UTF-8 text file.",
                epilog=f"No text? {GET_DATA} fetches Tiny Shakespeare. Metrics go to "
                       "OUT/metrics.jsonl, the checkpoint to OUT/checkpoint/.")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = _flag_type(f)
        if kind is bool:
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            metavar = {int: "N", float: "X"}.get(kind, "PATH" if f.name in ("data", "out_dir")
                                                   else "NAME")
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=metavar,
                           help=f"{help_text} (default: {f.default})")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """(config, names of the fields given on the command line)."""
    given = vars(build_parser().parse_args(argv))
    return TrainConfig(**given), set(given)


# ---- data -----------------------------------------------------------------------------------
def read_text(cfg: TrainConfig, data_given: bool) -> str:
    from .data import load_text

    if not data_given and not os.path.exists(cfg.data):
        raise TrainError(f"no {cfg.data} in {os.getcwd()} and no --data given: pass "
                         f"--data FILE (UTF-8 text), or get Tiny Shakespeare with `{GET_DATA}`")
    return load_text(cfg.data)


def make_tokenizer(cfg: TrainConfig, text: str):
    if cfg.tokenizer == "bpe":
        from .bpe import BPETokenizer

        return BPETokenizer.train(text, cfg.vocab_size)
    from .tokenizer import CharTokenizer

    return CharTokenizer.from_text(text)


def split_ids(ids: np.ndarray, block_size: int, path: str) -> tuple[np.ndarray, np.ndarray]:
    """90% train, 10% validation; each part must hold at least one window of block_size + 1."""
    from .data import split_ids as data_split_ids

    try:
        return data_split_ids(ids, 0.1, block_size)
    except ValueError as e:
        raise TrainError(f"{path}: {e}") from None


# ---- random streams -------------------------------------------------------------------------
def make_rngs(seed: int) -> dict[str, np.random.Generator]:
    """Independent streams from one seed: "data" (batches), "dropout" (masks), "eval"."""
    data, dropout, ev = np.random.SeedSequence(seed).spawn(3)
    return {"data": np.random.default_rng(data), "dropout": np.random.default_rng(dropout),
            "eval": np.random.default_rng(ev)}


def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state  # JSON-able: ints (Python's are unbounded) and strings


def set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state


# ---- evaluation -----------------------------------------------------------------------------
def estimate_loss(model: GPT, splits: dict[str, np.ndarray], cfg: TrainConfig) -> dict[str, float]:
    """Mean loss over cfg.eval_iters batches of each split. The batches come from a generator
    re-made from the seed every time: every eval of a run sees the same batches, so successive
    evals are comparable, and training's random stream is not touched."""
    out = {}
    with tl.no_grad():
        for name, ids in splits.items():
            rng = make_rngs(cfg.seed)["eval"]
            losses = []
            for _ in range(cfg.eval_iters):
                x, y = get_batch(ids, cfg.block_size, cfg.batch_size, rng)
                _, loss = model(x, y, training=False)
                losses.append(float(loss.data))
            out[name] = float(np.mean(losses))
    return out


# ---- metrics.jsonl --------------------------------------------------------------------------
def metrics_file(out_dir: str) -> str:
    return os.path.join(out_dir, "metrics.jsonl")


def prepare_metrics(out_dir: str, start_iter: int) -> None:
    """A fresh run starts an empty file; a resumed run keeps the records up to its checkpoint
    and drops later ones (logged after the checkpoint, before a crash), so no iteration repeats."""
    path = metrics_file(out_dir)
    kept = []
    if start_iter > 0 and os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    if json.loads(line)["iter"] <= start_iter:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line from a crash
    atomic_write(path, "".join(kept).encode("utf-8"))


def append_metrics(out_dir: str, record: dict) -> None:
    with open(metrics_file(out_dir), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def fmt_time(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ---- Ctrl-C: finish the step, save, exit ------------------------------------------------------
class StopFlag:
    """The first SIGINT sets a flag the loop checks after each step (so we never save a
    half-updated model); a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.set = False
        self.previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.set:
                raise KeyboardInterrupt
            self.set = True
            print("\nstopping after this step (Ctrl-C again to abort without saving)",
                  file=sys.stderr, flush=True)

        try:
            self.previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


# ---- data-parallel hook ------------------------------------------------------------------------
def make_grad_fn(model: GPT, cfg: TrainConfig):
    """A function (x, y, rng) -> loss (float) that leaves the gradient of the mean loss in each
    parameter's .grad. With --workers 1 (loky) it runs here; otherwise gpt.parallel provides it:
    `gpt.parallel.DataParallel(model, workers, backend, scheduler)` with `.loss_and_grads(x, y,
    rng)` and `.close()`."""
    if cfg.workers == 1 and cfg.backend == "loky":
        def loss_and_grads(x, y, rng):
            model.zero_grad()
            _, loss = model(x, y, training=True, rng=rng)
            loss.backward()
            return float(loss.data)

        return loss_and_grads, lambda: None
    from . import parallel  # imported here: joblib starts only when it is used

    dp = parallel.DataParallel(model, workers=cfg.workers, backend=cfg.backend,
                               scheduler=cfg.scheduler)
    return dp.loss_and_grads, dp.close


# ---- the run ---------------------------------------------------------------------------------
def resolve_resume(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, Checkpoint]:
    """The run's config on --resume: the checkpoint's saved config, overridden by the flags
    given now; flags that would change the model's shape are refused (nothing is written)."""
    ckpt = load_checkpoint(cfg.out_dir)
    try:
        saved = TrainConfig.from_dict(ckpt.config["train"]).validate()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}/config.json holds no valid train config ({e})") from None
    override = {k: getattr(cfg, k) for k in given}
    override["out_dir"] = cfg.out_dir  # where it is now (the folder may have been moved)
    merged = dataclasses.replace(saved, **override)
    shape = SHAPE_FIELDS + (("vocab_size",) if merged.tokenizer == "bpe" else ())
    changed = [f"--{k.replace('_', '-')} {getattr(merged, k)} (checkpoint: {getattr(saved, k)})"
               for k in shape if getattr(merged, k) != getattr(saved, k)]
    if changed:
        raise TrainError(f"cannot resume {ckpt.path} with a different model: "
                         f"{', '.join(changed)}; drop those flags or use a new --out-dir")
    return merged, ckpt


def train(cfg: TrainConfig, given: set[str] = frozenset()) -> int:
    """Run training as configured; returns the exit status. Raises TrainError/ValueError/OSError
    (one-line messages) on bad input."""
    cfg.validate()
    ckpt = None
    if cfg.resume:
        cfg, ckpt = resolve_resume(cfg, set(given) - {"resume"})
        cfg.validate()
    elif has_checkpoint(cfg.out_dir):
        raise TrainError(f"{checkpoint_path(cfg.out_dir)} already holds a checkpoint: continue it "
                         "with --resume, choose another --out-dir, or delete it to start over")

    text = read_text(cfg, "data" in given or ckpt is not None)
    if ckpt is not None:
        from .tokenizer import tokenizer_from_dict

        tokenizer = tokenizer_from_dict(ckpt.tokenizer)
    else:
        tokenizer = make_tokenizer(cfg, text)
    try:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    except ValueError as e:
        where = "the checkpoint's vocabulary" if ckpt is not None else "the tokenizer"
        raise TrainError(f"{cfg.data} does not fit {where}: {e}") from None
    train_ids, val_ids = split_ids(ids, cfg.block_size, cfg.data)

    mcfg = cfg.gpt_config(tokenizer.vocab_size)
    saved_model = dict(ckpt.config.get("model") or {}, dropout=cfg.dropout) if ckpt else None
    if ckpt is not None and saved_model != mcfg.to_dict():
        raise TrainError(f"cannot resume {ckpt.path}: it holds a model {ckpt.config.get('model')}, "
                         f"this run builds {mcfg.to_dict()}; use a new --out-dir")
    dtype = np.dtype(cfg.dtype)
    model = GPT(mcfg, dtype=dtype, seed=cfg.seed)
    opt = AdamW(model.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                weight_decay=cfg.weight_decay)
    rngs = make_rngs(cfg.seed)
    start_iter, best_val, elapsed_before = 0, math.inf, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        opt.load_state_dict(ckpt.optimizer)
        try:
            for name in ("data", "dropout"):
                set_rng_state(rngs[name], ckpt.state["rng"][name])
            start_iter = int(ckpt.state["iter"])
            best_val = float(ckpt.state.get("best_val_loss") or math.inf)
            elapsed_before = float(ckpt.state.get("elapsed_s", 0.0))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}/state.json lacks a valid iteration or random "
                                  f"state ({type(e).__name__}: {e}); it cannot be resumed") from None
        if start_iter >= cfg.max_iters:
            raise TrainError(f"the checkpoint is at iter {start_iter} and --max-iters is "
                             f"{cfg.max_iters}: give a larger --max-iters to train further")

    os.makedirs(cfg.out_dir, exist_ok=True)
    prepare_metrics(cfg.out_dir, start_iter)
    tl.kernels.tune_allocator()
    tokens_per_step = cfg.batch_size * cfg.block_size
    print(f"{cfg.data}: {len(ids):,} tokens ({len(train_ids):,} train, {len(val_ids):,} val), "
          f"vocab {tokenizer.vocab_size}; model {model.num_params():,} parameters "
          f"({cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, {cfg.dtype})")
    if ckpt is None:
        print(f"an untrained model scores about ln(vocab) = {math.log(tokenizer.vocab_size):.2f}")
    else:
        print(f"resuming {ckpt.path} at iter {start_iter}")

    def save(it: int, last_eval: dict | None) -> str:
        state = {"iter": it, "best_val_loss": None if math.isinf(best_val) else best_val,
                 "last_eval": last_eval, "elapsed_s": elapsed_before + time.perf_counter() - t0,
                 "rng": {name: rng_state(rngs[name]) for name in ("data", "dropout")}}
        return save_checkpoint(cfg.out_dir, Checkpoint(
            model=model.state_dict(), optimizer=opt.state_dict(),
            config={"model": mcfg.to_dict(), "train": cfg.to_dict()},
            tokenizer=tokenizer.to_dict(), state=state))

    loss_and_grads, close = make_grad_fn(model, cfg)
    fake_nan = int(os.environ.get("GPT_TRAIN_FAKE_NAN_AT", "0") or 0)
    last_saved = start_iter if ckpt is not None else None
    last_eval = ckpt.state.get("last_eval") if ckpt is not None else None
    t0 = t_log = time.perf_counter()
    it_log = start_iter
    it = start_iter
    try:
        with StopFlag() as stop:
            for it in range(start_iter + 1, cfg.max_iters + 1):  # `it` = steps done after this one
                lr = lr_at(it - 1, cfg)
                x, y = get_batch(train_ids, cfg.block_size, cfg.batch_size, rngs["data"])
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    # overflow shows up as a non-finite loss or norm, checked just below
                    loss = loss_and_grads(x, y, rngs["dropout"])
                    if it == fake_nan:
                        loss = float("nan")
                    norm = (clip_grad_norm(model.params, cfg.grad_clip) if math.isfinite(loss)
                            else loss)
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    what = "loss" if not math.isfinite(loss) else "gradient norm"
                    raise TrainError(f"{what} became {loss if what == 'loss' else norm} at iter "
                                     f"{it}; stopped without updating the weights; "
                                     f"{kept_checkpoint(cfg, last_saved)}; try a lower --lr "
                                     f"(now {cfg.lr:g}) or --grad-clip")
                opt.step(lr=lr)

                do_eval = it % cfg.eval_interval == 0 or it == cfg.max_iters
                if it % cfg.log_interval == 0 or do_eval:
                    now = time.perf_counter()
                    tps = (it - it_log) * tokens_per_step / max(now - t_log, 1e-9)
                    t_log, it_log = now, it
                    spent = now - t0
                    left = spent / (it - start_iter) * (cfg.max_iters - it)
                    record: dict[str, Any] = {"iter": it, "train_loss": loss, "lr": lr,
                                              "tokens_per_s": round(tps, 1),
                                              "grad_norm": round(float(norm), 4),
                                              "elapsed_s": round(elapsed_before + spent, 2)}
                    print(f"iter {it:>{len(str(cfg.max_iters))}}/{cfg.max_iters} | loss "
                          f"{loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | {fmt_time(spent)} "
                          f"elapsed, {fmt_time(left)} left", flush=True)
                    if do_eval:
                        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                            ev = estimate_loss(model, {"train": train_ids, "val": val_ids}, cfg)
                        if not (math.isfinite(ev["train"]) and math.isfinite(ev["val"])):
                            # this step's update broke the weights: never save them
                            raise TrainError(f"eval loss became {ev['val']} at iter {it}; "
                                             f"not saved; {kept_checkpoint(cfg, last_saved)}; "
                                             f"try a lower --lr (now {cfg.lr:g}) or --grad-clip")
                        best_val = min(best_val, ev["val"])
                        last_eval = {"iter": it, "train_loss": ev["train"], "val_loss": ev["val"]}
                        record.update(eval_train_loss=ev["train"], val_loss=ev["val"],
                                      val_ppl=math.exp(min(ev["val"], 700.0)))
                        path = save(it, last_eval)
                        last_saved = it
                        print(f"eval iter {it}: train {ev['train']:.4f}, val {ev['val']:.4f} "
                              f"(perplexity {record['val_ppl']:.2f}); saved {path}", flush=True)
                    append_metrics(cfg.out_dir, record)
                if stop.set and it < cfg.max_iters:
                    if last_saved != it:
                        save(it, last_eval)
                    print(f"interrupted at iter {it}: checkpoint saved in "
                          f"{checkpoint_path(cfg.out_dir)}; continue with --resume "
                          f"--out-dir {cfg.out_dir}", file=sys.stderr)
                    return 130
    finally:
        close()

    wall = time.perf_counter() - t0
    print(f"done: {cfg.max_iters - start_iter} steps in {fmt_time(wall)}; "
          f"val loss {last_eval['val_loss']:.4f}, best {best_val:.4f}")
    print("sample (temperature 0.8):")
    print(sample_text(model, tokenizer, cfg.seed))
    return 0


def kept_checkpoint(cfg: TrainConfig, last_saved: int | None) -> str:
    """What a stopped run says about the checkpoint it leaves behind."""
    if last_saved is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint (iter {last_saved}) is kept in {checkpoint_path(cfg.out_dir)}"


# ---- a short sample at the end ------------------------------------------------------------------
def sample_text(model: GPT, tokenizer, seed: int, max_new_tokens: int = 200,
                temperature: float = 0.8) -> str:
    """A short temperature sample from BOS, with gpt.sample.generate (KV cache)."""
    from .sample import generate

    return generate(model, tokenizer, None, max_new_tokens, temperature=temperature, seed=seed)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, given = parse_args(argv)
        return train(cfg, given)
    except (ValueError, OSError, RuntimeError) as e:  # bad input, or a parallel worker failed
        if os.environ.get("GPT_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg += f": {e.filename}"
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: the last checkpoint on disk is whole
        print("error: aborted; the last checkpoint on disk is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
