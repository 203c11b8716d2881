"""`python -m gpt.train`: train a GPT on a text file, with evaluation, metrics, checkpoints
that resume exactly, and one-line errors for bad input.

    python -m gpt.train                                   # the bundled train.txt, about a minute
    python -m gpt.train --data my.txt --out-dir my_run --max-iters 3000
    python -m gpt.train --preset baby --data my.txt       # a named set of sizes (config.PRESETS)
    python -m gpt.train --out-dir my_run --resume --max-iters 5000   # continue a run
    python -m gpt.train --init-from gpt2_run --data my.txt --out-dir tuned   # fine-tune

Every flag is a field of gpt.config.TrainConfig or of the GPTConfig it holds (`out_dir` ->
`--out-dir`). `train` reads top to bottom in named phases, like nanoGPT's loop:

    run = set_up(cfg)                      config, data, tokenizer, model, optimizer, state
    for it in steps:
        loss, norm, lr = take_step(run, it)      x, y = batch;  loss.backward();
                                                 clip to grad_clip;  AdamW step at lr_at(it)
        log_and_evaluate(run, it, ...)           metrics.jsonl; every eval_interval: eval, save
    finish(run)                            summary and a short sample

Reproducibility: three random streams come from one seed (batches, dropout, evaluation
batches); the first two and the optimizer state are saved in every checkpoint, so a resumed
run takes exactly the steps the uninterrupted run would have taken. Evaluation draws its
batches from a fresh generator each time, so it never disturbs the training stream.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import tensorlite as tl

from . import cli, metrics
from .bpe import REPLACEMENT_CHAR, REPLACEMENT_NOTE
from .checkpoint import (
    Checkpoint,
    checkpoint_path,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import PRESETS, TrainConfig, fixed_fields
from .data import (
    BY_REFERENCE_TOKENS,
    BY_REFERENCE_TOKENS_DASK,
    GET_DATA_HINT,
    TokenWindows,
    batch_starts,
    check_windows,
    get_batch,
    is_token_dir,
    load_text,
    load_token_dir,
    split_ids,
    windows,
)
from .errors import UserError
from .lock import RunLock
from .model import GPT, check_fits
from .optim import AdamW, clip_grad_norm, lr_at
from .threaded import ThreadShards, available_cores


# ---- the command line ---------------------------------------------------------------------------
def build_parser() -> cli.Parser:
    p = cli.Parser("python -m gpt.train",
                   "Train a character-level (or BPE) GPT on a UTF-8 text file.",
                   epilog=f"No text? {GET_DATA_HINT} fetches Tiny Shakespeare. Metrics go to "
                   "OUT/metrics.jsonl, the checkpoint to OUT/checkpoint/.")
    cli.add_config_flags(p, TrainConfig, PRESETS)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """(config, names of the fields given on the command line, by a flag or a preset)."""
    return cli.parse_config(build_parser(), TrainConfig, argv, PRESETS)


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: train(*parse_args(argv)), tune_process=True,
                   interrupted="aborted; the last checkpoint on disk is intact")


# ---- the run, in five phases (below) ---------------------------------------------------------
def train(cfg: TrainConfig, given: set[str] = frozenset()) -> int:
    """Run training as configured; returns the exit status (0, or 130 after Ctrl-C).
    Raises UserError/ValueError/OSError (one-line messages) on bad input. The run folder is
    locked for the whole run: a second trainer there stops at once ("OUT is in use by pid N")."""
    with RunLock(cfg.out_dir):
        run = set_up(cfg, given)
        try:
            with StopFlag() as stop:
                for it in range(run.start_iter + 1, run.cfg.max_iters + 1):
                    loss, norm, lr = take_step(run, it)
                    log_and_evaluate(run, it, loss, norm, lr)
                    if stop.set and it < run.cfg.max_iters:
                        return stop_early(run, it)
        finally:
            run.fns.close()
        finish(run)
    return 0


# ---- what a run carries from phase to phase ---------------------------------------------------
@dataclass
class Run:
    cfg: TrainConfig
    tokenizer: Any
    train_ids: np.ndarray
    val_ids: np.ndarray
    model: GPT
    opt: AdamW
    rngs: dict[str, np.random.Generator]
    fns: GradFns | None = None  # loss and gradients, evaluation loss (make_grad_fn)
    start_iter: int = 0
    best_val: float = math.inf  # the lowest val loss so far, whose weights are in OUT/best
    best_iter: int | None = None
    elapsed_before: float = 0.0  # seconds spent by the runs this one resumes
    last_eval: dict | None = None
    last_saved: int | None = None  # iteration of the checkpoint on disk (None: none yet)
    t0: float = field(default_factory=time.perf_counter)
    t_log: float = 0.0
    it_log: int = 0
    tokenizer_note: str = ""  # what training a BPE tokenizer did, for the intro


# ---- phase 1: set up the run --------------------------------------------------------------------
def set_up(cfg: TrainConfig, given: set[str]) -> Run:
    """Everything the loop needs; nothing is written before every check has passed."""
    ckpt, pretrained = None, None
    if cfg.resume:
        cfg, ckpt = resume_config(cfg, set(given) - {"resume"})
    elif has_checkpoint(cfg.out_dir):
        raise UserError(f"{checkpoint_path(cfg.out_dir)} already holds a checkpoint: continue it "
                        "with --resume, choose another --out-dir, or delete it to start over")
    elif cfg.init_from:
        cfg, pretrained = init_config(cfg, given)
    elif cfg.tokenizer == "gpt2":
        raise UserError("GPT-2's tokenizer comes with the model: give --init-from PATH (a run "
                        "or Hugging Face GPT-2 folder) instead of --tokenizer gpt2")
    cfg.validate()
    run = build_run(cfg, ckpt, data_given="data" in given or ckpt is not None, given=given,
                    tokenizer=pretrained[1] if pretrained else None)
    if ckpt is not None:
        restore(run, ckpt)
    elif pretrained is not None:
        try:
            run.model.load_state_dict(pretrained[0])  # the optimizer starts fresh
        except ValueError as e:
            raise UserError(f"{cfg.init_from}: the weights do not fit its config: {e}") from None
    metrics.start_log(cfg.out_dir, run.start_iter)
    run.fns = make_grad_fn(run.model, cfg)
    print_intro(run, resumed_from=ckpt.path if ckpt else None)
    if ckpt is not None:
        say_if_shards_differ(run, ckpt.state.get("shards"))
    run.t0 = run.t_log = time.perf_counter()
    run.it_log = run.start_iter
    return run


def resume_config(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, Checkpoint]:
    """The run's config on --resume: the checkpoint's saved config, overridden by the flags
    given now; settings that are fixed (the model's shape, tokenizer, dtype) may not change."""
    ckpt = load_checkpoint(cfg.out_dir)
    try:
        saved = TrainConfig.from_dict(ckpt.config["train"]).validate()
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{ckpt.path}/config.json holds no valid train config ({e})") from None
    flat = dict(saved.to_dict(), **{k: v for k, v in cfg.to_dict().items() if k in given})
    flat["out_dir"] = cfg.out_dir  # where it is now (the folder may have been moved)
    merged = TrainConfig.from_dict(flat)
    fixed = [k for k in fixed_fields(TrainConfig)  # the char tokenizer ignores vocab_size
             if not (k == "vocab_size" and merged.tokenizer == "char")]
    changed = [f"{cli.flag(k)} {flat[k]} (checkpoint: {saved.to_dict()[k]})"
               for k in fixed if flat[k] != saved.to_dict()[k]]
    if changed:
        raise UserError(f"cannot resume {ckpt.path} with a different model: "
                        f"{', '.join(changed)}; drop those flags or use a new --out-dir")
    return merged, ckpt


def init_config(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, tuple]:
    """--init-from PATH: the run's config with the model's shape (and architecture) and the
    tokenizer of PATH, and (weights, tokenizer) to start from. A shape flag that disagrees
    with PATH's model is an error (gpt.convert.same_shape)."""
    from .convert import load_pretrained, same_shape

    dtype = np.float32 if cfg.dtype == "bfloat16" else np.dtype(cfg.dtype)  # (master weights)
    config, weights, tokenizer = load_pretrained(cfg.init_from, dtype)
    if "tokenizer" in given and cfg.tokenizer != tokenizer.to_dict()["kind"]:
        raise UserError(f"is {cfg.tokenizer} but --init-from's is {tokenizer.to_dict()['kind']}; "
                        "drop the flag (the tokenizer comes from --init-from)", field="tokenizer")
    model = same_shape(cfg.model, config, given)
    cfg = dataclasses.replace(cfg, model=model, tokenizer=tokenizer.to_dict()["kind"])
    return cfg, (weights, tokenizer)


def build_run(cfg: TrainConfig, ckpt: Checkpoint | None, data_given: bool,
              given: set[str] = frozenset(), tokenizer=None) -> Run:
    """Data, tokenizer (trained, the checkpoint's, the token files', or `tokenizer`: the one
    of --init-from), model and optimizer of a run."""
    if not data_given and not os.path.exists(cfg.data):
        raise UserError(f"no {cfg.data} in {os.getcwd()} and no --data given: pass "
                        f"--data FILE (UTF-8 text), or get Tiny Shakespeare with `{GET_DATA_HINT}`")
    note = ""  # what training a BPE tokenizer did
    if is_token_dir(cfg.data):
        pretrained = tokenizer
        cfg, tokenizer, train_ids, val_ids = read_token_dir(cfg, ckpt, given)
        if pretrained is not None and pretrained.to_dict() != tokenizer.to_dict():
            raise UserError(f"{cfg.data} was tokenized with another tokenizer than "
                            f"{cfg.init_from}'s; prepare the text with that one")
    else:
        tokenizer, train_ids, val_ids, note = read_text(cfg, ckpt, tokenizer)
    mcfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    check_fits(mcfg, cfg.batch_size, cfg.dtype, shard_threads(cfg))  # before allocating
    model = GPT(mcfg, dtype=cfg.dtype, seed=cfg.seed)  # bfloat16: float32 weights, bf16 products
    opt = AdamW(model.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                weight_decay=cfg.weight_decay)
    return Run(cfg, tokenizer, train_ids, val_ids, model, opt, make_rngs(cfg.seed),
               tokenizer_note=note)


def read_text(cfg: TrainConfig, ckpt: Checkpoint | None, tokenizer=None):
    """(tokenizer, train ids, val ids, note) of a text file: read whole, tokenized (with
    `tokenizer`: --init-from's, the checkpoint's, or one trained on it), split 90/10; the note
    says what training a BPE tokenizer did ("" otherwise)."""
    text = load_text(cfg.data)
    t0 = time.perf_counter()
    trained = tokenizer is None and ckpt is None
    if tokenizer is None:
        tokenizer = load_tokenizer(ckpt.tokenizer) if ckpt else make_tokenizer(cfg, text)
    try:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    except ValueError as e:
        where = ("the checkpoint's vocabulary" if ckpt is not None or cfg.init_from
                 else "the tokenizer")
        raise UserError(f"{cfg.data} does not fit {where}: {e}") from None
    note = ""
    if trained and cfg.tokenizer == "bpe":
        note = bpe_note(tokenizer, len(text.encode("utf-8")), len(ids), time.perf_counter() - t0)
    try:
        train_ids, val_ids = split_ids(ids, 0.1, cfg.model.block_size)
    except ValueError as e:
        raise UserError(f"{cfg.data}: {e}") from None
    return tokenizer, train_ids, val_ids, note


def bpe_note(tokenizer, n_bytes: int, n_tokens: int, seconds: float) -> str:
    """What training the BPE tokenizer did: its merges, the time it took (training and
    encoding the text) and how many bytes of text a token stands for on average."""
    return (f"BPE tokenizer: {len(tokenizer.merges):,} merges learned and the text encoded in "
            f"{seconds:.2f} s; {n_bytes / max(n_tokens, 1):.2f} bytes per token "
            f"({n_bytes:,} bytes -> {n_tokens:,} tokens)")


def read_token_dir(cfg: TrainConfig, ckpt: Checkpoint | None, given: set[str]):
    """(config, tokenizer, train ids, val ids) of a folder of token files (gpt.data prepare),
    mapped with np.memmap, not read. The folder brings its tokenizer: the run takes its kind
    and size as its --tokenizer and --vocab-size, and refuses other ones given as flags (or,
    on --resume, a checkpoint trained with another vocabulary)."""
    data = load_token_dir(cfg.data)
    kind, vocab = data.meta["tokenizer"], data.tokenizer.vocab_size
    if ckpt is not None and ckpt.tokenizer != data.tokenizer.to_dict():
        raise UserError(f"{cfg.data} was tokenized with another vocabulary than the checkpoint "
                        f"in {cfg.out_dir}; resume with the data the run was trained on")
    if ckpt is None:
        for name, ours, theirs in (("tokenizer", cfg.tokenizer, kind),
                                   ("vocab_size", cfg.model.vocab_size, vocab)):
            if name in given and ours != theirs and not (name == "vocab_size" and kind == "char"):
                raise UserError(f"is {ours}, but {cfg.data} holds token ids of a {kind} "
                                f"tokenizer of {vocab} ids; drop the flag (a prepared folder "
                                "brings its tokenizer) or prepare the text again", field=name)
        cfg = dataclasses.replace(cfg, tokenizer=kind,
                                  model=dataclasses.replace(cfg.model, vocab_size=vocab))
    try:
        check_windows(len(data.train), len(data.val), cfg.model.block_size)
    except ValueError as e:
        raise UserError(f"{cfg.data}: {e}") from None
    return cfg, data.tokenizer, data.train, data.val


def make_tokenizer(cfg: TrainConfig, text: str):
    if cfg.tokenizer == "bpe":
        from .bpe import BPETokenizer

        return BPETokenizer.train(text, cfg.model.vocab_size)
    from .tokenizer import CharTokenizer

    return CharTokenizer.from_text(text)


def load_tokenizer(d: dict):
    from .tokenizer import tokenizer_from_dict

    return tokenizer_from_dict(d)


def restore(run: Run, ckpt: Checkpoint) -> None:
    """Weights, optimizer moments, random streams and counters from a checkpoint."""
    for name, load, tensors in (("model", run.model.load_state_dict, ckpt.model),
                                ("optimizer", run.opt.load_state_dict, ckpt.optimizer)):
        try:
            load(tensors)
        except (ValueError, TypeError) as e:
            raise UserError(f"{ckpt.path}/{name}.safetensors does not fit this run: {e}") \
                from None
    try:
        for name in ("data", "dropout"):
            run.rngs[name].bit_generator.state = ckpt.state["rng"][name]
        run.start_iter = int(ckpt.state["iter"])
        if has_checkpoint(run.cfg.out_dir, best=True):  # else that best's weights are gone
            run.best_val = float(ckpt.state.get("best_val_loss") or math.inf)
            run.best_iter = ckpt.state.get("best_iter")
        run.elapsed_before = float(ckpt.state.get("elapsed_s", 0.0))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{ckpt.path}/state.json lacks a valid iteration or random state "
                        f"({type(e).__name__}: {e}); it cannot be resumed") from None
    if run.start_iter >= run.cfg.max_iters:
        raise UserError(f"the checkpoint is at iter {run.start_iter} and --max-iters is "
                        f"{run.cfg.max_iters}: give a larger --max-iters to train further")
    run.last_saved, run.last_eval = run.start_iter, ckpt.state.get("last_eval")


