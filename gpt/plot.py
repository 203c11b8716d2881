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

import numpy as np

from . import cli
from .errors import UserError
from .metrics import is_number, metrics_path, read_metrics, series

INSTALL_HINT = 'matplotlib is not installed: run pip install -e ".[plot]" to plot training runs'


def plot_metrics(records: list[dict], output: str | Path, title: str = "",
                 vocab_size: int | None = None) -> Path:
    """Draw loss (top) and learning rate (bottom) against iteration into the PNG `output`.
    With `vocab_size`, a dashed line at ln(vocab_size) marks where training starts: the loss
    of a model that guesses every token equally likely.

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
    if vocab_size:
        start = math.log(vocab_size)
        ax_loss.axhline(start, color="0.45", linestyle="--", linewidth=1,
                        label=f"ln(vocab {vocab_size}) = {start:.2f}: uniform guessing")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if title:
        ax_loss.set_title(title, fontsize=11)

    bottom = ax_loss
    if ax_lr is not None:
        it, lr = series(records, "lr")
        exponent = lr_exponent(lr)  # plot lr / 10**exponent: ticks 0 .. 1, not a corner 1e-3
        ax_lr.plot(it, [v / 10.0**exponent for v in lr], color="tab:green", linewidth=1.2)
        ax_lr.set_ylabel("learning rate" if exponent == 0 else f"learning rate\n(× 1e{exponent})")
        ax_lr.grid(alpha=0.3)
        bottom = ax_lr
    bottom.set_xlabel("iteration")
    fig.savefig(output, format="png")
    return output


def lr_exponent(values: list[float]) -> int:
    """The power of ten that brings the largest learning rate into [1, 10): -3 for 1e-3."""
    top = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    return math.floor(math.log10(top)) if top > 0 else 0


def run_title(run: Path, config: dict) -> str:
    """What the run is, for a plot's title: its data file and model size when the run's
    config.json says them, else the folder's name."""
    model, train = config.get("model", {}), config.get("train", {})
    parts = []
    if isinstance(train.get("data"), str):
        parts.append(Path(train["data"]).name)
    try:
        parts.append(f"{int(model['n_layer'])} layers × {int(model['n_head'])} heads, "
                     f"n_embd {int(model['n_embd'])}, vocab {int(model['vocab_size'])}")
    except (KeyError, TypeError, ValueError):
        pass
    what = ": ".join(parts) if parts else f"the run in {run.name or run.resolve().name}"
    return f"training loss and learning rate\n{what}"


def run_config(run: Path) -> dict:
    """The config.json of a run folder's latest checkpoint (or best/), {} when there is none
    or it does not read as a JSON object: the plot is drawn without it."""
    import json

    from .checkpoint import BEST_DIR, CHECKPOINT_DIR, read_regular_file

    for folder in (CHECKPOINT_DIR, BEST_DIR, CHECKPOINT_DIR + ".old"):
        try:
            config = json.loads(read_regular_file(str(run / folder / "config.json"), 1 << 20))
        except (OSError, UserError, ValueError):
            continue
        if isinstance(config, dict):
            return config
    return {}


def token_label(text: str) -> str:
    """A token's text as an axis label: spaces and newlines made visible."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "·"


def previous_token_share(maps) -> np.ndarray:
    """(n_layer, n_head): the mean over queries i >= 1 of maps[..., i, i - 1], the weight a
    head puts on the position just before the query (1.0 for a pure previous-token head)."""
    T = maps.shape[-1]
    if T < 2:
        return np.zeros(maps.shape[:2])
    i = np.arange(1, T)
    return maps[..., i, i - 1].mean(axis=-1)


PREVIOUS_TOKEN = 0.5  # a head whose previous_token_share reaches this is marked as one


def plot_attention(maps, labels: list[str], output: str | Path, title: str = "",
                   layers: list[int] | None = None, columns: int | None = None) -> Path:
    """Draw `maps` (n_layer, n_head, T, T), as from GPT.attention_maps, into the PNG `output`:
    one heatmap per layer and head, in `columns` columns (default: a row per layer, a column
    per head); in each, row i (a query) shows how position i weighs the positions j <= i (the
    keys), with `labels` (T tokens) on both axes. `layers` names the layers the maps are of
    (default 0, 1, ...). Each panel's title gives its previous-token share; a head that puts
    at least half its weight on the previous position is framed in red and called a
    previous-token head. Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_layer, n_head, T, _ = maps.shape
    layers = list(range(n_layer)) if layers is None else layers
    columns = columns or n_head
    rows = -(-n_layer * n_head // columns)
    side = 1.1 + 0.12 * T
    fig = Figure(figsize=(side * columns + 0.8, side * rows + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    ticks = [token_label(t) for t in labels]
    size = max(4.0, min(9.0, 200 / T))
    shares = previous_token_share(maps)
    for k, ax in enumerate(axes):
        if k >= n_layer * n_head:
            ax.axis("off")
            continue
        layer, head = divmod(k, n_head)
        image = ax.imshow(maps[layer, head], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(T), ticks, fontsize=size, family="monospace")
        ax.set_yticks(range(T), ticks, fontsize=size, family="monospace")
        ax.tick_params(length=0, pad=1)
        share = shares[layer, head]
        marked = share >= PREVIOUS_TOKEN
        ax.set_title(f"layer {layers[layer]}, head {head}\n"
                     + (f"previous-token head ({share:.0%})" if marked
                        else f"previous token {share:.0%}"),
                     fontsize=9, color="#c00000" if marked else "black")
        if marked:
            for spine in ax.spines.values():
                spine.set(color="#c00000", linewidth=2.5)
        if k % columns == 0:
            ax.set_ylabel("query (predicting after)", fontsize=8)
        if k >= n_layer * n_head - columns:
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
        cfg = model.config
        plot_attention(model.attention_maps(ids), labels, output,
                       title=f"attention of a {cfg.n_layer}-layer, {cfg.n_head}-head model "
                             f"(n_embd {cfg.n_embd}) on {prompt!r}")
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
        config = run_config(path.parent)
        vocab = config.get("model", {}).get("vocab_size") if isinstance(config.get("model"), dict) else None
        plot_metrics(records, output, title=run_title(path.parent, config),
                     vocab_size=vocab if isinstance(vocab, int) and vocab > 1 else None)
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
