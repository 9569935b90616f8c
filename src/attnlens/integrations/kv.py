"""KV-cache compression scored inside the attention pass: `scores` and `compress` for Hugging Face decoders.

The attention a key *receives* is what heavy-hitter eviction keeps (H2O), and the attention of the last queries is
what SnapKV, PyramidKV and TOVA keep. Here those scores come from the prefill's own attention call, exactly and in
linear memory (nothing ``N × N``, no second pass over the model, no eager attention), and the transformers cache is
shrunk right after each layer's prefill so that ``model.generate`` continues on the smaller cache::

    with attnlens.kv.compress(model, method="snapkv", ratio=0.5, window=64) as press:
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    press.layers[0].keep          # (B, Hkv, S): the key positions layer 0 kept, ascending (-1 = empty slot)

    layers = attnlens.kv.scores(model, input_ids, method="h2o", ratio=0.5)   # what a researcher compares
    layers[3].scores              # (B, Hkv, N) the method's score of every key; layers[3].kept() (B, Hkv, N) bool

**Methods** (`METHODS`; the definitions follow kvpress 0.5.4, NVIDIA's reference library — its ``*Press.score``
and ``ScorerPress.compress`` — and say where they differ). ``P`` is the layer's attention (B, Hq, N, N) with the
model's own scale, soft-cap, sliding window and padding; ``G = Hq / Hkv`` query heads share a key/value head.

=============  =========================================================================================  ===========
method         score of key j, per (sequence, KV head)                                                     computed
=============  =========================================================================================  ===========
``h2o``        observed attention (kvpress ``ObservedAttentionPress``; H2O's heavy hitters):               in the pass
               ``Σ_i P[i, j] / n_j``, ``n_j`` = the number of queries that see key j (``N - j`` when         (``received``)
               causal; fewer under a sliding window), averaged over the G query heads (kvpress: ``mean(2)``;
               a sum would be G times it: same ranking)
``snapkv``     SnapKV (kvpress ``SnapKVPress``): ``mean`` over the last ``window`` queries of ``P[i, j]``,    window rows
               for the keys before the window, smoothed by ``avg_pool1d(kernel_size, stride 1, padding       (one pass of
               kernel_size // 2)`` over those keys (zero padding counted), averaged over the G query heads;  ``window``
               the ``window`` keys of the observation window score ``max + 1`` (always kept)               queries)
``pyramidkv``  PyramidKV (kvpress ``PyramidKVPress``): SnapKV's scores; per-layer budgets decreasing with     as snapkv
               depth (`pyramid_budget`, kvpress's formula with ``beta``)
``tova``       TOVA (kvpress ``TOVAPress``): the last query's weights ``P[N-1, j]`` averaged over all Hq     one row
               heads (one set shared by the layer's KV heads); the last key scores ``max + 1``
``streamingllm``  StreamingLLM (kvpress ``StreamingLLMPress``): 1 for the first ``sinks`` keys and the       no attention
               most recent ones, 0 for the ``n - int(n·(1 - ratio))`` keys after the sinks
``knorm``      key norm (kvpress ``KnormPress``): ``-‖k_j‖`` (keeps small key norms)                          no attention
=============  =========================================================================================  ===========

``max + 1``: the largest score of the sequence in that layer (all its KV heads) plus one, as kvpress pads with
``scores.max() + 1`` (kvpress takes the max over the whole batch tensor; per sequence here, so a sequence in a
batch scores as it does alone — the same for kvpress's batch of one).

**Which keys are kept.** A layer keeps, per sequence and KV head, the ``int(n · (1 - ratio))`` keys with the
largest scores (kvpress's ``n_kept``; PyramidKV: its layer budget), ties to the earlier key (a stable sort), in
position order. ``n`` is the number of keys the layer's cache holds after the prefill: the sequence's tokens (its
padding left out) for full attention; for a sliding-window layer only the last ``sliding_window - 1`` tokens,
which transformers keeps (older keys are never seen again), so it keeps ``1 - ratio`` of those. ``shared=True``
keeps one set per layer (the scores averaged over its KV heads) for every KV head. kvpress differs in three ways:
it gathers keys in score order (the same attention: only positions tell keys apart after rotary embeddings), it
compresses sliding-window layers over all N keys (or skips them, Gemma 3), and it has no padding (batch of one).

**Batches with padding.** Sequences are left-padded (as ``generate`` needs; right padding is refused). Each
sequence is scored and compressed as if alone: its padding keys are never scored (``-inf``) and its budget counts
its own tokens; a shorter sequence's unused cache slots are empty (position -1) and masked.

**The compressed cache.** After a layer's prefill its transformers cache layer (``DynamicLayer`` or
``DynamicSlidingWindowLayer`` of a ``DynamicCache``, what ``generate`` makes) is replaced by a `CompressedLayer`:
the kept keys and values ``(B, Hkv, S, D)`` and their original positions. New tokens are appended as usual, and
``get_seq_length()`` keeps counting every token seen, so positions and rotary embeddings continue where they were.
Before each later call of the layer, `compress`'s hook rewrites the attention mask transformers built for the
full-length cache into a mask over the kept slots (`CompressedLayer.prepare_step`: padding, causality and the
sliding window at each slot's original position), so a compressed cache must be used inside `compress` (outside,
its ``update`` raises). Generation on it is exactly generation on the full cache with the evicted keys masked out
(tests/test_kv.py checks it token by token against a float64 eager model).

**kvpress.** `kvpress_press` offers these scores as a kvpress ``ScorerPress`` (kvpress's own protocol and gather);
tests/test_kvpress.py checks its scores and kept keys against kvpress 0.5.5's presses where kvpress is installed.

**Cost.** ``h2o`` asks the pass for column sums (``Lens(received=True)``: the prefill runs on the chunked torch
backend, or Triton on CUDA, instead of PyTorch's fused SDPA). ``snapkv``/``pyramidkv``/``tova`` leave the pass on
the fused kernel and add one lens pass over only the last ``window`` (or one) queries of the same call (its
recorded q, k, mask and flags: ``O(window · N)``). ``streamingllm``/``knorm`` need no attention statistic.
Memory: a few ``(B, H, N)`` vectors per layer; nothing ``N × N`` unless the model builds its own dense mask
(transformers does for padding and sliding windows).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import Lens
from .capture import Recorder, activate
from .hf import attnlens_attention

try:  # the `hf` extra
    from transformers import PreTrainedModel
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("attnlens.kv needs transformers: pip install 'attnlens[hf]'") from e

__all__ = ["METHODS", "Method", "LayerScores", "Compression", "CompressedLayer", "compress", "scores",
           "kvpress_press", "pyramid_budget", "visible_queries"]

#: the scoring methods, in the order the docs list them
METHODS = ("h2o", "snapkv", "pyramidkv", "tova", "streamingllm", "knorm")
#: the methods that read the last queries' attention (`Method.window` applies)
WINDOW_METHODS = ("snapkv", "pyramidkv")
#: query rows per chunk when counting the queries that see each key under a dense mask (`visible_queries`)
COUNT_ROWS = 1024

_NO_STATS = dict(lse=False, max_weight=False, entropy=False)


def _int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {lo}, got {type(value).__name__} {value!r}")
    if value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value}")
    return int(value)


@dataclass(frozen=True)
class Method:
    """A scoring method and its settings (see the module docstring for the definitions).

    Args:
        name: one of `METHODS`: ``"h2o"``, ``"snapkv"``, ``"pyramidkv"``, ``"tova"``, ``"streamingllm"``,
            ``"knorm"``.
        ratio: the fraction of each layer's keys to evict, ``0 <= ratio < 1`` (kvpress's ``compression_ratio``);
            0 keeps everything.
        window: SnapKV/PyramidKV's observation window: the last ``window`` queries (kvpress default 64).
        kernel_size: SnapKV/PyramidKV's pooling kernel over keys, odd (kvpress default 5).
        sinks: StreamingLLM's first keys always kept (kvpress ``n_sink``, default 4).
        beta: PyramidKV's pyramid steepness, ``>= 1`` (kvpress default 20).
        shared: keep one set of keys per layer (scores averaged over its KV heads) instead of one per KV head.
    """

    name: str = "snapkv"
    ratio: float = 0.5
    window: int = 64
    kernel_size: int = 5
    sinks: int = 4
    beta: int = 20
    shared: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or self.name not in METHODS:
            raise ValueError(f"method: expected one of {list(METHODS)}, got {self.name!r}")
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(float(r)):
            raise TypeError(f"ratio: expected a number 0 <= ratio < 1 (the fraction of keys evicted), got {r!r}")
        if not 0.0 <= float(r) < 1.0:
            raise ValueError(f"ratio: expected 0 <= ratio < 1 (the fraction of keys evicted), got {r}")
        object.__setattr__(self, "ratio", float(r))
        _int("window", self.window, 1)
        k = _int("kernel_size", self.kernel_size, 1)
        if k % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd int >= 1 (the pooling keeps the length), got {k}")
        _int("sinks", self.sinks, 0)
        _int("beta", self.beta, 1)
        if not isinstance(self.shared, bool):
            raise TypeError(f"shared: expected a bool, got {self.shared!r}")

    @property
    def lens(self) -> Optional[Lens]:
        """What the method asks of the prefill's attention pass: column sums for ``h2o``, else nothing (the window
        methods ask a few rows of the same call afterwards; ``streamingllm`` and ``knorm`` need no attention)."""
        return Lens(received=True, **_NO_STATS) if self.name == "h2o" else None

    def min_tokens(self) -> int:
        """The fewest tokens a sequence needs (kvpress asserts the same): more than ``window`` for SnapKV and
        PyramidKV, more than ``sinks`` for StreamingLLM, 2 for TOVA."""
        if self.name in WINDOW_METHODS:
            return self.window + 1
        if self.name == "streamingllm":
            return self.sinks + 1
        return 2 if self.name == "tova" else 1

    def budget(self, n: int, layer: int, n_layers: int) -> int:
        """How many of a sequence's ``n`` candidate keys a layer keeps: ``int(n · (1 - ratio))`` (kvpress's
        ``n_kept``), or PyramidKV's layer budget (`pyramid_budget`)."""
        if self.name == "pyramidkv":
            return pyramid_budget(n, layer, n_layers, self.ratio, self.window, self.beta)
        return int(n * (1 - self.ratio))


