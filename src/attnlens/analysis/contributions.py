"""Token contributions: value-norm contributions of the attention alone (Kobayashi et al. 2020, "Attention is not
only a weight"), per head and through all heads together; and contributions through the whole attention block — heads,
output projection, residual and layer norm — by norm (Kobayashi et al. 2021) or by distance (ALTI, Ferrando et al.
2022), composed across layers like rollout. All for chosen rows at any length, in linear memory."""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..core import Lens
from .records import as_numpy, start_rows

__all__ = ["contributions", "layer_contributions", "block_contributions", "compose_contributions", "METHODS"]

#: the whole-block methods: ``"alti"`` (Ferrando et al. 2022) and ``"norm"`` (Kobayashi et al. 2021)
METHODS = ("alti", "norm")
#: the lens of a pass for weight rows only
WEIGHT_ROWS = Lens(lse=False, max_weight=False, entropy=False, received=False, rows="all", max_bytes=None)
#: elements of the largest temporary of a tile (rows × keys × E, or heads × rows × keys): 4 Mi
TILE_ELEMS = 1 << 22


def contributions(weights, norms=None, *, batch: int = 0, use_output_projection: bool = True):
    """Value-norm contributions ``‖α_ij v_j‖`` per head (Kobayashi et al. 2020).

    Because ``α_ij >= 0`` is a scalar, ``‖α_ij f(v_j)‖ = α_ij ‖f(v_j)‖``: the weights scaled
    column-wise by the value norms. With the output projection (``use_output_projection`` and a
    record whose ``out_norms`` is known) ``f(v_j) = v_j W_O^h``, what head h adds to the residual
    stream from token j; otherwise ``f(v_j) = v_j``.

    Args:
        weights: ``(H, Nq, Nk)`` / ``(B, H, Nq, Nk)``, or an `attnlens.hf.HFRecord` (its full
            weights and norms).
        norms: ``(H, Nk)`` / ``(B, H, Nk)``; taken from the record when ``weights`` is one.

    Returns:
        ``C (H, Nq, Nk)`` float64. ``C.sum(0)`` adds the heads' norms: an upper bound (triangle
        inequality) of the norm of their sum.
    """
    if hasattr(weights, "result"):
        rec = weights
        res = rec.result
        if res.weights is None:
            raise ValueError("contributions: the record has no full weight rows; capture with Lens(rows='all')")
        if norms is None:
            norms = rec.out_norms if (use_output_projection and rec.out_norms is not None) else rec.value_norms
        if norms is None:
            raise ValueError("contributions: the record has no value norms; capture with values=True")
        weights = res.weights
    w = as_numpy(weights)
    nv = as_numpy(norms)
    if w.ndim == 4:
        w = w[batch]
    if nv.ndim == 3:
        nv = nv[batch]
    if w.ndim != 3 or nv.shape != (w.shape[0], w.shape[2]):
        raise ValueError(f"contributions: weights (H, Nq, Nk) and norms (H, Nk) must agree, got {w.shape} "
                         f"and {nv.shape}")
    return w * nv[:, None, :]


