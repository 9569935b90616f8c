"""Ring attention over ``torch.distributed``, with the lens.

Context parallelism: every rank of a process group holds a shard of the sequence — its queries
and its keys/values — and the K/V shards travel around the ring of ranks, one hop per step. A
rank attends its queries to each K/V block as it passes, while the next block is already in
flight (non-blocking ``isend``/``irecv``), and merges the partial results exactly through
their log-sum-exp:

    lse = log Σ_b exp(lse_b)             w_b = exp(lse_b - lse)      (the block's share of row i)
    out = Σ_b w_b · out_b                 (out_b: attention over block b alone)
    max_weight = max_b w_b · max_weight_b
    entropy    = Σ_b w_b (H_b - log w_b)  = lse - Σ_b w_b (lse_b - H_b)
    top-k      = top-k of ∪_b (w_b · topk_weights_b), with global key indices

``received`` (the column sums ``Σ_i p_ij``) needs every query's *global* ``lse`` before any
weight ``p_ij = exp(s_ij - lse_i)`` is known, so it takes a second ring pass in which the
queries and their ``lse`` travel and each rank sums the weights of its own keys.

The backward pass is a ring too: K/V blocks travel again, each accompanied by its dK/dV
accumulator, and every rank adds the contribution of its queries, recomputing the weights
from the saved global ``lse`` (``dS = P ∘ (dP - D_i)``, ``D_i = rowsum(dO ∘ O)`` with the final
``O``); after a full turn each accumulator arrives back at the rank that owns the block.

Memory per rank is O(N_local): the shards, the K/V block in use and the one in flight, in the
backward three dK/dV accumulators (the one being computed, the one being sent, the one being
received — what lets the gradient transfer hide behind the compute) and dQ, which the block compute
adds into in place; plus the block compute's own bounded workspace (the torch backend's two chunk
buffers; the Triton kernels' tiles), which does not shrink with the world size — never an N × N or N_local × N_local matrix. Because of
the buffers in flight a rank holds about twice as many N_local-sized tensors as one process does at
the same length, so the N-dependent part of the peak halves from world 2 to 4 but not from 1 to 2
(benchmarks/results/distributed-2026-11-22.md).

Positions are global. Causal attention and windows compare the global position of a query
with that of a key, whatever rank holds them: bottom-right alignment over the *whole*
sequence, exactly as `attnlens.attention` on the unsharded tensors. With the zigzag layout
(``layout="zigzag"``) each rank holds chunk ``r`` and chunk ``2·world−1−r`` of ``2·world``
equal chunks, so causal work is balanced; `shard` / `unshard` / `gather` move between layouts.

    import torch.distributed as dist
    from attnlens.distributed import ring_attention, shard, gather
    dist.init_process_group("gloo")                   # "nccl" on GPUs
    r, w = dist.get_rank(), dist.get_world_size()
    q, k, v = (shard(x, r, w, "zigzag") for x in (Q, K, V))     # (B, H, N_local, D) each
    out, res = ring_attention(q, k, v, causal=True, layout="zigzag", lens=True)
    full = gather(out, layout="zigzag")               # (B, H, N, D) on every rank
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..core import FLOAT_DTYPES, Block, Lens, Merger, differentiable, masks, stat_dtype
from ..core.masks import band

__all__ = ["ring_attention", "shard", "unshard", "gather", "chunk_sizes", "LAYOUTS"]

LAYOUTS = ("contiguous", "zigzag")
_TAG_KV, _TAG_GRAD, _TAG_Q = 11, 12, 13


# ------------------------------------------------------------------------------------------------
# layouts

def chunk_sizes(n: int, parts: int) -> list[int]:
    """Lengths of ``parts`` near-equal chunks of ``n`` (the first ``n % parts`` one longer), as
    ``torch.tensor_split`` cuts them."""
    return [n // parts + (1 if c < n % parts else 0) for c in range(parts)]


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _zigzag_chunks(rank: int, world: int) -> tuple[int, int]:
    return rank, 2 * world - 1 - rank


def shard(x: torch.Tensor, rank: int, world: int, layout: str = "contiguous", dim: int = -2) -> torch.Tensor:
    """The part of the full sequence ``x`` that rank ``rank`` of ``world`` holds, along ``dim``
    (the sequence dim, ``-2`` for ``(B, H, N, D)``).

    ``"contiguous"``: rank r holds the r-th of ``world`` near-equal pieces (a view).
    ``"zigzag"``: the sequence is cut into ``2·world`` near-equal chunks and rank r holds chunks
    ``r`` and ``2·world−1−r``, concatenated (a copy) — under causal attention every rank then
    does the same amount of work. Any contiguous split with uneven lengths also works with
    `ring_attention`; the zigzag split must be this one.
    """
    _check_layout(layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    n, parts = x.shape[dim], world if layout == "contiguous" else 2 * world
    if n < parts:
        raise ValueError(f"shard: a sequence of {n} positions (x of shape {tuple(x.shape)}, dim {dim}) cannot give each "
                         f"of {world} ranks a non-empty {layout} shard: it needs at least {parts} positions")
    if layout == "contiguous":
        return torch.tensor_split(x, world, dim=dim)[rank]
    parts = torch.tensor_split(x, 2 * world, dim=dim)
    a, b = _zigzag_chunks(rank, world)
    return torch.cat([parts[a], parts[b]], dim=dim)


def unshard(shards, layout: str = "contiguous", dim: int = -2) -> torch.Tensor:
    """The full sequence from the list of every rank's shard (rank order), inverse of `shard`."""
    _check_layout(layout)
    shards = list(shards)
    if layout == "contiguous":
        return torch.cat(shards, dim=dim)
    world = len(shards)
    n = sum(s.shape[dim] for s in shards)
    sizes = chunk_sizes(n, 2 * world)
    chunks = [None] * (2 * world)
    for r, s in enumerate(shards):
        a, b = _zigzag_chunks(r, world)
        if s.shape[dim] != sizes[a] + sizes[b]:
            raise ValueError(f"zigzag shard of rank {r} has length {s.shape[dim]} along dim {dim}; a sequence of "
                             f"{n} split over {world} ranks puts {sizes[a]} + {sizes[b]} there")
        chunks[a], chunks[b] = torch.split(s, [sizes[a], sizes[b]], dim=dim)
    return torch.cat(chunks, dim=dim)