def pyramid_budget(n: int, layer: int, n_layers: int, ratio: float, window: int, beta: int) -> int:
    """PyramidKV's keys kept by ``layer`` of ``n_layers`` for ``n`` keys (kvpress ``PyramidKVPress.get_layer_budget``,
    after KVCache-Factory's ``pyramidkv_utils``): with ``C = window + n·(1 - ratio)``, ``min = (C - window) / beta``,
    ``max = 2·(C - window) - min`` (if ``max >= n - window``: ``max = n - window``, ``min = 2·(C - window) - max``),
    layer ``l`` keeps ``round(max - l · (max - min) / (n_layers - 1))``; when ``n >= max >= min >= window`` fails,
    or the model has one layer, it keeps SnapKV's ``round(n · (1 - ratio))``. The layers' budgets add up to
    ``n_layers · n · (1 - ratio)`` (up to rounding)."""
    cap = window + n * (1 - ratio)
    lo = (cap - window) / beta
    hi = (cap - window) * 2 - lo
    if hi >= n - window:
        hi = n - window
        lo = (cap - window) * 2 - hi
    if not (n >= hi >= lo >= window) or n_layers < 2:
        return round(n * (1 - ratio))
    return round(hi - layer * (hi - lo) / (n_layers - 1))


# ---------------------------------------------------------------------------------------------
# scores of one recorded prefill call