def say_if_shards_differ(run: Run, before) -> None:
    """With dropout each shard draws its own masks, so a run resumed on another number of
    threads (--threads defaults to the cores, which differ between machines) takes other
    steps than the uninterrupted run would have: say so, and how to replay it exactly."""
    now = run.fns.threads
    if run.cfg.model.dropout > 0 and isinstance(before, int) and before != now:
        flag = "--workers" if run.cfg.workers > 1 or run.cfg.backend != "loky" else "--threads"
        print(f"note: the run split its batches into {before} shards and resumes with {now}: "
              f"with dropout the masks differ, so its steps will not be those of an "
              f"uninterrupted run (give {flag} {before} to replay it exactly)", file=sys.stderr)


def make_rngs(seed: int) -> dict[str, np.random.Generator]:
    """Independent streams from one seed: "data" (batches), "dropout" (masks), "eval"."""
    data, dropout, ev = np.random.SeedSequence(seed).spawn(3)
    return {"data": np.random.default_rng(data), "dropout": np.random.default_rng(dropout),
            "eval": np.random.default_rng(ev)}


@dataclass
class GradFns:
    """How a run computes: loss_and_grads(x, y, rng) -> loss leaves the gradient of the mean
    loss in each parameter's .grad; eval_loss(x, y) -> loss computes no gradients; close()
    releases the threads or worker processes; grad_norm() -> the global norm of the
    gradients the last loss_and_grads left, where it measured it, else None. (With several
    shards, the first and the last are a gpt.shards.ShardedStep's.)"""

    loss_and_grads: Callable[[np.ndarray, np.ndarray, np.random.Generator | None], float]
    eval_loss: Callable[[np.ndarray, np.ndarray], float]
    close: Callable[[], None]
    threads: int = 1  # how many shards a batch is split into (threads or worker processes)
    grad_norm: Callable[[], float | None] = lambda: None
    # worker processes (loky, or a dask cluster's): loss_and_grads of a batch of token files
    # that each worker reads itself where it can (ShardedStep.loss_and_grads_from); None: the
    # rows are sent
    loss_and_grads_from: Callable[[TokenWindows, np.random.Generator | None], float] | None = None


