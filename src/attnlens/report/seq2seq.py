"""Reports of encoder-decoder models (BART, T5, ...): the encoder's self-attention, and the
decoder's cross-attention to the encoder.

`collect_seq2seq(text, model, tokenizer, target=)` runs the model once under `attnlens.hf.capture`
with teacher forcing: the encoder reads ``text``, the decoder reads ``target`` (default: ``text``)
shifted right behind the model's ``decoder_start_token_id``. It returns a `ReportData` of the
encoder's self-attention (`attnlens.report.from_records`) whose ``cross`` holds the cross-attention:
``{"tokens": decoder tokens, "weights": (L_dec, H, N_dec, N_enc) float32}`` — row i of a head:
how decoder token i weighs each encoder token (each row sums to 1).
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

__all__ = ["collect_any", "collect_seq2seq", "is_cross_attention", "is_encoder_decoder"]

_CROSS = re.compile(r"encoder_attn|encdecattention|crossattention|cross_attn", re.I)


def is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def is_cross_attention(name: str) -> bool:
    """A captured module's qualified name names a decoder's cross-attention (BART's ``encoder_attn``,
    T5's ``EncDecAttention``, ``crossattention``, ``cross_attn``)."""
    return bool(_CROSS.search(name))


def _decoder_ids(model, tokenizer, target: str):
    """``target``'s ids shifted right behind ``decoder_start_token_id`` (teacher forcing)."""
    import torch

    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "pad_token_id", 0) or 0
    ids = tokenizer(target, return_tensors="pt")["input_ids"]  # (1, Nd)
    return torch.cat([torch.full((1, 1), int(start), dtype=ids.dtype), ids[:, :-1]], dim=1)


def collect_any(text: str, model, tokenizer, *, pair: Optional[str] = None, topk: int = 8, truncate: bool = False,
                on_layer=None, on_analysis=None, rollout_rows=None):
    """`collect_seq2seq` for an encoder-decoder model (``pair``: the decoder's text), else
    `attnlens.report.collect` (``pair``: the second sentence of a pair; ``on_analysis(done, total)`` reports its
    exact head scores and rollout as they go; ``rollout_rows``: the tokens whose rollout rows it holds exactly)."""
    from . import collect

    if is_encoder_decoder(model):
        return collect_seq2seq(text, model, tokenizer, target=pair, topk=topk, truncate=truncate, on_layer=on_layer,
                               rollout_rows=rollout_rows)
    return collect(text, model, tokenizer, pair=pair, topk=topk, truncate=truncate, on_layer=on_layer,
                   on_analysis=on_analysis, rollout_rows=rollout_rows)


def collect_seq2seq(text: str, model, tokenizer, *, target: Optional[str] = None, topk: int = 8,
                    truncate: bool = False, on_layer=None, rollout_rows=None):
    """Run an encoder-decoder ``model`` on ``text`` (decoder input: ``target``, default ``text``) and
    return the `ReportData` of its encoder with the decoder's cross-attention in ``cross``."""
    import torch

    from .. import analysis, hf
    from ..lens import Lens
    from . import from_records, tokenize

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