def layer_contributions(rec, rows, *, batch: int = 0, use_output_projection: bool = True,
                        key_chunk: Optional[int] = None) -> np.ndarray:
    """Layer-level value-norm contributions (Kobayashi et al. 2020) for chosen query rows, exact, linear memory:

        C[i, j] = ‖Σ_h P_h[i, j] · f_h(v_j)‖      f_h(v) = v_hᵀ W_O^h (head h's slice of the output projection)

    — the norm of what token j adds, through all heads together, to query i's attention output: the figure
    the paper reports. The per-head sum ``contributions(...).sum(0)`` is only an upper bound of it (triangle
    inequality). Without an output projection (or ``use_output_projection=False``), ``f_h(v) = v_h`` placed
    in head h's slice of the concatenation, so ``C[i, j] = sqrt(Σ_h P_h[i, j]² ‖v_h,j‖²)``.

    Args:
        rec: a record of `attnlens.hf.capture` (its kept inputs and output projection, ``rec.output_heads()``) or
            `attnlens.nn.capture` (no projection).
        rows: query rows (ints).
        batch: which sequence.
        key_chunk: keys per step (bounds the ``(len(rows), chunk, E)`` temporary).

    Returns:
        ``C (len(rows), Nk)`` float64. Cost: one pass for the weight rows, then ``O(Nk · H · Dv · E)`` for the
        projected values (in key chunks).
    """
    call = getattr(rec, "call", None)
    if call is None:
        raise ValueError("layer_contributions: needs a record with kept inputs (capture with keep_inputs=True)")
    rows = [int(r) for r in np.atleast_1d(rows)]
    P = call.ask(Lens(lse=False, max_weight=False, entropy=False, received=False, rows=rows), batch=batch).weights[0]
    Hq, R, Nk = P.shape
    v = call.select(batch).v[0].to(P.dtype)  # (Hkv, Nk, Dv)
    v = v.repeat_interleave(Hq // v.shape[0], dim=0)  # (Hq, Nk, Dv)
    heads = getattr(rec, "output_heads", None) if use_output_projection else None
    wo = None if heads is None else heads()  # (Hq, Dv, E): W_O cut by head, from the record (Hugging Face)
    if wo is not None and tuple(wo.shape[:2]) != (Hq, v.shape[-1]):
        wo = None
    if wo is None:
        sq = torch.einsum("hrn,hn->rn", P.square(), v.square().sum(-1))
        return as_numpy(sq.clamp_(min=0).sqrt_())
    wo = wo.to(device=P.device, dtype=P.dtype)  # (Hq, Dv, E)
    step = key_chunk or max(1, (1 << 24) // max(1, R * wo.shape[-1]))
    out = torch.empty(R, Nk, dtype=P.dtype, device=P.device)
    for a in range(0, Nk, step):
        f = torch.einsum("hnd,hde->hne", v[:, a:a + step], wo)  # (Hq, c, E): each head's value, projected
        out[:, a:a + step] = torch.linalg.vector_norm(torch.einsum("hrn,hne->rne", P[..., a:a + step], f), dim=-1)
    return as_numpy(out)


# ---------------------------------------------------------------------------------------------
# whole-block contributions (Kobayashi et al. 2021; ALTI, Ferrando et al. 2022)


def block_contributions(rec, rows=None, *, method: str = "alti", batch: int = 0, normalize: Optional[bool] = None,
                        key_chunk: Optional[int] = None) -> np.ndarray:
    """How much each input token ``j`` contributes to the output ``y_i`` of the whole attention block, for the query
    rows ``rows``: exact, in key tiles (never an ``N × N × E`` array), at any length.

    The block's output is split into one *transformed vector* per input token (the papers' ``T_i(x_j)``, Kobayashi
    et al. 2021 §3, eqs. 5–9; Ferrando et al. 2022 §3, eqs. 4–7) plus terms no token owns::

        z_ij = Σ_h P_h[i, j] · v_{h,j} W_O^h  +  δ_ij · x_i       all heads together, the residual on j = i
        post-LN (BERT):  y_i = LN(x_i + Σ_j Σ_h P_h[i, j] v_{h,j} W_O^h + b_O)
                         T_i(x_j) = γ ⊙ (z_ij − mean(z_ij)) / s_i,   s_i = sqrt(Var(u_i) + eps),  u_i the LN's input
                         y_i = Σ_j T_i(x_j) + γ ⊙ (b_O − mean(b_O)) / s_i + β
        pre-LN (GPT-2, Llama):  y_i = x_i + Σ_j Σ_h P_h[i, j] v_{h,j} W_O^h + b_O   (the residual stream after
                         attention), T_i(x_j) = z_ij,  y_i = Σ_j T_i(x_j) + b_O

    - ``v_{h,j}`` is the value vector the layer computed (the kept call's ``v``): it holds the value bias ``b_V``
      (for pre-LN models also the first LN, applied to ``x_j`` alone, so ``T_i(x_j)`` depends on ``x_j`` only).
      Kobayashi et al. 2020/2021 and the ALTI authors' code put ``b_V`` into ``f(x_j)`` the same way.
    - The output bias ``b_O`` and the LN's ``β`` belong to no token: they stay out of every ``T_i(x_j)`` (as in both
      papers) but are part of the real output ``y_i``, which ALTI measures distances to.
    - ``s_i`` is the LN's own ``sqrt(biased variance + eps)`` of its real input, so ``Σ_j T_i(x_j)`` plus the bias
      terms is exactly the layer's output (the ALTI authors' code divides by ``std(u_i + eps)``, the unbiased std;
      we keep the decomposition exact instead).
    - Pre-LN blocks have no LN after the residual inside the attention block: the next LN belongs to the MLP (its
      decomposition is GlobEnc's, Modarressi et al. 2022, not done here). This follows ALTI's extension to
      pre-LN decoders (Ferrando et al. 2023, "Explaining How Transformers Use Context to Build Predictions").

    Methods:
        ``"norm"`` (Kobayashi et al. 2021, "Incorporating Residual and Normalization Layers into Analysis of Masked
        Language Models", the "ATB + RES + LN" figure): ``C[i, j] = ‖T_i(x_j)‖₂``, L2 norms, not normalised unless
        ``normalize=True`` (each row divided by its sum; what composition uses).

        ``"alti"`` (Ferrando et al. 2022, "Measuring the Mixing of Contextual Information in the Transformer",
        eqs. 8–9): ``d_ij = ‖y_i − T_i(x_j)‖₁`` (L1, the paper's choice), ``c_ij = max(0, ‖y_i‖₁ − d_ij)``,
        ``C[i, j] = c_ij / Σ_k c_ik``: rows sum to 1 (0 where every ``c_ik`` is 0).

    Args:
        rec: a record of `attnlens.hf.capture` that kept its inputs (``record.block_parts()``: the block's input,
            W_O, b_O and the layer norm; see `attnlens.analysis.records`). Self-attention without a cache only.
        rows: query rows (ints, negative from the end); ``None`` = all rows (an ``N × N`` result).
        method: ``"alti"`` or ``"norm"``.
        batch: which sequence.
        normalize: divide each row by its sum (default: True for ALTI, which defines it so; False for norm).
        key_chunk: keys per tile (default: keeps the ``rows × keys × E`` temporary under `TILE_ELEMS`).

    Returns:
        ``C (len(rows), N)`` float64, computed in the call's float64 when the model runs in float64, else float32.
        Cost: one attention pass over only the chosen queries (each run of consecutive rows) for their weight rows
        and outputs; then ALTI ``O(len(rows) · N · Hq · E)`` (one batched matmul and an L1 norm per key tile) and the
        norm ``O(len(rows) · N · Hq²)`` (per-key Gram matrices). Memory: ``O(N · Hq · E)`` for the per-key vectors plus
        tiles of at most `TILE_ELEMS` elements — never ``N × N × E``.
    """
    rows_list = _rows_of(rec, rows, batch)
    out = np.zeros((len(rows_list), _block_size(rec, batch)))
    pos = {r: t for t, r in enumerate(rows_list)}
    for tile, C in _contribution_tiles(rec, sorted(set(rows_list)), method, batch, normalize, key_chunk):
        for a, r in enumerate(tile):
            out[pos[r]] = C[a]
    if len(pos) != len(rows_list):  # repeated rows
        for t, r in enumerate(rows_list):
            out[t] = out[pos[r]]
    return out


def compose_contributions(records: Sequence, rows=None, *, method: str = "alti", batch: int = 0,
                          pool: Optional[int] = None, key_chunk: Optional[int] = None,
                          on_layer: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Contributions composed through the layers (ALTI's §4, like rollout without the added identity, since each
    layer's matrix already holds the residual)::

        R = C_L · … · C_2 · C_1        C_l: layer l's `block_contributions` matrix, rows summing to 1
                                       (ALTI by definition; for ``"norm"`` each row divided by its sum, GlobEnc's way)

    ``R[i, j]``: how much input token j makes up top-layer token i. Exact rows at any length, in linear memory:
    like ``rollout(rows=...)`` each row vector is carried down from the top, ``w ← C_lᵀ w``, the products ``C_lᵀ W``
    of all carried rows together taken tile by tile (`block_contributions`' row and key tiles), only over the rows
    where some ``w`` is not zero — the top layer costs ``len(rows)`` rows, each layer below up to all ``N``.

    Args:
        records: one record per layer, bottom to top (``cap.layers()`` of `attnlens.hf.capture`).
        rows: rows of ``R`` (ints, negative from the end), or a ``(T, N)`` float array of row combinations;
            ``None`` = all rows.
        method: ``"alti"`` or ``"norm"``.
        pool: block size b: instead return the ``(⌈N/b⌉, ⌈N/b⌉)`` means of ``R`` over ``b × b`` blocks (a thumbnail
            at any length: ``⌈N/b⌉`` block-mean rows carried, then averaged over blocks of columns).
        on_layer: called with the number of layers done (a progress bar).

    Returns:
        ``(len(rows), N)`` float64 (or ``(T, N)``, or the pooled ``(⌈N/b⌉, ⌈N/b⌉)``).
    """
    if len(records) == 0:
        raise ValueError("compose_contributions: expected at least one layer record, got none")
    n = _block_size(records[-1], batch)
    if pool is not None:
        if rows is not None:
            raise ValueError("compose_contributions: pass rows or pool, not both")
        b = int(pool)
        if b < 1:
            raise ValueError(f"compose_contributions: pool must be an int >= 1, got {pool}")
        blocks = np.arange(n) // b
        nb = int(blocks[-1]) + 1
        comb = np.zeros((nb, n))
        comb[blocks, np.arange(n)] = 1.0
        comb /= comb.sum(1, keepdims=True)
        full = compose_contributions(records, comb, method=method, batch=batch, key_chunk=key_chunk,
                                     on_layer=on_layer)  # (nb, N): block means of R's rows
        return full @ comb.T  # (nb, nb): and of its columns
    u = start_rows(np.arange(n) if rows is None else rows, n, who="compose_contributions")  # (N, T)
    for done, rec in enumerate(reversed(list(records))):
        if _block_size(rec, batch) != n:
            raise ValueError(f"compose_contributions: layers have different lengths {n} and {_block_size(rec, batch)}")
        live = np.flatnonzero(np.any(u != 0, axis=1)).tolist()
        nxt = np.zeros_like(u)
        for tile, C in _contribution_tiles(rec, live, method, batch, True, key_chunk):
            nxt += C.T @ u[tile]  # Cᵀ w over this tile of rows
        u = nxt
        if on_layer is not None:
            on_layer(done + 1)
    return u.T.copy()


def _block_size(rec, batch: int) -> int:
    call = getattr(rec, "call", None)
    if call is None:
        raise ValueError("block contributions need a record that kept its inputs (hf.capture, keep_inputs=True)")
    B, _, nq, _ = call.q.shape
    if not -B <= batch < B:
        raise ValueError(f"batch={batch} is out of range for a call of batch size {B}")
    if nq != call.k.shape[2]:
        raise ValueError(f"block contributions need self-attention without a cache (Nq == Nk), got Nq={nq} and "
                         f"Nk={call.k.shape[2]}")
    return nq


def _rows_of(rec, rows, batch: int) -> list:
    n = _block_size(rec, batch)
    if rows is None:
        return list(range(n))
    picked = [int(r) for r in np.atleast_1d(np.asarray(rows))]
    if any(not -n <= r < n for r in picked):
        raise ValueError(f"rows: {picked} out of range for N={n}")
    return [r % n for r in picked]


def _weight_rows(whole, rows: list) -> tuple:
    """``(P (Hq, len(rows), N), out (Hq, len(rows), Dv))``: the exact weight rows of ``rows`` (sorted) and their
    attention outputs, from the call's `attnlens.core.Block`: one pass over only the queries of each run of
    consecutive rows (`Block.rows`), not over all N queries."""
    parts, outs, a = [], [], 0
    while a < len(rows):
        b = a + 1
        while b < len(rows) and rows[b] == rows[b - 1] + 1:
            b += 1
        out, _, res = whole.rows(rows[a], rows[b - 1] + 1, lens=WEIGHT_ROWS).forward()
        parts.append(res.weights[0])  # (Hq, run, N)
        outs.append(out[0])  # (Hq, run, Dv)
        a = b
    if len(parts) == 1:  # one run of rows: no copy
        return parts[0], outs[0]
    return torch.cat(parts, dim=1), torch.cat(outs, dim=1)


def _contribution_tiles(rec, rows: list, method: str, batch: int, normalize: Optional[bool],
                        key_chunk: Optional[int]) -> Iterator[tuple]:
    """Yield ``(tile rows, C (len(tile), N) float64)`` over tiles of ``rows`` (`block_contributions`).

    The LN's centring and ``γ`` are linear, so they are applied once per key (``f̃_hj = γ ⊙ (f_hj − mean f_hj)``,
    linear memory) and ``T_i(x_j) = Σ_h (P_h[i, j] / s_i) f̃_hj`` (+ ``γ ⊙ (x_i − mean x_i) / s_i`` on j = i).
    ALTI: ``s_i (T_i(x_j) − y_i)`` for a tile of keys is one batched matmul (``bmm`` batched over the keys, into a
    reused buffer) and an in-place subtraction, then its L1 norm, divided by ``s_i``. Norm:
    ``s_i² ‖T_i(x_j)‖² = Σ_h Σ_g P_h[i, j] P_g[i, j] G_j[h, g]`` with each key's ``H × H`` Gram matrix
    ``G_j = f̃_j f̃_jᵀ`` (``O(H²)`` a pair instead of ``O(H · E)``), in ``H (H + 1) / 2`` element-wise passes over the
    weight rows (``key_chunk`` is ALTI's only)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if normalize is None:
        normalize = method == "alti"
    n = _block_size(rec, batch)
    if not callable(getattr(rec, "block_parts", None)):
        raise ValueError(f"block contributions need a record that knows its attention block (an attnlens.hf.capture "
                         f"record: HFRecord.block_parts()), got {type(rec).__name__}")
    parts = rec.block_parts()
    call = rec.call
    dt = torch.float64 if call.q.dtype == torch.float64 else torch.float32
    dev = call.q.device
    Hq, Dv = call.q.shape[1], call.v.shape[-1]
    v = call.select(batch).v[0].to(dt)  # (Hkv, N, Dv)
    v = v.repeat_interleave(Hq // v.shape[0], dim=0)  # (Hq, N, Dv)
    wo = parts.w_o.to(dev, dt)  # (Hq, Dv, E)
    if tuple(wo.shape[:2]) != (Hq, Dv):
        raise ValueError(f"block contributions: W_O by head is {tuple(wo.shape)}, expected ({Hq}, {Dv}, E)")
    f = torch.einsum("hnd,hde->hne", v, wo)  # (Hq, N, E): what head h carries from token j, f_h(x_j) = v_hj W_O^h
    E = f.shape[-1]
    x = parts.x[batch].to(dev, dt)  # (N, E)
    if tuple(x.shape) != (n, E):
        raise ValueError(f"block contributions: the block input is {tuple(x.shape)}, expected ({n}, {E})")
    b_o = torch.zeros(E, dtype=dt, device=dev) if parts.b_o is None else parts.b_o.to(dev, dt)
    post = parts.norm == "post"
    if post:
        gamma = torch.ones(E, dtype=dt, device=dev) if parts.ln_weight is None else parts.ln_weight.to(dev, dt)
        beta = torch.zeros(E, dtype=dt, device=dev) if parts.ln_bias is None else parts.ln_bias.to(dev, dt)
        fc = gamma * (f - f.mean(-1, keepdim=True))  # (Hq, N, E): centred and scaled once per key
        xc = gamma * (x - x.mean(-1, keepdim=True))  # (N, E)
    elif parts.norm == "pre":
        fc, xc = f, x
    else:
        raise ValueError(f"block contributions: norm must be 'post' or 'pre', got {parts.norm!r}")
    fk = fc.transpose(0, 1).contiguous()  # (N, Hq, E): keys first, for matmuls batched over keys
    if method == "norm":
        gram = (fk @ fk.transpose(1, 2)).permute(1, 2, 0).contiguous()  # (Hq, Hq, N): G_j[h, g] = f̃_hj · f̃_gj
        cross = torch.einsum("nhe,ne->nh", fk, xc)  # (N, Hq): f̃_hj · x̃_j, for the residual on j = i
        xx = xc.square().sum(-1)  # (N,)
    r_step = max(1, TILE_ELEMS // max(1, Hq * n))
    whole = call.block(WEIGHT_ROWS, batch=batch)  # a backend that returns weight rows
    for a0 in range(0, len(rows), r_step):
        tile = rows[a0:a0 + r_step]
        r = len(tile)
        ri = torch.tensor(tile, device=dev)
        P, o = _weight_rows(whole, tile)  # (Hq, r, N): exact weight rows; (Hq, r, Dv): their outputs Σ_j P v
        P = P.to(dt)
        u = x[ri] + torch.einsum("hrd,hde->re", o.to(dt), wo) + b_o  # (r, E): the residual stream after attention
        if post:
            s = torch.sqrt(u.var(-1, unbiased=False, keepdim=True) + parts.ln_eps)  # (r, 1): LN's own scale
            y = gamma * (u - u.mean(-1, keepdim=True)) / s + beta  # (r, E): the block's output, LN(u)
        else:
            s = torch.ones(r, 1, dtype=dt, device=dev)
            y = u
        # a_ij = P[:, i, j] / s_i: the 1/s_i is taken out of every product below (no pass over P for it), and the keys
        # brought first by one 2-D transpose (H, r·N) -> (r·N, H), ~2.5x quicker than a 3-D permute; A is its
        # (N, r, Hq) view (strided: each key's (r, Hq) matrix has row stride N·Hq, which bmm takes as it is)
        own = xc[ri]  # (r, E): the residual's transformed vector on j = i, times s_i
        rr = torch.arange(r, device=dev)
        if method == "alti":
            y1 = y.abs().sum(-1)  # (r,): ‖y_i‖₁
            ys = y * s  # (r, E): s_i y_i, so that s_i (y_i − T_i(x_j)) = s_i y_i − Σ_h P_hij f̃_hj (− own on j = i)
            A = P.reshape(Hq, r * n).T.contiguous().view(r, n, Hq).transpose(0, 1)  # (N, r, Hq): P_hij, keys first
            c_step = key_chunk or max(1, (TILE_ELEMS // 2) // max(1, r * E))  # (c, r, E): ~2 Mi elements
            buf = torch.empty(min(c_step, n), r, E, dtype=dt, device=dev)  # reused: no allocation per key tile
            Ct = torch.empty(n, r, dtype=dt, device=dev)  # keys first: each tile's sums land contiguous
            for c0 in range(0, n, c_step):
                c1 = min(n, c0 + c_step)
                D = torch.bmm(A[c0:c1], fk[c0:c1], out=buf[:c1 - c0])  # (c, r, E): Σ_h P_hij f̃_hj
                k = [t for t, i in enumerate(tile) if c0 <= i < c1]  # the residual: j = i
                if k:  # D[i − c0, t] += own[t], one index_add_ on the flat (c · r, E) view
                    at = torch.tensor([(tile[t] - c0) * r + t for t in k], device=dev)
                    D.view(-1, E).index_add_(0, at, own[k])
                D.sub_(ys)  # s_i (T_i(x_j) − y_i), in place (the sign does not change the L1 norm)
                torch.sum(D.abs_(), dim=-1, out=Ct[c0:c1])  # s_i d_ij = s_i ‖y_i − T_i(x_j)‖₁
            C = (y1[:, None] - Ct.T / s).clamp_(min=0)
            none = (P == 0).all(0)  # (r, N): T_i(x_j) = 0 (no weight, j ≠ i): exactly 0, not ‖y‖₁ − ‖y‖₁'s rounding
            none[rr, ri] = False
            C[none] = 0.0
        else:
            # s_i² ‖T_i(x_j)‖² = Σ_h Σ_g P_hij P_gij G_j[h, g] (j ≠ i): H (H + 1) / 2 element-wise passes over the
            # (r, N) weight rows as they come (G symmetric), no transpose and no per-key small matmuls
            C = torch.zeros(r, n, dtype=dt, device=dev)
            tmp = torch.empty(r, n, dtype=dt, device=dev)
            for h in range(Hq):
                C.addcmul_(torch.mul(P[h], P[h], out=tmp), gram[h, h])
                for g in range(h + 1, Hq):
                    C.addcmul_(torch.mul(P[h], P[g], out=tmp), gram[h, g], value=2)
            C[rr, ri] += 2 * (P[:, rr, ri].T * cross[ri]).sum(-1) + xx[ri]  # j = i: + 2 P·(f̃ · x̃) + ‖x̃‖²
            C = (C / s.square()).clamp_(min=0).sqrt_()
        if normalize:
            tot = C.sum(-1, keepdim=True)
            C = torch.where(tot > 0, C / torch.where(tot > 0, tot, 1), torch.zeros_like(C))
        yield tile, as_numpy(C)
