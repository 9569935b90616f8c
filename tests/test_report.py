"""`attnlens.report`: the data a report holds, the HTML page (escaping, size at 512 tokens), the PNGs,
and the page opened from disk by headless Chromium (marked ``browser``; skipped without Chromium)."""
from __future__ import annotations

import base64
import json
import os
import re

import numpy as np
import pytest

from attnlens import analysis
from attnlens import LensResult
from attnlens.report import ReportData, html, pool_means

EVIL = ['</script><script>window.pwned=1</script>', '"quo\'te"', '<img src=x onerror="window.pwned=2">', '&amp;',
        "\u2028line", "$x^2$"]


def synthetic(tokens, L=2, H=3, k=3, *, seed=0, full=True) -> ReportData:
    """A ReportData from random softmax weights (no model needed); ``data.norms (L, H, N)`` are the
    value norms behind ``contrib``."""
    rng = np.random.default_rng(seed)
    n = len(tokens)
    s = rng.standard_normal((L, H, n, n)) * 2
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ent = -(w * np.log(w)).sum(-1)
    idx = np.argsort(-w, axis=-1)[..., :k]
    tw = np.take_along_axis(w, idx, -1)
    results = [LensResult(entropy=ent[li], max_weight=w[li].max(-1), received=w[li].sum(-2), topk_indices=idx[li],
                          topk_weights=tw[li], weights=w[li] if full else None, rows=tuple(range(n)) if full else None)
               for li in range(L)]
    roll, cov = analysis.rollout(results, allow_topk=True, return_coverage=True)
    norms = 0.5 + 2 * rng.random((L, H, n))
    data = ReportData(text=" ".join(tokens), tokens=list(tokens), model_name="<b>model</b>", n_layers=L, n_heads=H,
                      entropy=ent, max_weight=w.max(-1), received=w.sum(-2), topk_idx=idx, topk_w=tw,
                      summaries=[analysis.head_summary(LensResult(entropy=ent[li], max_weight=w[li].max(-1),
                                                                  weights=w[li], rows=tuple(range(n))))
                                 for li in range(L)], rollout=roll, rollout_coverage=cov,
                      weights=w.astype(np.float32) if full else None,
                      contrib=(w * norms[:, :, None, :]).astype(np.float32) if full else None,
                      contrib_kind="‖α v W_O‖" if full else "", warnings=["<warn> & \"x\""])
    data.norms = norms
    return data


