"""The GPT model: exact gradients for every parameter (whole-model gradcheck in float64),
parameter names/shapes/init, causality, loss at init, state_dict round trip and errors."""

import math

import numpy as np
import pytest

import tensorlite as tl
from gpt.config import GPTConfig
from gpt.model import GPT

TINY = GPTConfig(vocab_size=7, block_size=4, n_layer=2, n_head=2, n_embd=8)


def _ids(rng, cfg, B=2, T=None):
    return rng.integers(0, cfg.vocab_size, size=(B, T or cfg.block_size))


def _randomize(model, rng, scale=0.5):
    """Move every parameter away from its init (gains off 1, larger weights), so attention is
    not near-uniform and no gradient is trivially small."""
    for p in model.parameters():
        if p.ndim == 1:
            p.data[...] = 1.0 + 0.3 * rng.standard_normal(p.shape)
        else:
            p.data[...] = scale * rng.standard_normal(p.shape)


def test_whole_model_gradcheck_every_parameter():
    rng = np.random.default_rng(0)
    model = GPT(TINY, dtype=np.float64, seed=1)
    _randomize(model, rng)
    x, y = _ids(rng, TINY), _ids(rng, TINY)
    params = model.parameters()
    assert len(params) == 2 + 6 * TINY.n_layer + 2

    def loss_fn(*_):
        return model(x, y)[1]

    assert tl.gradcheck(loss_fn, params, atol=1e-6, rtol=1e-4)


GPT2_ARCH = {"norm": "layernorm", "activation": "gelu", "bias": True, "tied_head": True}
ARCHS = [{"norm": "layernorm"}, {"activation": "gelu"}, {"bias": True}, {"tied_head": True},
         GPT2_ARCH]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "+".join(f"{k}={v}" for k, v in a.items()))
def test_whole_model_gradcheck_every_architecture(arch):
    """Each architecture option alone, and all four (GPT-2's): every parameter's gradient,
    the tied wte's from both its uses, against finite differences on a random cotangent."""
    cfg = GPTConfig(vocab_size=7, block_size=4, n_layer=2, n_head=2, n_embd=8, **arch)
    rng = np.random.default_rng(11)
    model = GPT(cfg, dtype=np.float64, seed=1)
    _randomize(model, rng)
    x = _ids(rng, cfg, B=2, T=3)
    u = rng.standard_normal((2, 3, cfg.vocab_size))
    assert tl.gradcheck(lambda *_: (model(x)[0] * u).sum(), model.parameters(),
                        atol=1e-6, rtol=1e-4)


def test_gpt2_architecture_parameters_and_the_default_unchanged():
    gpt2 = GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=8, **GPT2_ARCH)
    names = [n for n, _, _ in GPT.param_specs(gpt2)]
    assert names == ["wte", "wpe", "h.0.ln_1.weight", "h.0.ln_1.bias", "h.0.attn.c_attn.weight",
                     "h.0.attn.c_attn.bias", "h.0.attn.c_proj.weight", "h.0.attn.c_proj.bias",
                     "h.0.ln_2.weight", "h.0.ln_2.bias", "h.0.mlp.c_fc.weight",
                     "h.0.mlp.c_fc.bias", "h.0.mlp.c_proj.weight", "h.0.mlp.c_proj.bias",
                     "ln_f.weight", "ln_f.bias"]  # no lm_head: tied to wte
    model = GPT(gpt2, seed=0)
    assert all(not model.params[n].data.any() for n in names if n.endswith(".bias"))
    assert gpt2.unlike_gpt2() == []
    assert GPTConfig().unlike_gpt2() == ["norm 'rmsnorm' (GPT-2 has 'layernorm')",
                                         "activation 'relu2' (GPT-2 has 'gelu')",
                                         "bias False (GPT-2 has True)"]
    with pytest.raises(ValueError, match="norm must be one of rmsnorm, layernorm"):
        GPTConfig(norm="batchnorm").validate()
    with pytest.raises(ValueError, match="bias must be true or false"):
        GPTConfig(bias="yes").validate()


def test_weights_given_to_the_constructor_are_used_as_they_are():
    model = GPT(TINY, seed=3)
    weights = model.state_dict()
    again = GPT(TINY, weights=weights)
    assert all(again.params[n].data is weights[n] for n in weights)  # no copies
    with pytest.raises(ValueError, match="float64, expected float32"):
        GPT(TINY, weights={n: w.astype(np.float64) for n, w in weights.items()})
    with pytest.raises(ValueError, match="missing lm_head.weight"):
        GPT(TINY, weights={n: w for n, w in weights.items() if n != "lm_head.weight"})


