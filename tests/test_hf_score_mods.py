"""Hugging Face models with score modifications through ``attn_implementation="attnlens"``: Gemma 2 (logit
soft-capping, sliding-window layers) and gpt-oss (a learned sink per head, sliding-window layers), built small
from their config classes (no download) — plus a short representative subset of benchmarks/hf_coverage.py.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import attnlens as al  # noqa: E402
from attnlens import hf  # noqa: E402


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attn_logit_softcapping=2.0,
                       sliding_window=4, query_pre_attn_scalar=8, pad_token_id=0)
    return Gemma2ForCausalLM(cfg).eval()


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.utils import logging

    torch.manual_seed(0)
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # a note on the default RoPE scaling of a tiny config
    cfg = GptOssConfig(vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                       max_position_embeddings=64, pad_token_id=0)
    model = GptOssForCausalLM(cfg).eval()
    logging.set_verbosity(level)
    with torch.no_grad():
        for layer in model.model.layers:  # trained sinks are O(1); the init (std 0.02) would hide them
            layer.self_attn.sinks.normal_(0.0, 1.5)
    return model


MODELS = [pytest.param(_gemma2, id="gemma2-softcap"), pytest.param(_gpt_oss, id="gpt-oss-sinks")]


def _with(model, impl):
    prev = model.config._attn_implementation
    model.set_attn_implementation(impl)
    return prev


@pytest.mark.parametrize("make", MODELS)
def test_padded_batch_logits_and_captured_weights_equal_eager(make):
    model = make()
    ids = torch.randint(1, 97, (2, 11))
    am = torch.ones(2, 11, dtype=torch.long)
    am[1, :3] = 0  # left padding
    real = am.bool()
    with torch.no_grad():
        prev = _with(model, "eager")
        eager = model(input_ids=ids, attention_mask=am, output_attentions=True)
        _with(model, hf.IMPLEMENTATION)
        ours = model(input_ids=ids, attention_mask=am).logits
        _with(model, prev)
        with hf.capture(model, lens=al.Lens(topk=3, rows="all")) as cap:
            captured = model(input_ids=ids, attention_mask=am).logits
    assert (ours - eager.logits)[real].abs().max() <= 1e-4
    assert (captured - eager.logits)[real].abs().max() <= 1e-4
    assert len(cap.results) == model.config.num_hidden_layers
    sinks = hasattr(model.model.layers[0].self_attn, "sinks")
    for rec, ref in zip(cap.results, eager.attentions):
        w = rec.result.weights
        assert (w - ref).transpose(1, 2)[real].abs().max() <= 1e-5  # padded query rows are arbitrary in eager
        if sinks:
            sw = rec.result.sink_weight  # what the real keys miss
            assert sw is not None and sw.shape == w.shape[:3]
            assert ((w.sum(-1) + sw - 1).transpose(1, 2)[real].abs().max()) <= 1e-5
            assert sw.transpose(1, 2)[real].min() > 1e-3  # the sinks matter in this model
        else:
            assert rec.result.sink_weight is None


@pytest.mark.parametrize("make", MODELS)
def test_greedy_generation_with_a_kv_cache_is_identical(make):
    model = make()
    ids = torch.randint(1, 97, (2, 6))
    am = torch.ones(2, 6, dtype=torch.long)
    am[0, :2] = 0
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    prev = _with(model, "eager")
    ref = model.generate(ids, **kw)
    _with(model, hf.IMPLEMENTATION)
    got = model.generate(ids, **kw)
    _with(model, prev)
    with hf.capture(model, lens=al.Lens(topk=2)) as cap:
        captured = model.generate(ids, **kw)
    assert torch.equal(got, ref) and torch.equal(captured, ref)
    assert len(cap.results) == 6 * model.config.num_hidden_layers


def test_sink_gradient_reaches_the_model_parameter():
    model = _gpt_oss()
    ids = torch.randint(1, 97, (1, 7))
    prev = _with(model, hf.IMPLEMENTATION)
    model(input_ids=ids).logits.sum().backward()
    ours = [layer.self_attn.sinks.grad.clone() for layer in model.model.layers]
    model.zero_grad()
    _with(model, "eager")
    model(input_ids=ids).logits.sum().backward()
    _with(model, prev)
    for a, e in zip(ours, [layer.self_attn.sinks.grad for layer in model.model.layers]):
        assert torch.allclose(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2", "mistral", "bert", "gemma2", "gpt_oss", "flint"])
def test_coverage_check_passes_on_a_representative_subset(model_type):
    """A few architectures of benchmarks/hf_coverage.py (which tries every causal LM of transformers)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import hf_coverage
    finally:
        sys.path.pop(0)
    status, detail = hf_coverage.check(model_type)
    assert status == "PASS", detail