def make_grad_fn(model: GPT, cfg: TrainConfig) -> GradFns:
    """With --workers 1 (loky) the batch is computed here, split over --threads threads
    (gpt.threaded) when there are several; otherwise gpt.parallel.DataParallel spreads it
    over worker processes (and evaluation runs here)."""
    if cfg.backend == "loky":  # (dask's workers run on the cluster's machines)
        warn_if_oversubscribed(max(cfg.workers, shard_threads(cfg)),
                               "--workers" if cfg.workers > 1 else "--threads")
    if cfg.workers == 1 and cfg.backend == "loky":
        threads = shard_threads(cfg)
        if threads > 1:
            shards = ThreadShards(model, threads)
            return GradFns(shards.loss_and_grads, shards.loss, shards.close, threads,
                           lambda: shards.grad_norm)
        if cfg.threads == 1:
            tl.set_num_threads(1)

        def loss_and_grads(x, y, rng):
            model.zero_grad()
            _, loss = model(x, y, training=True, rng=rng)
            loss.backward()
            return float(loss.data)

        return GradFns(loss_and_grads, plain_loss(model), lambda: None)
    from . import parallel  # imported here: joblib starts only when it is used

    dp = parallel.DataParallel(model, workers=cfg.workers, backend=cfg.backend,
                               scheduler=cfg.scheduler)
    return GradFns(dp.loss_and_grads, plain_loss(model), dp.close,
                   min(cfg.workers, cfg.batch_size), lambda: dp.grad_norm,
                   # (dask: each worker is asked whether it has the files; those that do not
                   # are sent the rows)
                   getattr(dp, "loss_and_grads_from", None))