def gather(x: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = -2) -> torch.Tensor:
    """All-gather every rank's shard ``x`` (uneven lengths along ``dim`` allowed) and `unshard`
    them: the full sequence on every rank. O(N) memory — for checks and small tensors."""
    _check_layout(layout)
    _require_group(group)
    world = dist.get_world_size(group)
    dim = dim % x.ndim
    n = torch.tensor([x.shape[dim]], dtype=torch.int64, device=x.device)
    lens = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(lens, n, group=group)
    lens = [int(t.item()) for t in lens]
    pad = list(x.shape)
    pad[dim] = max(lens) - x.shape[dim]
    xp = torch.cat([x, x.new_zeros(pad)], dim=dim).contiguous()
    bufs = [torch.empty_like(xp) for _ in range(world)]
    dist.all_gather(bufs, xp, group=group)
    return unshard([b.narrow(dim, 0, m) for b, m in zip(bufs, lens)], layout, dim=dim)


# ------------------------------------------------------------------------------------------------
# the ring

def _require_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("ring_attention needs an initialised torch.distributed process group: call "
                         "torch.distributed.init_process_group('gloo' or 'nccl', ...) first (group=None uses "
                         "the default group)")


class _Ring:
    """Neighbours in the ring of ``group`` and non-blocking exchanges with them."""

    def __init__(self, group):
        self.group = group
        g = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = dist.get_global_rank(g, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(g, (self.rank - 1) % self.world)

    def _fail(self, what, err):
        return RuntimeError(
            f"ring_attention: rank {self.rank} of {self.world} could not {what} (send to rank "
            f"{(self.rank + 1) % self.world}, receive from rank {(self.rank - 1) % self.world}): another rank "
            f"probably raised or exited, or the process group's timeout expired. Cause: {type(err).__name__}: {err}")

    def exchange(self, send: list, recv: list, tag: int, what: str):
        """Post: send ``send`` to the next rank, receive ``recv`` from the previous one. Returns the works."""
        ops = [dist.P2POp(dist.isend, t, peer=self.next, group=self.group, tag=tag) for t in send]
        ops += [dist.P2POp(dist.irecv, t, peer=self.prev, group=self.group, tag=tag) for t in recv]
        try:
            return dist.batch_isend_irecv(ops)
        except Exception as e:  # noqa: BLE001 - any backend error becomes one clear message
            raise self._fail(what, e) from e

    def wait(self, works, what: str):
        try:
            for w in works or ():
                w.wait()
        except Exception as e:  # noqa: BLE001
            raise self._fail(what, e) from e


# ------------------------------------------------------------------------------------------------
# agreeing on the call across ranks

_META = ("status", "B", "Hq", "Hkv", "Nq", "Nk", "D", "Dv", "rank (ndim)", "dtype", "causal", "layout", "window left",
         "window right", "scale", "lens", "topk", "requires_grad", "seqlens")


def _lens_code(lens: Optional[Lens]) -> tuple[int, int]:
    if lens is None:
        return 0, 0
    return 1 + lens.lse + 2 * lens.max_weight + 4 * lens.entropy + 8 * lens.received, lens.topk


@dataclass
class _Plan:
    """Everything a ring pass needs, the same on every rank (shapes, lengths, global positions)."""

    ring: _Ring
    causal: bool
    window: object
    scale: float
    lens: Optional[Lens]
    root: Block  # this rank's own block: its rules and the backend of every block's forward, column sums, backward
    B: int
    Hq: int
    Hkv: int
    D: int
    Dv: int
    nq: list  # query shard length of every rank
    nk: list  # key shard length of every rank
    qsegs: list  # per rank: [(local start, length, global position of the first)], queries
    ksegs: list  # per rank: the same for keys
    #: a padded batch: the global lengths ``(lq, lk)`` ``(B,)`` int64 and each sequence's offset minus the call's
    #: ``delta (B,)`` (``lk - lq - (Nk - Nq)``), on q's device; None otherwise
    seq: Optional[tuple] = None
    base: int = 0  # Nk - Nq (all ranks): the global key position of query 0
    spread: tuple = (0, 0)  # (min, max) of ``delta``: the blocks' trim covers every sequence's band

    def blocks(self, qrank: int, krank: int) -> list:
        """The `_Block` pairs of rank ``qrank``'s queries and rank ``krank``'s keys that hold a visible cell."""
        return _blocks(self.qsegs[qrank], self.ksegs[krank], self.causal, self.window, self.spread)

    def block(self, q, k, v, b: "_Block", lens=None) -> Block:
        """One block, queries ``[i0, i1)`` against keys ``[j0, j1)`` at the block's offset, on the chosen backend.
        In a padded batch each sequence's block has its own offset (``b.offset + delta``) and lengths: its queries
        from global index ``g0 = b.offset + b.koff - base`` on, its keys from ``b.koff`` on, cut at its lengths."""
        qb, kb, vb = q[:, :, b.i0:b.i1], k[:, :, b.j0:b.j1], v[:, :, b.j0:b.j1]
        if self.seq is None:
            return self.root.derive(qb, kb, vb, offset=b.offset, lens=lens)
        lq, lk, delta = self.seq
        g0 = b.offset + b.koff - self.base
        return self.root.derive(qb, kb, vb, offset=b.offset + delta, lens=lens,
                                seqlens_q=(lq - g0).clamp(0, b.i1 - b.i0),
                                seqlens_k=(lk - b.koff).clamp(0, b.j1 - b.j0))


def _segments(lengths: list, layout: str, what: str, offset: int = 0) -> list:
    """Per rank, the (local start, length, global position) of each run of consecutive positions."""
    world, n = len(lengths), sum(lengths)
    if layout == "contiguous":
        starts = [sum(lengths[:r]) for r in range(world)]
        return [[(0, lengths[r], starts[r] + offset)] for r in range(world)]
    sizes = chunk_sizes(n, 2 * world)
    starts = [sum(sizes[:c]) for c in range(2 * world)]
    segs = []
    for r in range(world):
        a, b = _zigzag_chunks(r, world)
        if lengths[r] != sizes[a] + sizes[b]:
            raise ValueError(
                f"ring_attention(layout='zigzag'): rank {r} holds {lengths[r]} {what}, but the zigzag layout of "
                f"{n} positions over {world} ranks gives it chunks {a} and {b} of lengths {sizes[a]} + {sizes[b]}; "
                f"cut the sequence with attnlens.distributed.shard(x, rank, world, 'zigzag') (all lengths: {lengths})")
        segs.append([(0, sizes[a], starts[a] + offset), (sizes[a], sizes[b], starts[b] + offset)])
    return segs


def _local_call(q, k, v, *, causal, window, scale, lens, layout, backend, varlen=False):
    """Check this rank's call: ``(its own block, lens, the call's shape as ints for _META)``. The block is chosen
    with the lens the blocks need (lse always: blocks merge through it) and block primitives — and, for a padded
    batch (``varlen``), per-sequence lengths; its backend runs every pass."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ring_attention: {name} must be a torch.Tensor (NumPy arrays cannot travel the "
                            f"ring), got {type(t).__name__}")
    _check_layout(layout)
    lens = Lens.coerce(lens)
    if lens is not None and lens.rows is not None:
        raise ValueError(f"ring_attention: Lens.rows={lens.rows!r} is not supported across ranks (full weight "
                         f"rows would span every rank's keys); use attnlens.attention on gathered tensors")
    for name in ("received_from", "at", "pool"):
        if lens is not None and getattr(lens, name) is not None:
            raise ValueError(f"ring_attention: Lens.{name} is not supported across ranks yet; use "
                             f"attnlens.attention on gathered tensors")
    nk = k.shape[-2] if k.ndim >= 2 else 1
    # a padded batch: the root block carries (local, full) lengths so that the backend chosen serves them
    seq = dict(seqlens_k=torch.full((q.shape[0] if q.ndim == 4 else 1,), nk)) if varlen else {}
    try:
        root = Block.build(q, k, v, causal=causal, window=window, scale=scale, lens=_block_lens(lens, nk),
                           backend=backend, primitives=True, **seq)
    except ValueError as e:
        raise ValueError(f"ring_attention: {e}") from None
    inp = root.inputs
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    wl, wr = inp.window if inp.window is not None else (None, None)
    lc, topk = _lens_code(lens)
    meta = [0, B, Hq, Hkv, Nq, Nk, D, Dv, inp.rank, FLOAT_DTYPES.index(inp.q.dtype), int(inp.causal),
            LAYOUTS.index(layout), -1 if wl is None else wl, -1 if wr is None else wr,
            struct.unpack("<q", struct.pack("<d", inp.scale))[0], lc, topk, int(inp.requires_grad), int(varlen)]
    return root, lens, meta


def _check_agreement(every: list) -> None:
    """Every rank's `_META` row: raise the same ValueError on every rank if one rejected its call or they differ."""
    bad = [r for r, m in enumerate(every) if m[0] != 0]
    if bad:
        raise ValueError(f"ring_attention: rank(s) {bad} rejected their inputs (see the error on those ranks); no rank "
                         f"ran the ring")
    for i, name in enumerate(_META):
        if name in ("Nq", "Nk"):
            continue
        vals = [m[i] for m in every]
        if len(set(vals)) != 1:
            shown = {r: _show(name, x) for r, x in enumerate(vals)}
            raise ValueError(f"ring_attention: ranks disagree on {name} ({shown} by rank); every rank must pass "
                             f"shards of one call: q (B, Hq, N_local, D), k and v (B, Hkv, N_local, D|Dv) with the "
                             f"same B, heads, head dims, dtype, causal, window, scale, lens and layout")


def _agree(q, k, v, *, group, causal, window, scale, lens, layout, backend, seqlens_q=None, seqlens_k=None):
    """Check the local call, exchange its shape with every rank, and agree (or fail on every rank alike)."""
    _require_group(group)
    ring = _Ring(group)
    err = None
    varlen = seqlens_q is not None or seqlens_k is not None
    try:
        root, lens, meta = _local_call(q, k, v, causal=causal, window=window, scale=scale, lens=lens,
                                       layout=layout, backend=backend, varlen=varlen)
    except (TypeError, ValueError) as e:
        err, meta = e, [1] + [0] * (len(_META) - 1)
    dev = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    mine = torch.tensor(meta, dtype=torch.int64, device=dev)
    every = [torch.empty_like(mine) for _ in range(ring.world)]
    try:
        dist.all_gather(every, mine, group=group)
    except Exception as e:  # noqa: BLE001
        raise ring._fail("exchange the shapes of the call with every rank (all_gather)", e) from e
    if err is not None:
        raise err
    every = [t.tolist() for t in every]
    _check_agreement(every)
    nq, nk = [m[4] for m in every], [m[5] for m in every]
    if lens is not None and lens.topk > sum(nk):
        raise ValueError(f"Lens.topk={lens.topk} is larger than the number of keys N={sum(nk)} (all ranks)")
    qsegs = _segments(nq, layout, "queries", sum(nk) - sum(nq))  # bottom-right over the whole sequence
    ksegs = _segments(nk, layout, "keys")
    inp = root.inputs
    B, Hq, Hkv, _, _, D, Dv = inp.shape
    plan = _Plan(ring=ring, causal=inp.causal, window=inp.window, scale=inp.scale, lens=lens, root=root, B=B,
                 Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, nq=nq, nk=nk, qsegs=qsegs, ksegs=ksegs, base=sum(nk) - sum(nq))
    if varlen:
        lq, lk = _agree_seqlens(ring, seqlens_q, seqlens_k, B, sum(nq), sum(nk), inp.q.device)
        delta = lk - lq - plan.base
        plan.seq, plan.spread = (lq, lk, delta), (int(delta.min()), int(delta.max()))
    return inp, plan


def _agree_seqlens(ring, seqlens_q, seqlens_k, B: int, NQ: int, NK: int, dev):
    """The global lengths ``(lq, lk)`` ``(B,)`` int64, checked on every rank against the whole sequence's lengths
    (``masks.SeqLens.check``) and equal on every rank — or the same ValueError on every rank."""
    err = None
    try:
        sl = masks.SeqLens.check(seqlens_q, seqlens_k, B, NQ, NK, dev)
        mine = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), sl.q, sl.k])
    except (TypeError, ValueError) as e:
        err, mine = e, torch.cat([torch.ones(1, dtype=torch.int64, device=dev),
                                  torch.zeros(2 * B, dtype=torch.int64, device=dev)])
    every = [torch.empty_like(mine) for _ in range(ring.world)]
    try:
        dist.all_gather(every, mine, group=ring.group)
    except Exception as e:  # noqa: BLE001
        raise ring._fail("exchange seqlens_q / seqlens_k with every rank (all_gather)", e) from e
    if err is not None:
        raise ValueError(f"ring_attention: {err}") from None
    bad = [r for r, t in enumerate(every) if int(t[0]) != 0]
    if bad:
        raise ValueError(f"ring_attention: rank(s) {bad} rejected seqlens_q / seqlens_k (see the error on those "
                         f"ranks); no rank ran the ring")
    if any(not torch.equal(t, mine) for t in every):
        shown = {r: (t[1:B + 1].tolist(), t[B + 1:].tolist()) for r, t in enumerate(every)}
        raise ValueError(f"ring_attention: ranks disagree on (seqlens_q, seqlens_k) ({shown} by rank); they are the "
                         f"lengths of the whole sequences, the same on every rank")
    return mine[1:B + 1], mine[B + 1:]


