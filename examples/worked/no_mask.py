"""Exercise 1 of docs/gpt.md: train without the causal mask.

Train a small character model on train.txt twice: with the mask, and with attention allowed
to look at every position. Without the mask, position t can read token t+1, the very token
it must predict, from its input, and the training loss falls below the masked model's. Then score both models the way they will be used, where the future is not there
to read: with the mask on. The unmasked model learned to copy, not to predict, and its
honest loss is worse than the masked model's (and near an untrained model's).

    python examples/worked/no_mask.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _toy import attention_variant

import tensorlite.functional as F
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.optim import AdamW
from gpt.tokenizer import CharTokenizer

TEXT = (Path(__file__).resolve().parents[2] / "train.txt").read_text(encoding="utf-8")
T = 32


def windows(ids: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n random windows x (n, T) and the same shifted by one, y: y[:, t] = x[:, t + 1]."""
    starts = rng.integers(0, len(ids) - T - 1, size=n)
    rows = np.stack([ids[s:s + T + 1] for s in starts])
    return rows[:, :-1], rows[:, 1:]


def train(causal: bool, steps: int = 100) -> tuple[float, float]:
    """(training loss at the end, held-out loss WITH the mask) for a model trained with or
    without it."""
    tok = CharTokenizer.from_text(TEXT)
    ids = np.array(tok.encode(TEXT))
    split = int(0.9 * len(ids))
    model = GPT(GPTConfig(tok.vocab_size, block_size=T, n_layer=2, n_head=2, n_embd=48))
    opt = AdamW(model.params, lr=3e-3)
    rng = np.random.default_rng(0)
    with attention_variant(causal=causal):
        for _ in range(steps):
            x, y = windows(ids[:split], 16, rng)
            _, loss = model(x, y)
            model.zero_grad()
            loss.backward()
            opt.step()
            train_loss = loss.item()
    x, y = windows(ids[split:], 64, np.random.default_rng(1))
    logits, _ = model(x)  # the real, masked attention: no future to read
    return train_loss, F.cross_entropy(logits.reshape(-1, tok.vocab_size), y.reshape(-1)).item()


def main() -> None:
    masked, unmasked = train(True), train(False)
    print(f"trained with the mask:    train loss {masked[0]:.2f}, held-out loss (masked) {masked[1]:.2f}")
    print(f"trained without the mask: train loss {unmasked[0]:.2f}, held-out loss (masked) {unmasked[1]:.2f}")
    assert unmasked[0] < masked[0]  # reading the next token helps in training...
    assert unmasked[1] > masked[1] + 0.3  # ...and useless when it is not there
    print("ok")


if __name__ == "__main__":
    main()
