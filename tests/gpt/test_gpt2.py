"""GPT-2 in and out, checked against transformers (the `hf` and `bench` extras): random GPT-2s
of a few sizes and byte-level BPE tokenizers are built offline and saved in the Hugging Face
format; our tokenizer must give the same ids, our model the same logits, loss and gradients,
`gpt.convert` must carry them both ways, and `gpt.train --init-from` must fine-tune them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from gpt import convert
from gpt.bpe import GPT2Tokenizer
from gpt.checkpoint import load_model
from gpt.model import GPT

REPO = Path(__file__).resolve().parents[2]

# A varied corpus: prose, unicode, emoji, whitespace runs, contractions, numbers, code.
CORPUS = [
    (REPO / "train.txt").read_text(encoding="utf-8")[:3000],
    "héllo wörld, naïve café; Ærøskøbing Łódź İstanbul ǅ ß straße",
    "日本語のテキストと中文字符 한국어 العربية עברית हिन्दी ไทย",
    "emoji 😀🎉🤖 flags 🇫🇷🇯🇵 family 👨‍👩‍👧 skin 👍🏽 and a lone \U0001f9ea",
    "spaces    between   words \t\ttabs\n\n\nnewlines \r\n windows  \u00a0nbsp \u2003em  ",
    "it's we're I'll they've she'd I'm don't 'S 'RE 'Ve  'll'd",
    "numbers 12345 3.14159 1,000,000 -42 0x1F 1e-5 ²³ ½ Ⅻ ٣",
    "def f(x):\n    return x**2 + 1  # comment\n\nif a<=b and c!=d: print(f'{a!r}')\n",
    "<|endoftext|>start and end<|endoftext|><|endoftext|> mid<|endoftext|>dle",
    "", " ", "a", "\n",
]


def train_tokenizer(folder: Path, vocab_size: int) -> None:
    """vocab.json + merges.txt of a byte-level BPE trained on CORPUS (all 256 bytes kept)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 3, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))


def hf_gpt2(folder: Path, n_layer=2, n_head=2, n_embd=16, block=32, seed=0, tied=True,
            dtype=torch.float32) -> GPT2LMHeadModel:
    """A random GPT-2 saved in `folder` (which holds its tokenizer's files already), every
    parameter moved away from its init (biases and LayerNorm off 0 and 1), in eval mode."""
    vocab = len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    config = GPT2Config(vocab_size=vocab, n_positions=block, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, tie_word_embeddings=tied, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.05))
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2tok")
    train_tokenizer(folder, vocab_size=400)
    return folder


def model_dir(base: Path, tok_dir: Path, name: str, **kwargs) -> tuple[Path, GPT2LMHeadModel]:
    folder = base / name
    folder.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(tok_dir / f, folder / f)
    return folder, hf_gpt2(folder, **kwargs)


def batch(vocab: int, B: int, T: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (B, T)), rng.integers(0, vocab, (B, T))


def torch_logits_loss(model, x, y):
    out = model(torch.from_numpy(x), labels=None)
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.from_numpy(y).reshape(-1))
    return logits, loss


# ---- the tokenizer -------------------------------------------------------------------------------
def test_tokenizer_gives_the_ids_of_gpt2_tokenizer_fast(tok_dir):
    ours = GPT2Tokenizer.from_files((tok_dir / "vocab.json").read_text(encoding="utf-8"),
                                    (tok_dir / "merges.txt").read_text(encoding="utf-8"))
    hf = GPT2TokenizerFast.from_pretrained(str(tok_dir))
    assert ours.vocab_size == len(hf) and ours.eos_id == hf.eos_token_id
    for text in CORPUS + ["".join(CORPUS)]:
        ids = ours.encode(text)
        assert ids == hf.encode(text), repr(text[:60])
        assert ours.decode(ids) == text.replace("<|endoftext|>", "")
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.encode("<|endoftext|>") == [ours.eos_id]
    assert len(set(ours.encode(CORPUS[0]))) > 100  # the merges are in use