def _show(name, x):
    if name == "lens":
        if x == 0:
            return "None"
        x -= 1
        on = [f for i, f in enumerate(("lse", "max_weight", "entropy", "received")) if x >> i & 1]
        return f"Lens({', '.join(on) or 'no fields'})"
    if name == "dtype":
        return str(FLOAT_DTYPES[x])
    if name == "scale":
        return struct.unpack("<d", struct.pack("<q", x))[0]
    if name == "layout":
        return LAYOUTS[x]
    return x




# ------------------------------------------------------------------------------------------------
# which (query, key) blocks hold a visible cell

@dataclass
class _Block:
    """Query rows [i0, i1) of a query shard against keys [j0, j1) of a key shard; query i0 sits at key
    position ``offset`` relative to key j0 (the global relation, whatever ranks hold them); ``koff`` = the
    global index of key j0 (for top-k)."""

    i0: int
    i1: int
    j0: int
    j1: int
    offset: int
    koff: int


def _blocks(qsegs, ksegs, causal, window, spread=(0, 0)) -> list:
    """The blocks of one (query shard × key shard) pair, trimmed to the rows that see a key of it and the
    keys that some row sees.

    Query i of a segment sits at global position ``qa + i``, key j at ``ka + j``: with ``d = qa - ka``
    query i sees key j iff ``i + d - L <= j <= i + d + R`` (``(L, R)`` the band, causal folded in) —
    exactly `attnlens.attention`'s rule with ``offset = d``, so every block goes to the backend whole.
    ``spread = (lo, hi)``: in a padded batch each sequence's offset is ``d + delta_b`` with ``lo <= delta_b <= hi``,
    and the trim keeps what any of them sees.
    """
    left, right = band(causal, window)
    dlo, dhi = spread
    out = []
    for qs, nq, qa in qsegs:
        for ks, nk, ka in ksegs:
            if nq == 0 or nk == 0:
                continue
            d = qa - ka
            # rows that see at least one key of the segment: i + d + R >= 0 and i + d - L <= nk - 1
            ia = 0 if right is None else max(0, -(d + dhi) - right)
            ib = nq - 1 if left is None else min(nq - 1, nk - 1 - (d + dlo) + left)
            if ia > ib:
                continue  # no query of this segment sees a key of that one (causal: the block is in the future)
            jlo = 0 if left is None else max(0, ia + d + dlo - left)
            jhi = nk - 1 if right is None else min(nk - 1, ib + d + dhi + right)
            out.append(_Block(qs + ia, qs + ib + 1, ks + jlo, ks + jhi + 1, d + ia - jlo, ka + jlo))
    return out


