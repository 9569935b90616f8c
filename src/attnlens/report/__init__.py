"""The `attnlens explain` report: run a model on a text under `attnlens.hf.capture`, analyse, render.

- `collect(text, model, tokenizer)` → `ReportData` (NumPy arrays per layer and head).
- `from_records(records, tokens)` → `ReportData` from a capture you already ran (`attnlens.hf.capture`
  or `attnlens.nn.capture`: one self-attention record per layer).
- `attnlens.report.html.render(data)` → one self-contained HTML page (no network, all inline).
- `attnlens.report.plots.write_pngs(data, folder)` → matplotlib heatmaps.

Full weight rows are captured when all layers' ``(H, N, N)`` fit in ``FULL_BYTES`` (always for
MiniLM's 512 tokens: 75 MB); beyond that, nothing ``N × N`` is ever held: the capture keeps the lens
statistics, top-k (the token view), pooled maps (``Lens(pool=...)``: the layer × head grid) and each
layer's inputs, and the rollout (pooled to the page's size: block means of its rows, carried through the
layers with ``Pᵀ W``) and the head scores are computed exactly from them (`attnlens.analysis`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

__all__ = ["ReportData", "collect", "from_records", "pooled_rollout", "rollout_views", "default_rollout_rows",
           "model_max_length", "FULL_BYTES", "DEFAULT_TOPK", "ROLLOUT_BLOCKS", "ROLLOUT_ROWS"]

#: capture every weight row when L · H · N² float32 fit in this many bytes
FULL_BYTES = 512 << 20
#: top-k kept per query and head for the terminal summary and long inputs
DEFAULT_TOPK = 8
#: without full weights, the rollout is carried as this many block means of its rows (each costs one column of
#: P^T W per layer: at 256 the column passes cost ~8 forward passes; benchmarks/analysis.py measures explain)
ROLLOUT_BLOCKS = 64
#: rows of the rollout the report holds exactly (default: evenly spaced, the first and the last token among them)
ROLLOUT_ROWS = 8


@dataclass
class ReportData:
    """Everything the report shows, for one sequence. ``L`` layers, ``H`` heads, ``N`` tokens.

    ``weights (L, H, N, N)`` and ``contrib (L, H, N, N)`` (value-norm contributions
    ``‖α_ij v_j W_O^h‖``, or ``‖α_ij v_j‖`` without an output projection) are ``None`` when
    the weights were not kept; ``topk_idx`` / ``topk_w (L, H, N, k)`` always hold the top-k.
    ``rollout_rows (r, N)``: rows ``rollout_row_ids`` of the rollout, exact at any length (``rollout`` itself is
    pooled beyond the full-weight limit).
    ``sink_weight (L, H)``: for a model with attention sinks (gpt-oss), the mean weight a query of each
    layer and head puts on its sink (its rows then sum to ``1 - sink weight``); ``None`` without sinks.
    """

    text: str
    tokens: list
    model_name: str
    n_layers: int
    n_heads: int
    entropy: np.ndarray  # (L, H, N) nats
    max_weight: np.ndarray  # (L, H, N)
    received: np.ndarray  # (L, H, N) column sums
    topk_idx: np.ndarray  # (L, H, N, k) int64
    topk_w: np.ndarray  # (L, H, N, k)
    summaries: list  # one analysis.HeadSummary per layer (exact; duplicate / induction from the token ids)
    rollout: np.ndarray  # (N, N), or (t, t) block means of it (html._pool's blocks) when weights were not kept
    rollout_coverage: float  # 1.0: the rollout is exact
    weights: Optional[np.ndarray] = None
    contrib: Optional[np.ndarray] = None
    contrib_kind: str = ""
    warnings: list = field(default_factory=list)
    thumbs: Optional[np.ndarray] = None  # (L, H, t, t) block means of each head's weights when weights were not kept
    segments: Optional[list] = None  # (N,) segment of each token (0, 1) for a sentence pair, else None
    cross: Optional[dict] = None  # encoder-decoder models: {"tokens": decoder tokens, "weights": (Ld, H, Nd, N)}
    sink_weight: Optional[np.ndarray] = None
    rollout_rows: Optional[np.ndarray] = None  # (r, N): exact rows of the rollout (every length), float64
    rollout_row_ids: Optional[list] = None  # (r,): the top-layer tokens those rows belong to

    @property
    def n(self) -> int:
        return len(self.tokens)


def model_max_length(model, tokenizer) -> int:
    """The most tokens the model takes: its position embeddings, capped by the tokenizer's limit."""
    cands = [getattr(model.config, a, None) for a in ("max_position_embeddings", "n_positions")]
    cands.append(getattr(tokenizer, "model_max_length", None))
    cands = [int(c) for c in cands if isinstance(c, (int, np.integer)) and 0 < c < 10**7]
    return min(cands) if cands else 10**7


