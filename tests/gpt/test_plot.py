"""`python -m gpt.plot`: a PNG from a small hand-written metrics.jsonl, one-line errors for
bad files, and the install hint when matplotlib is missing."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.errors import UserError
from gpt.metrics import read_metrics, series
from gpt.plot import INSTALL_HINT, main

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RECORDS = [
    {"iter": 0, "train_loss": 4.17, "lr": 1e-5, "tokens_per_s": 900.0,
     "val_loss": 4.18, "val_ppl": 65.4},
    {"iter": 10, "train_loss": 3.61, "lr": 1e-4, "tokens_per_s": 950.0},
    {"iter": 20, "train_loss": 3.02, "lr": 2e-4, "tokens_per_s": 940.0},
    {"iter": 30, "train_loss": 2.71, "lr": 3e-4, "tokens_per_s": 960.0},
    {"iter": 40, "train_loss": 2.55, "lr": 2e-4, "tokens_per_s": 955.0,
     "val_loss": 2.62, "val_ppl": 13.7},
    {"iter": 50, "train_loss": 2.48, "lr": 1e-4, "tokens_per_s": 950.0},
]


def write_run(folder: Path, records=RECORDS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def run_cli(*args, code: str | None = None):
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "gpt.plot", *args]
    return subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_renders_png_of_a_run_folder(tmp_path):
    write_run(tmp_path / "out")
    r = run_cli(str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    png = tmp_path / "out" / "loss.png"
    assert "wrote" in r.stdout and "2 evals" in r.stdout
    width, height = png_size(png)
    assert (width, height) == (800, 600)
    assert png.stat().st_size > 10_000  # two panels with curves, not a blank canvas


def test_accepts_metrics_file_and_output_flag(tmp_path):
    path = write_run(tmp_path / "run")
    out = tmp_path / "elsewhere.png"
    assert main([str(path), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert not (tmp_path / "run" / "loss.png").exists()


def test_val_points_only_at_eval_iterations():
    assert series(RECORDS, "val_loss") == ([0.0, 40.0], [4.18, 2.62])
    assert series(RECORDS, "train_loss")[0] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]


def test_eval_only_records_and_no_lr(tmp_path):
    # evals logged as their own lines, and a file without lr: still a plot (one panel)
    records = [{"iter": i, "train_loss": 3.0 - i / 100} for i in range(0, 60, 10)]
    records += [{"iter": 0, "val_loss": 3.1}, {"iter": 50, "val_loss": 2.6}]
    path = write_run(tmp_path, records)
    assert main([str(path)]) == 0
    assert png_size(tmp_path / "loss.png") == (800, 600)


def test_unfinished_last_line_is_ignored(tmp_path):
    path = write_run(tmp_path)
    with open(path, "a") as f:
        f.write('{"iter": 60, "train_lo')  # training is writing this line right now
    assert len(read_metrics(path)) == len(RECORDS)


def test_resumed_run_replaces_the_repeated_iterations(tmp_path):
    # logged up to 50, resumed from a checkpoint at 30: the old 30..50 are superseded
    resumed = [{"iter": 30, "train_loss": 2.0}, {"iter": 40, "train_loss": 1.9}]
    path = write_run(tmp_path, RECORDS + resumed)
    records = read_metrics(path)
    assert [r["iter"] for r in records] == [0, 10, 20, 30, 40]
    assert series(records, "train_loss")[1][-2:] == [2.0, 1.9]
    assert series(records, "val_loss")[0] == [0.0]  # the eval at 40 belonged to the old run


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "no metrics file"),
        ("", "is empty"),
        ("\n\n", "is empty"),
        ('{"iter": 0, "train_loss": 4.1}\nnot json\n{"iter": 2, "train_loss": 3.9}\n', "line 2"),
        ('{"step": 0, "train_loss": 4.1}\n', "'iter'"),
        ('{"iter": 0, "train_loss": "high"}\n', "expected a number"),
        ('{"iter": 0, "lr": 0.001}\n', "no train_loss or val_loss"),
    ],
)
def test_bad_metrics_one_line_error(tmp_path, capsys, content, words):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    if words != "no train_loss or val_loss":  # a valid log, with nothing to plot
        with pytest.raises(UserError, match=words):
            read_metrics(tmp_path / "metrics.jsonl")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err
    assert not (tmp_path / "loss.png").exists()


def test_missing_output_folder_is_an_error(tmp_path, capsys):
    write_run(tmp_path)
    assert main([str(tmp_path), "--output", str(tmp_path / "nope" / "x.png")]) == 2
    assert "--output names a folder" in capsys.readouterr().err


def test_cli_error_has_no_traceback(tmp_path):
    r = run_cli(str(tmp_path / "missing"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_matplotlib_missing_says_how_to_install(tmp_path):
    write_run(tmp_path)
    blocked = (
        "import sys, runpy\n"
        "sys.modules['matplotlib'] = None  # makes `import matplotlib` raise ImportError\n"
        "sys.argv = ['gpt.plot', *sys.argv[1:]]\n"
        "runpy.run_module('gpt.plot', run_name='__main__')\n"
    )
    r = run_cli(str(tmp_path), code=blocked)
    assert r.returncode == 2
    assert 'pip install -e ".[plot]"' in r.stderr and INSTALL_HINT in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "loss.png").exists()


# ---- --attention: the trained model's attention maps ------------------------------------------
def test_attention_flag_writes_a_grid_with_the_prompt_on_the_axes(tiny_run, tmp_path):
    r = run_cli(str(tiny_run), "--attention", "Once upon")
    assert r.returncode == 0, r.stderr
    out = tiny_run / "attention.png"
    assert "wrote" in r.stdout and "1 layers x 2 heads, 9 tokens" in r.stdout
    w, h = png_size(out)
    assert w > 2 * 100 and h > 100  # two heads side by side
    other = tmp_path / "a.png"
    assert run_cli(str(tiny_run), "--attention", "O", "--output", str(other)).returncode == 0
    assert png_size(other)[0] < w  # one token: smaller panels


def test_plot_attention_labels_each_token(tmp_path):
    import numpy as np
    from matplotlib.figure import Figure

    drawn = {}
    original = Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn["fig"] = fig
        return original(fig, *args, **kwargs)

    from gpt import plot
    maps = np.tril(np.ones((2, 3, 4, 4))) / np.arange(1, 5)[:, None]
    Figure.savefig = keep
    try:
        plot.plot_attention(maps, ["a", " ", "\n", "b"], tmp_path / "m.png")
    finally:
        Figure.savefig = original
    axes = [ax for ax in drawn["fig"].axes if ax.get_title()]
    assert len(axes) == 6 and axes[5].get_title().startswith("layer 1, head 2\n")
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["a", "␣", "↵", "b"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["a", "␣", "↵", "b"]


@pytest.mark.parametrize("prompt,words", [("", "1 to 32 tokens"), ("x" * 33, "got 33"),
                                          ("~\u00e9", "does not know")])
def test_attention_bad_prompt_is_one_line(tiny_run, prompt, words):
    r = run_cli(str(tiny_run), "--attention", prompt)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --attention") and words in r.stderr


# ---- the loss plot's title, learning-rate scale and ln(vocab) line -----------------------------
def drawn_figure(draw):
    """The matplotlib Figure that `draw()` saves."""
    from matplotlib.figure import Figure

    drawn, original = {}, Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn["fig"] = fig
        return original(fig, *args, **kwargs)

    Figure.savefig = keep
    try:
        draw()
    finally:
        Figure.savefig = original
    return drawn["fig"]


def test_the_loss_plot_says_what_ran_and_where_training_starts(tmp_path):
    import math

    from gpt import plot

    run = tmp_path / "out"
    write_run(run)
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "config.json").write_text(json.dumps({
        "model": {"n_layer": 4, "n_head": 8, "n_embd": 128, "vocab_size": 55},
        "train": {"data": "/somewhere/train.txt"}}))
    fig = drawn_figure(lambda: plot.plot_run(str(run)))
    ax_loss, ax_lr = fig.axes
    title = ax_loss.get_title()
    assert "train.txt" in title and "4 layers × 8 heads" in title and "vocab 55" in title
    assert str(tmp_path) not in title  # a title, not a path
    flat = [line for line in ax_loss.get_lines() if len(set(line.get_ydata())) == 1]
    assert len(flat) == 1 and math.isclose(flat[0].get_ydata()[0], math.log(55))
    assert "1e-4" in ax_lr.get_ylabel()  # RECORDS' learning rates peak at 3e-4
    assert max(ax_lr.get_lines()[0].get_ydata()) == pytest.approx(3.0)


def test_without_a_config_the_plot_names_the_folder_and_draws_no_line(tmp_path):
    from gpt import plot

    write_run(tmp_path / "myrun")
    fig = drawn_figure(lambda: plot.plot_run(str(tmp_path / "myrun")))
    assert fig.axes[0].get_title().endswith("the run in myrun")
    assert all(len(set(line.get_ydata())) > 1 for line in fig.axes[0].get_lines())


@pytest.mark.parametrize("values,exponent", [([1e-5, 1e-3, 1e-4], -3), ([0.5], -1),
                                             ([3.0], 0), ([0.0], 0), ([], 0)])
def test_lr_exponent(values, exponent):
    from gpt.plot import lr_exponent

    assert lr_exponent(values) == exponent


def test_previous_token_heads_are_measured_and_marked(tmp_path):
    import numpy as np

    from gpt import plot

    T = 5
    uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]  # rows sum to 1
    previous = np.eye(T, k=-1)
    previous[0, 0] = 1.0  # the first query can only look at itself
    maps = np.stack([np.stack([uniform, previous])])  # (1 layer, 2 heads, T, T)
    shares = plot.previous_token_share(maps)
    assert shares[0, 1] == 1.0 and shares[0, 0] == pytest.approx(np.mean([1 / 2, 1 / 3, 1 / 4, 1 / 5]))
    fig = drawn_figure(lambda: plot.plot_attention(maps, list("abcde"), tmp_path / "a.png"))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert "previous-token head (100%)" in titles[1] and "previous-token head" not in titles[0]


def test_the_attention_title_describes_the_model_not_the_path(tiny_run, tmp_path):
    from gpt import plot

    fig = drawn_figure(lambda: plot.plot_run_attention(str(tiny_run), "Once", str(tmp_path / "a.png")))
    title = fig._suptitle.get_text()
    assert "1-layer, 2-head model" in title and "'Once'" in title and str(tiny_run) not in title