def _block_lens(lens: Optional[Lens], nk: int) -> Lens:
    """What a block computes: lse always (blocks merge through it), the row statistics asked, never received."""
    if lens is None:
        return Lens(lse=True, max_weight=False, entropy=False, received=False)
    return Lens(lse=True, max_weight=lens.max_weight, entropy=lens.entropy, received=False, topk=min(lens.topk, nk))


# ------------------------------------------------------------------------------------------------
# forward: K/V travel, partial results merge through their log-sum-exp

def _empty_block(plan: _Plan, k, v, n: int, dtype=None):
    """Receive buffers for a K/V-shaped pair of ``n`` positions."""
    return (k.new_empty(plan.B, plan.Hkv, n, plan.D, dtype=dtype), v.new_empty(plan.B, plan.Hkv, n, plan.Dv, dtype=dtype))


def _forward(plan: _Plan, q, k, v):
    """``out (B, Hq, Nq, Dv)`` in the compute dtype, the global ``lse (B, Hq, Nq)`` and the `Merger`."""
    ring = plan.ring
    r, W = ring.rank, ring.world
    cdt, dev = stat_dtype(q.dtype), q.device
    merged = Merger((plan.B, plan.Hq, q.shape[2], plan.Dv), q.shape[2], plan.lens, cdt, dev)
    kb, vb = k.contiguous(), v.contiguous()  # the block we hold: our own first
    for step in range(W):
        src = (r - step) % W  # the rank whose K/V block we hold now
        works, nxt = None, None
        if step < W - 1:  # post the next hop before computing on this block
            nxt = _empty_block(plan, kb, vb, plan.nk[(r - step - 1) % W])
            works = ring.exchange([kb, vb], list(nxt), _TAG_KV, f"pass K/V blocks at ring step {step}")
        for b in plan.blocks(r, src):
            o, _, res = plan.block(q, kb, vb, b, lens=_block_lens(plan.lens, b.j1 - b.j0)).forward()
            merged.add(o, res, b.koff, b.i0, b.i1)
            del o, res
        ring.wait(works, f"pass K/V blocks at ring step {step}")
        works = None
        if nxt is not None:
            kb, vb = nxt
            nxt = None
    return merged.out, merged.lse, merged


