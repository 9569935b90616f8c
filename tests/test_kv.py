"""attnlens.kv: KV-cache scores from the prefill's own attention call, and generation on the compressed cache.

The oracle (tests/_kv_oracle.py) is float64 and dense: eager attention weights, each method written from its
definition (kvpress 0.5.4), and generation recomputed without a cache with the evicted keys masked.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import attnlens as al  # noqa: E402
from attnlens import hf, kv  # noqa: E402
from attnlens.integrations.capture import Recorder, activate, attend  # noqa: E402

from _kv_oracle import eager_scores, left_padded, masked_logits, pyramid, tiny_model  # noqa: E402

KINDS = ["llama", "qwen2", "mistral", "gemma2"]


@pytest.fixture(scope="module")
def models():
    return {k: tiny_model(k, seed=i) for i, k in enumerate(KINDS)}


def _check_layers(got, want, live):
    assert len(got) == len(want)
    for ls, (s, keep) in zip(got, want):
        g = ls.scores.numpy()
        assert g.dtype == np.float64
        fin = np.isfinite(s)
        assert np.array_equal(np.isfinite(g), fin)
        np.testing.assert_allclose(g[fin], s[fin], rtol=1e-12, atol=0)
        # the kept positions, empty slots (-1) first
        B, H = ls.keep.shape[:2]
        for b in range(B):
            for h in range(H):
                row = ls.keep[b, h].tolist()
                assert row == [-1] * (len(row) - len(keep[b][h])) + keep[b][h], (ls.layer, b, h)
        assert ls.kept().sum(-1).tolist() == [[len(keep[b][h]) for h in range(H)] for b in range(B)]
        assert not (ls.kept() & ~live[:, None, :]).any()  # padding is never kept


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", kv.METHODS)
def test_scores_equal_the_float64_eager_oracle(models, kind, method, rng):
    """Every method's scores equal a dense float64 eager computation from its definition (≤ 1e-12 relative; the
    target is 1e-5), and the kept keys are the same, on a left-padded batch: GQA, biases, a sliding window (Mistral,
    Gemma 2's sliding layers keep from their last window - 1 keys) and logit soft-capping (Gemma 2)."""
    model = models[kind]
    ids, mask = left_padded(rng, [30, 23], 30)
    ratio = 0.45
    got = kv.scores(model, ids, attention_mask=mask, method=method, ratio=ratio, window=6, kernel_size=5, sinks=3)
    want = eager_scores(model, ids, mask, method, ratio=ratio, window=6, kernel=5, sinks=3)
    _check_layers(got, want, mask.bool())


def test_shared_keeps_one_set_per_layer(models, rng):
    model = models["llama"]
    ids, mask = left_padded(rng, [28, 28], 28)
    got = kv.scores(model, ids, attention_mask=mask, method="h2o", ratio=0.6, shared=True)
    want = eager_scores(model, ids, mask, "h2o", ratio=0.6, shared=True)
    _check_layers(got, want, mask.bool())
    for ls in got:
        assert torch.equal(ls.keep[:, 0], ls.keep[:, 1])


@pytest.mark.parametrize("method", ["h2o", "snapkv", "tova", "streamingllm"])
def test_a_padded_sequence_scores_as_if_alone(models, method, rng):
    """Left padding changes nothing: each sequence of a batch gets the scores and keys it gets alone, shifted."""
    model = models["mistral"]
    ids, mask = left_padded(rng, [26, 19], 26)
    both = kv.scores(model, ids, attention_mask=mask, method=method, ratio=0.5, window=5, sinks=2)
    alone = kv.scores(model, ids[1:, 7:], method=method, ratio=0.5, window=5, sinks=2)
    for lb, la in zip(both, alone):
        torch.testing.assert_close(lb.scores[1, :, 7:], la.scores[0], rtol=1e-10, atol=1e-12)
        k = lb.keep[1]
        assert torch.equal(k[k >= 0].reshape(k.shape[0], -1) - 7, la.keep[0])


def test_pyramid_budget():
    """kvpress's formula (the oracle's copy) for every layer; budgets fall with depth and add up to the total."""
    for n, L, r, w in [(1000, 8, 0.5, 64), (4096, 32, 0.75, 64), (300, 4, 0.25, 16), (100, 4, 0.5, 64), (500, 1, .5, 8)]:
        b = [kv.pyramid_budget(n, i, L, r, w, 20) for i in range(L)]
        assert b == [pyramid(n, i, L, r, w, 20) for i in range(L)]
        assert b == sorted(b, reverse=True)
        assert abs(sum(b) - L * n * (1 - r)) <= L
    assert kv.pyramid_budget(100, 0, 4, 0.5, 64, 20) == 50  # max < window: SnapKV's budget


def test_visible_queries_count_the_mask():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 13, 8, generator=g)
    mask = torch.rand(2, 1, 9, 13, generator=g) > 0.3
    for causal, window, m in [(True, None, None), (True, (3, None), None), (False, (2, 1), None), (True, None, mask),
                              (True, (4, 0), mask.float().log())]:
        call = al.AttnCall(None, q, k, k, mask=m, causal=causal, window=window)
        _, res = al.attention(q, k, k, mask=m, causal=causal, window=window, backend="reference",
                              lens=al.Lens(rows="all"))
        dense = al.attention(q, torch.zeros_like(k), k, mask=m, causal=causal, window=window, backend="reference",
                             lens=al.Lens(rows="all"))[1].weights > 0  # equal scores: every visible key has weight
        old = kv.COUNT_ROWS
        kv.COUNT_ROWS = 4  # several row chunks
        try:
            got = kv.visible_queries(call)
        finally:
            kv.COUNT_ROWS = old
        assert torch.equal(got.expand(2, 4, 13), dense.sum(2)), (causal, window)


