"""metrics.jsonl, the log of a training run: one JSON object per logged step, appended by
gpt.train and read by gpt.plot. Keys: "iter", "train_loss", "lr", "tokens_per_s",
"grad_norm", "elapsed_s"; evaluations add "eval_train_loss", "val_loss" and "val_ppl".

A resumed run first trims the file to its checkpoint's iteration (`start_log`), so that steps
logged after the checkpoint and before a crash are not logged twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import atomic_write
from .errors import UserError

FILENAME = "metrics.jsonl"


def metrics_path(run: str | os.PathLike) -> Path:
    """The metrics file of a run: `run` itself if it is a file, else run/metrics.jsonl."""
    run = Path(run)
    return run if run.is_file() else run / FILENAME


def start_log(out_dir: str, start_iter: int) -> None:
    """A fresh run (start_iter 0) starts an empty file; a resumed run keeps the records up to
    its checkpoint and drops later ones. Lines that do not parse (a torn last line) go too."""
    os.makedirs(out_dir, exist_ok=True)
    path = Path(out_dir) / FILENAME
    kept = []
    if start_iter > 0 and path.exists():
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    if json.loads(line)["iter"] <= start_iter:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
    atomic_write(str(path), "".join(kept).encode("utf-8"))


def append_record(out_dir: str, record: dict) -> None:
    with open(Path(out_dir) / FILENAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


MAX_BYTES = 1 << 30  # a metrics file larger than this is not one gpt.train wrote


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics file, each with a numeric "iter".

    Raises UserError (one line) on a missing, empty or corrupt file. A last line that does
    not parse is dropped: training may be writing it right now. When "iter" goes back (a run
    resumed without trimming), the lines it repeats are replaced by the new ones.
    """
    from .checkpoint import read_regular_file

    path = Path(path)
    if not path.exists():
        raise UserError(f"no metrics file at {path}: pass a run folder written by "
                        "gpt.train")
    try:  # a regular file of bounded size: a FIFO or /dev/zero in its place is refused
        text = read_regular_file(str(path), MAX_BYTES, follow_links=True).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    lines = text.split("\n")
    records: list[dict] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if n == len(lines):  # the unfinished last line of a run in progress
                break
            raise UserError(f"{path} line {n} is not valid JSON: the metrics file is corrupt") from None
        _check_record(record, path, n)
        if records and record["iter"] < records[-1]["iter"]:
            records = [r for r in records if r["iter"] < record["iter"]]  # the newer lines win
        records.append(record)
    if not records:
        raise UserError(f"{path} is empty: train for at least one log interval first")
    return records


def _check_record(record, path: Path, n: int) -> None:
    if not isinstance(record, dict) or not is_number(record.get("iter")):
        raise UserError(f"{path} line {n} has no numeric 'iter': not a gpt.train metrics file")
    for key in ("train_loss", "val_loss", "lr"):
        if record.get(key) is not None and not is_number(record[key]):
            raise UserError(f"{path} line {n}: {key} is {record[key]!r}, expected a number")


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(iterations, values) of the records that carry a number under `key` (NaN losses are
    kept: a plot shows them as gaps)."""
    points = [(float(r["iter"]), float(r[key])) for r in records if is_number(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]