def warn_if_oversubscribed(shards: int, flag: str) -> None:
    """One line on stderr when a step is split into more threads or worker processes (one
    BLAS thread each) than this process has cores: they will take turns, and a step is
    slower than with one per core. (It is only a note: the user asked for them.)"""
    cores = available_cores()
    if shards > cores:
        print(f"gpt.train: {flag} {shards} on {cores} cores: they will take turns; "
              f"{flag} {cores} is usually faster", file=sys.stderr)


def shard_threads(cfg: TrainConfig) -> int:
    """How many threads make_grad_fn splits each batch over: --threads (default: all cores),
    never more than the batch has rows; 1 with worker processes (--workers > 1 or dask),
    which ignore --threads."""
    if cfg.workers != 1 or cfg.backend != "loky":
        return 1
    return min(cfg.threads or available_cores(), cfg.batch_size)


def plain_loss(model: GPT) -> Callable[[np.ndarray, np.ndarray], float]:
    def eval_loss(x, y) -> float:
        with tl.no_grad():
            return float(model(x, y, training=False)[1].data)

    return eval_loss


def print_intro(run: Run, resumed_from: str | None) -> None:
    cfg, m = run.cfg, run.cfg.model
    n = len(run.train_ids) + len(run.val_ids)
    if run.tokenizer_note:
        print(run.tokenizer_note)
    print(f"{cfg.data}: {n:,} tokens ({len(run.train_ids):,} train, {len(run.val_ids):,} val), "
          f"vocab {run.tokenizer.vocab_size}; model {run.model.num_params():,} parameters "
          f"({m.n_layer} layers, {m.n_head} heads, n_embd {m.n_embd}, {cfg.dtype})")
    if resumed_from:
        print(f"resuming {resumed_from} at iter {run.start_iter}")
    elif run.cfg.init_from:
        print(f"fine-tuning from {run.cfg.init_from} (its weights and tokenizer; a fresh "
              "optimizer)")
    else:
        print(f"an untrained model scores about ln(vocab) = "
              f"{math.log(run.tokenizer.vocab_size):.2f}")