# ---------------------------------------------------------------------------------------------
# generation on the compressed cache


def _generate(model, ids, mask, steps, **kw):
    with kv.compress(model, **kw) as press:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits), press.layers


@pytest.mark.parametrize("kind,method,kw", [("llama", "snapkv", dict(window=5)), ("llama", "h2o", dict(shared=True)),
                                            ("qwen2", "tova", {}), ("mistral", "h2o", {}),
                                            ("mistral", "pyramidkv", dict(window=4)), ("gemma2", "snapkv", dict(window=4)),
                                            ("gemma2", "knorm", {})])
def test_generation_equals_the_full_cache_with_evicted_keys_masked(models, kind, method, kw, rng):
    """Greedy generation on the compressed cache (left-padded batch) gives, token by token, the logits of the model
    recomputed without a cache where the generated tokens do not see the evicted keys (a float64 model; generate
    returns float32 logits, hence 2e-6). Sliding-window
    layers (Mistral: window 12; Gemma 2's every other layer) see their kept keys leave the window as tokens come."""
    model = models[kind]
    ids, mask = left_padded(rng, [24, 17], 24)
    steps = 9
    new, logits, layers = _generate(model, ids, mask, steps, method=method, ratio=0.5, **kw)
    keeps = [ls.kept() for ls in layers]
    want = masked_logits(model, ids, mask, new, keeps)
    torch.testing.assert_close(logits, want.float(), rtol=0, atol=2e-6)  # generate hands logits back in float32
    full = masked_logits(model, ids, mask, new, None).float()
    assert (logits - full).abs().max() > 1e-3  # the eviction changes the logits: the comparison has power
    for ls in layers:  # the cache shrank to the kept keys
        assert ls.keep.shape[-1] < ids.shape[1]


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_a_question_after_the_compressed_context(models, kind, rng):
    """kvpress's way: compress the context, then feed several tokens at once (a question) on the compressed cache;
    each of them sees the kept keys, the others before it, and (sliding layers) only its window."""
    model = models[kind]
    ids, mask = left_padded(rng, [22, 16], 22)
    new = torch.tensor(rng.integers(1, 101, size=(2, 4)))
    with torch.no_grad(), kv.compress(model, method="h2o", ratio=0.6) as press:
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True)
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        m = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
        got = model(input_ids=new[:, :3], attention_mask=m, position_ids=(m.cumsum(-1) - 1)[:, -3:], cache=cache,
                    use_cache=True).logits
    want = masked_logits(model, ids, mask, new, [ls.kept() for ls in press.layers])[1:4].transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_ratio_zero_generates_as_the_model_does(models, rng):
    model = models["gemma2"]
    ids, mask = left_padded(rng, [20, 14], 20)
    new, logits, _ = _generate(model, ids, mask, 5, method="snapkv", ratio=0.0, window=4)
    with torch.no_grad(), hf.attnlens_attention(model):  # (the model's own eager attention gives NaN for padding)
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(new, plain.sequences[:, 20:])
    torch.testing.assert_close(logits, torch.stack(plain.logits), rtol=0, atol=2e-6)


