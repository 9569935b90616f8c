"""The report at any length (issue 12, item 3): 8,192 tokens of a small local model, in headless Chromium — the
token view is paged (never 8,192 elements), a search jumps to a token, the panels that would be N × N show exact
pooled maps, the rollout rows the page holds are exact, and the page says what is exact and what is pooled."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

from attnlens.report import html, pool_means

N_LONG = 8192
NEEDLE = 6001  # where "zebra" sits


def _blob(path) -> dict:
    m = re.search(r'<script type="application/json" id="attnlens-data">(.*?)</script>', path.read_text("utf-8"), re.S)
    return json.loads(m.group(1))


def _tiny_bert(n_pos: int, *, seed=0):
    """A 2-layer, 2-head random BERT taking ``n_pos`` tokens, and MiniLM's tokenizer allowing as many."""
    transformers = pytest.importorskip("transformers", reason="needs the hf extra")
    from attnlens import hf

    try:
        path = hf.default_model_path()
    except (ValueError, ImportError) as e:  # pragma: no cover - the hf extra is installed in CI
        pytest.skip(str(e))
    tok = transformers.AutoTokenizer.from_pretrained(str(path), model_max_length=n_pos)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=n_pos)
    return transformers.BertModel(cfg).eval(), tok


def _words(tok, n: int, needle_at: int) -> str:
    """``n - 2`` single-token words (so ``n`` tokens with [CLS] and [SEP]), "zebra" only at token ``needle_at``."""
    pool = sorted(w for w in tok.vocab if w.isascii() and w.isalpha() and len(w) > 3 and w != "zebra")
    words = list(np.random.default_rng(0).choice(pool, n - 2))
    words[needle_at - 1] = "zebra"
    return " ".join(words)


@pytest.fixture(scope="module")
def long_report(tmp_path_factory):
    from attnlens.report import collect

    model, tok = _tiny_bert(N_LONG)
    data = collect(_words(tok, N_LONG, NEEDLE), model, tok)
    path = tmp_path_factory.mktemp("long") / "report.html"
    size = html.write(data, path)
    return data, path, size


def test_long_report_is_bounded_and_holds_no_n_squared(long_report):
    data, path, size = long_report
    assert data.n == N_LONG and data.tokens[NEEDLE] == "zebra" and data.weights is None
    assert size < 20e6, f"{size / 1e6:.1f} MB"
    blob = _blob(path)
    assert blob["views"]["weights"]["mode"] == "topk"
    assert blob["thumb"]["pooled"] and blob["thumb"]["t"] == html.THUMB
    assert blob["rollout"]["t"] < N_LONG  # the map is pooled; its rows below are exact
    rows = blob["rows"]
    assert rows["ids"] == data.rollout_row_ids and rows["ids"][0] == 0 and rows["ids"][-1] == N_LONG - 1
    got = np.frombuffer(base64.b64decode(rows["w"]), dtype="<u2").reshape(len(rows["ids"]), N_LONG) / 65535
    np.testing.assert_allclose(got * np.array(rows["max"])[:, None], data.rollout_rows, atol=max(rows["max"]) / 65535)
    np.testing.assert_allclose(data.rollout_rows.sum(-1), 1.0, atol=1e-6)  # rollout rows are distributions


def test_exact_rollout_rows_equal_the_dense_rollout_when_weights_are_not_kept(monkeypatch):
    """The long path (no full weights) holds rows of the rollout equal to the dense rollout's, and its pooled map
    equals the dense rollout's block means."""
    from attnlens import report

    model, tok = _tiny_bert(64, seed=1)
    text = _words(tok, 61, 30)
    dense = report.collect(text, model, tok, rollout_rows=[0, 5, -1])
    monkeypatch.setattr(report.from_model, "FULL_BYTES", 0)
    long = report.collect(text, model, tok, rollout_rows=[0, 5, -1])
    assert dense.weights is not None and long.weights is None
    assert long.rollout_row_ids == [0, 5, 60]
    np.testing.assert_allclose(long.rollout_rows, dense.rollout[[0, 5, 60]], atol=1e-6)  # float32 model
    np.testing.assert_allclose(dense.rollout_rows, dense.rollout[[0, 5, 60]], atol=0)
    t = long.rollout.shape[-1]
    np.testing.assert_allclose(long.rollout, pool_means(dense.rollout, t), atol=1e-6)
    with pytest.raises(ValueError, match="rollout_rows"):
        report.collect(text, model, tok, rollout_rows=[61])
    with pytest.raises(TypeError, match="rollout_rows"):
        report.collect(text, model, tok, rollout_rows=["a"])


