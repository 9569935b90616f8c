"""``torch.nn`` modules on top of `attnlens.attention`, and `capture()` to see inside a model.

- `MultiHeadAttention`: projections + `attention()` + output projection (GQA/MQA, causal,
  sliding window, padding); a drop-in for ``torch.nn.MultiheadAttention(batch_first=True)``.
- `TransformerBlock`: attention, residual, LayerNorm, feed-forward, residual (pre- or post-norm).
- `AdditiveAttention`: Bahdanau et al. 2015, ``score(s, h_j) = vᵀ tanh(W_q s + W_k h_j)``.
- `capture(model)`: a ``with`` block that records a `LensResult` for every attention call
  inside ``model`` while the model returns its normal outputs.

Every dot-product attention here goes through `attnlens.attention` (one way to do things), by
way of the capture core `attnlens.integrations.capture.attend` shared with `attnlens.hf`; only
`AdditiveAttention` writes its own math, because its scores are not dot products.
"""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core import Lens, check_dropout, check_softcap
from ..core.masks import alibi_slopes, normalize_window
from .capture import Record, Recorder, activate, attend

__all__ = ["MultiHeadAttention", "TransformerBlock", "AdditiveAttention", "capture", "Capture", "CaptureRecord"]


def _check_int(name: str, val, lo: int = 1) -> int:
    if isinstance(val, bool) or not isinstance(val, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {lo}, got {type(val).__name__} {val!r}")
    if val < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {val}")
    return int(val)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention: project, attend with `attnlens.attention`, project.

    ::

        q = query W_qᵀ + b_q   (B, Nq, E)  -> (B, H,   Nq, E/H)
        k = key   W_kᵀ + b_k   (B, Nk, kdim) -> (B, Hkv, Nk, E/H)
        v = value W_vᵀ + b_v   (B, Nk, vdim) -> (B, Hkv, Nk, E/H)
        y = attention(q, k, v)               -> (B, H, Nq, E/H) -> heads side by side (B, Nq, E)
        out = y W_oᵀ + b_o                   (B, Nq, E)

    Row i of each head's output is a convex combination of that head's value rows (see
    `attnlens.attention`). With ``num_kv_heads == num_heads`` and copied weights this equals
    ``torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)``
    (``in_proj_weight`` = ``[q_proj; k_proj; v_proj]``), except that a query that may see no
    key gets output ``out_proj.bias`` (attention 0) instead of NaN.

    Args:
        embed_dim: E, the size of the query (and output) vectors.
        num_heads: H query heads; ``embed_dim % num_heads == 0``, head dim ``E / H``.
        num_kv_heads: Hkv key/value heads (default H). ``num_heads % num_kv_heads == 0``:
            grouped-query attention (1 = multi-query). The k/v projections produce
            ``Hkv · E/H`` features; query head h uses kv head ``h // (H / Hkv)``.
        kdim, vdim: sizes of the key and value vectors (default E), for cross-attention
            from another space.
        bias: add biases in the four projections.
        dropout: probability of dropping an attention weight, applied in training mode only.
        causal: each query sees only keys at or before its position, bottom-right aligned
            (query i sees key j iff ``j <= i + Nk - Nq``, as in `attnlens.attention`).
        window: sliding window ``(left, right)`` or int w, as in `attnlens.attention`.
        batch_first: inputs and outputs are ``(B, N, E)`` (default); False means ``(N, B, E)``.
            Lens fields are always ``(B, H, ...)``.
        softcap: logit soft-capping ``c·tanh(s/c)`` of the scores (Gemma 2), or None.
        sinks: ``True`` creates a learned parameter ``self.sinks (H,)`` (zeros): one sink logit per head,
            as in gpt-oss (see `attnlens.attention`); the lens then has ``sink_weight``.
        alibi: ``True`` adds ALiBi biases with the standard slopes (`attnlens.masks.alibi_slopes`, a buffer
            ``self.alibi_slopes``); or a tensor of ``H`` slopes.

    Projections use ``nn.Linear``'s default initialisation.
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None, bias=True, dropout=0.0,
                 causal=False, window=None, batch_first=True, softcap=None, sinks=False, alibi=False):
        super().__init__()
        embed_dim = _check_int("embed_dim", embed_dim)
        num_heads = _check_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, "
                             f"num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else _check_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads must be a multiple of num_kv_heads (grouped-query attention), got "
                             f"num_heads={num_heads}, num_kv_heads={num_kv_heads}")
        kdim = embed_dim if kdim is None else _check_int("kdim", kdim)
        vdim = embed_dim if vdim is None else _check_int("vdim", vdim)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim, vdim
        self.dropout = check_dropout(dropout, "dropout")
        self.causal = causal
        self.window = normalize_window(window)
        self.batch_first = bool(batch_first)
        self.softcap = check_softcap(softcap)
        if not isinstance(sinks, bool):
            raise TypeError(f"sinks must be a bool (True creates a learned sink logit per head), got "
                            f"{type(sinks).__name__} {sinks!r}")
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None
        if isinstance(alibi, bool):
            slopes = alibi_slopes(num_heads) if alibi else None
        elif isinstance(alibi, torch.Tensor) and alibi.shape == (num_heads,) and alibi.is_floating_point():
            slopes = alibi.detach().clone()
        else:
            raise TypeError(f"alibi must be a bool or a float tensor of shape ({num_heads},) (one slope per head), got "
                            f"{type(alibi).__name__} {getattr(alibi, 'shape', alibi)!r}")
        self.register_buffer("alibi_slopes", slopes)
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, kv_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.causal:
            s += ", causal=True"
        if self.window is not None:
            s += f", window={self.window}"
        if not self.batch_first:
            s += ", batch_first=False"
        if self.softcap is not None:
            s += f", softcap={self.softcap}"
        if self.sinks is not None:
            s += ", sinks=True"
        if self.alibi_slopes is not None:
            s += ", alibi=True"
        return s

    def forward(self, query, key=None, value=None, *, key_padding_mask=None, attn_mask=None, lens=None):
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: ``(B, Nq, E)``.
            key: ``(B, Nk, kdim)``; ``None`` = ``query`` (self-attention).
            value: ``(B, Nk, vdim)``; ``None`` = ``key``.
            key_padding_mask: bool ``(B, Nk)``, **True = padding** (this key may not be
                attended to) — PyTorch's ``nn.MultiheadAttention`` convention, the opposite of
                ``attn_mask``. ``~attnlens.masks.padding_mask(lengths, Nk)[:, 0, 0]`` gives it
                from lengths.
            attn_mask: attnlens semantics, **True = may attend**: bool, or float added to the
                scores (``-inf`` = may not attend), broadcastable to ``(B, H, Nq, Nk)``
                (e.g. ``(Nq, Nk)``). Combined with ``key_padding_mask``, ``causal``, ``window``.
            lens: ``None`` → return ``out``; ``True`` or an `attnlens.Lens` → ``(out, LensResult)``
                with fields ``(B, H, ...)`` describing the weights before dropout.

        Returns:
            ``out (B, Nq, E)`` (``(Nq, B, E)`` when ``batch_first=False``), or ``(out, LensResult)``.
        """
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, Nq, Nk = self._check_inputs(query, key, value)
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim

        q = self.q_proj(query).view(B, Nq, H, hd).transpose(1, 2)  # (B, H, Nq, hd)
        k = self.k_proj(key).view(B, Nk, Hkv, hd).transpose(1, 2)  # (B, Hkv, Nk, hd)
        v = self.v_proj(value).view(B, Nk, Hkv, hd).transpose(1, 2)  # (B, Hkv, Nk, hd)
        mask = _merge_masks(_keep_from_padding(key_padding_mask, B, Nk),
                            _check_attn_mask(attn_mask, (B, H, Nq, Nk)))  # True = may attend
        want = Lens.coerce(lens)
        # the caller's lens first, then those of the captures that watch this module (one attention() call)
        y, res = attend(self, q, k, v, lens=want, mask=mask, causal=self.causal, window=self.window,
                        dropout_p=self.dropout if self.training else 0.0, softcap=self.softcap, sinks=self.sinks,
                        alibi_slopes=self.alibi_slopes)  # (B, H, Nq, hd)

        y = y.transpose(1, 2).reshape(B, Nq, H * hd)  # (B, Nq, E): heads side by side
        out = self.out_proj(y)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out, res) if want is not None else out

    def _check_inputs(self, query, key, value):
        for name, t, d in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim != 3 or t.shape[-1] != d:
                layout = "(B, N, {})" if self.batch_first else "(N, B, {})"
                raise ValueError(f"{name} must have shape {layout.format(d)}, got {tuple(t.shape)}"
                                 + ("" if self.batch_first else " before moving the batch first"))
        B, Nq, _ = query.shape
        if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} "
                             f"must share the batch size, and key and value the length Nk (batch-first shapes)")
        return B, Nq, key.shape[1]


def _keep_from_padding(key_padding_mask, B: int, Nk: int):
    """PyTorch's ``(B, Nk)`` True = padding → attnlens' ``(B, 1, 1, Nk)`` True = may attend."""
    if key_padding_mask is None:
        return None
    m = key_padding_mask
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        what = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
        raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {what}")
    if tuple(m.shape) != (B, Nk):
        raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(B, Nk)}, got {tuple(m.shape)}")
    return ~m[:, None, None, :]  # (B, 1, 1, Nk)


def _check_attn_mask(attn_mask, target):
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        what = attn_mask.dtype if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
        raise TypeError(f"attn_mask must be a bool (True = may attend) or float (added to the scores) tensor, "
                        f"got {what}")
    shape = tuple(attn_mask.shape)
    if len(shape) > 4 or any(m not in (1, t) for m, t in zip(shape[::-1], target[::-1])):
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to (B, H, Nq, Nk) = {target}")
    return attn_mask


def _merge_masks(keep, attn_mask):
    """One attnlens mask from a bool keep-mask and a bool/float attn_mask (either may be None)."""
    if keep is None or attn_mask is None:
        return attn_mask if keep is None else keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return torch.where(keep, attn_mask, torch.full((), float("-inf"), dtype=attn_mask.dtype, device=attn_mask.device))


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class TransformerBlock(nn.Module):
    """Attention, residual, LayerNorm, feed-forward, residual — the block after attention that the
    Transformer stacks.

    ::

        norm_first=True (pre-norm, GPT-2)          norm_first=False (post-norm, the 2017 paper)
        x = x + drop(attn(ln1(x)))                 x = ln1(x + drop(attn(x)))
        x = x + drop(ff(ln2(x)))                   x = ln2(x + drop(ff(x)))

        ff(x) = Linear(E→F) → activation → Linear(F→E)

    The attention adds to each token a convex combination of (projected) tokens; the
    feed-forward then acts on every position on its own.

    Args:
        embed_dim: E.
        num_heads, num_kv_heads, causal, window: passed to `MultiHeadAttention`.
        ff_dim: F, the feed-forward hidden size (default ``4 * E``).
        dropout: probability used for the attention weights and for the two residual branches,
            in training mode only.
        norm_first: pre-norm (default) or post-norm.
        activation: ``"gelu"`` (default), ``"relu"``, or an ``nn.Module``.
    """

    def __init__(self, embed_dim, num_heads, *, ff_dim=None, num_kv_heads=None, dropout=0.0, norm_first=True,
                 causal=False, window=None, activation="gelu"):
        super().__init__()
        embed_dim = _check_int("embed_dim", embed_dim)
        ff_dim = 4 * embed_dim if ff_dim is None else _check_int("ff_dim", ff_dim)
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)} or an nn.Module, "
                                 f"got {activation!r}")
            activation = _ACTIVATIONS[activation]()
        elif not isinstance(activation, nn.Module):
            raise TypeError(f"activation must be one of {sorted(_ACTIVATIONS)} or an nn.Module, "
                            f"got {type(activation).__name__}")
        self.norm_first = bool(norm_first)
        self.attn = MultiHeadAttention(embed_dim, num_heads, num_kv_heads=num_kv_heads, dropout=dropout,
                                       causal=causal, window=window)
        self.ln1 = nn.LayerNorm(embed_dim)
        self.ln2 = nn.LayerNorm(embed_dim)
        self.ff = nn.Sequential(nn.Linear(embed_dim, ff_dim), activation, nn.Linear(ff_dim, embed_dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, *, key_padding_mask=None, attn_mask=None, lens=None):
        """``x (B, N, E)`` → ``(B, N, E)``, or ``(x, LensResult)`` of the attention when ``lens`` is given.

        ``key_padding_mask`` (bool ``(B, N)``, True = padding) and ``attn_mask`` (True = may attend)
        are as in `MultiHeadAttention.forward`.
        """
        lens = Lens.coerce(lens)
        kw = dict(key_padding_mask=key_padding_mask, attn_mask=attn_mask, lens=lens)
        if self.norm_first:
            a = self.attn(self.ln1(x), **kw)
            a, res = a if lens is not None else (a, None)
            x = x + self.drop(a)  # (B, N, E)
            x = x + self.drop(self.ff(self.ln2(x)))
        else:
            a = self.attn(x, **kw)
            a, res = a if lens is not None else (a, None)
            x = self.ln1(x + self.drop(a))  # (B, N, E)
            x = self.ln2(x + self.drop(self.ff(x)))
        return x if lens is None else (x, res)


class AdditiveAttention(nn.Module):
    """Additive attention of Bahdanau, Cho & Bengio (2015), "Neural Machine Translation by Jointly
    Learning to Align and Translate"::

        score(s, h_j) = vᵀ tanh(W_q s + W_k h_j)       (no biases, as in the paper)
        a_j           = softmax_j(score(s, h_j))       over the visible keys
        context       = Σ_j a_j h_j                    a convex combination of the annotations

    The decoder state ``s`` (query) picks how to crunch the encoder's annotations ``h_j`` (keys,
    which are also the values) down to one vector. The scores are not dot products, so this
    does not go through `attnlens.attention`.

    Args:
        query_dim: Dq, size of the query (decoder state) vectors.
        key_dim: Dk, size of the annotation vectors.
        hidden_dim: size of the alignment model's hidden layer.
    """

    def __init__(self, query_dim, key_dim, hidden_dim):
        super().__init__()
        self.query_dim = _check_int("query_dim", query_dim)
        self.key_dim = _check_int("key_dim", key_dim)
        self.hidden_dim = _check_int("hidden_dim", hidden_dim)
        self.w_q = nn.Linear(self.query_dim, self.hidden_dim, bias=False)
        self.w_k = nn.Linear(self.key_dim, self.hidden_dim, bias=False)
        self.v = nn.Linear(self.hidden_dim, 1, bias=False)

    def forward(self, query, keys, mask=None):
        """Attend from ``query`` to ``keys``.

        Args:
            query: ``(B, Dq)`` (one decoding step) or ``(B, Nq, Dq)``.
            keys: ``(B, Nk, Dk)``, the annotations (also the values).
            mask: bool ``(B, Nk)``, **True = may attend**. A query with no visible key gets
                weights 0 and context 0 (not NaN).

        Returns:
            ``(context, weights)``: ``(B, Dk)`` and ``(B, Nk)`` for a 2-D query,
            ``(B, Nq, Dk)`` and ``(B, Nq, Nk)`` for a 3-D query.
        """
        single = query.ndim == 2
        if query.ndim not in (2, 3) or query.shape[-1] != self.query_dim:
            raise ValueError(f"query must have shape (B, {self.query_dim}) or (B, Nq, {self.query_dim}), "
                             f"got {tuple(query.shape)}")
        if keys.ndim != 3 or keys.shape[-1] != self.key_dim or keys.shape[0] != query.shape[0]:
            raise ValueError(f"keys must have shape (B, Nk, {self.key_dim}) with B = {query.shape[0]} as in query, "
                             f"got {tuple(keys.shape)}")
        q = query[:, None] if single else query  # (B, Nq, Dq)
        s = self.v(torch.tanh(self.w_q(q)[:, :, None, :] + self.w_k(keys)[:, None, :, :]))  # (B, Nq, Nk, 1)
        s = s.squeeze(-1)  # (B, Nq, Nk)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = may attend), got "
                                f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
            if tuple(mask.shape) != (keys.shape[0], keys.shape[1]):
                raise ValueError(f"mask must have shape (B, Nk) = {tuple(keys.shape[:2])}, got {tuple(mask.shape)}")
            keep = mask[:, None, :]  # (B, 1, Nk)
            # a finite floor instead of -inf: a fully masked row stays finite (uniform), then * keep -> 0
            s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
            a = torch.softmax(s, dim=-1) * keep
        else:
            a = torch.softmax(s, dim=-1)  # (B, Nq, Nk), rows sum to 1
        context = a @ keys  # (B, Nq, Dk): Σ_j a_j h_j
        return (context[:, 0], a[:, 0]) if single else (context, a)


# ---------------------------------------------------------------------------------------------
# capture(): record a LensResult per attention call inside a module tree


@dataclass(frozen=True)
class CaptureRecord(Record):
    """One attention call seen by `capture`: the module's qualified ``name`` (from
    ``named_modules()`` of the captured module; ``""`` for the module itself), the call
    ``index`` (0, 1, ... in call order) and its ``result``."""


@dataclass
class Capture(Recorder):
    """What a `capture` block records: ``results``, a list of `CaptureRecord` in call order."""

    def record(self, call, result):
        self.results.append(CaptureRecord(self.names[call.module], len(self.results), result, self.kept(call)))


@contextlib.contextmanager
def capture(module, *, lens=None, keep_inputs: bool = True):
    """Within the block, every call of a `MultiHeadAttention` inside ``module`` records a `LensResult`.

    >>> with attnlens.nn.capture(model, lens=attnlens.Lens(topk=4)) as cap:
    ...     y = model(x)                        # y is the normal output, not a tuple
    >>> [(r.name, r.index) for r in cap.results]
    [('0.attn', 0), ('1.attn', 1)]

    Args:
        module: any ``nn.Module`` tree containing `MultiHeadAttention` instances.
        lens: the statistics to record; ``None`` or ``True`` = ``Lens()`` (the defaults).
        keep_inputs: keep each call's q, k, v (detached references to the tensors the layer made, so they
            stay alive: O(N · D) per layer, the size of its q, k and v) and mask, so ``record.ask(lens)``
            can recompute it with another lens. ``False`` frees them with the forward pass.

    Yields:
        a `Capture`; ``cap.results`` is a list of `CaptureRecord` (``.name``, ``.index``,
        ``.result``, ``.ask(lens)``) in call order. The model's outputs are the same as outside the block
        up to rounding (the lens needs the ``"torch"`` backend instead of ``"sdpa"``; in
        training mode with dropout, the random dropout masks differ too).

    The state lives in a ``contextvars.ContextVar``: it is restored on exit (also when the block
    raises), other threads and asyncio tasks do not see it, and nested captures each record the
    calls of their own module with their own lens.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    lens = Lens.coerce(True if lens is None else lens)
    if lens is None:
        raise TypeError("lens must be None, True, or an attnlens.Lens, got False")
    cap = Capture(lens=lens, keep_inputs=bool(keep_inputs))
    cap.names = {m: name for name, m in module.named_modules() if isinstance(m, MultiHeadAttention)}
    if not cap.names:
        raise ValueError(f"module ({type(module).__name__}) contains no attnlens.nn.MultiHeadAttention to capture")
    with activate(cap):
        yield cap