def test_the_cache_layer_after_compression(models, rng):
    """The compressed layers hold the kept keys at their positions; the model keeps counting positions; the
    compressed cache outside `compress` refuses to decode (it would need the mask of the kept keys)."""
    model = models["mistral"]
    ids, mask = left_padded(rng, [30, 30], 30)
    with kv.compress(model, method="knorm", ratio=0.5) as press:
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    for ls, layer in zip(press.layers, cache.layers):
        assert isinstance(layer, kv.CompressedLayer) and layer.get_seq_length() == 30
        assert torch.equal(layer.positions, ls.keep) and layer.keys.shape[2] == ls.keep.shape[-1] == 5  # int(11 / 2)
    with pytest.raises(RuntimeError, match="inside attnlens.kv.compress"):
        model(input_ids=ids[:, :1], attention_mask=torch.ones(2, 31, dtype=torch.long), cache=cache)


def test_beam_search_reorders_positions(models, rng):
    """Beam search reorders the cache by beam: the positions follow their keys (the run completes and each beam's
    layer keeps ascending positions)."""
    model = models["llama"]
    ids, mask = left_padded(rng, [20], 20)
    with kv.compress(model, method="h2o", ratio=0.5) as press:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (1, 24) and press.layers[0].keep.shape[0] == 3


# ---------------------------------------------------------------------------------------------
# errors and the capture core


@pytest.mark.parametrize("kw,match", [(dict(ratio=1.0), "ratio: expected 0 <= ratio < 1"),
                                      (dict(ratio=-0.1), "ratio"), (dict(ratio="a"), "ratio"),
                                      (dict(method="lru"), "method: expected one of"),
                                      (dict(window=0), "window: expected an int >= 1"),
                                      (dict(kernel_size=4), "kernel_size: expected an odd"),
                                      (dict(sinks=-1), "sinks"), (dict(beta=0), "beta")])
def test_bad_settings(models, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        kv.scores(models["llama"], torch.zeros(1, 8, dtype=torch.long), **kw)


def test_errors_on_inputs(models, rng):
    model = models["llama"]
    ids, mask = left_padded(rng, [12, 8], 12)
    with pytest.raises(ValueError, match=r"snapkv: a sequence of 12 tokens is too short: it needs at least 65 "
                                         r"\(window=64; pass a smaller one\)"):
        kv.scores(model, ids)
    right = mask.flip(1)
    with pytest.raises(ValueError, match="needs left padding"):
        kv.scores(model, ids, attention_mask=right, method="h2o")
    with pytest.raises(ValueError, match="snapkv: a sequence of 8 tokens is too short: it needs at least 9"):
        kv.scores(model, ids, attention_mask=mask, window=8)


def test_kvpress_press_without_kvpress_says_what_to_install():
    try:
        import kvpress  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install kvpress"):
            kv.kvpress_press("h2o", 0.5)
    else:  # where kvpress is installed, tests/test_kvpress.py checks the press
        assert kv.kvpress_press("h2o", 0.5).compression_ratio == 0.5


def test_an_encoder_gets_one_clear_error(minilm):
    model, tok = minilm
    with pytest.raises(ValueError, match=r"BertModel.*causal decoder.*encoder"):
        kv.scores(model, tok("a b c", return_tensors="pt")["input_ids"], method="h2o")


def test_attend_with_a_recorder_that_asks_no_lens():
    """A capture whose lens is None adds no pass and records the call with result None, next to one with a lens."""

    class Calls(Recorder):
        def record(self, call, result):
            self.results.append((call, result))

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g) for _ in range(3))
    mod = object()
    bare, lensed = Calls(lens=None), Calls(lens=al.Lens())
    bare.names = lensed.names = {mod: "m"}
    with activate(bare):
        out, first = attend(mod, q, k, v, causal=True)
        assert first is None and bare.results[0][1] is None
        with activate(lensed):
            out2, first2 = attend(mod, q, k, v, causal=True)
    torch.testing.assert_close(out, al.attention(q, k, v, causal=True))
    torch.testing.assert_close(out2, out)
    rec = lensed.results[0][1]  # the record is a detached copy of what the call returned
    assert bare.results[1][1] is None and first2.received is not None
    assert torch.equal(rec.received, first2.received) and torch.equal(rec.lse, first2.lse) and not rec.lse.requires_grad


# ---------------------------------------------------------------------------------------------
# attnlens explain --kv


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory):
    """A small random Llama (GQA) saved with MiniLM's tokenizer: a local causal decoder folder."""
    import transformers

    _, tok = hf.load_default()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))
    root = tmp_path_factory.mktemp("decoder")
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


TEXT = "the cat sat on the mat while the dog slept by the door and the bird sang in the tree"


