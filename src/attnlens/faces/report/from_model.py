"""Running a Hugging Face model on a text for the report: `collect_any` → `collect` (encoders, decoders) or
`collect_seq2seq` (encoder-decoder models, with the decoder's cross-attention) → `attnlens.report.data.ReportData`.

The flow reads top-down: the notebook's `attnlens.explain` and the CLI's ``explain`` call `collect_any`, which
tokenizes, runs the model once under `attnlens.hf.capture` and hands the records to `data.from_records` (or builds
the data itself for a long input's pooled views); nothing here calls back up.

Full weight rows are captured when all layers' ``(H, N, N)`` fit in ``FULL_BYTES`` (always for MiniLM's 512
tokens: 75 MB; up to 965 tokens, where `attnlens explain` peaks at 1.36 GB: see ``FULL_BYTES``); beyond that,
nothing ``N × N`` is ever held: the capture keeps the lens statistics, top-k (the token view), pooled maps
(``Lens(pool=...)``: the layer × head grid) and each layer's inputs, and the rollout (pooled to the page's size, plus
exact rows) and the head scores are computed exactly from them (`attnlens.analysis`).

Encoder-decoder models run once with teacher forcing: the encoder reads ``text``, the decoder reads ``target``
(default: ``text``) shifted right behind the model's ``decoder_start_token_id``; the data's ``cross`` holds the
cross-attention ``{"tokens": decoder tokens, "weights": (L_dec, H, N_dec, N_enc) float32}``.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import numpy as np
import torch

from ... import analysis
from ...analysis.records import dense_view
from ...core import Lens
from .data import (
    DEFAULT_TOPK,
    FULL_BYTES,
    THUMB,
    ReportData,
    from_records,
    row_ids,
    set_contributions,
    set_rollout,
)

__all__ = ["collect_any", "collect", "collect_seq2seq", "tokenize", "model_max_length", "segments",
           "is_encoder_decoder", "is_cross_attention", "kv_view"]

_CROSS = re.compile(r"encoder_attn|encdecattention|crossattention|cross_attn", re.I)


def is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def is_cross_attention(name: str) -> bool:
    """A captured module's qualified name names a decoder's cross-attention (BART's ``encoder_attn``,
    T5's ``EncDecAttention``, ``crossattention``, ``cross_attn``)."""
    return bool(_CROSS.search(name))


def _decoder_ids(model, tokenizer, target: str):
    """``target``'s ids shifted right behind ``decoder_start_token_id`` (teacher forcing)."""
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "pad_token_id", 0) or 0
    ids = tokenizer(target, return_tensors="pt")["input_ids"]  # (1, Nd)
    return torch.cat([torch.full((1, 1), int(start), dtype=ids.dtype), ids[:, :-1]], dim=1)