def test_whole_model_gradcheck_logits_with_short_sequence():
    # T < block_size, and a random cotangent on all logits (not only through the loss).
    rng = np.random.default_rng(1)
    model = GPT(TINY, dtype=np.float64, seed=2)
    _randomize(model, rng)
    x = _ids(rng, TINY, B=2, T=3)
    assert tl.gradcheck(lambda *_: model(x)[0], model.parameters(), atol=1e-6, rtol=1e-4)


def test_whole_model_gradcheck_with_dropout():
    # The same mask on every call (a fresh generator with a fixed seed), so the model is a
    # fixed function of its parameters: dropout on the embeddings and both residual branches.
    cfg = GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=8, dropout=0.3)
    rng = np.random.default_rng(5)
    model = GPT(cfg, dtype=np.float64, seed=4)
    _randomize(model, rng)
    x, y = _ids(rng, cfg), _ids(rng, cfg)

    def loss_fn(*_):
        return model(x, y, training=True, rng=np.random.default_rng(7))[1]

    assert loss_fn().item() != model(x, y)[1].item()  # dropout is really on
    assert tl.gradcheck(loss_fn, model.parameters(), atol=1e-6, rtol=1e-4)


def test_a_wrong_gradient_is_caught(monkeypatch):
    # The check above is not vacuous: corrupting one op's backward makes it fail.
    rng = np.random.default_rng(2)
    model = GPT(TINY, dtype=np.float64, seed=3)
    _randomize(model, rng)
    x, y = _ids(rng, TINY), _ids(rng, TINY)
    original = tl.functional.ReluSquared.backward

    def wrong(self, dout):
        return original(self, dout) * 1.01

    monkeypatch.setattr(tl.functional.ReluSquared, "backward", wrong)
    with pytest.raises(tl.GradcheckError):
        tl.gradcheck(lambda *_: model(x, y)[1], [model.params["h.0.mlp.c_fc.weight"]])


def test_parameter_names_shapes_and_order():
    cfg = GPTConfig(vocab_size=11, block_size=5, n_layer=2, n_head=2, n_embd=8)
    model = GPT(cfg)
    V, T, C = 11, 5, 8
    expected = [("wte", (V, C)), ("wpe", (T, C))]
    for i in range(2):
        expected += [
            (f"h.{i}.ln_1.weight", (C,)),
            (f"h.{i}.attn.c_attn.weight", (C, 3 * C)),
            (f"h.{i}.attn.c_proj.weight", (C, C)),
            (f"h.{i}.ln_2.weight", (C,)),
            (f"h.{i}.mlp.c_fc.weight", (C, 4 * C)),
            (f"h.{i}.mlp.c_proj.weight", (4 * C, C)),
        ]
    expected += [("ln_f.weight", (C,)), ("lm_head.weight", (C, V))]
    assert [(n, p.shape) for n, p in model.params.items()] == expected
    assert model.num_params() == sum(math.prod(s) for _, s in expected)
    assert model.parameters() == list(model.params.values())
    assert all(p.requires_grad and p.dtype == np.float32 for p in model.parameters())


def test_init_statistics():
    cfg = GPTConfig(vocab_size=300, block_size=64, n_layer=8, n_head=4, n_embd=64)
    model = GPT(cfg, seed=0)
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.params.items():
        d = p.data
        if name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight":
            assert np.all(d == 1.0), name
            continue
        std = proj_std if name.endswith("c_proj.weight") else 0.02
        assert abs(d.mean()) < 4 * std / math.sqrt(d.size), name
        assert abs(d.std() / std - 1) < 0.05, (name, d.std(), std)


def test_same_seed_same_weights_and_dtypes_agree():
    a, b = GPT(TINY, seed=5), GPT(TINY, seed=5)
    c = GPT(TINY, dtype=np.float64, seed=5)
    d = GPT(TINY, seed=6)
    for n in a.params:
        np.testing.assert_array_equal(a.params[n].data, b.params[n].data)
        np.testing.assert_allclose(a.params[n].data, c.params[n].data, rtol=1e-6)
    assert not np.array_equal(a.params["wte"].data, d.params["wte"].data)


def test_causality_future_tokens_do_not_change_earlier_logits():
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)
    rng = np.random.default_rng(3)
    model = GPT(cfg, dtype=np.float64, seed=0)
    _randomize(model, rng)
    x = _ids(rng, cfg, B=3)
    base = model(x)[0].data
    for t in range(cfg.block_size):
        x2 = x.copy()
        x2[:, t] = (x2[:, t] + 1) % cfg.vocab_size
        out = model(x2)[0].data
        np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert not np.allclose(out[:, t], base[:, t])  # the changed position itself does move


