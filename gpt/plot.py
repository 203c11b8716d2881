"""Plot a training run: `python -m gpt.plot OUT` turns OUT/metrics.jsonl (written by
gpt.train, one JSON object per logged iteration) into a PNG with train and validation loss
against iteration on top and the learning rate below. With `--attention PROMPT` it draws
the trained model's attention instead: one heatmap per layer and head, the prompt's tokens
on both axes.

    python -m gpt.plot out                         # writes out/loss.png
    python -m gpt.plot out/metrics.jsonl --output run.png
    python -m gpt.plot out --attention "ROMEO:"    # writes out/attention.png

matplotlib is optional (pip install -e ".[plot]") and imported only when a plot is drawn.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from . import cli
from .errors import UserError
from .metrics import is_number, metrics_path, read_metrics, series

INSTALL_HINT = 'matplotlib is not installed: run pip install -e ".[plot]" to plot training runs'


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
    has_lr = any(is_number(r.get("lr")) for r in records)
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


def token_label(text: str) -> str:
    """A token's text as an axis label: spaces and newlines made visible."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "·"


def plot_attention(maps, labels: list[str], output: str | Path, title: str = "") -> Path:
    """Draw `maps` (n_layer, n_head, T, T), as from GPT.attention_maps, into the PNG `output`:
    a grid with a row per layer and a column per head; in each heatmap row i (a query) shows
    how position i weighs the positions j <= i (the keys), with `labels` (T tokens) on both
    axes. Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_layer, n_head, T, _ = maps.shape
    side = 1.1 + 0.12 * T
    fig = Figure(figsize=(side * n_head + 0.8, side * n_layer + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    ticks = [token_label(t) for t in labels]
    size = max(4.0, min(9.0, 200 / T))
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(maps[layer, head], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(T), ticks, fontsize=size, family="monospace")
            ax.set_yticks(range(T), ticks, fontsize=size, family="monospace")
            ax.tick_params(length=0, pad=1)
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            if head == 0:
                ax.set_ylabel("query (predicting after)", fontsize=8)
            if layer == n_layer - 1:
                ax.set_xlabel("key (looked at)", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(output, format="png")
    return Path(output)


def plot_run_attention(run: str, prompt: str, output: str | None = None) -> int:
    """Write RUN/attention.png (or `output`): the attention maps of the run's model on `prompt`."""
    from .checkpoint import load_model

    output = Path(output) if output else Path(run) / "attention.png"
    try:
        import matplotlib  # noqa: F401  (optional: the `plot` extra)
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    model, tokenizer = load_model(run)
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as e:
        raise UserError(str(e), field="attention") from None
    block = model.config.block_size
    if not ids or len(ids) > block:
        raise UserError(f"needs a prompt of 1 to {block} tokens (the model's block_size), "
                        f"got {len(ids)}", field="attention")
    if not output.parent.is_dir():
        raise UserError(f"names a folder ({output.parent}) that does not exist: create it "
                        "or pick another", field="output")
    labels = [tokenizer.decode([i]) for i in ids]
    try:
        plot_attention(model.attention_maps(ids), labels, output, title=f"{run}: {prompt!r}")
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    print(f"wrote {output} ({model.config.n_layer} layers x {model.config.n_head} heads, "
          f"{len(ids)} tokens)")
    return 0


def build_parser() -> cli.Parser:
    p = cli.Parser("python -m gpt.plot",
                   "Plot train/val loss and learning rate of a gpt.train run as a PNG.")
    p.add_argument("run", help="a run folder holding metrics.jsonl, or a metrics.jsonl file")
    p.add_argument("--output", metavar="PNG",
                   help="PNG to write (default: loss.png next to metrics.jsonl, or "
                        "RUN/attention.png with --attention)")
    p.add_argument("--attention", metavar="PROMPT",
                   help="draw the trained model's attention on PROMPT (a heatmap per layer "
                        "and head) instead of the losses")
    return p


def plot_run(run: str, output: str | None = None) -> int:
    path = metrics_path(run)
    output = Path(output) if output else path.parent / "loss.png"
    records = read_metrics(path)
    if not any(is_number(r.get("train_loss")) or is_number(r.get("val_loss")) for r in records):
        raise UserError(f"{path} holds no train_loss or val_loss values: nothing to plot")
    try:
        import matplotlib  # noqa: F401  (optional: the `plot` extra)
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    if not output.parent.is_dir():
        raise UserError(f"names a folder ({output.parent}) that does not exist: create it "
                        "or pick another", field="output")
    try:
        plot_metrics(records, output, title=str(path.parent))
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
    n_val = sum(is_number(r.get("val_loss")) for r in records)
    print(f"wrote {output} ({len(records)} records, {n_val} evals)")
    return 0


def main(argv: list[str] | None = None) -> int:
    def command() -> int:
        args = build_parser().parse_args(argv)
        if args.attention is not None:
            return plot_run_attention(args.run, args.attention, args.output)
        return plot_run(args.run, args.output)

    return cli.run(command)


if __name__ == "__main__":
    sys.exit(main())