@given(text=st.text(st.characters(codec="utf-8"), max_size=40))
def test_tokenizer_matches_on_any_text(tok_dir, text):
    ours = _tokenizer(tok_dir)
    assert ours.encode(text) == _hf_tokenizer(tok_dir).encode(text)


_cache: dict = {}


def _tokenizer(tok_dir):
    if "ours" not in _cache:
        _cache["ours"] = GPT2Tokenizer.from_files(
            (tok_dir / "vocab.json").read_text(encoding="utf-8"),
            (tok_dir / "merges.txt").read_text(encoding="utf-8"))
    return _cache["ours"]


def _hf_tokenizer(tok_dir):
    if "hf" not in _cache:
        _cache["hf"] = GPT2TokenizerFast.from_pretrained(str(tok_dir))
    return _cache["hf"]


def test_tokenizer_round_trips_through_its_dict_and_files(tok_dir):
    ours = _tokenizer(tok_dir)
    again = GPT2Tokenizer.from_dict(json.loads(json.dumps(ours.to_dict())))
    vocab, merges = again.to_files()
    third = GPT2Tokenizer.from_files(vocab, merges)
    for t in (again, third):
        assert t.encode(CORPUS[3]) == ours.encode(CORPUS[3])
    with pytest.raises(ValueError, match="ids must be 0..1"):
        GPT2Tokenizer({"<|endoftext|>": 0, "a": 2}, [])
    with pytest.raises(ValueError, match="no <|endoftext|>"):
        GPT2Tokenizer({"a": 0}, [])


# ---- the model -------------------------------------------------------------------------------------
SIZES = [{"n_layer": 1, "n_head": 1, "n_embd": 8, "block": 16},
         {"n_layer": 2, "n_head": 2, "n_embd": 16},
         {"n_layer": 3, "n_head": 4, "n_embd": 32, "block": 24, "tied": False}]


@pytest.mark.parametrize("size", SIZES, ids=["1x8", "2x16", "3x32-untied"])
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
def test_logits_loss_and_gradients_equal_transformers(tmp_path, tok_dir, size, dtype, tol):
    torch_dtype = torch.float32 if dtype == np.float32 else torch.float64
    folder, hf = model_dir(tmp_path, tok_dir, "hf", dtype=torch_dtype, **size)
    config, weights, _ = convert.read_hf(str(folder), dtype)
    assert config.unlike_gpt2() == [] and config.tied_head == size.get("tied", True)
    model = GPT(config, dtype=dtype, weights={k: np.array(v) for k, v in weights.items()})
    x, y = batch(config.vocab_size, 3, config.block_size)
    logits, loss = model(x, y)
    t_logits, t_loss = torch_logits_loss(hf, x, y)
    assert np.abs(logits.data - t_logits.detach().numpy()).max() <= tol
    assert abs(float(loss.data) - t_loss.item()) <= tol
    # gradients of the loss, every parameter, against torch autograd
    loss.backward()
    t_loss.backward()
    grads = {k: v.grad.numpy() for k, v in hf.named_parameters()}
    ours = convert.weights_to_hf({n: p.grad for n, p in model.params.items()}, config)
    assert set(ours) == set(grads)
    for name, g in grads.items():
        scale = max(1.0, float(np.abs(g).max()))
        assert np.abs(ours[name] - g).max() <= tol * scale, name


def test_decoder_samples_what_transformers_generate_does(tmp_path, tok_dir):
    folder, hf = model_dir(tmp_path, tok_dir, "hf", n_layer=2, n_head=2, n_embd=16, block=32)
    config, weights, _ = convert.read_hf(str(folder))
    model = GPT(config, weights=weights)
    prompt = np.array([[5, 17, 42, 99]])
    want = hf.generate(torch.from_numpy(prompt), max_new_tokens=20, do_sample=False,
                       use_cache=True, pad_token_id=0)[0, 4:].tolist()
    dec, ids = model.decoder(), list(prompt[0])
    logits = dec(ids)
    got = []
    for _ in range(20):
        token = int(np.argmax(logits))
        got.append(token)
        logits = dec([token])
    assert got == want


