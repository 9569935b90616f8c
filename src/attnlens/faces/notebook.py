"""The report in Python and in Jupyter: `explain` and `explain_capture` return a `Report`.

>>> import attnlens
>>> r = attnlens.explain("The animal didn't cross the street because it was too tired.")
>>> r                          # in Jupyter: the report inline
>>> r.save("report.html")      # the same page as `attnlens explain` writes
>>> r.data.weights.shape       # (L, H, N, N): the numbers behind it (`attnlens.report.ReportData`)

A report of a capture you ran yourself (a Hugging Face model, or `attnlens.nn` modules)::

    with attnlens.nn.capture(model, lens=attnlens.Lens(rows="all", topk=8)) as cap:
        model(x)
    attnlens.explain_capture(cap, tokens=["the", "cat", ...])

Inline, the page sits in an ``<iframe srcdoc=...>`` with ``sandbox="allow-scripts"``: its own
script runs under its own Content-Security-Policy, in an opaque origin, and shares nothing with
the notebook (no same-origin access, no forms, no top navigation).
"""
from __future__ import annotations

import html as _html
import warnings
from pathlib import Path
from typing import Optional

from .report import DEFAULT_MODEL_LABEL, from_records, html
from .report.data import count
from .report.files import write_atomic
from .report.from_model import collect_any


__all__ = ["Report", "explain", "explain_capture", "IFRAME_HEIGHT"]
#: the inline frame's height in pixels (the page scrolls inside it)
IFRAME_HEIGHT = 900


class Report:
    """One explained sequence: ``data`` (`attnlens.report.ReportData`), the page (`html`), `save`.

    In Jupyter the report displays itself (``_repr_html_``) in a sandboxed frame.
    """

    def __init__(self, data):
        self.data = data
        self._page: Optional[str] = None

    def html(self) -> str:
        """The self-contained page (as `attnlens.report.html.render` makes it)."""
        if self._page is None:
            self._page = html.render(self.data)
        return self._page

    def save(self, path, *, overwrite: bool = True) -> Path:
        """Write the page to ``path`` atomically; ``overwrite=False`` refuses an existing file
        (`attnlens.report.files.TargetError`). Returns the path written."""
        return write_atomic(path, self.html().encode("utf-8"), overwrite=overwrite)

    def _repr_html_(self) -> str:
        return (f'<iframe class="attnlens-report" sandbox="allow-scripts" title="attnlens report" '
                f'style="width:100%;height:{IFRAME_HEIGHT}px;border:1px solid #e3e6ee" '
                f'srcdoc="{_html.escape(self.html(), quote=True)}"></iframe>')

    def __repr__(self) -> str:
        d = self.data
        return (f"<attnlens Report: {d.model_name}, {count(d.n, 'token')}, {count(d.n_layers, 'layer')} × "
                f"{count(d.n_heads, 'head')}>")


def explain(text: str, model=None, tokenizer=None, *, pair: Optional[str] = None, topk: int = 8,
            truncate: bool = False, rollout_rows=None, contributions: bool = False) -> Report:
    """Run a Hugging Face model on ``text`` with attnlens attention and return its `Report`.

    ``model``: ``None`` (all-MiniLM-L6-v2, offline), a local model folder, or a loaded model (then
    ``tokenizer`` too, or it is loaded from the model's ``name_or_path``). ``pair``: a second text
    (a sentence pair, for an encoder; the decoder's text, for an encoder-decoder model, whose report
    then shows its cross-attention). ``topk``, ``truncate`` and ``rollout_rows`` (the tokens whose rollout
    rows the report holds exactly) as in `attnlens explain`; ``contributions``: also the whole-block contributions
    (`attnlens.analysis.compose_contributions`, the report's contributions card; ``attnlens explain --contributions``).
    """
    with warnings.catch_warnings():  # transformers imports tqdm.auto, which warns in a notebook without ipywidgets
        warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")
        from ..integrations import hf  # lazy: transformers (seconds) loads only when a model is run

    m, tok = hf.load(model, tokenizer)
    data = collect_any(text, m, tok, topk=topk, truncate=truncate, pair=pair, rollout_rows=rollout_rows,
                       contributions=contributions)
    data.model_name = DEFAULT_MODEL_LABEL if model is None else (
        str(model) if isinstance(model, (str, Path)) else str(getattr(m.config, "name_or_path", "") or
                                                              type(m).__name__))
    return Report(data)


def explain_capture(capture, tokens, *, text: str = "", model_name: str = "", batch: int = 0) -> Report:
    """The `Report` of a capture you ran: ``capture`` an `attnlens.hf.capture` (its first record
    per layer) or `attnlens.nn.capture` (its records in call order), or a list of records.

    Self-attention over ``tokens`` (one label per position); the lens must hold the defaults and
    ``topk`` (``Lens(rows="all", topk=8)`` gives every weight). See `attnlens.report.from_records`.
    """
    if hasattr(capture, "layers"):
        records = capture.layers()
    elif hasattr(capture, "results"):
        records = capture.results
    else:
        records = list(capture)
    return Report(from_records(records, list(tokens), text=text, model_name=model_name or "captured model",
                               batch=batch))