# ---- phase 2: one step --------------------------------------------------------------------------
def take_step(run: Run, it: int) -> tuple[float, float, float]:
    """Step `it` (1-based): a batch, its gradient, clipping, one AdamW update.
    Returns (loss, gradient norm before clipping, learning rate). A non-finite loss or norm
    stops the run before the weights are touched."""
    cfg = run.cfg
    lr = lr_at(it - 1, cfg)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        # overflow shows up as a non-finite loss or norm, checked just below
        try:
            loss = batch_loss_and_grads(run)
        except RuntimeError as e:  # data-parallel workers failed (or none is left)
            raise UserError(f"{e}; {kept_checkpoint(run)}") from e
        norm = (clip_grad_norm(run.model.params, cfg.grad_clip, run.fns.grad_norm())
                if math.isfinite(loss) else loss)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
        raise UserError(f"{what} became {value} at iter {it}; stopped without updating the "
                        f"weights; {kept_checkpoint(run)}; try a lower --lr (now {cfg.lr:g}) "
                        "or --grad-clip")
    run.opt.step(lr=lr)
    return loss, norm, lr


def batch_loss_and_grads(run: Run) -> float:
    """The loss of the next training batch (random windows of the train ids), its gradients
    left in .grad. Worker processes training on token files are sent the windows' starts
    and read the rows themselves where that is cheaper than sending the rows (batches of
    BY_REFERENCE_TOKENS or more; BY_REFERENCE_TOKENS_DASK on a dask cluster, whose workers
    without the same files get the rows); the batch and the result are the same."""
    cfg, ids = run.cfg, run.train_ids
    starts = batch_starts(len(ids), cfg.model.block_size, cfg.batch_size, run.rngs["data"])
    threshold = BY_REFERENCE_TOKENS_DASK if cfg.backend == "dask" else BY_REFERENCE_TOKENS
    large = cfg.batch_size * cfg.model.block_size >= threshold
    by_reference = (run.fns.loss_and_grads_from and large
                    and TokenWindows.of(ids, starts, cfg.model.block_size))
    if by_reference:
        return run.fns.loss_and_grads_from(by_reference, run.rngs["dropout"])
    x, y = windows(ids, starts, cfg.model.block_size)
    return run.fns.loss_and_grads(x, y, run.rngs["dropout"])