def visible_queries(call) -> torch.Tensor:
    """``(B|1, Hq|1, Nk)`` int64: how many queries of the call (an `attnlens.AttnCall`) see each key, under its mask,
    ``causal`` and ``window`` (bottom-right aligned, as `attnlens.attention` draws them). Without a mask it is
    arithmetic; with one, counted over ``COUNT_ROWS`` query rows at a time (never more than a chunk of the mask)."""
    Nq, Nk = call.q.shape[2], call.k.shape[2]
    off = Nk - Nq
    dev = call.k.device
    j = torch.arange(Nk, device=dev)
    w = call.window
    left, right = (None, None) if w is None else ((w, w) if isinstance(w, int) else tuple(w))
    if call.causal:
        right = 0 if right is None else min(right, 0)
    if call.mask is None:  # queries i with j - right <= i + off <= j + left
        lo = torch.zeros_like(j) if right is None else (j - right - off).clamp(min=0)
        hi = torch.full_like(j, Nq - 1) if left is None else (j + left - off).clamp(max=Nq - 1)
        return (hi - lo + 1).clamp(min=0)[None, None]
    mask = call.mask
    counts = None
    for a in range(0, Nq, COUNT_ROWS):
        b = min(Nq, a + COUNT_ROWS)
        m = mask[:, :, a:b] if mask.shape[2] == Nq else mask
        m = m if m.dtype == torch.bool else m > float("-inf")
        i = torch.arange(a, b, device=dev)[:, None] + off  # (rows, 1): each query's position
        band = torch.ones(b - a, Nk, dtype=torch.bool, device=dev)
        if right is not None:
            band &= j[None] <= i + right
        if left is not None:
            band &= j[None] >= i - left
        c = (m & band).sum(2)  # (B|1, H|1, Nk)
        counts = c if counts is None else counts + c
    return counts


def _rows_received(call, a: int, b: int) -> torch.Tensor:
    """``Σ_{a <= i < b} P[i, j]`` ``(B, Hq, Nk)``: one lens pass over queries ``[a, b)`` of the call, exact (the call's
    own q, k, mask, scale, soft-cap and flags; `attnlens.Block.rows`)."""
    lens = Lens(received=True, **_NO_STATS)
    with torch.no_grad():
        return call.block(lens).rows(a, b, lens=lens).forward()[2].received