def _payload(path):
    import json
    import re

    return json.loads(re.search(r'id="attnlens-data">(.*?)</script>', path.read_text(encoding="utf-8"), re.S).group(1))


def test_explain_kv_marks_what_each_layer_keeps(capsys, tmp_path, decoder_folder):
    """`attnlens explain --model DECODER --kv snapkv:0.5:4`: the page holds, per layer and token, how many KV heads
    keep the token — what attnlens.kv.scores keeps — and the terminal prints the layer × token strip."""
    import base64

    from attnlens.faces import cli

    out = tmp_path / "r.html"
    code = cli.main(["explain", TEXT, "--model", str(decoder_folder), "--kv", "snapkv:0.5:4", "--out", str(out)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    blob = _payload(out)["kv"]
    model, tok = hf.load(str(decoder_folder))
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    layers = kv.scores(model, ids, method="snapkv", ratio=0.5, window=4)
    want = np.stack([ls.kept()[0].sum(0).numpy() for ls in layers])
    N = ids.shape[1]
    got = np.frombuffer(base64.b64decode(blob["kept"]), dtype=np.uint8).reshape(len(layers), N)
    assert np.array_equal(got, want) and blob["heads"] == 2 and blob["budget"] == [N // 2] * 3
    assert (blob["method"], blob["ratio"], blob["window"]) == ("snapkv", 0.5, 4)
    assert "KV cache after snapkv at ratio 0.5, window 4" in cap.out
    strip = [line.split()[-1] for line in cap.out.splitlines() if f" of {N} " in line]
    assert len(strip) == 3 and strip[0] == "".join("█" if k == 2 else ("▒" if k else "·") for k in want[0])
    assert strip[0][-4:] == "████"  # the observation window is always kept


@pytest.mark.parametrize("argv,message", [
    (["--kv", "snapkv:0.5"], "--kv: the default model (all-MiniLM-L6-v2) is an encoder"),
    (["--kv", "snapkv:half"], "expected METHOD[:RATIO[:WINDOW]]"),
    (["--kv", "lru:0.5", "--model", "{folder}"], "--kv: method: expected one of ['h2o', 'snapkv'"),
    (["--kv", "h2o:1.5", "--model", "{folder}"], "--kv: ratio: expected 0 <= ratio < 1"),
    (["--kv", "snapkv", "--model", "{folder}"], "--kv: snapkv: a sequence of 22 tokens is too short: it needs at "
                                                "least 65 (window=64; pass a smaller one, e.g. --kv snapkv:0.5:8)")])
def test_explain_kv_errors_are_one_line(capsys, tmp_path, decoder_folder, argv, message):
    from attnlens.faces import cli

    argv = [a.replace("{folder}", str(decoder_folder)) for a in argv]
    code = cli.main(["explain", TEXT, "--out", str(tmp_path / "r.html"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.html").exists()


def test_page_kv_strip_in_chromium(browser, tmp_path, decoder_folder):
    """The page's KV card: a layer × token map, white where every KV head evicts the token, darkest where all keep
    it; hovering names the layer, the token and how many heads keep it."""
    from _browser import console_errors, open_page

    from attnlens.faces import cli

    out = tmp_path / "r.html"
    assert cli.main(["explain", TEXT, "--model", str(decoder_folder), "--kv", "h2o:0.75", "--out", str(out)]) == 0
    blob = _payload(out)
    open_page(browser, out)
    assert browser.find_element("id", "kv-title").text == "What the KV cache keeps — h2o, ratio 0.75"
    px = browser.execute_script("var c = document.querySelector('#kv canvas'); return [c.width, c.height,"
                                " Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]")
    import base64

    N, L = blob["N"], 3
    kept = np.frombuffer(base64.b64decode(blob["kv"]["kept"]), dtype=np.uint8).reshape(L, N) / 2
    assert px[:2] == [N, L]
    want = np.rint(np.stack([255 - 208 * kept, 255 - 144 * kept, 255 - 33 * kept], -1))
    np.testing.assert_allclose(np.array(px[2]).reshape(L, N, 4)[..., :3], want, atol=1.01)
    browser.execute_script("var c = document.querySelector('#kv canvas'), r = c.getBoundingClientRect();"
                           "c.dispatchEvent(new MouseEvent('mousemove', {clientX: r.right - 2, clientY: r.bottom - 2}))")
    text = browser.find_element("id", "kvinfo").text
    assert text.startswith(f"layer 2, {blob['tokens'][-1]} #{N - 1}: kept by ") and "of 2 KV heads" in text
    assert console_errors(browser) == []