# ---- gpt.convert ---------------------------------------------------------------------------------
def run_module(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300, check=False)


def test_from_hf_run_samples_plots_and_converts_back_with_equal_logits(tmp_path, tok_dir):
    folder, hf = model_dir(tmp_path, tok_dir, "hf", n_layer=2, n_head=2, n_embd=16, block=32)
    run = tmp_path / "run"
    r = run_module("gpt.convert", "--from-hf", str(folder), "--out-dir", str(run))
    assert r.returncode == 0, r.stderr
    model, tokenizer = load_model(str(run))
    assert isinstance(tokenizer, GPT2Tokenizer) and model.config.unlike_gpt2() == []
    ids = np.array([tokenizer.encode("First Citizen: héllo 😀")])
    want = hf(torch.from_numpy(ids)).logits.detach().numpy()
    np.testing.assert_allclose(model(ids)[0].data, want, rtol=0, atol=1e-5)
    r = run_module("gpt.sample", "--out-dir", str(run), "--prompt", "First", "--max-new-tokens",
                   "8", "--seed", "1", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("First"), r.stderr
    maps = model.attention_maps(ids[0])  # attention maps of a GPT-2-shaped model
    assert maps.shape == (2, 2, ids.shape[1], ids.shape[1])
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    # back to transformers: the same logits again, and the same tokenizer
    back = tmp_path / "back"
    r = run_module("gpt.convert", "--to-hf", str(run), "--out", str(back))
    assert r.returncode == 0, r.stderr
    again = GPT2LMHeadModel.from_pretrained(str(back)).eval()
    np.testing.assert_allclose(again(torch.from_numpy(ids)).logits.detach().numpy(), want,
                               rtol=0, atol=1e-6)
    hf_tok = GPT2TokenizerFast.from_pretrained(str(back))
    assert hf_tok.encode(CORPUS[2] + CORPUS[3]) == tokenizer.encode(CORPUS[2] + CORPUS[3])


def test_plot_attention_of_a_converted_gpt2(tmp_path, tok_dir):
    folder, _ = model_dir(tmp_path, tok_dir, "hf", n_layer=1, n_head=2, n_embd=8, block=16)
    convert.from_hf(str(folder), str(tmp_path / "run"))
    r = run_module("gpt.plot", str(tmp_path / "run"), "--attention", "it's a test")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "attention.png").stat().st_size > 1000


