"""Fixtures for the gpt.serve tests: a tiny model trained for a few iterations, and a live
server on 127.0.0.1 (a free port, in a background thread of this process) serving it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123"
SERVER_MAX_TOKENS = 50_000  # high, so that a stream can run long enough to be cut off


class PacedDecoder:
    """A batch decoder that takes 10 ms a step (and a prompt read): the event loop has long
    taken one step's events when the next step's come, and a browser sees tokens arrive."""

    def __init__(self, decoder):
        self.decoder = decoder

    def prefill_many(self, slots, prompts):
        time.sleep(0.01)
        return self.decoder.prefill_many(slots, prompts)

    def step(self, slots, tokens):
        time.sleep(0.01)
        return self.decoder.step(slots, tokens)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A training run's folder: a 1-layer char model, 30 iterations on the start of train.txt
    (its characters include every letter of the chat template)."""
    from gpt import train

    base = tmp_path_factory.mktemp("serve")
    data = base / "text.txt"
    data.write_text((REPO / "train.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    out = base / "tiny"
    code = train.main([
        "--data", str(data), "--out-dir", str(out), "--max-iters", "30", "--n-layer", "1",
        "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--eval-interval", "30", "--eval-iters", "2", "--log-interval", "30",
        "--warmup-iters", "5", "--seed", "0"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_run):
    """(model, tokenizer) of the tiny run."""
    from gpt.checkpoint import load_model

    return load_model(str(tiny_run))


@pytest.fixture(scope="session")
def server(tiny_model):
    """(base URL, app) of a live server with an API key; app.state.model has the counters."""
    from gpt.serve import create_app, running

    model, tokenizer = tiny_model
    app = create_app(model, tokenizer, "tiny", SERVER_MAX_TOKENS, API_KEY)
    with running(app) as url:
        yield url, app