def test_token_view_budget_lowers_k_and_says_so(long_report, monkeypatch):
    data, _, _ = long_report
    monkeypatch.setattr(html, "TOKEN_VIEW_BYTES", 2 * 2 * N_LONG * 4 * 3)  # room for 3 keys per query
    blob = html.payload(data)
    assert blob["views"]["weights"]["k"] == 3
    assert any("top 3 keys (not 8)" in w for w in blob["warnings"])
    w = np.frombuffer(base64.b64decode(blob["views"]["weights"]["w"]), dtype="<f2").reshape(2, 2, N_LONG, 3)
    np.testing.assert_allclose(w, data.topk_w[..., :3], rtol=2 ** -11, atol=2 ** -24)  # float16: no small weight lost
    assert (w[..., 0] > 0).all()  # at 8k a row's largest weight may be ~1e-3: it survives the page's encoding


@pytest.mark.browser
def test_8k_report_renders_pages_and_search_jumps(browser, long_report):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from _browser import console_errors, open_page, screenshot

    data, path, _ = long_report
    open_page(browser, path)
    spans = browser.find_elements("css selector", "#tokens .tok")
    assert len(spans) == html.PAGE_TOKENS  # one page of the 8,192 tokens in the DOM
    box = browser.find_element("id", "search")
    box.send_keys("zebra", Keys.ENTER)
    assert browser.find_element("id", "searchnote").text == f"#{NEEDLE} — hit 1 of 1"
    pinned = browser.find_element("css selector", "#tokens .tok.pinned")
    assert pinned.get_attribute("data-i") == str(NEEDLE) and pinned.text == "zebra"
    assert browser.find_element("id", "page").get_attribute("value") == str(NEEDLE // html.PAGE_TOKENS)
    inside = browser.execute_script(
        "var b = document.getElementById('tokens').getBoundingClientRect(), r = arguments[0].getBoundingClientRect();"
        "return r.top >= b.top && r.bottom <= b.bottom", pinned)
    assert inside, "the found token is not scrolled into the token box"
    assert f"“zebra” #{NEEDLE}" in browser.find_element("id", "mix-title").text
    info = browser.find_element("id", "info").text
    assert info.startswith(f"zebra (#{NEEDLE}") and "draws on: " in info and " #" in info.split("draws on: ")[1]
    box.clear()
    box.send_keys("#42", Keys.ENTER)  # by index: back to the first page
    assert browser.find_element("css selector", "#tokens .tok.pinned").get_attribute("data-i") == "42"
    assert browser.find_element("id", "page").get_attribute("value") == "0"
    # panels that would be N × N are pooled, and say so; received lists the top tokens and a strip of all
    assert "pooled to 48×48" in browser.find_element("id", "heat-title").text
    assert len(browser.find_elements("css selector", "#received .bar")) == 30
    assert len(browser.find_elements("css selector", "#received canvas.strip")) == 1
    assert len(browser.find_elements("css selector", "#rollrow option")) == len(data.rollout_row_ids)
    assert len(browser.find_elements("css selector", "#rollrows .bar")) == 12
    held = browser.find_element("id", "exactness").text
    assert "pooled to 48×48" in held and "rows exact" in held and "top 8 keys" in held
    # the next page, then colour by received attention
    browser.find_element("id", "page-next").click()
    assert browser.find_elements("css selector", "#tokens .tok")[0].get_attribute("data-i") == str(html.PAGE_TOKENS)
    Select(browser.find_element("id", "colour")).select_by_value("received")
    shaded = browser.execute_script("return Array.from(document.querySelectorAll('#tokens .tok'))"
                                    ".filter(s => s.style.backgroundColor).length")
    assert shaded > html.PAGE_TOKENS // 2, shaded  # every token receives some attention
    assert console_errors(browser) == []
    screenshot(browser, path.with_suffix(".png"))
