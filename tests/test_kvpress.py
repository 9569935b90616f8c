"""`attnlens.kv.kvpress_press` against kvpress's own presses, in kvpress's own protocol (``with press(model):``).

kvpress pins transformers < 5.3 and the project's environment has a newer one, so this file runs where kvpress is
installed (a separate environment: see the README's "KV-cache compression" section for the versions tested) and is
skipped elsewhere. The reference is kvpress itself: ``ObservedAttentionPress`` on eager attention weights (what H2O
needs there), ``SnapKVPress``/``PyramidKVPress``/``TOVAPress`` recomputing their window's attention, and
``StreamingLLMPress``/``KnormPress``; a random float64 Llama with grouped-query attention, one sequence.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

kvpress = pytest.importorskip("kvpress")

from attnlens import kv  # noqa: E402

from _kv_oracle import tiny_model  # noqa: E402

RATIO, WINDOW, KERNEL, SINKS = 0.4, 8, 5, 3
#: our method -> kvpress's press with the same settings, and whether kvpress needs eager attention for it
THEIRS = {
    "h2o": (lambda: kvpress.ObservedAttentionPress(compression_ratio=RATIO), True),
    "snapkv": (lambda: kvpress.SnapKVPress(compression_ratio=RATIO, window_size=WINDOW, kernel_size=KERNEL), False),
    "pyramidkv": (lambda: kvpress.PyramidKVPress(compression_ratio=RATIO, window_size=WINDOW, kernel_size=KERNEL,
                                                 beta=20), False),
    "tova": (lambda: kvpress.TOVAPress(compression_ratio=RATIO), False),
    "streamingllm": (lambda: kvpress.StreamingLLMPress(compression_ratio=RATIO, n_sink=SINKS), False),
    "knorm": (lambda: kvpress.KnormPress(compression_ratio=RATIO), False),
}


def _recorded(press) -> dict:
    """Wrap ``press.score`` to keep what it returns, by layer."""
    got, inner = {}, press.score

    def score(module, *args):
        s = inner(module, *args)
        got[module.layer_idx] = s.detach().clone()
        return s

    press.score = score
    return got


def _prefill(model, ids, press, impl: str):
    from transformers import DynamicCache

    model.set_attn_implementation(impl)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache


def _positions(full: torch.Tensor, kept: torch.Tensor) -> list:
    """Per KV head, the set of positions of ``full (1, H, N, D)`` that the rows of ``kept (1, H, S, D)`` are."""
    d = torch.cdist(kept[0], full[0])  # (H, S, N)
    assert bool((d.min(-1).values < 1e-5).all())  # later layers: the float32 eager softmax of the layers before
    return [sorted(r) for r in d.argmin(-1).tolist()]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


@pytest.mark.parametrize("method", list(THEIRS))
def test_our_press_scores_and_keeps_as_kvpress_own(model, method):
    ids = torch.tensor(np.random.default_rng(5).integers(1, 101, size=(1, 41)))
    make, eager = THEIRS[method]
    theirs, ours = make(), kv.kvpress_press(method, RATIO, window=WINDOW, kernel_size=KERNEL, sinks=SINKS)
    assert isinstance(ours, kvpress.ScorerPress)
    want, got = _recorded(theirs), _recorded(ours)
    full = _prefill(model, ids, kvpress.KnormPress(compression_ratio=0.0), "eager")
    c_theirs = _prefill(model, ids, theirs, "eager" if eager else "sdpa")
    c_ours = _prefill(model, ids, ours, "sdpa")  # attnlens inside the block: no eager weights
    assert model.config._attn_implementation == "sdpa"  # set back on exit
    assert sorted(got) == sorted(want) == list(range(model.config.num_hidden_layers))
    for layer in want:
        # the weights kvpress reads are a float32 softmax (transformers' eager attention; SnapKV, PyramidKV and TOVA
        # recomputing their window): agreement to float32's rounding; the others are exact
        tol = 1e-12 if method in ("streamingllm", "knorm") else 2e-6
        torch.testing.assert_close(got[layer], want[layer], rtol=tol, atol=0)
        k_full = full.layers[layer].keys
        assert c_ours.layers[layer].keys.shape == c_theirs.layers[layer].keys.shape
        assert _positions(k_full, c_ours.layers[layer].keys) == _positions(k_full, c_theirs.layers[layer].keys)
    assert c_ours.layers[0].keys.shape[2] < ids.shape[1]


def test_press_errors():
    with pytest.raises(ValueError, match="method"):
        kv.kvpress_press("nope")
    with pytest.raises(ValueError, match="ratio"):
        kv.kvpress_press("h2o", 1.0)
    press = kv.kvpress_press("knorm", 0.5)
    with pytest.raises(RuntimeError, match="inside"):
        press.score(torch.nn.Module(), None, torch.zeros(1, 1, 4, 2), None, None, {})
