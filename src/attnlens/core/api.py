"""`attention()` and `merge()`: the entry points (the block API underneath: `attnlens.core.blocks`)."""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .blocks import Block
from .inputs import stat_dtype
from .lens import Lens, LensResult, Merger


def attention(q, k, v, *, mask=None, causal=False, window=None, scale=None, offset=None, softcap=None, sinks=None,
              alibi_slopes=None, seqlens_q=None, seqlens_k=None, dropout_p=0.0, backend="auto", lens=None):
    """Exact scaled dot-product attention, ``softmax(q kᵀ · scale + mask) v``, and what it does.

    Each output row is a convex combination of the rows of ``v``: row i of the output is
    ``Σ_j P[i, j] · v[j]`` with ``P = softmax(q kᵀ · scale + mask)`` taken row by row
    (non-negative weights that sum to 1). ``lens`` returns statistics of ``P`` computed inside
    the same pass, without ever holding ``P`` (n × n) in memory.

    Args:
        q: queries ``(N, D)``, ``(H, N, D)`` or ``(B, H, N, D)`` — a NumPy array or torch tensor
            of float16, bfloat16 (torch), float32 or float64.
        k: keys ``(..., Hkv, Nk, D)``, same rank, dtype, device and batch as ``q``.
            ``Hq % Hkv == 0``: query head ``h`` uses key/value head ``h // (Hq // Hkv)``
            (grouped-query / multi-query attention; K and V are not copied per query head).
        v: values ``(..., Hkv, Nk, Dv)``.
        mask: bool (True = may attend) or float (added to the scaled scores; ``-inf`` = may
            not attend), broadcastable to the scores' shape ``(B, Hq, Nq, Nk)`` (fewer leading
            dims for lower-rank input). Same kind (NumPy/torch) and device as ``q``.
        causal: query i sees key j iff ``j <= i + offset``. With the default offset (``Nk - Nq``)
            this is bottom-right aligned, as in decoding with a KV cache; for ``Nq == Nk`` it is
            PyTorch's ``is_causal=True``::

                Nq=2, Nk=5 (two new tokens after a cache of 3)   Nq=5, Nk=5
                        k0 k1 k2 k3 k4                           k0 k1 k2 k3 k4
                    q0   x  x  x  x  .                       q0   x  .  .  .  .
                    q1   x  x  x  x  x                       q1   x  x  .  .  .
                                                             q2   x  x  x  .  .
                                                             ...
            A query with ``i + offset < 0`` sees no key (output 0); with the default offset these are
            the first ``Nq - Nk`` queries.
        window: sliding window ``(left, right)``: query i, at key position ``p = i + offset``,
            sees keys ``p - left <= j <= p + right``; ``None`` on a side = unbounded (FlashAttention
            writes -1 there; attnlens refuses negative sides and says so); an int w = ``(w, w)``.
            Combines with ``causal`` (then ``right`` is 0) and with ``mask``.
        scale: multiplies the scores; default ``1 / sqrt(D)``.

            The scores are formed in this order: ``s = (q_i · k_j) · scale``; ``softcap``; ``alibi_slopes``;
            then ``mask`` (float: added; bool: hides), ``causal`` and ``window`` hide keys.
        offset: query i sits at key position ``i + offset`` for ``causal`` and ``window``; default
            ``Nk - Nq`` (bottom-right; with ``seqlens_q/k`` each sequence's own, see there). Any int: a block of a
            longer sequence whose first query sits
            at key position ``offset`` of the block's keys (ring attention, split-KV), e.g.
            ``offset=0`` is top-left alignment and ``offset=-2`` pushes the keys two positions later::

                Nq=3, Nk=4, causal
                offset=1 (default)      offset=0                offset=-2
                    k0 k1 k2 k3             k0 k1 k2 k3             k0 k1 k2 k3
                q0   x  x  .  .         q0   x  .  .  .         q0   .  .  .  .
                q1   x  x  x  .         q1   x  x  .  .         q1   .  .  .  .
                q2   x  x  x  x         q2   x  x  x  .         q2   x  .  .  .
        softcap: logit soft-capping (Gemma 2): ``s = softcap · tanh(s / softcap)`` after scaling, before
            ALiBi and any mask; a real number > 0, or ``None`` (off). Gradients flow through the tanh.
        sinks: attention sinks (gpt-oss): one logit per query head, shape ``(Hq,)`` or broadcastable to
            ``(B, Hq)`` (torch or NumPy, as ``q``). Each row's softmax gets one more entry with that logit and
            no value::

                lse_i = log(Σ_j exp(s_ij) + exp(sink))     P[i, j] = exp(s_ij - lse_i)

            so row i's weights on the keys sum to ``1 - sink_weight_i`` (``LensResult.sink_weight``). A row
            that sees no key puts all its weight on the sink: output 0, ``lse = sink``. ``sinks`` gets a
            gradient when it requires one (it is a trained parameter).
        alibi_slopes: ALiBi (BLOOM, MPT): slopes ``(Hq,)`` or ``(B, Hq)``; the score of query i on key j
            gets ``- slope · |i + offset - j|`` (FlashAttention's convention; ``offset`` as below). No gradient.
            One difference on purpose: with ``causal``, FlashAttention's reference adds ``slope · (j - Nk + 1)``
            instead, a constant per row away from this one (for the default offset), so the weights, output and
            gradients are the same and only the lse differs: attnlens's is larger by ``slope · (Nq - 1 - i)``.
            The distance form holds for any offset and window and does not depend on Nk (split-KV blocks).
        seqlens_q, seqlens_k: a padded batch of sequences of different lengths (FlashAttention's varlen semantics,
            ``cu_seqlens_q/k``, in padded form): ``(B,)`` ints (torch, NumPy or a list), right padding — sequence
            b's queries are rows ``[0, seqlens_q[b])`` and its keys ``[0, seqlens_k[b])``, with
            ``0 <= seqlens_q[b] <= Nq`` and ``0 <= seqlens_k[b] <= Nk``; either may be None (every sequence full
            length). Each sequence is attention on its own: its offset is by default
            ``seqlens_k[b] - seqlens_q[b]`` (bottom-right *per sequence*, FlashAttention's), and ``causal``,
            ``window`` and ALiBi are measured from it; ``offset`` may instead be an int (every sequence) or ``(B,)``
            ints (one per sequence). Padded query rows (``i >= seqlens_q[b]``) are rows with no visible key — output
            0, lse -inf, lens zeros, no sink weight — and padded keys receive 0 and get no gradient. Linear memory:
            no mask is built. E.g. a sequence of 2 queries and 3 keys in a batch padded to Nq = 4, Nk = 5, causal::

                seqlens_q=[2, ...], seqlens_k=[3, ...]   (its offset: 3 - 2 = 1)
                        k0 k1 k2 k3 k4
                    q0   x  x  .  .  .        q2, q3: padded rows (nothing)
                    q1   x  x  x  .  .        k3, k4: padded keys (seen by no query)

            Served by ``reference``, ``torch`` and ``triton``; ``sdpa`` declines (no per-sequence lengths).
        dropout_p: probability of dropping a weight (kept weights scaled by ``1/(1-p)``), in
            ``[0, 1)``. Applied whenever ``dropout_p > 0``, as in PyTorch's functional form
            (pass 0.0 at evaluation). The lens describes the weights before dropout.
        backend: ``"auto"`` (first that can serve, see ``attnlens.backends()``), ``"triton"``
            (fused GPU kernels with the lens; CUDA), ``"sdpa"`` (PyTorch's fused kernel, no lens),
            ``"fused"`` (the tiled C kernel with the lens on the CPU, built at first use),
            ``"torch"`` (chunked, lens, autograd, any device) or ``"reference"`` (NumPy float64,
            dense); or a backend object with per-call settings, e.g.
            ``attnlens.TorchChunkedBackend(chunk_bytes=1 << 20)``. A named backend that cannot serve
            the call raises ``ValueError`` describing the input and the reasons; ``auto`` never takes
            a dense ``O(Nq·Nk)``-memory path when a linear-memory backend serves the call. On the
            CPU ``auto`` gives a lens call to ``"fused"`` and a plain call to ``"sdpa"``, except
            causal float32 forwards, which go to ``"fused"`` (measured faster; ``attnlens info``).
            ``attnlens.use_backend`` sets it for a block.
        lens: ``None`` → return the output only. ``True`` → ``Lens()`` (the defaults); an
            ``attnlens.Lens`` → return ``(out, LensResult)``.

    Returns:
        ``out`` of shape ``(..., Hq, Nq, Dv)``, of ``q``'s kind, dtype and device; or
        ``(out, LensResult)`` when ``lens`` is given. float16/bfloat16 are computed with
        float32 accumulation. ``LensResult.lse`` carries a gradient when an input needs one (its derivative
        is ``P``: `merge` of parts is differentiable); the other lens fields carry none.

    Empty rows, NaN and inf — one rule on every backend (the float64 reference states it exactly):

    - *Visible* is structural: key j is visible to query i unless causal / window / offset exclude it, a
      bool mask is False there, or a float mask is ``-inf`` there.
    - A row with no visible key: output 0, ``lse = -inf``, entropy 0, max_weight 0, weights 0, top-k
      indices -1 — never NaN, whatever q, k, v hold.
    - A row with a visible score that is not finite (NaN in q, k or the float mask; ±inf from inf in q
      or k; overflow of ``q·k·scale + mask`` in the compute dtype) is NaN: its output, lse, entropy,
      max_weight and top-k weights (indices -1); its weight rows NaN at its visible keys, 0 elsewhere;
      ``received`` NaN at the keys it sees. Every other row is exact.
    - NaN/inf in v reach only the rows that give that key a weight > 0.
    - Numeric range: any finite score is exact (masked keys are ``-inf``, never a finite sentinel),
      e.g. a float-mask entry of -1e30 or ``finfo.min`` is a score, not a mask. The fused backends
      (``sdpa``, ``triton``) refuse inputs holding NaN/inf with a reason, so ``auto`` takes ``torch``.

    Raises:
        TypeError / ValueError naming the argument, what was seen and what was expected.
    """
    blk = Block.build(q, k, v, mask=mask, causal=causal, window=window, scale=scale, offset=offset, softcap=softcap,
                      sinks=sinks, alibi_slopes=alibi_slopes, seqlens_q=seqlens_q, seqlens_k=seqlens_k,
                      dropout_p=dropout_p, lens=lens, backend=backend)
    out, _, res = blk.run()  # under the one autograd wrapper when a gradient is needed (sdpa: PyTorch's own)
    return blk.finish(out, res)