# ---- phase 3: log, evaluate, save ---------------------------------------------------------------
def log_and_evaluate(run: Run, it: int, loss: float, norm: float, lr: float) -> None:
    """Every log_interval steps a progress line and a metrics record; every eval_interval
    steps (and at the last) an evaluation, which is saved as a checkpoint."""
    cfg = run.cfg
    do_eval = it % cfg.eval_interval == 0 or it == cfg.max_iters
    if not (it % cfg.log_interval == 0 or do_eval):
        return
    now = time.perf_counter()
    tps = (it - run.it_log) * cfg.batch_size * cfg.model.block_size / max(now - run.t_log, 1e-9)
    run.t_log, run.it_log = now, it
    spent = now - run.t0
    left = spent / (it - run.start_iter) * (cfg.max_iters - it)
    record: dict[str, Any] = {"iter": it, "train_loss": loss, "lr": lr,
                              "tokens_per_s": round(tps, 1), "grad_norm": round(float(norm), 4),
                              "elapsed_s": round(run.elapsed_before + spent, 2)}
    print(f"iter {it:>{len(str(cfg.max_iters))}}/{cfg.max_iters} | loss {loss:.4f} | lr "
          f"{lr:.2e} | {tps:,.0f} tok/s | {fmt_time(spent)} elapsed, {fmt_time(left)} left",
          flush=True)
    if do_eval:
        best_before = run.best_val
        record.update(evaluate(run, it))
        path = save(run, it)
        if run.best_val < best_before:  # a new lowest val loss: keep these weights as the best
            run.best_iter = it
            path += f" and {save(run, it, best=True)} (new best)"
        print(f"eval iter {it}: train {record['eval_train_loss']:.4f}, val "
              f"{record['val_loss']:.4f} (perplexity {record['val_ppl']:.2f}); saved {path}",
              flush=True)
    metrics.append_record(cfg.out_dir, record)