def _received(plan: _Plan, q, k, v, lse):
    """Second ring pass: queries and their global lse travel; each rank sums the weights of its keys."""
    ring = plan.ring
    r, W = ring.rank, ring.world
    cdt, dev = lse.dtype, q.device
    rec = torch.zeros(plan.B, plan.Hq, k.shape[2], dtype=cdt, device=dev)
    qb, lb = q.contiguous(), lse.contiguous()
    for step in range(W):
        src = (r - step) % W  # the rank whose queries we hold now
        works, nxt = None, None
        if step < W - 1:
            n = plan.nq[(r - step - 1) % W]
            nxt = (qb.new_empty(plan.B, plan.Hq, n, plan.D), lb.new_empty(plan.B, plan.Hq, n))
            works = ring.exchange([qb, lb], list(nxt), _TAG_Q, f"pass queries for 'received' at ring step {step}")
        for b in plan.blocks(src, r):
            rec[..., b.j0:b.j1] += plan.block(qb, k, v, b).column_sums(lb[..., b.i0:b.i1]).to(cdt)
        ring.wait(works, f"pass queries for 'received' at ring step {step}")
        works = None
        if nxt is not None:
            qb, lb = nxt
            nxt = None
    return rec


# ------------------------------------------------------------------------------------------------
# backward: K/V travel again, each with its dK/dV accumulator, and come home with the gradient