def _blob(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="attnlens-data">(.*?)</script>', page, re.S)
    assert m, "no data element"
    return json.loads(m.group(1))


def test_input_is_data_never_markup():
    data = synthetic(EVIL)
    page = html.render(data)
    # exactly the two script elements of the page; nothing from the input opens or closes one
    assert page.count("<script") == 2 and page.count("</script>") == 2
    for tok in EVIL:
        for bad in ("<", ">", "&"):
            if bad in tok:
                assert tok not in page
    assert "onerror" in page and "<img" not in page  # present only as escaped JSON text
    blob = _blob(page)
    assert blob["tokens"] == EVIL and blob["model"] == "<b>model</b>" and blob["warnings"] == data.warnings
    assert "innerHTML" not in page and "eval(" not in page and "document.write" not in page
    assert "Content-Security-Policy" in page and "connect-src" not in page  # default-src 'none': no network


def test_json_for_script_escapes():
    s = html.json_for_script({"a": "</script>&<!--", "b": "\u2028"})
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == {"a": "</script>&<!--", "b": "\u2028"}


def test_csp_hashes_match_the_inline_script_and_style():
    page = html.render(synthetic(["a", "b", "c"]))
    csp = re.search(r'content="(default-src[^"]*)"', page).group(1)
    script = re.findall(r"<script>(.*?)</script>", page, re.S)[0]
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    import hashlib

    for body in (script, style):
        h = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{h}'" in csp


def test_page_files_are_inlined_and_shipped_as_package_data():
    """The page's HTML, CSS and JS are package files (not Python strings), inlined as they are,
    and every one of them is listed in pyproject's package-data, so a wheel carries them."""
    import fnmatch
    import pathlib
    import tomllib
    from importlib import resources

    page = html.render(synthetic(["a", "b"]))
    folder = resources.files("attnlens.report")
    assets = sorted(p.name for p in folder.iterdir() if p.name.startswith("page."))
    assert assets == ["page.css", "page.html", "page.js"]
    for name in assets:
        assert folder.joinpath(name).read_text(encoding="utf-8") in page, name
    root = pathlib.Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["attnlens"]
    for name in assets:
        assert any(fnmatch.fnmatch(f"faces/report/{name}", g) for g in globs), name


def test_write_atomic_refuses_links_and_files_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    from attnlens.report import files as _files

    f = tmp_path / "r.html"
    assert _files.write_atomic(f, b"one") == f and f.read_bytes() == b"one"
    assert f.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as open() would create it, not mkstemp's 0600
    with pytest.raises(_files.TargetError, match="already exists") as e:
        _files.write_atomic(f, b"two")
    assert e.value.kind == "exists" and f.read_bytes() == b"one"
    link = tmp_path / "link.html"
    link.symlink_to(f)
    with pytest.raises(_files.TargetError, match="symbolic link"):
        _files.write_atomic(link, b"two", overwrite=True)
    assert _files.write_atomic(link, b"two", overwrite=True, follow_symlinks=True) == f
    assert link.is_symlink() and f.read_bytes() == b"two"

    def fail(*_):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(_files.os, "replace", fail)
    with pytest.raises(OSError, match="I/O error"):
        _files.write_atomic(f, b"three", overwrite=True)
    assert f.read_bytes() == b"two" and sorted(p.name for p in tmp_path.iterdir()) == ["link.html", "r.html"]


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_full_view_round_trips_the_weights():
    data = synthetic([f"t{i}" for i in range(7)])
    blob = html.payload(data)
    v = blob["views"]["weights"]
    assert v["mode"] == "full"
    w = np.frombuffer(base64.b64decode(v["w"]), dtype=np.uint8).reshape(2, 3, 7, 7) / 255
    np.testing.assert_allclose(w, data.weights, atol=0.5 / 255 + 1e-7)
    rec = np.frombuffer(base64.b64decode(blob["received"]), dtype="<u2").reshape(2, 3, 7) / 65535 \
        * np.array(blob["received_max"]).reshape(2, 3, 1)
    np.testing.assert_allclose(rec, data.received / 7, atol=1e-4)
    # the value norms behind the contributions travel as float32; the page multiplies them by the weights
    norms = np.frombuffer(base64.b64decode(blob["norms"]), dtype="<f4").reshape(2, 3, 7)
    np.testing.assert_allclose(norms, data.norms, rtol=1e-5)
    assert blob["norm_kind"] == "‖v W_O‖" and "contrib" not in blob["views"] and blob["segments"] is None


def test_long_input_embeds_topk_not_n_squared(monkeypatch):
    monkeypatch.setattr(html, "FULL_CELLS", 10)
    n = 40
    data = synthetic([f"t{i}" for i in range(n)])
    blob = html.payload(data)
    v = blob["views"]["weights"]
    assert v["mode"] == "topk" and v["k"] == html.PAGE_TOPK
    idx = np.frombuffer(base64.b64decode(v["idx"]), dtype="<u2").reshape(2, 3, n, -1)
    w = np.frombuffer(base64.b64decode(v["w"]), dtype="<f2").reshape(2, 3, n, -1).astype(np.float64)
    ref = -np.sort(-data.weights, axis=-1)[..., :html.PAGE_TOPK]
    np.testing.assert_allclose(w, ref, rtol=2 ** -11, atol=2 ** -24)  # float16: 3 significant digits, any size
    np.testing.assert_allclose(np.take_along_axis(data.weights, idx.astype(np.int64), -1), ref, atol=1e-6)
    assert blob["thumb"]["t"] == min(html.THUMB, n)


def test_report_without_full_weights_uses_topk():
    data = synthetic([f"t{i}" for i in range(9)], full=False)
    blob = html.payload(data)
    assert blob["views"]["weights"]["mode"] == "topk" and blob["norms"] is None
    assert 0 < blob["rollout"]["coverage"] < 1


def test_pool_block_means():
    m = np.arange(16, dtype=float).reshape(4, 4)
    np.testing.assert_allclose(pool_means(m, 2), [[2.5, 4.5], [10.5, 12.5]])
    idx = np.array([[[[0, 1], [3, -1], [2, 3], [0, 1]]]])
    w = np.array([[[[0.5, 0.5], [1.0, 0.0], [0.25, 0.75], [0.5, 0.5]]]])
    dense = analysis.topk_dense(idx, w, 4)
    np.testing.assert_allclose(html._pool_topk(idx, w, 4, 2), pool_means(dense, 2))


def test_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="PNGs need matplotlib (the hf extra)")
    from attnlens.report import plots

    data = synthetic(EVIL)
    paths = plots.write_pngs(data, tmp_path / "png", layer=1, head=2)
    assert [p.name for p in paths] == ["rollout.png", "heads.png", "layer1_head2.png", "received.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000


def test_word_pieces_join_subwords_as_a_reader_sees_them():
    wp = html.word_pieces(["[CLS]", "at", "##t", "##nl", "##ens", "is", "here", "[SEP]", "##x"])
    assert wp["scheme"] == "wordpiece"
    assert wp["text"] == ["[CLS]", "at", "t", "nl", "ens", "is", "here", "[SEP]", "x"]
    assert wp["join"] == [False, False, True, True, True, False, False, False, False]  # never after a special
    bpe = html.word_pieces(["<|endoftext|>", "The", "Ġatt", "nl", "ens", ",", "Ġa", "Ċ", "Ġb"])
    assert bpe["scheme"] == "bpe" and bpe["text"] == ["<|endoftext|>", "The", "att", "nl", "ens", ",", "a", "↵", "b"]
    assert bpe["join"] == [False, False, False, True, True, True, False, False, False]
    sp = html.word_pieces(["<s>", "▁The", "▁att", "nl", "ens", "▁", "x"])
    assert sp["scheme"] == "sentencepiece" and sp["text"] == ["<s>", "The", "att", "nl", "ens", "▁", "x"]
    assert sp["join"] == [False, False, False, True, True, False, True]
    assert html.word_pieces(["a", "b", "#", "##"]) is None  # no subword marks: every token a word


def test_the_page_opens_on_the_head_of_the_strongest_informative_link():
    from attnlens.report.data import opening_view

    data = synthetic([f"w{i}" for i in range(12)], L=3, H=4, k=3, seed=3)
    kinds = [analysis.head_kinds(s, data.n) for s in data.summaries]
    i, _, heads = analysis.informative_links(data.topk_idx, data.topk_w, data.tokens, kinds)[0]
    assert opening_view(data) == (heads[0][1], heads[0][2], i)
    assert _blob(html.render(data))["initial"] == {"layer": heads[0][1], "head": heads[0][2], "token": i}
    data.initial_layer = 1  # asked for: that layer's mean of heads, no token shown first
    assert opening_view(data) == (1, -1, -1)
    data.initial_layer, data.initial_head, data.initial_token = None, 2, 5
    assert opening_view(data) == (0, 2, 5)
    data.topk_w = data.topk_w * 0.01  # no link: layer 0's mean of heads
    data.initial_head = data.initial_token = None
    assert opening_view(data) == (0, -1, -1)


# ---------------------------------------------------------------- MiniLM at full length


def test_minilm_report_at_512_tokens_stays_small(minilm, tmp_path):
    from attnlens import report

    model, tok = minilm
    data = report.collect(" ".join(["the cat sat on the mat ."] * 80), model, tok, truncate=True)
    assert data.n == 512 and data.warnings and "512" in data.warnings[0]
    assert data.weights.shape == (6, 12, 512, 512) and data.contrib.shape == data.weights.shape
    np.testing.assert_allclose(data.rollout.sum(-1), 1.0, atol=1e-6)
    size = html.write(data, tmp_path / "r.html")
    assert size < 6e6  # the dense weights alone would be 19 M bytes before base64
    blob = _blob((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert blob["views"]["weights"]["mode"] == "topk" and blob["rollout"]["t"] == html.ROLLOUT_MAX


def test_collect_refuses_too_long_text_without_truncate(minilm):
    from attnlens import report

    model, tok = minilm
    with pytest.raises(ValueError, match="longer than the model's maximum of 512"):
        report.collect("word " * 600, model, tok)
    with pytest.raises(ValueError, match="empty"):
        report.collect("  ", model, tok)


# ---------------------------------------------------------------- headless Chromium


def _open(drv, path):
    from _browser import open_page

    open_page(drv, path)


def _assert_not_blank(path):
    from _browser import assert_not_blank

    assert_not_blank(path)


@pytest.mark.browser
def test_page_in_chromium_escapes_hovers_and_renders(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    data = synthetic(EVIL + ["plain", "words"], L=3, H=4)
    html.write(data, tmp_path / "r.html")
    _open(browser, tmp_path / "r.html")
    spans = browser.find_elements("css selector", "#tokens .tok")
    assert [browser.execute_script("return arguments[0].textContent", s) for s in spans] == data.tokens
    assert browser.execute_script("return window.pwned === undefined")
    assert browser.find_elements("css selector", "img") == []  # the <img> token is text, not an element

    def colours():
        return [s.value_of_css_property("background-color") for s in spans]

    ActionChains(browser).move_to_element(spans[1]).perform()
    first, info1 = colours(), browser.find_element("id", "info").text
    ActionChains(browser).move_to_element(spans[5]).perform()
    second, info2 = colours(), browser.find_element("id", "info").text
    assert first != second and info1 != info2  # hovering another token changes what is highlighted
    assert info2.startswith("$x^2$") and "draws on" in info2
    # selecting a head in the grid updates the controls
    browser.find_element("css selector", '#grid canvas[data-l="2"][data-h="1"]').click()
    assert browser.find_element("id", "layer").get_attribute("value") == "2"
    assert browser.find_element("id", "head").get_attribute("value") == "1"
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == [], errors
    shot = tmp_path / "shot.png"
    browser.save_screenshot(str(shot))
    _assert_not_blank(shot)


@pytest.mark.browser
def test_minilm_report_in_chromium(browser, minilm, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    from attnlens import report

    model, tok = minilm
    data = report.collect('The cat sat on the mat because it was "warm" <and> tired.', model, tok)
    html.write(data, tmp_path / "r.html")
    _open(browser, tmp_path / "r.html")
    spans = browser.find_elements("css selector", "#tokens .tok")
    assert len(spans) == data.n
    ActionChains(browser).move_to_element(spans[3]).perform()
    assert "draws on" in browser.find_element("id", "info").text
    assert len(browser.find_elements("css selector", "#grid canvas")) == 6 * 12
    assert len(browser.find_elements("css selector", "#summary tr")) == 1 + 6 * 12
    cells = browser.execute_script("return Array.from(document.querySelectorAll('#summary tr')[3].cells)"
                                   ".map(c => c.textContent)")  # header, L0 h0, L0 h1, L0 h2
    assert cells[:3] == ["0", "2", "previous-token"], cells  # named by analysis.head_kinds, as in the terminal
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == [], errors
    shot = tmp_path / "minilm.png"
    browser.save_screenshot(str(shot))
    _assert_not_blank(shot)


@pytest.mark.browser
def test_subword_pieces_read_as_words_and_the_pinned_row_is_marked(browser, minilm, tmp_path):
    """WordPiece pieces are joined in the token view ("attnlens", not "at ##t ##nl ##ens"), each piece still its own
    hoverable token with a thin mark; the page opens on the head `opening_view` picks; a pinned query's row is
    outlined on the heatmap."""
    from selenium.webdriver.common.action_chains import ActionChains

    from attnlens import report
    from attnlens.report.data import opening_view

    model, tok = minilm
    data = report.collect("attnlens shows what attention does, and it looks at tired words.", model, tok)
    assert data.tokens[1:5] == ["at", "##t", "##nl", "##ens"]
    html.write(data, tmp_path / "r.html")
    _open(browser, tmp_path / "r.html")
    layer, head, token = opening_view(data)
    assert browser.find_element("id", "layer").get_attribute("value") == str(layer)
    assert browser.find_element("id", "head").get_attribute("value") == str(head)
    assert f"“{data.tokens[token]}” #{token}" in browser.find_element("id", "mix-title").text
    text = browser.execute_script("return document.getElementById('tokens').textContent")
    assert text.startswith("[CLS] attnlens shows what attention does") and "##" not in text
    spans = browser.find_elements("css selector", "#tokens .tok")
    assert len(spans) == data.n and [s.text for s in spans[1:5]] == ["at", "t", "nl", "ens"]
    assert "cont" in spans[2].get_attribute("class") and "cont" not in spans[1].get_attribute("class")
    assert spans[2].get_attribute("title") == "#2 ##t"
    assert spans[2].value_of_css_property("border-left-style") == "dotted"  # the thin boundary mark
    ActionChains(browser).move_to_element(spans[2]).perform()
    assert "“##t” #2" in browser.find_element("id", "mix-title").text  # the piece itself, hoverable
    assert browser.find_elements("css selector", "#heat .hmrow") == []
    spans[7].click()  # pin a token: its row is outlined
    mark = browser.find_element("css selector", "#heat .hmrow")
    px = int(browser.find_element("css selector", "#heat canvas").get_attribute("data-px"))
    assert mark.value_of_css_property("top") == f"{1 + 7 * px}px" and mark.get_attribute("title").endswith("#7")
    Select = __import__("selenium.webdriver.support.ui", fromlist=["Select"]).Select
    Select(browser.find_element("id", "layer")).select_by_value("3")  # redrawn: still marked
    assert browser.find_element("css selector", "#heat .hmrow").value_of_css_property("top") == f"{1 + 7 * px}px"
    spans[7].click()  # unpinned: no mark
    assert browser.find_elements("css selector", "#heat .hmrow") == []
    assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []
    spans[1].click()
    from _browser import screenshot

    screenshot(browser, tmp_path / "pieces.png")


def _mix_table(drv) -> list:
    """The row-view table as text cells, header first."""
    return drv.execute_script(
        "return Array.from(document.querySelectorAll('#mix table tr')).map("
        "r => Array.from(r.children).map(c => c.textContent))")


def _q(w):
    return np.rint(np.asarray(w, dtype=np.float64) * 255) / 255  # what the page holds: 1-byte weights


@pytest.mark.browser
def test_page_row_view_per_head_heatmap_and_titles(browser, tmp_path):
    """Hover and pin show the hovered token's weights, value norms, contributions ‖P v W_O‖ and shares
    (the page's numbers = the data's); one bar per head per key; a labelled heatmap whose colours are
    linear in the weight, with a legend; every panel's title names the layer and head."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    from _browser import console_errors, screenshot

    toks = ["The", "cat", "sat", "on", "the", "mat", "because", "warm", "<b>"]
    data = synthetic(toks, L=3, H=4)
    n, (li, h, i) = len(toks), (1, 2, 3)
    html.write(data, tmp_path / "r.html")
    _open(browser, tmp_path / "r.html")
    browser.find_element("css selector", f'#grid canvas[data-l="{li}"][data-h="{h}"]').click()
    spans = browser.find_elements("css selector", "#tokens .tok")
    ActionChains(browser).move_to_element(spans[i]).perform()
    for pid in ("mix-title", "heat-title", "rec-title", "tok-title"):
        assert f"layer {li}, head {h}" in browser.find_element("id", pid).text, pid
    assert f"“on” #{i}" in browser.find_element("id", "mix-title").text
    assert f"layer {li}, all 4 heads" in browser.find_element("id", "heads-title").text

    # the row view: top keys by weight, each with its weight, value norm, ‖P v W_O‖ and share
    w, nv = _q(data.weights[li, h, i]), data.norms[li, h]
    c = w * nv
    head, *rows = _mix_table(browser)
    assert head[:6] == ["key", "#", "weight Pᵢⱼ", "‖vⱼ W_O‖", "‖Pᵢⱼ vⱼ W_O‖", "share of output"]
    keys = [int(r[1]) for r in rows]
    assert keys == [j for j in sorted(range(n), key=lambda j: -w[j]) if w[j] > 0]  # every key with a weight
    assert len(keys) >= n - 2 and [r[0] for r in rows] == [toks[j] for j in keys]
    got = np.array([[float(x.rstrip("%")) for x in r[2:6]] for r in rows])
    np.testing.assert_allclose(got[:, 0], w[keys], atol=6e-4)
    np.testing.assert_allclose(got[:, 1], nv[keys], atol=6e-3)
    np.testing.assert_allclose(got[:, 2], c[keys], atol=6e-4)
    np.testing.assert_allclose(got[:, 3], 100 * c[keys] / c.sum(), atol=0.06)

    # one bar per head per key: 4 heads × min(8, n) keys, each titled with its head's weight
    bars = browser.execute_script("return Array.from(document.querySelectorAll('#perhead .phb')).map(b => b.title)")
    per_head = _q(data.weights[li, :, i])  # (H, N)
    j0 = int(np.argmax(per_head.mean(0)))  # the first key listed: largest mean over heads
    assert len(bars) == 4 * 8 and bars[:4] == [f"head {hh}: {per_head[hh, j0]:.3f}" for hh in range(4)]

    # pinned: hovering elsewhere keeps the pinned token's row view
    spans[5].click()
    ActionChains(browser).move_to_element(spans[1]).perform()
    assert "“mat” #5" in browser.find_element("id", "mix-title").text
    head, *rows = _mix_table(browser)
    np.testing.assert_allclose(float(rows[0][2]), _q(data.weights[li, h, 5]).max(), atol=6e-4)

    # the heatmap: token labels on both axes, a legend, colours linear in weight / largest weight
    for axis in ("xl", "yl"):
        assert browser.execute_script(f"return Array.from(document.querySelectorAll('#heat .{axis} span'))"
                                      ".map(s => s.textContent)") == toks, axis
    W = _q(data.weights[li, h])
    legend = browser.find_element("css selector", "#heat .legend").text
    assert f"{W.max():.3f}" in legend and "linear" in legend
    px = browser.execute_script("var c = document.querySelector('#heat .hm canvas');"
                                "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)")
    rgb = np.array(px).reshape(n, n, 4)[..., :3]
    x = W / W.max()
    want = np.rint(np.stack([255 - 208 * x, 255 - 144 * x, 255 - 33 * x], -1))
    np.testing.assert_allclose(rgb, want, atol=1.01)  # linear: no gamma
    assert len(browser.find_elements("css selector", "#rollout .xl span")) == n  # the rollout has axes too
    assert browser.find_element("css selector", "#gridlegend .legend").text.startswith("0")

    # the value-norm view: every panel switches to contributions
    Select(browser.find_element("id", "view")).select_by_value("contrib")
    assert browser.find_element("id", "heat-title").text.startswith("Contribution shares — layer 1, head 2")
    assert browser.find_element("id", "rec-title").text.startswith("Received contribution")
    assert "takes its output from" in browser.find_element("id", "info").text
    head, *rows = _mix_table(browser)
    c5 = _q(data.weights[li, h, 5]) * nv
    by_contrib = [j for j in sorted(range(n), key=lambda j: -c5[j]) if c5[j] > 0]
    assert [int(r[1]) for r in rows] == by_contrib  # ordered by contribution now
    errors = console_errors(browser)
    assert errors == [], errors
    screenshot(browser, tmp_path / "synthetic-full.png", full_page=True)


@pytest.mark.browser
def test_page_cross_attention_heatmap(browser, tmp_path):
    """An encoder-decoder report: decoder tokens label the rows, encoder tokens the columns, the colours
    are the chosen decoder layer's weights (linear), and the title names the layer and head."""
    from selenium.webdriver.support.ui import Select

    from _browser import console_errors

    toks, dec = ["a", "b", "c", "d", "e"], ["<s>", "x", "y"]
    data = synthetic(toks, L=2, H=3)
    rng = np.random.default_rng(1)
    w = rng.random((3, 3, 3, 5))
    data.cross = {"tokens": dec, "weights": (w / w.sum(-1, keepdims=True)).astype(np.float32)}
    html.write(data, tmp_path / "r.html")
    _open(browser, tmp_path / "r.html")
    Select(browser.find_element("id", "head")).select_by_value("1")
    Select(browser.find_element("id", "xlayer")).select_by_value("2")
    assert browser.find_element("id", "cross-title").text.endswith("decoder layer 2, head 1")
    labels = browser.execute_script(
        "return [Array.from(document.querySelectorAll('#cross .xl span')).map(s => s.textContent),"
        " Array.from(document.querySelectorAll('#cross .yl span')).map(s => s.textContent)]")
    assert labels == [toks, dec]
    px = browser.execute_script("var c = document.querySelector('#cross canvas'); return [c.width, c.height,"
                                " Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]")
    assert px[:2] == [5, 3]
    W = _q(data.cross["weights"][2, 1])
    x = W / W.max()
    want = np.rint(np.stack([255 - 208 * x, 255 - 144 * x, 255 - 33 * x], -1))
    np.testing.assert_allclose(np.array(px[2]).reshape(3, 5, 4)[..., :3], want, atol=1.01)
    # click decoder row 1: its row view lists the encoder tokens it reads, largest first, with their weights
    browser.execute_script("var c = document.querySelector('#cross canvas'), r = c.getBoundingClientRect();"
                           "c.dispatchEvent(new MouseEvent('click', {clientX: r.left + 2, clientY: r.top + r.height * 0.5}))")
    assert "“x” #1 reads" in browser.find_element("id", "crossrow").text
    got = browser.execute_script("return Array.from(document.querySelectorAll('#crossrow .bar')).map(b => b.textContent)")
    order = np.argsort(-W[1], kind="stable")
    assert [g.split(" ")[0].rstrip("0123456789.") for g in got] == [toks[j] for j in order]
    assert console_errors(browser) == []
