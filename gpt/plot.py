"""Plot a training run: `python -m gpt.plot OUT` turns OUT/metrics.jsonl (written by
gpt.train, one JSON object per logged iteration) into a PNG with train and validation loss
against iteration on top and the learning rate below.

    python -m gpt.plot out                         # writes out/loss.png
    python -m gpt.plot out/metrics.jsonl --output run.png

matplotlib is optional (pip install -e ".[plot]") and imported only when a plot is drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

INSTALL_HINT = 'matplotlib is not installed: run pip install -e ".[plot]" to plot training runs'


class PlotError(Exception):
    """Bad input for a plot: the message is one line that says what to do."""


def metrics_path(run: str | Path) -> Path:
    """The metrics file of a run: `run` itself if it is a file, else run/metrics.jsonl."""
    run = Path(run)
    return run if run.is_file() else run / "metrics.jsonl"


def load_metrics(path: str | Path) -> list[dict]:
    """Read metrics.jsonl into a list of dicts, each with an integer "iter".

    Raises PlotError (one line) on a missing, empty or corrupt file. A last line without
    its newline that does not parse is dropped: training may be writing it right now.
    When "iter" goes back (a resumed run), the lines it repeats are replaced by the new ones.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlotError(f"no metrics file at {path}: pass a run folder written by gpt.train") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"cannot read {path}: {e}") from None
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # the unfinished last line of a run in progress
                break
            raise PlotError(f"{path} line {n} is not valid JSON: the metrics file is corrupt") from None
        if not isinstance(record, dict) or not _is_number(record.get("iter")):
            raise PlotError(f"{path} line {n} has no numeric 'iter': not a gpt.train metrics file")
        for key in ("train_loss", "val_loss", "lr"):
            if key in record and record[key] is not None and not _is_number(record[key]):
                raise PlotError(f"{path} line {n}: {key} is {record[key]!r}, expected a number")
        if records and record["iter"] < records[-1]["iter"]:
            # A resumed run logs from its checkpoint's iteration again: the newer lines win.
            records = [r for r in records if r["iter"] < record["iter"]]
        records.append(record)
    if not records:
        raise PlotError(f"{path} is empty: train for at least one log interval first")
    if not any(_has(r, "train_loss") or _has(r, "val_loss") for r in records):
        raise PlotError(f"{path} holds no train_loss or val_loss values: nothing to plot")
    return records


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _has(record: dict, key: str) -> bool:
    return _is_number(record.get(key))


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(iterations, values) of the records that carry `key` (NaN losses are kept: gaps)."""
    points = [(float(r["iter"]), float(r[key])) for r in records if _has(r, key)]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(records: list[dict], output: str | Path, title: str = "") -> Path:
    """Draw loss (top) and learning rate (bottom) against iteration into the PNG `output`.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it is
    safe to call from a notebook or a headless machine. Raises ImportError without matplotlib.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    output = Path(output)
    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    has_lr = any(_has(r, "lr") for r in records)
    if has_lr:
        ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        ax_loss, ax_lr = fig.subplots(1, 1), None

    it, train = series(records, "train_loss")
    if it:
        ax_loss.plot(it, train, color="tab:blue", linewidth=1.2, label="train loss")
    it, val = series(records, "val_loss")
    if it:
        ax_loss.plot(it, val, color="tab:orange", marker="o", markersize=4, label="val loss")
        finite = [(v, i) for i, v in zip(it, val) if math.isfinite(v)]
        if finite:
            best, at = min(finite)
            ax_loss.annotate(f"best val {best:.3f} @ {at:g}", (at, best), xytext=(0, 12),
                             textcoords="offset points", ha="center", fontsize=8)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if title:
        ax_loss.set_title(title)

    bottom = ax_loss
    if ax_lr is not None:
        it, lr = series(records, "lr")
        ax_lr.plot(it, lr, color="tab:green", linewidth=1.2)
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax_lr.grid(alpha=0.3)
        bottom = ax_lr
    bottom.set_xlabel("iteration")
    fig.savefig(output, format="png")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt.plot",
        description="Plot train/val loss and learning rate of a gpt.train run as a PNG.",
    )
    parser.add_argument("run", help="a run folder holding metrics.jsonl, or a metrics.jsonl file")
    parser.add_argument("--output", help="PNG to write (default: loss.png next to metrics.jsonl)")
    args = parser.parse_args(argv)

    path = metrics_path(args.run)
    output = Path(args.output) if args.output else path.parent / "loss.png"
    try:
        records = load_metrics(path)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        import matplotlib  # noqa: F401  (optional: the `plot` extra)
    except ImportError:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if not output.parent.is_dir():
        print(f"error: folder {output.parent} does not exist: create it or pick another --output",
              file=sys.stderr)
        return 1
    try:
        plot_metrics(records, output, title=str(path.parent))
    except OSError as e:
        print(f"error: cannot write {output}: {e.strerror or e}", file=sys.stderr)
        return 1
    n_val = sum(_has(r, "val_loss") for r in records)
    print(f"wrote {output} ({len(records)} records, {n_val} evals)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