def evaluate(run: Run, it: int) -> dict[str, float]:
    """Train and val loss (estimate_loss); a non-finite one stops the run unsaved."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ev = estimate_loss(run.fns.eval_loss, {"train": run.train_ids, "val": run.val_ids}, run.cfg)
    if not (math.isfinite(ev["train"]) and math.isfinite(ev["val"])):
        # this step's update broke the weights: never save them
        raise UserError(f"eval loss became {ev['val']} at iter {it}; not saved; "
                        f"{kept_checkpoint(run)}; try a lower --lr (now {run.cfg.lr:g}) "
                        "or --grad-clip")
    run.best_val = min(run.best_val, ev["val"])
    run.last_eval = {"iter": it, "train_loss": ev["train"], "val_loss": ev["val"]}
    return {"eval_train_loss": ev["train"], "val_loss": ev["val"],
            "val_ppl": math.exp(min(ev["val"], 700.0))}


def estimate_loss(loss_fn, splits: dict[str, np.ndarray], cfg: TrainConfig) -> dict[str, float]:
    """Mean loss_fn(x, y) (a model's loss without gradients) over cfg.eval_iters batches of
    each split. The batches come from a generator re-made from the seed every time: every eval
    of a run sees the same batches, so successive evals are comparable, and training's random
    stream is not touched."""
    out = {}
    for name, ids in splits.items():
        rng = make_rngs(cfg.seed)["eval"]
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(ids, cfg.model.block_size, cfg.batch_size, rng)
            losses.append(loss_fn(x, y))
        out[name] = float(np.mean(losses))
    return out


# ---- phase 4: save ------------------------------------------------------------------------------
def save(run: Run, it: int, best: bool = False) -> str:
    """The run at step `it` as OUT/checkpoint (OUT/best with best=True), atomically; returns
    its path."""
    state = {"iter": it, "best_val_loss": None if math.isinf(run.best_val) else run.best_val,
             "best_iter": run.best_iter, "last_eval": run.last_eval,
             "elapsed_s": run.elapsed_before + time.perf_counter() - run.t0,
             "shards": run.fns.threads if run.fns else 1,
             "rng": {name: run.rngs[name].bit_generator.state for name in ("data", "dropout")}}
    path = save_checkpoint(run.cfg.out_dir, Checkpoint(
        model=run.model.state_dict(), optimizer=run.opt.state_dict(),
        config={"model": run.model.config.to_dict(), "train": run.cfg.to_dict()},
        tokenizer=run.tokenizer.to_dict(), state=state), best=best)
    if not best:
        run.last_saved = it
    return path


def kept_checkpoint(run: Run) -> str:
    """What a stopped run says about the checkpoint it leaves behind."""
    if run.last_saved is None:
        return "no checkpoint was written yet"
    return (f"the last good checkpoint (iter {run.last_saved}) is kept in "
            f"{checkpoint_path(run.cfg.out_dir)}")


# ---- phase 5: finish ----------------------------------------------------------------------------
def finish(run: Run) -> None:
    """A short sample of the final weights, then the summary: which checkpoint is where."""
    wall = time.perf_counter() - run.t0
    print("sample of the final weights (temperature 0.8):")
    text = sample_text(run.model, run.tokenizer, run.cfg.seed)
    print(text)
    if REPLACEMENT_CHAR in text:
        print(REPLACEMENT_NOTE)
    out = run.cfg.out_dir
    best = (f"best {run.best_val:.4f} (iter {run.best_iter}) in {checkpoint_path(out, True)}"
            if run.best_iter is not None else "no best checkpoint")
    print(f"done: {run.cfg.max_iters - run.start_iter} steps in {fmt_time(wall)}; "
          f"val loss {run.last_eval['val_loss']:.4f} (iter {run.cfg.max_iters}) in "
          f"{checkpoint_path(out)}, {best}; gpt.sample takes the best (--latest: the latest)")


def stop_early(run: Run, it: int) -> int:
    """After Ctrl-C: save step `it` (unless just saved) and say how to go on."""
    if run.last_saved != it:
        save(run, it)
    print(f"interrupted at iter {it}: checkpoint saved in {checkpoint_path(run.cfg.out_dir)}; "
          f"continue with --resume --out-dir {run.cfg.out_dir}", file=sys.stderr)
    return cli.EXIT_INTERRUPTED


def sample_text(model: GPT, tokenizer, seed: int, max_new_tokens: int = 200,
                temperature: float = 0.8) -> str:
    """A short temperature sample from BOS, with gpt.sample.generate (KV cache)."""
    from .sample import generate

    return generate(model, tokenizer, None, max_new_tokens, temperature=temperature, seed=seed)


def fmt_time(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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


if __name__ == "__main__":
    sys.exit(main())