def test_loss_at_init_close_to_log_vocab():
    cfg = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64)
    rng = np.random.default_rng(4)
    model = GPT(cfg, seed=0)
    _, loss = model(_ids(rng, cfg, B=8), _ids(rng, cfg, B=8))
    assert loss.shape == ()
    assert abs(loss.item() - math.log(65)) < 0.1


def test_logits_shape_and_no_loss_without_targets():
    model = GPT(TINY)
    logits, loss = model(np.zeros((3, 2), dtype=np.int64))
    assert logits.shape == (3, 2, 7) and loss is None


def test_dropout_only_in_training_and_reproducible_with_rng():
    cfg = GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=8, dropout=0.5)
    model = GPT(cfg, dtype=np.float64)
    x = _ids(np.random.default_rng(0), cfg)
    eval_a, eval_b = model(x)[0].data, model(x)[0].data
    np.testing.assert_array_equal(eval_a, eval_b)
    t1 = model(x, training=True, rng=np.random.default_rng(9))[0].data
    t2 = model(x, training=True, rng=np.random.default_rng(9))[0].data
    np.testing.assert_array_equal(t1, t2)
    assert not np.allclose(t1, eval_a)


def test_bad_inputs_raise_one_line_errors():
    model = GPT(TINY)
    for bad, match in [
        (np.zeros((2, 5), dtype=np.int64), "block_size"),
        (np.full((2, 3), 7), "outside"),
        (np.zeros(3, dtype=np.int64), r"\(B, T\)"),
        (np.zeros((2, 3)), "integer"),
    ]:
        with pytest.raises(ValueError, match=match) as e:
            model(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="targets"):
        model(np.zeros((2, 3), dtype=np.int64), np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="divisible"):
        GPT(GPTConfig(vocab_size=7, n_head=3, n_embd=8))


def test_state_dict_round_trip():
    a = GPT(TINY, seed=0)
    b = GPT(TINY, seed=1)
    sd = a.state_dict()
    assert list(sd) == list(a.params)
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    sd["wte"][0, 0] = 123.0  # a copy: changing it leaves the model alone
    assert a.params["wte"].data[0, 0] != 123.0
    held = b.params["wte"]
    b.load_state_dict(a.state_dict())
    assert b.params["wte"] is held  # loaded in place: an optimizer's references stay valid
    x = _ids(np.random.default_rng(0), TINY)
    np.testing.assert_array_equal(a(x)[0].data, b(x)[0].data)
    c = GPT(TINY, dtype=np.float64, seed=2)
    c.load_state_dict(a.state_dict())  # float32 weights into a float64 model: cast
    assert c.params["wte"].dtype == np.float64
    np.testing.assert_allclose(c(x)[0].data, a(x)[0].data, rtol=1e-4, atol=1e-6)


def test_load_state_dict_errors_name_the_problem_and_change_nothing():
    model = GPT(TINY, seed=0)
    before = model.state_dict()
    sd = GPT(TINY, seed=1).state_dict()

    missing = dict(sd)
    del missing["h.1.mlp.c_fc.weight"]
    with pytest.raises(ValueError, match=r"missing h\.1\.mlp\.c_fc\.weight"):
        model.load_state_dict(missing)

    extra = dict(sd, **{"h.2.ln_1.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected h\.2\.ln_1\.weight"):
        model.load_state_dict(extra)

    wrong = dict(sd)
    wrong["lm_head.weight"] = np.zeros((8, 9), np.float32)  # another vocabulary
    with pytest.raises(ValueError, match=r"lm_head\.weight has shape \(8, 9\), expected \(8, 7\)"):
        model.load_state_dict(wrong)

    ints = dict(sd)
    ints["wte"] = np.zeros((7, 8), np.int64)
    with pytest.raises(ValueError, match="dtype"):
        model.load_state_dict(ints)

    for name, arr in model.state_dict().items():
        np.testing.assert_array_equal(arr, before[name])


def test_zero_grad_and_backward_fill_every_parameter():
    rng = np.random.default_rng(0)
    model = GPT(TINY, seed=0)
    _, loss = model(_ids(rng, TINY), _ids(rng, TINY))
    loss.backward()
    for name, p in model.params.items():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype, name
        assert np.all(np.isfinite(p.grad)) and np.any(p.grad != 0), name
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_training_memory_counts_the_parameters_and_refuses_what_cannot_fit(monkeypatch):
    from gpt import model as gm

    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=8)
    P, need = gm.training_memory(cfg, batch_size=4, dtype=np.float64)
    assert P == GPT(cfg).num_params() and need > 4 * P * 8
    _, need32 = gm.training_memory(cfg, batch_size=4, dtype=np.float32)
    assert need32 * 2 == need
    gm.check_fits(cfg, 4)  # a tiny model fits
    big = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=8, n_embd=65536)
    with pytest.raises(ValueError, match=r"206,\d{3},\d{3},\d{3} parameters.*GB of memory"):
        gm.check_fits(big, 12)
    monkeypatch.setattr(gm, "available_memory", lambda: 10**6)
    with pytest.raises(ValueError, match="0.0 GB is available"):
        gm.check_fits(cfg, 10**5)