def tokenize(text: str, model, tokenizer, *, truncate: bool = False, pair: Optional[str] = None):
    """``(encoding, warnings)``. Too long: ``ValueError`` unless ``truncate`` (then a warning says so).

    ``pair``: a second text, encoded with ``text`` as one sentence pair (``[CLS] A [SEP] B [SEP]``
    for BERT); the encoding's ``token_type_ids`` tell the segments apart.
    """
    for name, t in (("TEXT", text), ("--pair", pair)):
        if t is not None and (not t or not t.strip()):
            raise ValueError(f"{name}: expected some text, got an empty string")
    limit = model_max_length(model, tokenizer)
    args = (text,) if pair is None else (text, pair)
    enc = tokenizer(*args, return_tensors="pt", truncation=False)
    n = enc["input_ids"].shape[1]
    warnings = []
    if n > limit:
        if not truncate:
            raise ValueError(f"TEXT: {n} tokens is longer than the model's maximum of {limit}; shorten the text "
                             f"or pass --truncate to keep the first {limit} tokens")
        enc = tokenizer(*args, return_tensors="pt", truncation=True, max_length=limit)
        warnings.append(f"the text was {n} tokens long; only the first {limit} (the model's maximum) were used")
    return enc, warnings


def collect(text: str, model, tokenizer, *, topk: int = DEFAULT_TOPK, truncate: bool = False,
            on_layer: Optional[Callable[[int], None]] = None, pair: Optional[str] = None,
            on_analysis: Optional[Callable[[int, int], None]] = None, rollout_rows=None) -> ReportData:
    """Run ``model`` on ``text`` (and ``pair``, a second sentence) under `attnlens.hf.capture` and compute the
    analyses, exactly, in linear memory unless the full weights fit in ``FULL_BYTES``.

    ``on_layer(i)`` is called as each attention layer finishes, ``on_analysis(done, total)`` as each analysis step
    (a layer's head scores, a layer of the rollout) finishes (for progress bars). ``rollout_rows``: the tokens
    whose rollout rows the report holds exactly (ints, negative from the end; default `default_rollout_rows`).
    """
    import torch

    from .. import analysis, hf
    from ..lens import Lens
    from .html import THUMB

    enc, warnings = tokenize(text, model, tokenizer, truncate=truncate, pair=pair)
    n = enc["input_ids"].shape[1]
    chosen = _row_ids(rollout_rows, n)
    L = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0) or 0)
    H = int(getattr(model.config, "num_attention_heads", 0) or getattr(model.config, "n_head", 0) or 0)
    full = L * H * n * n * 4 <= FULL_BYTES if L and H else n <= 512
    blk = -(-n // min(THUMB, n))  # thumbnail blocks of blk × blk tokens
    lens = Lens(topk=min(topk, n), rows="all" if full else None, pool=None if full else (blk, blk))
    cb = (lambda rec: on_layer(rec.index)) if on_layer is not None else None
    with torch.no_grad(), hf.capture(model, lens=lens, on_record=cb, keep_inputs=not full) as cap:
        model(**enc)
    recs = cap.layers()
    if not recs:
        raise ValueError("the model ran but no attention call was recorded")

    def stack(get):
        return np.stack([analysis.as_numpy(get(r))[0] for r in recs])

    entropy = stack(lambda r: r.result.entropy)
    ids = enc["input_ids"]
    data = ReportData(
        text=text, tokens=[str(t) for t in tokenizer.convert_ids_to_tokens(ids[0].tolist())],
        model_name=str(getattr(model.config, "name_or_path", "") or type(model).__name__),
        n_layers=len(recs), n_heads=entropy.shape[1], entropy=entropy,
        max_weight=stack(lambda r: r.result.max_weight), received=stack(lambda r: r.result.received),
        topk_idx=stack(lambda r: r.result.topk_indices), topk_w=stack(lambda r: r.result.topk_weights),
        summaries=[], rollout=None, rollout_coverage=1.0, warnings=warnings)
    done, total = [0], len(recs) * (1 if full else 2)

    def tick(*_):
        done[0] += 1
        if on_analysis is not None:
            on_analysis(done[0], total)

    for r in recs:
        data.summaries.append(analysis.head_summary(r, ids))
        tick()
    data.segments = _segments(enc) if pair is not None else None
    if all(r.result.sink_weight is not None for r in recs):
        data.sink_weight = stack(lambda r: r.result.sink_weight).mean(-1)  # (L, H): mean over queries
    _set_rollout(data, recs, full, chosen, on_layer=tick)
    if full:
        data.weights = stack(lambda r: r.result.weights).astype(np.float32)
        data.contrib = np.stack([analysis.contributions(r).astype(np.float32) for r in recs])
        data.contrib_kind = "‖α v W_O‖" if recs[0].out_norms is not None else "‖α v‖"
    else:
        sizes = np.diff(np.minimum(np.arange(0, n + blk, blk), n))[: -(-n // blk)]  # tokens per block
        data.thumbs = (stack(lambda r: r.result.pooled) / np.outer(sizes, sizes)).astype(np.float32)  # block means
        data.warnings.append(f"{n} tokens: full weights were not kept (kept: each query's top {lens.topk} keys); the "
                             f"head scores, received attention and the chosen rollout rows are exact, the head grid "
                             f"and the rollout map exact block means")
    return data


def default_rollout_rows(n: int) -> list:
    """Up to `ROLLOUT_ROWS` evenly spaced tokens, the first and the last among them."""
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(ROLLOUT_ROWS, n))})