def collect_any(text: str, model, tokenizer, *, pair: Optional[str] = None, topk: int = 8, truncate: bool = False,
                on_layer=None, on_analysis=None, rollout_rows=None, contributions: bool = False):
    """`collect_seq2seq` for an encoder-decoder model (``pair``: the decoder's text), else
    `attnlens.report.collect` (``pair``: the second sentence of a pair; ``on_analysis(done, total)`` reports its
    exact head scores and rollout as they go; ``rollout_rows``: the tokens whose rollout rows it holds exactly;
    ``contributions``: also the whole-block contributions, `collect`)."""
    if is_encoder_decoder(model):
        if contributions:
            raise ValueError("contributions: whole-block contributions need a self-attention model (encoder or "
                             "decoder), not an encoder-decoder model")
        return collect_seq2seq(text, model, tokenizer, target=pair, topk=topk, truncate=truncate, on_layer=on_layer,
                               rollout_rows=rollout_rows)
    return collect(text, model, tokenizer, pair=pair, topk=topk, truncate=truncate, on_layer=on_layer,
                   on_analysis=on_analysis, rollout_rows=rollout_rows, contributions=contributions)


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
            on_analysis: Optional[Callable[[int, int], None]] = None, rollout_rows=None,
            contributions: bool = False) -> ReportData:
    """Run ``model`` on ``text`` (and ``pair``, a second sentence) under `attnlens.hf.capture` and compute the
    analyses, exactly, in linear memory unless the full weights fit in ``FULL_BYTES``.

    ``on_layer(i)`` is called as each attention layer finishes, ``on_analysis(done, total)`` as each analysis step
    (a layer's head scores, a layer of the rollout) finishes (for progress bars). ``rollout_rows``: the tokens
    whose rollout rows the report holds exactly (ints, negative from the end; default `default_rollout_rows`).
    ``contributions``: also what each token contributes through the whole attention block (ALTI, composed through
    the layers: `data.set_contributions`, exact, in key tiles; costs about ``N² · E`` per layer, so seconds at 512
    tokens on a CPU and minutes at several thousand); the records then keep their inputs.
    """
    from ...integrations import hf  # lazy: transformers (seconds to import), only when a model is run

    enc, warnings = tokenize(text, model, tokenizer, truncate=truncate, pair=pair)
    n = enc["input_ids"].shape[1]
    chosen = row_ids(rollout_rows, n)
    L = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0) or 0)
    H = int(getattr(model.config, "num_attention_heads", 0) or getattr(model.config, "n_head", 0) or 0)
    full = L * H * n * n * 4 <= FULL_BYTES if L and H else n <= 512
    blk = -(-n // min(THUMB, n))  # thumbnail blocks of blk × blk tokens
    lens = Lens(topk=min(topk, n), rows="all" if full else None, pool=None if full else (blk, blk))
    cb = (lambda rec: on_layer(rec.index)) if on_layer is not None else None
    with torch.no_grad(), hf.capture(model, lens=lens, on_record=cb, keep_inputs=contributions or not full,
                                          keep_blocks=contributions) as cap:
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
    done, total = [0], len(recs) * (1 if full else 2) + (len(recs) if contributions else 0)

    def tick(*_):
        done[0] += 1
        if on_analysis is not None:
            on_analysis(done[0], total)

    for r in recs:
        data.summaries.append(analysis.head_summary(r, ids))
        tick()
    data.segments = segments(enc) if pair is not None else None
    if all(r.result.sink_weight is not None for r in recs):
        data.sink_weight = stack(lambda r: r.result.sink_weight).mean(-1)  # (L, H): mean over queries
    set_rollout(data, recs, full, chosen, on_layer=tick)
    if contributions:
        set_contributions(data, recs, chosen, on_layer=tick)
    if full:  # a layer at a time, each capture's weights let go once copied: 2 × L·H·N² float32 at most, not 3
        data.weights = np.empty((len(recs), data.n_heads, n, n), dtype=np.float32)
        data.contrib = np.empty_like(data.weights)
        for li, r in enumerate(recs):
            data.weights[li] = dense_view(r.result, 0)
            data.contrib[li] = analysis.contributions(r)
            r.result.weights = None
        data.contrib_kind = "‖α v W_O‖" if recs[0].out_norms is not None else "‖α v‖"
    else:
        sizes = np.diff(np.minimum(np.arange(0, n + blk, blk), n))[: -(-n // blk)]  # tokens per block
        data.thumbs = (stack(lambda r: r.result.pooled) / np.outer(sizes, sizes)).astype(np.float32)  # block means
        data.warnings.append(f"{n} tokens: full weights were not kept (kept: each query's top {lens.topk} keys); the "
                             f"head scores, received attention and the chosen rollout rows are exact, the head grid "
                             f"and the rollout map exact block means")
    return data


def kv_view(model, input_ids, method: str = "snapkv", ratio: float = 0.5, window: Optional[int] = None) -> dict:
    """What `attnlens.kv` keeps of ``input_ids (1, N)`` (one sequence) in each layer of a causal decoder: the report's
    ``kv`` (`ReportData.kv`). ``window``: SnapKV/PyramidKV's observation window (default: `attnlens.kv`'s 64).

    Returns ``{"method", "ratio", "window", "heads": Hkv, "layers": [l...], "kept": (L, N) uint8 = how many KV heads
    of each layer keep each token, "budget": keys kept per KV head by each layer, "sliding": each layer's sliding
    window or None}``. Raises ValueError for a model without a decoder KV cache (an encoder) or a bad setting."""
    from ...integrations import kv  # lazy: transformers (seconds to import), only when a model is run

    kw = {} if window is None else {"window": window}
    layers = kv.scores(model, input_ids, method=method, ratio=ratio, **kw)
    kept = np.stack([ls.kept()[0].sum(0).cpu().numpy() for ls in layers]).astype(np.uint8)  # (L, N)
    m = kv.Method(method, ratio, **kw)
    return {"method": m.name, "ratio": m.ratio, "window": m.window if m.name in kv.WINDOW_METHODS else None,
            "heads": int(layers[0].keep.shape[1]), "layers": [ls.layer for ls in layers], "kept": kept,
            "budget": [int(ls.budget[0]) for ls in layers], "sliding": [ls.window for ls in layers]}


def segments(enc) -> list:
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


def collect_seq2seq(text: str, model, tokenizer, *, target: Optional[str] = None, topk: int = 8,
                    truncate: bool = False, on_layer=None, rollout_rows=None):
    """Run an encoder-decoder ``model`` on ``text`` (decoder input: ``target``, default ``text``) and
    return the `ReportData` of its encoder with the decoder's cross-attention in ``cross``."""
    from ...integrations import hf  # lazy: transformers (seconds to import), only when a model is run

    enc, warnings = tokenize(text, model, tokenizer, truncate=truncate)
    dec = _decoder_ids(model, tokenizer, text if target is None else target)
    n = enc["input_ids"].shape[1]
    cb = (lambda rec: on_layer(rec.layer)) if on_layer is not None else None
    k = min(topk, n, dec.shape[1])  # the decoder's self-attention has only its own keys
    with torch.no_grad(), hf.capture(model, lens=Lens(topk=k, rows="all"), on_record=cb) as cap:
        model(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"), decoder_input_ids=dec)
    cross = [r for r in cap.results if is_cross_attention(r.name)]
    encoder = [r for r in cap.results if ".encoder." in f".{r.name}" and not is_cross_attention(r.name)]
    if not cross or not encoder:
        raise ValueError(f"model ({type(model).__name__}): expected encoder self-attention and decoder cross-attention "
                         f"calls, recorded {[r.name for r in cap.results]}")
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())]
    data = from_records(encoder, tokens, text=text, warnings=warnings, input_ids=enc["input_ids"][0],
                        rollout_rows=rollout_rows)
    w = np.stack([analysis.as_numpy(r.result.weights[0]) for r in cross]).astype(np.float32)  # (Ld, H, Nd, Ne)
    data.cross = {"tokens": [str(t) for t in tokenizer.convert_ids_to_tokens(dec[0].tolist())], "weights": w}
    return data