def test_untied_head_round_trips(tmp_path, tok_dir):
    folder, hf = model_dir(tmp_path, tok_dir, "hf", n_layer=1, n_head=2, n_embd=8, block=16,
                           tied=False)
    convert.from_hf(str(folder), str(tmp_path / "run"))
    convert.to_hf(str(tmp_path / "run"), str(tmp_path / "back"))
    again = GPT2LMHeadModel.from_pretrained(str(tmp_path / "back")).eval()
    ids = torch.tensor([[1, 2, 3, 50]])
    np.testing.assert_allclose(again(ids).logits.detach().numpy(),
                               hf(ids).logits.detach().numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_weights_laid_out_by_rows_convert_back_to_the_same_hf_tensors(tmp_path, tok_dir,
                                                                     monkeypatch, tied):
    """load_model lays large linear weights out by rows (gpt.model.lay_out_by_rows; forced here
    on a small model): --to-hf still writes every tensor of the original folder, bit for bit,
    Conv1D's (in, out) and lm_head's (out, in) included."""
    from safetensors.numpy import load_file

    import gpt.model

    folder, _ = model_dir(tmp_path, tok_dir, "hf", n_layer=1, n_head=2, n_embd=8, block=16,
                          tied=tied)
    convert.from_hf(str(folder), str(tmp_path / "run"))
    monkeypatch.setattr(gpt.model, "BY_ROWS_BYTES", 1)
    convert.to_hf(str(tmp_path / "run"), str(tmp_path / "back"))
    want, got = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "back"
                                                                            / "model.safetensors"))
    assert set(want) <= set(got)
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_convert_refuses_with_one_line(tmp_path, tok_dir):
    folder, hf = model_dir(tmp_path, tok_dir, "hf", n_layer=1, n_head=1, n_embd=8, block=16)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(folder / f, pickled / f)
    torch.save(hf.state_dict(), pickled / "pytorch_model.bin")

    def refused(*args) -> str:
        r = run_module("gpt.convert", *args)
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        return r.stderr

    assert "pytorch_model.bin, a pickle" in refused("--from-hf", str(pickled), "--out-dir",
                                                    str(tmp_path / "x"))
    assert "safe_serialization=True" in refused("--from-hf", str(pickled), "--out-dir",
                                                str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    # a native run: GPT-2 cannot represent RMSNorm, relu2, no biases, an untied head
    native = tmp_path / "native"
    r = run_module("gpt.train", "--data", str(REPO / "train.txt"), "--out-dir", str(native),
                   "--preset", "tiny", "--max-iters", "1", "--eval-interval", "1")
    assert r.returncode == 0, r.stderr
    msg = refused("--to-hf", str(native), "--out", str(tmp_path / "hf_out"))
    assert "norm 'rmsnorm' (GPT-2 has 'layernorm')" in msg and "activation 'relu2'" in msg
    assert "bias False" in msg and "GPT-2 cannot represent" in msg
    # hostile or broken folders
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in refused("--from-hf", str(broken), "--out-dir",
                                             str(tmp_path / "y"))
    cfg = json.loads((folder / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(cfg, activation_function="relu")))
    assert "activation_function is 'relu'" in refused("--from-hf", str(broken), "--out-dir",
                                                      str(tmp_path / "y"))
    (broken / "config.json").write_text(json.dumps(dict(cfg, n_layer=5)))
    shutil.copy(folder / "model.safetensors", broken / "model.safetensors")
    assert "does not fit" in refused("--from-hf", str(broken), "--out-dir", str(tmp_path / "y"))
    (broken / "config.json").write_text(json.dumps(dict(cfg, n_embd=1 << 30)))
    assert "above the limit" in refused("--from-hf", str(broken), "--out-dir",
                                        str(tmp_path / "y"))
    (broken / "vocab.json").unlink()
    (broken / "config.json").write_text(json.dumps(cfg))
    assert "has no vocab.json" in refused("--from-hf", str(broken), "--out-dir",
                                          str(tmp_path / "y"))
    assert not (tmp_path / "y").exists()
    assert "either --from-hf" in refused("--out", str(tmp_path / "z"))


# ---- fine-tuning ---------------------------------------------------------------------------------
def test_init_from_fine_tunes_a_gpt2_folder_and_a_run(tmp_path, tok_dir):
    folder, _ = model_dir(tmp_path, tok_dir, "hf", n_layer=1, n_head=2, n_embd=16, block=16)
    text = tmp_path / "mine.txt"
    text.write_text(CORPUS[0] * 3 + CORPUS[1], encoding="utf-8")
    common = ["--data", str(text), "--batch-size", "4", "--eval-interval", "4",
              "--eval-iters", "2", "--log-interval", "2", "--warmup-iters", "1", "--lr", "1e-3"]
    tuned = tmp_path / "tuned"
    r = run_module("gpt.train", "--init-from", str(folder), "--out-dir", str(tuned),
                   "--max-iters", "4", *common)
    assert r.returncode == 0, r.stderr
    assert "fine-tuning from" in r.stdout
    metrics = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in metrics if "train_loss" in m][-1] == 4
    assert all(np.isfinite(m["train_loss"]) for m in metrics if "train_loss" in m)
    model, tokenizer = load_model(str(tuned))
    assert isinstance(tokenizer, GPT2Tokenizer)
    assert model.config == convert.read_hf(str(folder))[0]  # the pretrained shape exactly
    # resume the new run, then fine-tune the fine-tuned run further (a run folder as PATH)
    r = run_module("gpt.train", "--out-dir", str(tuned), "--resume", "--max-iters", "6")
    assert r.returncode == 0, r.stderr
    r = run_module("gpt.train", "--init-from", str(tuned), "--out-dir", str(tmp_path / "t2"),
                   "--max-iters", "2", *common)
    assert r.returncode == 0, r.stderr
    # a shape flag that disagrees: one line, nothing written
    r = run_module("gpt.train", "--init-from", str(folder), "--out-dir", str(tmp_path / "t3"),
                   "--n-layer", "3", "--max-iters", "2", *common)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--n-layer is 3 but the model of --init-from has 1" in r.stderr
    assert not (tmp_path / "t3" / "checkpoint").exists()
    r = run_module("gpt.train", "--init-from", str(tmp_path / "nothing"), "--out-dir",
                   str(tmp_path / "t4"), *common)
    assert r.returncode == 2 and "neither a run folder" in r.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fine_tuning_starts_from_the_pretrained_weights(tmp_path, tok_dir, dtype):
    """In process: the model a --init-from run builds has GPT-2's weights before its first
    step (float32 master weights in bfloat16 too), a fresh optimizer, and (float32) the
    logits of transformers on the same tokens."""
    from gpt import train as gt

    folder, hf = model_dir(tmp_path, tok_dir, "hf", n_layer=1, n_head=2, n_embd=16, block=16)
    text = tmp_path / "mine.txt"
    text.write_text(CORPUS[0] * 3, encoding="utf-8")
    cfg, given = gt.parse_args(["--init-from", str(folder), "--data", str(text), "--out-dir",
                                str(tmp_path / "t"), "--max-iters", "1", "--dtype", dtype])
    run = gt.set_up(cfg, given)
    try:
        assert run.opt.state_dict()["step"] == 0 and run.start_iter == 0
        ours = convert.weights_to_hf({n: p.data for n, p in run.model.params.items()},
                                     run.model.config)
        for name, p in hf.named_parameters():
            np.testing.assert_array_equal(ours[name], p.detach().numpy(), err_msg=name)
        if dtype == "float32":
            x = np.array([run.tokenizer.encode(CORPUS[0][:200])[:16]])
            want = hf(torch.from_numpy(x)).logits.detach().numpy()
            np.testing.assert_allclose(run.model(x)[0].data, want, rtol=0, atol=1e-5)
    finally:
        run.fns.close()


def test_serve_answers_with_a_converted_gpt2(tmp_path, tok_dir):
    """gpt.serve's app on a run converted from GPT-2: a greedy completion is the model's own
    greedy continuation, decoded by GPT-2's tokenizer."""
    import urllib.request

    from gpt.sample import generate
    from gpt.serve import create_app, running

    folder, _ = model_dir(tmp_path, tok_dir, "hf", n_layer=1, n_head=2, n_embd=16, block=32)
    convert.from_hf(str(folder), str(tmp_path / "run"))
    model, tokenizer = load_model(str(tmp_path / "run"))
    want = generate(model, tokenizer, "First Citizen", 6, temperature=0.0)
    app = create_app(model, tokenizer, "gpt2", 100, "key")
    body = json.dumps({"model": "gpt2", "prompt": "First Citizen", "max_tokens": 6,
                       "temperature": 0}).encode()
    with running(app) as url:
        req = urllib.request.Request(url + "v1/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": "Bearer key"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
    assert "First Citizen" + answer["choices"][0]["text"] == want
