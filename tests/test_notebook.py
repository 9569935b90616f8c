"""The Python API behind notebooks: `attnlens.explain` / `explain_capture` return a `Report` that saves the
same page as `attnlens explain` and displays itself inline (a sandboxed ``<iframe srcdoc>``). A real
notebook is executed with nbclient and an ipykernel, and its output opened in headless Chromium."""
from __future__ import annotations

import html as _html
import os
import re

import numpy as np
import pytest
import torch

import attnlens as al

SENTENCE = "The animal didn't cross the street because it was too tired."


def test_report_of_an_nn_capture_saves_and_displays_in_a_sandboxed_frame(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(al.nn.TransformerBlock(16, 4), al.nn.TransformerBlock(16, 4)).eval()
    x = torch.randn(1, 7, 16)
    with torch.no_grad(), al.nn.capture(model, lens=al.Lens(rows="all", topk=4)) as cap:
        model(x)
    toks = [f"t{i}" for i in range(7)]
    r = al.explain_capture(cap, tokens=toks)
    assert r.data.n_layers == 2 and r.data.n_heads == 4 and r.data.tokens == toks
    np.testing.assert_allclose(r.data.weights[1], cap.results[1].result.weights[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(r.data.rollout.sum(-1), 1.0, atol=1e-6)
    assert r.data.contrib is None  # nn records carry no value norms: the page shows the weights only
    page = r.html()
    assert r.save(tmp_path / "r.html").read_text(encoding="utf-8") == page
    frame = r._repr_html_()
    assert frame.startswith("<iframe") and 'sandbox="allow-scripts"' in frame and "allow-same-origin" not in frame
    srcdoc = re.search(r'srcdoc="([^"]*)"', frame).group(1)
    assert _html.unescape(srcdoc) == page and "<script" not in srcdoc  # the page is an attribute value
    with pytest.raises(ValueError, match="self-attention over the 6 tokens"):
        al.explain_capture(cap, tokens=toks[:6])
    with al.nn.capture(model, lens=al.Lens(entropy=False)) as cap2:
        model(x)
    with pytest.raises(ValueError, match="no entropy, topk_indices"):
        al.explain_capture(cap2, tokens=toks)


def test_explain_default_model_and_a_sentence_pair(minilm, tmp_path):
    r = al.explain(SENTENCE)
    assert r.data.model_name == "all-MiniLM-L6-v2" and r.data.n == 16 and r.data.segments is None
    assert "16 tokens" in repr(r)
    model, tok = minilm
    p = al.explain("A man is playing.", model, tok, pair="Someone plays.")
    seg, toks = p.data.segments, p.data.tokens
    first_b = toks.index("[SEP]") + 1  # [CLS] a man is playing . [SEP] | someone plays . [SEP]
    assert seg == [0] * first_b + [1] * (len(toks) - first_b) and toks[first_b] == "someone"
    assert '"segments":[0,0' in p.html()


# ---------------------------------------------------------------- a real notebook, executed


@pytest.mark.browser
def test_notebook_displays_the_report_inline(minilm, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    from _browser import console_errors, open_page, screenshot

    required = os.environ.get("ATTNLENS_CI") == "1"
    if not required:
        pytest.importorskip("nbclient", reason="needs nbclient, nbformat and ipykernel (the test extra)")
        pytest.importorskip("ipykernel", reason="needs ipykernel (the test extra)")
    import nbclient
    import nbformat

    saved = tmp_path / "saved.html"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import attnlens\n"
                                          f"r = attnlens.explain({SENTENCE!r})\n"
                                          f"r.save({str(saved)!r})\n"
                                          "r")]
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[0].outputs
    assert "error" not in [o.output_type for o in outputs]
    results = [o for o in outputs if o.output_type == "execute_result"]
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "TqdmWarning" not in streams and "IProgress" not in streams, streams  # transformers' tqdm.auto, hushed
    assert len(results) == 1, outputs
    frame = results[0].data["text/html"]
    assert frame.startswith('<iframe class="attnlens-report" sandbox="allow-scripts"')
    assert _html.unescape(re.search(r'srcdoc="([^"]*)"', frame).group(1)) == saved.read_text(encoding="utf-8")
    out = tmp_path / "notebook-output.html"  # the cell's output as a notebook page shows it
    out.write_text(f"<!DOCTYPE html><html><body><h3>In [1]:</h3>{frame}</body></html>", encoding="utf-8")
    browser.get("file://" + str(out))
    browser.switch_to.frame(browser.find_element("css selector", "iframe.attnlens-report"))
    try:
        assert browser.find_element("tag name", "body").get_attribute("data-ready") == "1"
        spans = browser.find_elements("css selector", "#tokens .tok")
        texts = [s.text for s in spans]
        assert texts[:3] == ["[CLS]", "the", "animal"] and len(texts) == 16
        i = texts.index("it")
        ActionChains(browser).move_to_element(spans[i]).perform()
        title = browser.find_element("id", "mix-title").text
        assert f"“it” #{i}" in title and "layer 2, head 1" in title  # opens on the head of "it → tired"
        assert 3 <= len(browser.find_elements("css selector", "#mix table tr")) <= 11  # up to 10 keys of weight > 0
        assert browser.execute_script("return window.parent === window") is False  # really inside the frame
    finally:
        browser.switch_to.default_content()
    assert console_errors(browser) == []
    screenshot(browser, tmp_path / "notebook.png")
    open_page(browser, saved)  # the saved file is the same page, standalone