def _backward(plan: _Plan, q, k, v, out, lse, dout, dlse=None):
    ring = plan.ring
    r, W = ring.rank, ring.world
    cdt, dev = stat_dtype(q.dtype), q.device
    dq = torch.zeros(plan.B, plan.Hq, q.shape[2], plan.D, dtype=cdt, device=dev)
    kb, vb = k.contiguous(), v.contiguous()
    acc_works, acc_in, sent = None, None, None
    free: list = []  # (dK, dV)-shaped pairs whose transfer is over, reused as buffers (even shards: no allocation)

    def pair(n):
        for i, (a, b) in enumerate(free):
            if a.shape[2] == n:
                del free[i]
                return a, b
        return (torch.empty(plan.B, plan.Hkv, n, plan.D, dtype=cdt, device=dev),
                torch.empty(plan.B, plan.Hkv, n, plan.Dv, dtype=cdt, device=dev))

    for step in range(W):
        src = (r - step) % W
        works, nxt = None, None
        if step < W - 1:
            nxt = _empty_block(plan, kb, vb, plan.nk[(r - step - 1) % W])
            works = ring.exchange([kb, vb], list(nxt), _TAG_KV, f"pass K/V blocks (backward) at ring step {step}")
        dk, dv = (t.zero_() for t in pair(kb.shape[2]))  # this rank's share of block src's dK, dV
        for b in plan.blocks(r, src):
            # the global lse gives the true weights p_ij; the final out gives D_i = rowsum(dO ∘ O); the
            # gradients are added straight into the rank's dQ and block src's dK/dV (no per-block copies)
            plan.block(q, kb, vb, b).backward(out[:, :, b.i0:b.i1], lse[:, :, b.i0:b.i1], dout[:, :, b.i0:b.i1],
                                              dq[:, :, b.i0:b.i1], dk[:, :, b.j0:b.j1], dv[:, :, b.j0:b.j1],
                                              dlse=None if dlse is None else dlse[:, :, b.i0:b.i1])
        if W > 1:
            if step > 0:  # what the ranks before us added to block src
                ring.wait(acc_works, f"pass dK/dV accumulators at ring step {step - 1}")
                acc_works = None
                dk += acc_in[0]
                dv += acc_in[1]
                free += [acc_in, sent]
            # on to the next rank, which holds block src at the next step (the owner after the last step)
            acc_in = pair(plan.nk[(r - step - 1) % W])
            acc_works = ring.exchange([dk, dv], list(acc_in), _TAG_GRAD,
                                      f"pass dK/dV accumulators at ring step {step}")
            sent = (dk, dv)
            del dk, dv
        ring.wait(works, f"pass K/V blocks (backward) at ring step {step}")
        works = None
        if nxt is not None:
            kb, vb = nxt
            nxt = None
    if W > 1:
        ring.wait(acc_works, f"receive this rank's dK/dV at ring step {W - 1}")
        dk, dv = acc_in
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingOp:
    """The ring's passes as `attnlens.core.differentiable` drives them (the one autograd wrapper)."""

    def __init__(self, plan: _Plan, q, k, v):
        self.plan, self.q, self.k, self.v = plan, q, k, v

    def forward(self):
        q, k, v = self.q.detach(), self.k.detach(), self.v.detach()
        out, lse, merged = _forward(self.plan, q, k, v)
        return out.to(q.dtype), lse, merged.result(self.plan.lens)

    def gradients(self, out, lse, dout, dlse=None):
        return _backward(self.plan, self.q.detach(), self.k.detach(), self.v.detach(), out, lse, dout, dlse)