# ---------------------------------------------------------------------------------------------
# merging partial results


def merge(parts, *, key_offsets=None):
    """Combine attention over disjoint key sets, for the same queries, into attention over all keys.

    Split-KV / partial attention: ``attention(q, k[a:b], v[a:b], lens=Lens(lse=True, ...))`` for
    key pieces ``[a, b)`` gives ``(out_b, res_b)``; ``merge`` returns ``(out, LensResult)`` equal to
    ``attention(q, k, v, lens=...)`` over all keys, exactly (to rounding), through the log-sum-exp::

        lse = log Σ_b exp(lse_b)      w_b = exp(lse_b - lse)   (piece b's share of query i's weight)
        out = Σ_b w_b out_b           max_weight = max_b w_b max_weight_b
        entropy = Σ_b w_b (H_b - log w_b)     top-k = the k largest of ∪_b w_b topk_weights_b

    Top-k has the parts' width: compute every part with the same ``Lens(topk=k)`` — a part with fewer than k
    keys fills its extra slots with index -1, weight 0, as a row with fewer visible keys does — and the merged
    top-k is the k largest over all keys (padded the same way when all parts together hold fewer than k). An
    empty key piece (``k[a:a]``: every row sees no key, lse -inf) is a part that changes nothing.

    Weight rows (``Lens(rows=...)``, the same rows in every part) merge too: ``w_b · weights_b`` at
    the piece's keys. ``received`` cannot be merged — a key's column sum needs every query's *final*
    lse — so the result's ``received`` is ``None``, and so are the other column sums (``received_from``,
    ``pooled``) and ``weights_at``: compute them from the merged lse with the backend's column-sum
    primitive (as ring attention does).

    Args:
        parts: a sequence of ``(out, LensResult)`` pairs (torch or NumPy, as `attention` returns them),
            each with ``lse``; causal/window/offset make no difference here, only the lse and stats do.
        key_offsets: for top-k indices and weight rows, the position of each part's first key in the
            merged key numbering: ints >= 0, one per part, whose key ranges do not overlap (a part's number of
            keys is read from its ``received`` or ``weights``; where neither is there, the offsets must differ);
            default: the parts are consecutive pieces in order. Indices -1 stay -1.

    Returns:
        ``(out, LensResult)`` with the fields every part has (``lse`` always; ``max_weight``, ``entropy``,
        top-k, weights when every part has them); of the parts' kind, dtype and device. Differentiable: gradients
        flow through each part's ``out`` and ``lse`` (the parts' lse carry the ``P`` of their keys), so
        ``merged_out.backward(g)`` gives the gradients of attention over all keys, exactly.

    Raises:
        TypeError when a part is not an ``(out, LensResult)`` pair. ValueError when ``parts`` is empty, a part
        has no ``lse``, shapes disagree, the parts hold weight rows of different queries, ``key_offsets`` are not
        ints >= 0 of disjoint key ranges, or top-k / weight rows need key offsets that cannot be inferred.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge: expected at least one (out, LensResult) part, got none")
    for i, part in enumerate(parts):
        ok = isinstance(part, (tuple, list)) and len(part) == 2
        if not (ok and isinstance(part[0], (torch.Tensor, np.ndarray)) and isinstance(part[1], LensResult)):
            got = (f"({type(part[0]).__name__}, {type(part[1]).__name__})" if ok else type(part).__name__)
            raise TypeError(f"merge: part {i} must be an (out, LensResult) pair, as attention(..., lens=Lens(...)) "
                            f"returns it; got {got}")
    numpy_io = isinstance(parts[0][0], np.ndarray)
    outs, results = zip(*[(_as_torch(o), r.map_arrays(_as_torch)) for o, r in parts])
    if any(r.lse is None for r in results):
        raise ValueError("merge: every part needs its lse (compute each with Lens(lse=True))")
    if any(r.sink_weight is not None for r in results):
        raise ValueError("merge: parts computed with sinks cannot be merged (each part's lse counts the sink once, so "
                         "the merged lse would count it once per part); compute the parts without sinks")
    shape = outs[0].shape
    for i, (o, r) in enumerate(zip(outs, results)):
        if o.shape != shape or r.lse.shape != shape[:-1]:
            raise ValueError(f"merge: part {i} has out {tuple(o.shape)} and lse {tuple(r.lse.shape)}; part 0 has out "
                             f"{tuple(shape)} (the same queries in every part)")
    lens = _merged_lens(results)
    offsets = _key_offsets(results, key_offsets, lens)
    nk = None if lens.rows is None else max(o + r.weights.shape[-1] for o, r in zip(offsets, results))
    cdt = stat_dtype(outs[0].dtype)
    m = Merger(tuple(shape), shape[-2], lens, cdt, outs[0].device, nk=nk, rows=lens.rows)
    for o, r, koff in zip(outs, results, offsets):
        m.add(o, r, koff)
    res = m.result(lens)
    out = m.out.to(outs[0].dtype)
    if numpy_io:
        return out.numpy(), res.map_arrays(lambda t: t.cpu().numpy())
    return out, res


def _as_torch(x):
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def _merged_lens(results) -> Lens:
    def every(name):
        return all(getattr(r, name) is not None for r in results)

    topk = max(r.topk_indices.shape[-1] for r in results) if every("topk_indices") else 0
    rows = None
    if every("weights"):
        rows = results[0].rows
        for i, r in enumerate(results):
            if r.rows != rows:
                raise ValueError(f"merge: the parts hold weight rows of different queries: part 0 rows {list(rows)}, "
                                 f"part {i} rows {list(r.rows)} (compute every part with the same Lens(rows=...))")
    return Lens(lse=True, max_weight=every("max_weight"), entropy=every("entropy"), received=False, topk=topk,
                rows=rows)


def _num_keys(r: LensResult):
    """A part's number of keys, from its ``received`` or ``weights`` (None when it has neither)."""
    return r.received.shape[-1] if r.received is not None else (r.weights.shape[-1] if r.weights is not None else None)