def _row_ids(rows, n: int) -> list:
    """``rows`` (ints, negative from the end) as sorted distinct positions in ``[0, n)``; ``None``: the default."""
    if rows is None:
        return default_rollout_rows(n)
    try:
        picked = [int(r) for r in np.atleast_1d(np.asarray(rows)).tolist()]
    except (TypeError, ValueError):
        raise TypeError(f"rollout_rows: expected token positions (ints), got {rows!r}") from None
    bad = [r for r in picked if not -n <= r < n]
    if bad or not picked:
        raise ValueError(f"rollout_rows: expected 1 or more positions in [-{n}, {n}) for {n} tokens, got {picked}")
    return sorted({r % n for r in picked})


def rollout_views(recs, n: int, t: int, rows=(), on_layer=None, batch: int = 0):
    """``(pooled (t, t), exact rows (len(rows), N))`` of the rollout, exactly, in linear memory, in one carry
    through the layers (``analysis.rollout(rows=...)``): the block means of its rows (html._pool's blocks), whose
    columns are then averaged by blocks, and the rows of the tokens ``rows``."""
    from .. import analysis

    edges = (np.arange(t) * n) // t
    counts = np.diff(np.append(edges, n))
    blocks = np.searchsorted(edges, np.arange(n), side="right") - 1  # (N,): each token's block
    start = np.zeros((t + len(rows), n))
    start[blocks, np.arange(n)] = 1.0 / counts[blocks]  # row b: the mean of block b's rows
    start[t + np.arange(len(rows)), list(rows)] = 1.0  # then one row per chosen token
    R = analysis.rollout(recs, rows=start, on_layer=on_layer, batch=batch)  # (t + r, N)
    return np.add.reduceat(R[:t], edges, axis=-1) / counts[None, :], R[t:]


def _set_rollout(data, recs, full: bool, rows: list, on_layer=None, batch: int = 0) -> None:
    """``data.rollout`` (dense ``(N, N)`` with full weights, else pooled to ``ROLLOUT_BLOCKS`` block means) and its
    exact ``rollout_rows`` for the tokens ``rows`` (``rollout_row_ids``), in one carry without full weights."""
    from .. import analysis

    data.rollout_row_ids = rows
    if full:
        data.rollout = analysis.rollout(recs, batch=batch)
        data.rollout_rows = data.rollout[rows]
    else:
        data.rollout, data.rollout_rows = rollout_views(recs, data.n, min(ROLLOUT_BLOCKS, data.n), rows,
                                                        on_layer=on_layer, batch=batch)


def pooled_rollout(recs, n: int, t: int, on_layer=None, batch: int = 0) -> np.ndarray:
    """The rollout ``(N, N)`` pooled to ``(t, t)`` block means (html._pool's blocks), exactly, in linear memory
    (`rollout_views` without chosen rows)."""
    return rollout_views(recs, n, t, (), on_layer=on_layer, batch=batch)[0]


