"""Whole-block token contributions (Kobayashi et al. 2021 norms; ALTI, Ferrando et al. 2022) and their composition,
against a dense float64 implementation written from the papers: the ``(N, N, E)`` transformed vectors ``T_i(x_j)``
built from the model's own eager attention weights and value layers (no attnlens in the oracle), on MiniLM (BERT,
post-LN) and on small random GPT-2 and Llama (pre-LN, grouped-query) models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

import attnlens as al  # noqa: E402
from attnlens import analysis, hf  # noqa: E402

RTOL = 1e-6


# ------------------------------------------------------------------------- the oracle, from the papers


def _dense_layers(model, ids, kind, methods=("alti", "norm"), only=None, mask=None, b=0):
    """Per layer ``{method: C (N, N)}`` float64, the papers' way: every transformed vector ``T (N, N, E)`` at once.

    ``T[i, j] = g_i(Σ_h P_h[i, j] (x_j W_V^h + b_V^h) W_O^h + δ_ij x_j)``, ``g_i`` = the LN's centring and scaling
    by ``γ / s_i`` (post-LN) or the identity (pre-LN, where the values read ``LN1(x_j)``); ``y_i`` is the block
    output the model itself computed (read by a hook)."""
    outs, hooks = {}, []
    blocks = _blocks(model, kind)
    for li, (attn_parent, attn) in enumerate(blocks):
        watched = attn_parent if kind == "bert" else attn
        hooks.append(watched.register_forward_hook(lambda m, a, o, li=li: outs.__setitem__(li, o[0])))
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            o = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    hidden, atts = o.hidden_states, o.attentions
    layers = []
    with torch.no_grad():
        for li, (parent, attn) in enumerate(blocks):
            if only is not None and li not in only:
                layers.append(None)
                continue
            layers.append(_dense_layer(kind, parent, attn, hidden[li][b], atts[li][b], outs[li][b], methods))
    return layers


def _dense_layer(kind, parent, attn, x, P, y, methods):
    if True:
        x = x.double()  # (N, E): the block's input
        P = P.double()  # (H, N, N): the model's own eager weights
        H, N, _ = P.shape
        E = x.shape[-1]
        if kind == "bert":
            v = attn.value(x)  # (N, E): x W_V + b_V
            wo, bo = parent.output.dense.weight.double().T, parent.output.dense.bias.double()
            ln = parent.output.LayerNorm
        elif kind == "gpt2":
            h = parent.ln_1(x)
            v = attn.c_attn(h)[:, 2 * E:]
            wo, bo = attn.c_proj.weight.double(), attn.c_proj.bias.double()  # Conv1D: (in, out)
        else:
            h = parent.input_layernorm(x)
            v = attn.v_proj(h)  # (N, Hkv · Dv)
            wo, bo = attn.o_proj.weight.double().T, torch.zeros(E, dtype=torch.float64)
        Dv = wo.shape[0] // H
        v = v.double().reshape(N, -1, Dv).transpose(0, 1)  # (Hkv, N, Dv)
        v = v.repeat_interleave(H // v.shape[0], dim=0)  # (H, N, Dv)
        f = torch.einsum("hnd,hde->hne", v, wo.reshape(H, Dv, E))  # (H, N, E)
        Z = torch.bmm(P.permute(2, 1, 0), f.transpose(0, 1)).transpose(0, 1)  # (N, N, E): Σ_h P_h[i, j] f_h(x_j)
        Z[torch.arange(N), torch.arange(N)] += x  # the residual: δ_ij x_j
        y = y.double()  # the model's own block output
        if kind == "bert":
            u = Z.sum(1) + bo
            s = torch.sqrt(u.var(-1, unbiased=False, keepdim=True) + ln.eps)  # (N, 1)
            g = ln.weight.double()
            T = g * (Z - Z.mean(-1, keepdim=True)) / s[:, None]
            rebuilt = T.sum(1) + g * (bo - bo.mean()) / s + ln.bias.double()
        else:
            y = x + y  # the residual stream after attention
            T = Z
            rebuilt = T.sum(1) + bo
        torch.testing.assert_close(rebuilt, y, rtol=1e-9, atol=1e-9)  # the decomposition is exact
        return {m: _dense_contrib(T, y, m) for m in methods}


def _dense_contrib(T, y, method):
    if method == "norm":
        return torch.linalg.vector_norm(T, dim=-1).numpy()
    y1 = y.abs().sum(-1, keepdim=True)
    c = (y1 - (y[:, None] - T).abs().sum(-1)).clamp(min=0)  # ALTI eqs. 8-9, L1
    return (c / c.sum(-1, keepdim=True)).numpy()


def _blocks(model, kind):
    if kind == "bert":
        return [(layer.attention, layer.attention.self) for layer in model.encoder.layer]
    base = model.transformer if kind == "gpt2" else model.model
    layers = base.h if kind == "gpt2" else base.layers
    return [(layer, layer.attn if kind == "gpt2" else layer.self_attn) for layer in layers]


# ------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def minilm64(minilm):
    import copy

    model, _ = minilm
    return copy.deepcopy(model).double()  # the shared fixture's model stays float32


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=128, n_embd=48, n_layer=2, n_head=4, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval().double()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval().double()


def _captured(model, ids):
    with torch.no_grad(), hf.capture(model, lens=al.Lens(received=False), keep_blocks=True) as cap:
        model(input_ids=ids)
    return cap.layers()


def _ids(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (1, n), generator=g)


def _check(got, want):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


# ------------------------------------------------------------------------- per layer


@pytest.mark.parametrize("n", [64, 97])
def test_minilm_block_contributions_match_the_papers(minilm64, n):
    ids = _ids(n, 30000, n)
    dense = _dense_layers(minilm64, ids, "bert")
    recs = _captured(minilm64, ids)
    rows = [0, 5, n // 2, n - 1]
    for method in ("alti", "norm"):
        for rec, want in zip(recs, dense):
            assert rec.norm == "post"
            _check(analysis.block_contributions(rec, rows=rows, method=method), want[method][rows])
        # every row, in small key tiles (tiles that do not divide N)
        _check(analysis.block_contributions(recs[-1], method=method, key_chunk=7), dense[-1][method])
    got = analysis.block_contributions(recs[2], rows=[3, 3, -1], method="norm", normalize=True)
    _check(got, dense[2]["norm"][[3, 3, n - 1]] / dense[2]["norm"][[3, 3, n - 1]].sum(-1, keepdims=True))


def test_minilm_block_contributions_at_256_tokens(minilm64):
    ids = _ids(256, 30000, 7)
    dense = _dense_layers(minilm64, ids, "bert", methods=("alti",), only=(0, 5))  # the oracle's (N, N, E): 2 layers
    recs = _captured(minilm64, ids)
    for rec, want in zip(recs, dense):
        if want is not None:
            _check(analysis.block_contributions(rec, rows=[0, 100, 255]), want["alti"][[0, 100, 255]])


@pytest.mark.parametrize("make,kind", [(_gpt2, "gpt2"), (_llama, "llama")], ids=["gpt2", "llama-gqa"])
def test_causal_block_contributions_match_the_papers(make, kind):
    model = make()
    ids = _ids(50, 97, 3)
    dense = _dense_layers(model, ids, kind)
    recs = _captured(model, ids)
    for method in ("alti", "norm"):
        for rec, want in zip(recs, dense):
            assert rec.norm == "pre"
            got = analysis.block_contributions(rec, method=method, key_chunk=9)
            _check(got, want[method])
            assert np.all(np.triu(got, 1) == 0)  # causal: no later token contributes


# ------------------------------------------------------------------------- composed across layers


def _dense_composed(dense, method):
    R = None
    for layer in dense:
        C = layer[method]
        C = C / C.sum(-1, keepdims=True)
        R = C if R is None else C @ R
    return R


@pytest.mark.parametrize("method", ["alti", "norm"])
def test_composed_rows_and_pooled_means_match_the_dense_product(minilm64, method):
    n = 64
    ids = _ids(n, 30000, 11)
    R = _dense_composed(_dense_layers(minilm64, ids, "bert", methods=(method,)), method)
    recs = _captured(minilm64, ids)
    rows = [0, 17, n - 1]
    _check(analysis.compose_contributions(recs, rows, method=method), R[rows])
    np.testing.assert_allclose(analysis.compose_contributions(recs, rows, method=method).sum(-1), 1.0, rtol=1e-9)
    b = 10  # blocks that do not divide N
    blocks = np.arange(n) // b
    want = np.array([[R[np.ix_(blocks == p, blocks == q)].mean() for q in range(7)] for p in range(7)])
    _check(analysis.compose_contributions(recs, method=method, pool=b), want)


def test_composed_rows_on_llama():
    model = _llama()
    ids = _ids(40, 97, 5)
    R = _dense_composed(_dense_layers(model, ids, "llama", methods=("alti",)), "alti")
    recs = _captured(model, ids)
    done = []
    _check(analysis.compose_contributions(recs, [-1, 3], on_layer=done.append), R[[-1, 3]])
    assert done == [1, 2]


# ------------------------------------------------------------------------- errors


def test_block_contributions_errors(minilm64):
    ids = _ids(12, 30000, 2)
    recs = _captured(minilm64, ids)
    with pytest.raises(ValueError, match="method must be one of"):
        analysis.block_contributions(recs[0], rows=[0], method="l2")
    with pytest.raises(ValueError, match="out of range"):
        analysis.block_contributions(recs[0], rows=[12])
    with torch.no_grad(), hf.capture(minilm64, keep_inputs=False) as cap:
        minilm64(input_ids=ids)
    with pytest.raises(ValueError, match="kept its inputs"):
        analysis.block_contributions(cap.layers()[0], rows=[0])
    with pytest.raises(ValueError, match="rows or pool"):
        analysis.compose_contributions(recs, [0], pool=4)


def test_padded_batch_matches_the_papers(minilm64):
    ids = torch.cat([_ids(40, 30000, 12), _ids(40, 30000, 13)])
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 31:] = 0  # the second sequence is padded: its last 9 keys are masked
    dense = _dense_layers(minilm64, ids, "bert", methods=("alti",), mask=mask, b=1)
    with torch.no_grad(), hf.capture(minilm64, lens=al.Lens(received=False), keep_blocks=True) as cap:
        minilm64(input_ids=ids, attention_mask=mask)
    for rec, want in zip(cap.layers(), dense):
        got = analysis.block_contributions(rec, rows=[0, 20, 30, 35], batch=1)
        _check(got, want["alti"][[0, 20, 30, 35]])
        assert np.all(got[:3, 31:] == 0)  # a masked key contributes nothing (except a padded row's own residual)


def test_batch_picks_the_sequence_and_hooks_are_removed():
    model = _gpt2()
    ids = torch.cat([_ids(30, 97, 8), _ids(30, 97, 9)])
    recs = _captured(model, ids)
    alone = _captured(model, ids[1:])
    for rec, one in zip(recs, alone):
        assert rec.block_input.shape == (2, 30, 48)
        got = analysis.block_contributions(rec, rows=[0, 29], batch=1)
        _check(got, analysis.block_contributions(one, rows=[0, 29]))
    assert all(not m._forward_pre_hooks for m in model.modules())  # the capture's hooks are gone


# ------------------------------------------------------------------------- the report and the CLI

TEXT = "The quick brown fox jumps over the lazy dog because it was tired of waiting."


@pytest.fixture(scope="module")
def report_data(minilm):
    from attnlens.faces.report.from_model import collect

    model, tok = minilm
    return collect(TEXT, model, tok, contributions=True), model, tok


def test_report_holds_the_exact_composed_rows(report_data):
    from attnlens.faces.report import html

    data, model, tok = report_data
    b = data.block
    enc = tok(TEXT, return_tensors="pt")
    recs = _captured(model, enc["input_ids"])
    _check(b["rows"], analysis.compose_contributions(recs, b["row_ids"]))
    assert b["layer_rows"].shape == (6, len(b["row_ids"]), data.n)
    want = analysis.block_contributions(recs[1])  # the token view's (N, N); float32 model: other row tiles round
    np.testing.assert_allclose(b["full"][1], want, rtol=1e-4, atol=1e-5)  # differently (measured 2e-6)
    np.testing.assert_allclose(b["layer_rows"][3], analysis.block_contributions(recs[3], rows=b["row_ids"]),
                               rtol=1e-4, atol=1e-5)  # float32 model: rows taken from the whole matrix round apart
    np.testing.assert_allclose(b["composed"].sum(-1), 1.0, rtol=1e-6)  # block means of rows that sum to 1
    p = html.payload(data)["block"]
    assert p["ids"] == b["row_ids"] and p["method"] == "alti" and p["t"] == data.n


def test_explain_prints_the_top_contributors(report_data):
    from io import StringIO

    from rich.console import Console

    from attnlens.faces.cli import explain_summary

    data, _, _ = report_data
    buf = StringIO()
    explain_summary(Console(file=buf, width=100), data)
    out = buf.getvalue()
    assert "Top contributors of the last token '[SEP]' #17" in out
    row = data.block["rows"][data.block["row_ids"].index(data.n - 1)]
    best = int(np.argmax(row))
    lines = out.splitlines()
    start = next(k for k, x in enumerate(lines) if "Top contributors" in x)
    line = next(x for x in lines[start + 1:] if x.strip() and not x.strip().startswith(("─", "token")))
    assert data.tokens[best] in line and f"{row[best]:.3f}" in line  # the first row is the largest contributor


@pytest.mark.browser
def test_contributions_card_in_chromium(browser, report_data, tmp_path):
    from _browser import console_errors, open_page

    from attnlens.faces.report import html

    data, _, _ = report_data
    html.write(data, tmp_path / "r.html")
    open_page(browser, tmp_path / "r.html")
    card = browser.find_element("id", "block-card")
    assert card.is_displayed()
    bars = browser.find_elements("css selector", "#blockrows .bar")
    assert len(bars) == 10
    row = data.block["rows"][-1]
    assert data.tokens[int(np.argmax(row))] in bars[0].text and f"{row.max():.3f}" in bars[0].text
    layer = browser.find_element("id", "layer").get_attribute("value")  # the page's opening layer
    assert f"In layer {layer} alone" in browser.find_element("id", "blocklayer-title").text
    assert console_errors(browser) == []
    # the token view's whole-block view: the hovered token's row of layer 2's contributions
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "layer")).select_by_value("2")
    Select(browser.find_element("id", "view")).select_by_value("block")
    spans = browser.find_elements("css selector", "#tokens .tok")
    ActionChains(browser).move_to_element(spans[4]).perform()
    info = browser.find_element("id", "info").text
    best = int(np.argmax(data.block["full"][2, 4]))
    assert "layer 2, whole block" in info and "takes its output from: " + data.tokens[best] + " #" + str(best) in info
    mix = browser.find_element("id", "mix").text
    assert "contribution" in mix and f"{data.block['full'][2, 4, best]:.3f}"[:4] in mix
    assert console_errors(browser) == []
    browser.execute_script("arguments[0].scrollIntoView()", card)
    card.screenshot(str(tmp_path / "contributions.png"))
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "contributions.png").convert("RGB"))
    assert img.shape[0] > 200 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    keep = __import__("os").environ.get("ATTNLENS_SCREENSHOTS")
    if keep:
        __import__("shutil").copy(tmp_path / "contributions.png", keep)


def test_records_without_a_known_block_are_refused():
    from attnlens import nn as alnn

    mha = alnn.MultiHeadAttention(8, 2)
    with torch.no_grad(), alnn.capture(mha) as cap:
        mha(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="knows its attention block"):
        analysis.block_contributions(cap.results[0], rows=[0])


def test_notebook_explain_with_contributions(minilm):
    import attnlens

    model, tok = minilm
    r = attnlens.explain("a cat sat on the mat", model, tok, contributions=True)
    assert r.data.block is not None and r.data.block["rows"].shape == (len(r.data.block["row_ids"]), r.data.n)
    assert attnlens.explain("a cat sat on the mat", model, tok).data.block is None


def test_block_inputs_are_kept_only_when_asked():
    model = _gpt2()
    with torch.no_grad(), hf.capture(model) as cap:  # the default: the call's inputs only (no B·N·E per layer)
        model(input_ids=_ids(10, 97, 1))
    rec = cap.layers()[0]
    assert rec.call is not None and rec.block_input is None
    with pytest.raises(ValueError, match="input was not kept.*keep_blocks=True"):
        analysis.block_contributions(rec, rows=[0])
    with pytest.raises(ValueError, match="keep_blocks=True needs keep_inputs=True"):
        with hf.capture(model, keep_inputs=False, keep_blocks=True):
            pass
    assert all(not m._forward_pre_hooks for m in model.modules())  # refused before any hook was set