def _key_offsets(results, key_offsets, lens: Lens) -> list:
    if key_offsets is not None:
        offs = list(key_offsets)
        if len(offs) != len(results):
            raise ValueError(f"merge: key_offsets has {len(offs)} entries for {len(results)} parts")
        for o in offs:
            if isinstance(o, (bool, np.bool_)) or not isinstance(o, (numbers.Integral, np.integer)) or o < 0:
                raise ValueError(f"merge: key_offsets must be ints >= 0 (each part's first key in the merged "
                                 f"numbering), got {offs}")
        offs = [int(o) for o in offs]
        spans = sorted((o, _num_keys(r), i) for i, (o, r) in enumerate(zip(offs, results)) if _num_keys(r) != 0)

        def keys(o, n):  # a part's keys, as far as known (one at least)
            return f"[{o}, {o + n})" if n is not None else f"from key {o}"

        for (a, na, i), (b, nb, j) in zip(spans, spans[1:]):
            if b < a + (1 if na is None else na):
                raise ValueError(f"merge: key_offsets {offs} overlap: part {i} holds keys {keys(a, na)}, part {j} "
                                 f"{keys(b, nb)} (the parts' key sets must be disjoint)")
        return offs
    if not lens.topk and lens.rows is None:
        return [0] * len(results)
    offs, at = [], 0
    for i, r in enumerate(results):
        n = _num_keys(r)
        if n is None:
            raise ValueError(f"merge: part {i} has top-k but neither received nor weights, so its number of keys is "
                             f"unknown; pass key_offsets=[first key of each part]")
        offs.append(at)
        at += n
    return offs