def _segments(enc) -> list:
    """The segment (0 = first text, 1 = second) of each token of a pair encoding: its
    ``token_type_ids``, or, for a tokenizer without them, 1 from the first token after the first
    separator on (``sequence_ids`` of a fast tokenizer)."""
    if "token_type_ids" in enc and int(enc["token_type_ids"].max()) > 0:
        return [int(x) for x in enc["token_type_ids"][0].tolist()]
    seq = enc.sequence_ids(0) if hasattr(enc, "sequence_ids") else None
    if seq is None:
        return None
    out, seg = [], 0
    for s in seq:
        seg = s if s is not None else seg
        out.append(int(seg))
    return out


def from_records(records, tokens, *, text: str = "", model_name: str = "", batch: int = 0,
                 warnings=(), input_ids=None, rollout_rows=None) -> ReportData:
    """A `ReportData` from captured self-attention records, one per layer, bottom to top.

    ``records``: `attnlens.hf.HFRecord`s (``cap.layers()``), `attnlens.nn.CaptureRecord`s
    (``cap.results``) or `LensResult`s; each must hold ``entropy``, ``max_weight``, ``received``
    (the `Lens` defaults) and ``topk``; with ``rows="all"`` the report has every weight, and with an
    HF record's value norms the value-norm contributions too. ``tokens``: one label per position
    (``Nq == Nk == len(tokens)``); ``batch``: which sequence. ``input_ids``: the token ids, ``(N,)`` for this
    sequence or ``(B, N)`` (tensor, array or list of ints); with them the head scores include ``duplicate``
    and ``induction`` (`attnlens.analysis.head_summary`), so `attnlens.analysis.head_kinds` can name
    duplicate-token and induction heads. ``rollout_rows``: the tokens whose rollout rows the report holds exactly
    (as in `collect`).
    """
    from .. import analysis

    recs = list(records)
    if not recs:
        raise ValueError("records: expected one record per layer, got none")
    n = len(tokens)
    for k, r in enumerate(recs):
        res = getattr(r, "result", r)
        missing = [f for f in ("entropy", "max_weight", "received", "topk_indices") if getattr(res, f) is None]
        if missing:
            raise ValueError(f"records[{k}]: the lens has no {', '.join(missing)}; capture with "
                             f"Lens(topk=8, rows='all') (entropy, max_weight and received are on by default)")
        nq, nk = res.entropy.shape[-1], res.received.shape[-1]
        if nq != n or nk != n:
            raise ValueError(f"records[{k}]: expected self-attention over the {n} tokens given, got {nq} queries "
                             f"and {nk} keys")
    ids = None if input_ids is None else analysis.as_numpy(input_ids)
    if ids is not None and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids: expected integer token ids, got dtype {ids.dtype}")
    if ids is not None and (ids.ndim not in (1, 2) or ids.shape[-1] != n or (ids.ndim == 2 and batch >= ids.shape[0])):
        raise ValueError(f"input_ids: expected one token id per token, shape ({n},) or (B, {n}) with B > batch "
                         f"({batch}), got shape {ids.shape}")

    def per_layer(name):  # (L, H, ...) for one sequence
        out = []
        for r in recs:
            a = analysis.as_numpy(getattr(getattr(r, "result", r), name))
            out.append(a[batch] if a.ndim == (4 if name.startswith("topk") or name == "weights" else 3) else a)
        return np.stack(out)

    entropy = per_layer("entropy")
    data = ReportData(text=text or " ".join(map(str, tokens)), tokens=[str(t) for t in tokens],
                      model_name=model_name, n_layers=len(recs), n_heads=entropy.shape[1], entropy=entropy,
                      max_weight=per_layer("max_weight"), received=per_layer("received"),
                      topk_idx=per_layer("topk_indices"), topk_w=per_layer("topk_weights"),
                      summaries=[], rollout=None, rollout_coverage=1.0, warnings=list(warnings))
    full = all(analysis._has_full(getattr(r, "result", r)) for r in recs)
    if full or all(getattr(r, "call", None) is not None for r in recs):  # exact: full weights or kept inputs
        data.summaries = [analysis.head_summary(r, ids, batch=batch) for r in recs]
        _set_rollout(data, recs, full, _row_ids(rollout_rows, n), batch=batch)
    else:
        raise ValueError("records: exact head scores and rollout need every weight (Lens(rows='all')) or the "
                         "records' inputs (capture with keep_inputs=True, the default)")
    if full:
        data.weights = per_layer("weights").astype(np.float32)
        if all(getattr(r, "value_norms", None) is not None for r in recs):
            data.contrib = np.stack([analysis.contributions(r, batch=batch).astype(np.float32) for r in recs])
            data.contrib_kind = "‖α v W_O‖" if getattr(recs[0], "out_norms", None) is not None else "‖α v‖"
    return data