def ring_attention(q, k, v, *, group=None, causal=False, window=None, scale=None, lens=None, seqlens_q=None,
                   seqlens_k=None, layout="contiguous", backend="auto"):
    """Exact attention over a sequence sharded across the ranks of a process group (ring attention).

    Every rank of ``group`` calls it at the same time with its own shard; the result on each rank
    is its shard of ``attnlens.attention(Q, K, V, ...)`` of the full, unsharded tensors — to
    round-off, with gradients and lens.

    Args:
        q: this rank's queries ``(B, Hq, N_local, D)`` (also ``(H, N_local, D)``, ``(N_local, D)``),
            a torch tensor of float16/bfloat16/float32/float64 on the device the process group
            communicates on (CPU for gloo, this rank's GPU for NCCL).
        k, v: this rank's keys ``(B, Hkv, Nk_local, D)`` and values ``(B, Hkv, Nk_local, Dv)``;
            ``Hq % Hkv == 0`` (grouped-query attention). ``N_local`` may differ between ranks
            (uneven shards, ``layout="contiguous"``); everything else — B, heads, head dims, dtype
            and every keyword argument — must be the same on every rank (checked: every rank
            raises the same ``ValueError`` otherwise).
        group: the process group (``None`` = the default one). Ring order = rank order in the group.
        layout: how the full sequence is cut.
            ``"contiguous"``: rank r holds positions ``[Σ_{s<r} N_s, Σ_{s<=r} N_s)`` — consecutive
            ranks hold consecutive pieces, of any lengths.
            ``"zigzag"``: the sequence is cut into ``2·world`` near-equal chunks (``chunk_sizes``)
            and rank r holds chunks ``r`` and ``2·world−1−r`` concatenated, so under ``causal``
            every rank has the same work. Use `shard` / `unshard` / `gather`. Queries and keys are
            each cut by this rule::

                world = 2, 8 positions:   chunks  [0 1][2 3][4 5][6 7]
                                          rank 0:  0 1 6 7    rank 1:  2 3 4 5

        causal: in *global* positions, bottom-right aligned over the whole sequence as in
            `attnlens.attention`: query i of Nq (all ranks) sees key j of Nk iff
            ``j <= i + (Nk - Nq)``, whichever ranks hold them. Each (query shard, key block) pair
            is one block call at the offset that makes the block's relation the global one; a block
            entirely in a query's future is skipped.
        window: ``(left, right)`` or an int, in global positions as in `attnlens.attention`.
        seqlens_q, seqlens_k: a padded batch (``(B,)`` ints, the same on every rank), as in `attnlens.attention` but
            for the *whole* sequences: sequence b's queries are global positions ``[0, seqlens_q[b])`` and its keys
            ``[0, seqlens_k[b])`` (natural order, also under zigzag), each sequence bottom-right at its own offset
            ``seqlens_k[b] - seqlens_q[b]``; padded rows are dead, padded keys receive 0. Each block gets the
            sequences' offsets and lengths cut to its global positions.
        scale: multiplies the scores; default ``1 / sqrt(D)``.
        lens: ``None`` → return the output only; ``True`` / an `attnlens.Lens` → ``(out, LensResult)``
            with, for this rank (``Lens.rows`` is not supported here):

            - ``lse``, ``max_weight``, ``entropy`` ``(B, Hq, N_local)``: of this rank's queries
              over *all* keys of all ranks (merged exactly, see the module docstring);
            - ``topk_indices``, ``topk_weights`` ``(B, Hq, N_local, k)``: the k largest weights of
              this rank's queries over all keys; indices are *global* key positions in the full,
              unsharded sequence (in natural order, also under zigzag), -1 where the weight is 0;
            - ``received`` ``(B, Hq, Nk_local)``: for this rank's *keys*, the weight they receive
              summed over *every rank's* queries (a second ring pass; skipped unless asked).
        backend: the `attnlens` backend (a name or a backend object) that runs all three passes —
            each block's forward, the ``received`` column sums and the backward — through its block
            primitives: ``"auto"`` takes the Triton kernels for CUDA tensors they serve and the
            chunked torch backend on the CPU.

    Returns:
        ``out`` (this rank's shard of the output, ``q``'s shape with ``Dv`` last, ``q``'s dtype),
        or ``(out, LensResult)``. Differentiable: the backward is one ring pass, so every rank
        must run it (``loss.backward()`` on all ranks); it gives each rank dQ for its queries and
        dK/dV for its keys, equal to the gradients of single-process attention. For float16 /
        bfloat16 the blocks' outputs come back in that dtype and merge in float32 (statistics,
        lse and gradient accumulators are float32), so the result can differ from single-process
        attention by about one rounding of the output dtype.

    Raises:
        ValueError / TypeError for a bad call on any rank — every rank raises (no hang): bad
        shapes or dtypes, ranks that disagree, no initialised process group, a zigzag shard of the
        wrong length, a backend that cannot serve the blocks. RuntimeError naming this rank and its
        neighbours when a transfer fails (another rank raised or exited, or the process group's
        ``timeout`` expired).

    Memory per rank is O(N_local): shards, two blocks in flight, the block compute's workspace.
    """
    inp, plan = _agree(q, k, v, group=group, causal=causal, window=window, scale=scale, lens=lens, layout=layout,
                       backend=backend, seqlens_q=seqlens_q, seqlens_k=seqlens_k)
    op = _RingOp(plan, inp.q, inp.k, inp.v)
    if inp.requires_grad:
        out, lse, res = differentiable(op, inp.q, inp.k, inp.v)
    else:
        out, lse, res = op.forward()
    lead = 4 - inp.rank
    out = out.reshape(out.shape[lead:])
    if plan.lens is None:
        return out
    if plan.lens.received:
        with torch.no_grad():
            res.received = _received(plan, inp.q.detach(), inp.k.detach(), inp.v.detach(), lse.detach())
    # the lse keeps its gradient (as attention()'s does); the other lens fields carry none
    return out, res.map_arrays(lambda t: (t if t is res.lse else t.detach()).reshape(t.shape[lead:]))