def test_training_memory_counts_the_gradients_of_every_thread(monkeypatch):
    """With the batch split over threads each thread holds a whole set of gradients (and the
    sum one more), so a model that fits on one thread may not fit on eight."""
    from gpt import model as gm

    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=64)
    P, one = gm.training_memory(cfg, batch_size=8, dtype=np.float32)
    _, eight = gm.training_memory(cfg, batch_size=8, dtype=np.float32, threads=8)
    assert eight - one == 9 * P * 4
    monkeypatch.setattr(gm, "available_memory", lambda: (one + eight) // 2)
    gm.check_fits(cfg, 8, np.float32, threads=1)
    with pytest.raises(ValueError, match=r"on 8 threads needs .* fewer --threads"):
        gm.check_fits(cfg, 8, np.float32, threads=8)


# ---- attention_maps: the attention probabilities, read out ------------------------------------
def test_attention_maps_shape_rows_and_causality():
    rng = np.random.default_rng(0)
    model = GPT(TINY)
    _randomize(model, rng)
    idx = _ids(rng, TINY, B=1)[0]  # (T,)
    maps = model.attention_maps(idx)
    T = len(idx)
    assert maps.shape == (TINY.n_layer, TINY.n_head, T, T)
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(maps, k=1) == 0) and np.all(maps >= 0)
    assert np.abs(np.tril(maps, k=-1)).max() > 0.05  # not just the diagonal
    np.testing.assert_array_equal(model.attention_maps(idx[None, :]), maps)  # (1, T) too
    changed = idx.copy()
    changed[-1] = (changed[-1] + 1) % TINY.vocab_size  # a later token cannot move earlier rows
    np.testing.assert_allclose(model.attention_maps(changed)[:, :, :-1], maps[:, :, :-1], rtol=1e-5)


def test_attention_maps_are_what_layer_0_computes():
    rng = np.random.default_rng(1)
    cfg = GPTConfig(vocab_size=7, block_size=5, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg, dtype=np.float64)
    _randomize(model, rng)
    idx = np.array([3, 1, 4, 1, 5])
    p = {k: v.data for k, v in model.params.items()}
    x = p["wte"][idx] + p["wpe"][:5]  # (T, C)
    a = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-5) * p["h.0.ln_1.weight"]
    q, k, _ = np.split(a @ p["h.0.attn.c_attn.weight"], 3, axis=-1)  # (T, C) each
    for h in range(2):
        qh, kh = q[:, 4 * h:4 * h + 4], k[:, 4 * h:4 * h + 4]
        s = qh @ kh.T / 2.0 + np.triu(np.full((5, 5), -np.inf), k=1)
        expected = np.exp(s - s.max(axis=1, keepdims=True))
        expected /= expected.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(model.attention_maps(idx)[0, h], expected, rtol=1e-10)


def test_attention_maps_leave_the_model_as_it_was():
    rng = np.random.default_rng(2)
    model = GPT(TINY)
    idx = _ids(rng, TINY)
    before, _ = model(idx)
    model.attention_maps(idx[0])
    after, _ = model(idx)
    np.testing.assert_array_equal(before.data, after.data)
    assert model._attention_maps is None
    with pytest.raises(ValueError, match="one sequence"):
        model.attention_maps(idx)  # (2, T): two sequences


def test_a_bfloat16_model_is_float32_with_bf16_products():
    """dtype "bfloat16": float32 parameters and gradients; its forward is the float32 model's
    inside tl.autocast("bfloat16") (every linear layer a MatMulBF16), close to float32's."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    idx = np.random.default_rng(0).integers(0, 11, (3, 8))
    mixed, plain = GPT(cfg, dtype="bfloat16", seed=1), GPT(cfg, dtype=np.float32, seed=1)
    assert mixed.dtype == np.float32 and mixed.matmul_dtype == "bfloat16"
    assert plain.matmul_dtype is None
    _, loss = mixed(idx, idx)
    loss.backward()
    assert all(p.data.dtype == np.float32 and p.grad.dtype == np.float32
               for p in mixed.parameters())
    with tl.autocast("bfloat16"):
        _, same = plain(idx, idx)
    _, wide = plain(idx, idx)
    assert float(loss.data) == float(same.data)
    assert float(loss.data) != float(wide.data)
    assert abs(float(loss.data) - float(wide.data)) < 1e-2 * float(wide.data)