def _group_mean(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """``(B, Hq, n)`` → ``(B, Hkv, n)``: the mean over the query heads of each KV head (head h uses KV head h // G)."""
    B, Hq, n = x.shape
    return x.reshape(B, hkv, Hq // hkv, n).mean(2)


def _pad_top(s: torch.Tensor, live: torch.Tensor, n: int) -> torch.Tensor:
    """Append ``n`` keys scoring ``max + 1`` (the sequence's largest score over its live keys and KV heads, plus one)."""
    top = s.masked_fill(~live[:, None, : s.shape[-1]], float("-inf")).amax(dim=(1, 2), keepdim=True) + 1
    return torch.cat([s, top.expand(s.shape[0], s.shape[1], n)], dim=-1)


def score_call(method: Method, call, result=None, live: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The method's score of every key of one prefill call ``(B, Hkv, N)`` (module docstring), ``-inf`` where
    ``live (B, N)`` is False (padding). ``result``: the `LensResult` of ``method.lens`` from the call's own pass
    (``h2o``). Computed in the statistics dtype (float32; float64 for float64 models)."""
    q, k = call.q, call.k
    B, Hq, N, _ = q.shape
    Hkv = k.shape[1]
    sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    live = torch.ones(B, N, dtype=torch.bool, device=k.device) if live is None else live
    name = method.name
    if name == "h2o":
        if result is None or result.received is None:
            raise ValueError("h2o needs the column sums of the call's own pass (Lens(received=True))")
        n = visible_queries(call).to(sdt)
        s = _group_mean(result.received.to(sdt) / n.clamp(min=1).expand(B, Hq, N), Hkv)
    elif name in WINDOW_METHODS:
        w = method.window
        rec = _rows_received(call, N - w, N).to(sdt)[..., : N - w] / w  # (B, Hq, N - w): mean over the window
        rec = F.avg_pool1d(rec, kernel_size=method.kernel_size, stride=1, padding=method.kernel_size // 2)
        s = _pad_top(_group_mean(rec, Hkv), live, w)
    elif name == "tova":
        last = _rows_received(call, N - 1, N).to(sdt)[..., : N - 1]  # (B, Hq, N - 1): the last query's row
        s = _pad_top(last.mean(1, keepdim=True).expand(B, Hkv, N - 1), live, 1)
    elif name == "streamingllm":
        s = torch.ones(B, Hkv, N, dtype=sdt, device=k.device)
        first = N - live.sum(1)  # (B,) each sequence's first token (left padding)
        for bi in range(B):
            n_live = N - int(first[bi])
            pruned = n_live - int(n_live * (1 - method.ratio))
            a = int(first[bi]) + method.sinks
            s[bi, :, a: a + pruned] = 0
    else:  # knorm
        s = -torch.linalg.vector_norm(k.to(sdt), dim=-1)
    return s.masked_fill(~live[:, None, :], float("-inf"))


def live_keys(call) -> torch.Tensor:
    """``(B, N)`` bool: the keys some query of the call sees (False: padding). Checks that padding is on the left."""
    B, N = call.q.shape[0], call.k.shape[2]
    if call.mask is None:
        return torch.ones(B, N, dtype=torch.bool, device=call.k.device)
    live = (visible_queries(call) > 0).any(1).expand(B, N)
    if bool((live[:, 1:] < live[:, :-1]).any()):
        raise ValueError("attention_mask: attnlens.kv needs left padding (a sequence's tokens at the end, as "
                         "generation uses: tokenizer.padding_side = 'left'); got padding after or between tokens")
    return live


# ---------------------------------------------------------------------------------------------
# choosing the keys


@dataclass(frozen=True)
class LayerScores:
    """One layer's scores and the keys it keeps (or would keep, with `scores`).

    Attributes:
        layer: the layer index.
        scores: ``(B, Hkv, N)`` the method's score of every key (``-inf`` for padding), float32 (float64 models:
            float64).
        keep: ``(B, Hkv, S)`` int64 positions of the kept keys, ascending, ``-1`` = an empty slot (a shorter sequence
            of a padded batch), empty slots first.
        window: the layer's sliding window (its cache held only the last ``window - 1`` keys), or ``None``.
    """

    layer: int
    scores: torch.Tensor
    keep: torch.Tensor
    window: Optional[int] = None

    @property
    def budget(self) -> torch.Tensor:
        """``(B,)`` keys kept per sequence (the same for every KV head)."""
        return (self.keep[:, 0] >= 0).sum(-1)

    def kept(self) -> torch.Tensor:
        """``(B, Hkv, N)`` bool: True where the key is kept."""
        B, H, N = self.scores.shape
        out = torch.zeros(B, H, N + 1, dtype=torch.bool, device=self.keep.device)
        out.scatter_(2, torch.where(self.keep < 0, N, self.keep), True)  # empty slots land on the extra column
        return out[..., :N]


def select(method: Method, s: torch.Tensor, live: torch.Tensor, *, layer: int, n_layers: int,
           window: Optional[int] = None) -> torch.Tensor:
    """``keep (B, Hkv, S)``: per sequence and KV head, the positions of the `Method.budget` best-scored candidate keys,
    ascending, ties to the earlier key; ``-1`` pads shorter sequences at the front. Candidates: the live keys, and for
    a sliding-window layer only the last ``window - 1`` (what its cache holds)."""
    B, H, N = s.shape
    cand = live.clone()
    if window is not None:
        cand[:, : max(0, N - (window - 1))] = False
    s = s.masked_fill(~cand[:, None], float("-inf"))
    if method.shared:
        s = s.mean(1, keepdim=True)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # (B, H|1, N)
    counts = cand.sum(1).tolist()
    budgets = [min(int(c), max(0, method.budget(int(c), layer, n_layers))) for c in counts]
    S = max(budgets) if budgets else 0
    keep = torch.full((B, H, S), -1, dtype=torch.int64, device=s.device)
    for bi, nb in enumerate(budgets):
        if nb:
            keep[bi, :, S - nb:] = order[bi, :, :nb].sort(-1).values
    return keep


# ---------------------------------------------------------------------------------------------
# the compressed cache layer


class CompressedLayer(DynamicLayer):
    """A transformers cache layer holding the kept keys and values ``(B, Hkv, S, D)`` and their original positions
    ``positions (B, Hkv, S)`` (``-1`` = empty slot; ascending per row, empty slots first). ``seen``: tokens seen,
    which ``get_seq_length`` reports, so positions and masks continue as for the full cache. ``sliding_window``:
    the layer's window, or ``None`` (full attention).

    `prepare_step` (called by `compress`'s hook before each call of the layer) drops the slots no query will see again
    and turns the mask transformers built for the full-length cache into the mask of the slots; `update` appends the
    new tokens. ``crop`` is refused (assisted decoding would need the evicted keys)."""

    def __init__(self, keys, values, positions, seen: int, sliding_window: Optional[int] = None):
        super().__init__()
        self.keys, self.values, self.positions = keys, values, positions
        self.seen = int(seen)
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.device = keys.device
        self.is_initialized = True
        self.prepared = None  # the query length `prepare_step` prepared for, until `update`

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The full-length cache's mask sizes (``DynamicLayer`` / ``DynamicSlidingWindowLayer`` with ``seen`` tokens),
        which the mask transformers builds is laid out on."""
        w = self.sliding_window
        if w is None:
            return self.seen + query_length, 0
        if self.seen >= w:
            return w - 1 + query_length, self.seen - w + 1
        return self.seen + query_length, 0

    def prepare_step(self, mask, q_len: int, num_heads: int):
        """Before a call with ``q_len`` new tokens: drop the leading slots that every row has past the window (and
        empty slots every row has), then return the attention mask over the slots and the new tokens
        ``(B, num_heads, q_len, S + q_len)`` — transformers' ``mask`` (bool, or float added to the scores; laid out on
        `get_mask_sizes`) read at each slot's position, or, when it is ``None`` (plain causal), causality (and the
        window) from the positions. Returns ``None`` when every slot is visible to every new token and ``mask`` is
        ``None`` (the attention then needs no mask)."""
        pos = self.positions
        w = self.sliding_window
        gone = (pos < 0) if w is None else (pos <= self.seen - w)  # unseen by the first new token and all later ones
        drop = int(gone.sum(-1).min()) if pos.numel() else 0
        if drop:
            self.keys, self.values = self.keys[:, :, drop:], self.values[:, :, drop:]
            self.positions = pos = pos[:, :, drop:]
        self.prepared = q_len
        B, Hkv, S = pos.shape
        G = num_heads // Hkv
        new = torch.arange(self.seen, self.seen + q_len, device=pos.device)  # (q,) the new tokens' positions
        allpos = torch.cat([pos, new.expand(B, Hkv, q_len)], dim=-1)  # (B, Hkv, S + q)
        if mask is None:
            if q_len == 1 and bool((pos >= 0).all()) and (w is None or bool((pos > self.seen - w).all())):
                return None
            p = allpos[:, :, None, :]
            vis = (p >= 0) & (p <= new[:, None])
            if w is not None:
                vis &= p > new[:, None] - w
            return vis.repeat_interleave(G, dim=1)
        kv_len, kv_off = self.get_mask_sizes(q_len)
        if mask.shape[-1] != kv_len:
            raise ValueError(f"attention_mask: expected the mask of the full-length cache ({kv_len} keys), got "
                             f"shape {tuple(mask.shape)}")
        col = allpos - kv_off
        ok = (allpos >= 0) & (col >= 0) & (col < kv_len)  # (B, Hkv, S + q)
        idx = col.clamp(0, kv_len - 1).repeat_interleave(G, dim=1)[:, :, None, :].expand(B, num_heads, q_len, -1)
        m = mask.expand(B, num_heads, q_len, kv_len).gather(-1, idx)
        ok = ok.repeat_interleave(G, dim=1)[:, :, None, :]
        if m.dtype == torch.bool:
            return m & ok
        return m.masked_fill(~ok, torch.finfo(m.dtype).min)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.prepared != key_states.shape[-2]:
            raise RuntimeError("a compressed KV cache must be used inside attnlens.kv.compress(model) (its hook gives "
                               "each call the mask of the kept keys)")
        self.prepared = None
        B, Hkv, q = key_states.shape[:3]
        new = torch.arange(self.seen, self.seen + q, device=self.positions.device).expand(B, Hkv, q)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new], dim=-1)
        self.seen += q
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be cropped (assisted decoding would need the "
                                  "evicted keys)")

    def reset(self) -> None:
        super().reset()
        self.positions, self.seen, self.prepared = None, 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.positions = self.positions[indices, ...]

    @classmethod
    def from_prefill(cls, layer, keep: torch.Tensor, n: int) -> "CompressedLayer":
        """The kept slots of a prefilled ``DynamicLayer`` / ``DynamicSlidingWindowLayer`` of ``n`` tokens; ``keep (B,
        Hkv, S)`` as `select` returns it."""
        keys, values = layer.keys, layer.values  # (B, Hkv, held, D): positions n - held .. n - 1
        base = n - keys.shape[2]
        idx = (keep - base).clamp(min=0).to(keys.device)
        if bool(((keep >= 0) & (keep < base)).any()):
            raise ValueError("keep: a kept key is no longer in the layer's cache (outside its sliding window)")
        k = keys.gather(2, idx[..., None].expand(-1, -1, -1, keys.shape[-1]))
        v = values.gather(2, idx[..., None].expand(-1, -1, -1, values.shape[-1]))
        w = layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None
        return cls(k.contiguous(), v.contiguous(), keep.to(keys.device), n, w)


# ---------------------------------------------------------------------------------------------
# the session: scores recorded in the prefill, the cache compressed after each layer


def attention_layers(model) -> dict:
    """``{module: name}`` of the decoder self-attention modules attnlens.kv hooks: modules named ``*.self_attn`` with
    an int ``layer_idx`` (Llama, Qwen2, Mistral, Gemma 2, Phi-3, ...).

    Raises:
        ValueError: the model has none (an encoder, an encoder-decoder, or a decoder of another layout)."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    found = {m: n for n, m in model.named_modules()
             if n.rsplit(".", 1)[-1] == "self_attn" and isinstance(getattr(m, "layer_idx", None), int)
             and getattr(m, "is_causal", True)}
    if getattr(model.config, "is_encoder_decoder", False) or not found:
        raise ValueError(f"model ({type(model).__name__}): attnlens.kv compresses the KV cache of a causal decoder "
                         f"(Llama, Qwen2, Mistral, Gemma 2, ...: modules named '*.self_attn' with a layer_idx); this "
                         f"model has no such layers (an encoder, or an encoder-decoder, keeps no KV cache to compress)")
    return found


def config_window(model, layer: int) -> Optional[int]:
    """The sliding window of ``layer`` from the model's config (``layer_types`` when given, else ``sliding_window``
    for every layer, as transformers' ``DynamicCache`` reads it), or ``None``."""
    cfg = model.config
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    w = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return w if types[layer] == "sliding_attention" else None
    return w


@dataclass(kw_only=True)
class Compression(Recorder):
    """What `compress` yields (and `scores` runs): the method, and ``layers``, the `LayerScores` of the last prefill
    by layer. A `Recorder` (the capture core): it watches the self-attention modules, asks the pass for
    ``method.lens``, and scores each prefill call it records."""

    model: nn.Module
    method: Method
    shrink: bool = True
    n_layers: int = 0
    _found: dict = field(default_factory=dict, repr=False)  # layer -> LayerScores of the last prefill
    _pending: dict = field(default_factory=dict, repr=False)  # module -> (scores, live, N)

    @property
    def layers(self) -> list:
        """The `LayerScores` of the last prefill, by layer."""
        return [self._found[k] for k in sorted(self._found)]

    def layer(self, index: int) -> Optional[LayerScores]:
        """The `LayerScores` of layer ``index`` in the last prefill, or ``None`` (not scored yet)."""
        return self._found.get(index)

    def record(self, call, result):
        Nq, Nk = call.q.shape[2], call.k.shape[2]
        if Nq != Nk:  # a decoding step, or a chunk after the first: only a prefill of an empty cache is scored
            return
        live = live_keys(call)
        short = int(live.sum(1).min())
        need = self.method.min_tokens()
        if short < need:
            what = {"snapkv": f"window={self.method.window}", "pyramidkv": f"window={self.method.window}",
                    "streamingllm": f"sinks={self.method.sinks}"}.get(self.method.name, "")
            raise ValueError(f"{self.method.name}: a sequence of {short} tokens is too short: it needs at least {need}"
                             + (f" ({what}; pass a smaller one)" if what else ""))
        self._pending[call.module] = (score_call(self.method, call, result, live), live, Nk)

    def after(self, module, args, kwargs, output):
        """Forward hook of a self-attention module: the keys its prefill keeps, and the cache layer compressed."""
        got = self._pending.pop(module, None)
        if got is None:
            return None
        s, live, n = got
        idx = module.layer_idx
        cache = _cache_of(kwargs)
        layer = None if cache is None or idx >= len(cache.layers) else cache.layers[idx]
        if layer is not None and not isinstance(layer, DynamicLayer):
            raise ValueError(f"cache: attnlens.kv compresses transformers' DynamicCache layers (what generate "
                             f"makes); layer {idx} is a {type(layer).__name__}")
        if isinstance(layer, CompressedLayer):
            raise ValueError(f"cache: layer {idx} is already compressed")
        window = (layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None) \
            if layer is not None else config_window(self.model, idx)
        keep = select(self.method, s, live, layer=idx, n_layers=self.n_layers, window=window)
        self._found[idx] = LayerScores(layer=idx, scores=s, keep=keep, window=window)
        if self.shrink and layer is not None and self.method.ratio > 0:
            cache.layers[idx] = CompressedLayer.from_prefill(layer, keep, n)
        return None

    def before(self, module, args, kwargs):
        """Forward pre-hook of a self-attention module: a compressed layer's mask over its kept slots."""
        cache = _cache_of(kwargs)
        idx = module.layer_idx
        if cache is None or idx >= len(cache.layers) or not isinstance(cache.layers[idx], CompressedLayer):
            return None
        if "attention_mask" not in kwargs or "hidden_states" not in kwargs:
            raise ValueError(f"model ({type(self.model).__name__}): attnlens.kv needs the attention module's "
                             f"hidden_states and attention_mask passed by keyword")
        heads = _num_heads(module)
        q_len = kwargs["hidden_states"].shape[1]
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = cache.layers[idx].prepare_step(kwargs["attention_mask"], q_len, heads)
        return args, kwargs


def _cache_of(kwargs):
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _num_heads(module) -> int:
    cfg = getattr(module, "config", None)
    h = getattr(cfg, "num_attention_heads", None) or getattr(module, "num_heads", None)
    if not isinstance(h, int):
        raise ValueError(f"{type(module).__name__}: cannot tell its number of query heads (no config."
                         f"num_attention_heads)")
    return h


@contextlib.contextmanager
def _session(model, method: Method, shrink: bool):
    found = attention_layers(model)
    sess = Compression(lens=method.lens, model=model, method=method, shrink=shrink,
                       n_layers=1 + max(m.layer_idx for m in found))
    sess.names = dict(found)
    hooks = []
    try:
        for m in found:
            hooks.append(m.register_forward_pre_hook(sess.before, with_kwargs=True))
            hooks.append(m.register_forward_hook(sess.after, with_kwargs=True))
        with activate(sess), attnlens_attention(model):
            yield sess
    finally:
        for h in hooks:
            h.remove()
        sess._pending.clear()


@contextlib.contextmanager
def compress(model, method: str = "snapkv", ratio: float = 0.5, *, window: int = 64, kernel_size: int = 5,
             sinks: int = 4, beta: int = 20, shared: bool = False):
    """Within the block, every prefill of ``model`` (a forward over an empty ``DynamicCache``, e.g. the first step of
    ``model.generate``) scores each layer's keys from its own attention call and compresses the layer's cache to the
    kept keys; later calls (decoding steps) run on the compressed cache, exactly as the full cache with the evicted
    keys masked.

    >>> with attnlens.kv.compress(model, method="snapkv", ratio=0.5, window=64) as press:
    ...     out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    >>> press.layers[0].keep.shape              # (B, Hkv, S): the kept positions of layer 0

    Args:
        model: a transformers causal decoder (`attention_layers`: Llama, Qwen2, Mistral, Gemma 2, ...). Within the
            block it runs its attention as ``attn_implementation="attnlens"`` (its own is set back on exit).
        method: one of `METHODS` (module docstring); ``ratio``, ``window``, ``kernel_size``, ``sinks``, ``beta``,
            ``shared``: see `Method`.

    Yields:
        the `Compression`: ``.layers`` holds the last prefill's `LayerScores`.

    Raises:
        ValueError / TypeError: a bad setting, a model without a decoder KV cache, a sequence too short for the
        method (SnapKV: more than ``window`` tokens), right padding, or a cache that is not a ``DynamicCache``.
    """
    m = Method(method, ratio, window, kernel_size, sinks, beta, shared)
    with _session(model, m, shrink=True) as sess:
        yield sess


def scores(model, input_ids, *, method: str = "snapkv", ratio: float = 0.5, window: int = 64, kernel_size: int = 5,
           sinks: int = 4, beta: int = 20, shared: bool = False, attention_mask=None) -> list:
    """Each layer's scores and kept keys for ``input_ids (B, N)`` (left-padded, with ``attention_mask``): one forward
    of the model's decoder (no cache, no logits; positions counted from each sequence's first token, as ``generate``
    counts them), the scores from each layer's own attention call (`compress`).

    Returns:
        a list of `LayerScores`, one per layer: ``scores (B, Hkv, N)`` and ``keep (B, Hkv, S)`` — what `compress` with
        the same settings keeps.
    """
    m = Method(method, ratio, window, kernel_size, sinks, beta, shared)
    ids = torch.as_tensor(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids: expected (B, N) token ids, got shape {tuple(ids.shape)}")
    kw = {}
    if attention_mask is not None:  # positions as generate makes them: counted from each sequence's first token
        mask = torch.as_tensor(attention_mask).to(model.device)
        kw = dict(attention_mask=mask, position_ids=(mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0))
    with torch.no_grad(), _session(model, m, shrink=False) as sess:
        base = getattr(model, "base_model", model)
        base(input_ids=ids.to(model.device), use_cache=False, **kw)
    return sess.layers


# ---------------------------------------------------------------------------------------------
# kvpress (NVIDIA's KV-cache compression library), when installed


def kvpress_press(method: str = "snapkv", ratio: float = 0.5, *, window: int = 64, kernel_size: int = 5,
                  sinks: int = 4, beta: int = 20):
    """Our scores as a kvpress press: a ``kvpress.ScorerPress`` whose ``score`` is attnlens's score of the method
    (this module's definitions), computed in the prefill's own attention call — so ``h2o`` needs no eager attention
    and no ``(B, H, N, N)`` weights, and ``snapkv``/``tova`` recompute nothing.

    >>> press = attnlens.kv.kvpress_press("h2o", ratio=0.5)
    >>> with press(model):                     # kvpress's protocol (or pipeline(..., press=press))
    ...     model(input_ids, past_key_values=cache)

    kvpress then keeps and gathers the keys as it does for its own presses (``ScorerPress.compress``: the top
    ``n_kept`` scores of each KV head in score order; PyramidKV: its layer budget, `pyramid_budget`); kvpress
    compresses one sequence (no padding). Within the block the model's attention runs as ``attn_implementation=
    "attnlens"``. On a sliding-window layer the scores of the keys its cache holds are passed (the last ones).
    Tested with kvpress 0.5.5 on transformers 5.2 (tests/test_kvpress.py: our press's scores and kept keys
    against kvpress's own ``ObservedAttentionPress`` on eager attention, ``SnapKVPress``, ``PyramidKVPress``,
    ``TOVAPress``, ``StreamingLLMPress`` and ``KnormPress``).

    Args:
        method: one of `METHODS`; ``ratio``, ``window``, ``kernel_size``, ``sinks``, ``beta``: see `Method`
            (kvpress's ``compression_ratio``, ``window_size``, ``kernel_size``, ``n_sink``, ``beta``).

    Raises:
        ImportError: kvpress is not installed. ValueError / TypeError: a bad setting (`Method`).
    """
    try:
        import kvpress
    except ImportError as e:
        raise ImportError("attnlens.kv.kvpress_press needs the kvpress package (pip install kvpress; tested with "
                          "0.5.5, which pins transformers < 5.3)") from e
    m = Method(method, ratio, window, kernel_size, sinks, beta)

    @dataclass
    class AttnlensPress(kvpress.ScorerPress):
        """A kvpress ``ScorerPress`` scoring keys with `attnlens.kv` (``method``: the settings, a `Method`)."""

        method: Method = m
        compression_ratio: float = m.ratio

        def __post_init__(self):
            super().__post_init__()
            self.method = Method(self.method.name, self.compression_ratio, self.method.window,
                                 self.method.kernel_size, self.method.sinks, self.method.beta)
            self.session = None

        @contextlib.contextmanager
        def __call__(self, model):
            # our hooks first (registered first, they run first): each layer's scores are ready for kvpress's hook
            with _session(model, self.method, shrink=False) as sess, super().__call__(model):
                self.session = sess
                try:
                    yield
                finally:
                    self.session = None

        def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
            if self.session is None:
                raise RuntimeError("an attnlens press scores inside `with press(model):` (kvpress's protocol)")
            got = self.session.layer(module.layer_idx)
            if got is None:
                raise RuntimeError(f"layer {module.layer_idx}: attnlens recorded no prefill call (is the model's "
                                   f"attention running as attn_implementation='attnlens'?)")
            return got.scores[..., got.scores.shape[-1] - keys.shape[2]:].to(keys.dtype)

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            if self.method.name != "pyramidkv" or self.compression_ratio == 0:
                return super().compress(module, hidden_states, keys, values, attentions, kwargs)
            s = self.score(module, hidden_states, keys, values, attentions, kwargs)
            n_kept = self.method.budget(keys.shape[2], module.layer_idx, module.config.num_hidden_layers)
            idx = s.topk(n_kept, dim=-1).indices[..., None].expand(-1, -1, -1, keys.shape[-1])
            return keys.gather(2, idx).contiguous(), values.gather(2, idx).contiguous()

    return AttnlensPress()
