"""One self-contained HTML page for a `ReportData`: opens from disk, no network, all CSS/JS inline.

Safety: the input text is data, never markup. Everything input-derived (tokens, the text, the
model name) travels only inside ``<script type="application/json">`` — JSON with ``<``, ``>``
and ``&`` written as ``\\u003c``, ``\\u003e``, ``\\u0026`` so no ``</script>`` can close it — and
the page's own script builds the DOM with ``textContent`` (never ``innerHTML``). A
Content-Security-Policy allows only the page's own script and style (by hash), no network.

The page itself is three package files next to this module, read with `importlib.resources`:
``page.html`` (the body), ``page.css`` and ``page.js``, inlined by `render`.

Size (what is embedded, and why it stays small at 512 tokens):

- token view: the weights quantised to one byte (``round(255·w)``); the full ``(L, H, N, N)``
  when it has at most ``FULL_CELLS`` cells (N ≤ 166 for 6 × 12 heads), else each query's top
  ``k`` keys per head (2-byte index + float16 weight, so that the small weights of a long input keep 3
  significant digits): 6 × 12 × 512 × 8 × 4 B = 1.2 MB before base64. ``k`` is ``PAGE_TOPK``, lowered (to 1
  at least, with a warning on the page) so that this part stays under ``TOKEN_VIEW_BYTES``;
- value norms ``‖v_j W_O^h‖`` (or ``‖v_j‖``) ``(L, H, N)`` as float32: the page computes each
  contribution ``‖P_ij v_j W_O^h‖ = P_ij · ‖v_j W_O^h‖`` (and its share) from the weights, so the
  row view, the heatmap and the received panel all show the same numbers;
- segments: the segment (0 or 1) of each token of a sentence pair, else ``null``;
- cross: an encoder-decoder model's cross-attention ``(L_dec, H, N_dec, N)``, 1 byte per weight,
  with the decoder's tokens, else ``null``;
- layer × head grid: each head's map pooled (block mean) to at most ``THUMB`` × ``THUMB``, 1 byte;
- rollout: pooled to at most ``ROLLOUT_MAX`` × ``ROLLOUT_MAX``, 1 byte;
- received: ``(L, H, N)`` as 2-byte fixed point relative to each head's largest (``received_max``);
- rollout rows: the exact rows ``ReportData.rollout_row_ids`` (at most ``ROLLOUT_ROWS``) ``(r, N)``, 2 bytes each,
  each row scaled to its own largest value;
- kv: with ``attnlens explain --kv``, how many KV heads of each layer keep each token ``(L, N)``, 1 byte each.

- block contributions (``ReportData.block``, when asked): the composed map pooled to at most ``ROLLOUT_MAX``, 1 byte;
  its exact rows and each layer's own rows for the rollout's tokens, ``(r, N)`` and ``(L, r, N)``, 2 bytes each, each
  row scaled to its own largest value; at short lengths (``BLOCK_FULL_CELLS``) every layer's ``(L, N, N)``
  contributions, 1 byte each (rows sum to 1), for the token view's "whole-block contributions".
The bound: everything but the token view is linear in N with small constants (received 2·L·H·N bytes, value
norms 4·L·H·N when the weights were kept, rollout rows 2·r·N, the tokens' text) or fixed (grid ≤ L·H·THUMB²,
rollout map ≤ ROLLOUT_MAX²); the token view is at most ``TOKEN_VIEW_BYTES`` unless even ``k = 1`` exceeds it
(L·H·N > 2.3 M). Base64 adds a third. Measured (benchmarks/report.py): 8,192 tokens of a 6-layer, 12-head model
→ 14.7 MB, top 4 keys per query (benchmarks/results/report-2026-11-29.md).
"""
from __future__ import annotations

import base64
import hashlib
import json
from importlib import resources

import numpy as np

from ...analysis import head_kinds, is_special_token, kind_label
from .data import THUMB, count, opening_view, pool_means
from .files import write_atomic

__all__ = ["render", "write", "payload", "value_norms", "word_pieces", "FULL_CELLS", "PAGE_TOPK", "TOKEN_VIEW_BYTES", "THUMB",
           "ROLLOUT_MAX", "HEAT_MAX", "PAGE_TOKENS"]

FULL_CELLS = 2_000_000
PAGE_TOPK = 8
#: the token view's top-k part is kept under this many bytes (before base64) by lowering k
TOKEN_VIEW_BYTES = 9 << 20
ROLLOUT_MAX = 256
#: above this many tokens the page's heatmap shows the pooled map and the received panel the top tokens
HEAT_MAX = 512
#: the token view shows this many tokens per page (with search and jump) above it
PAGE_TOKENS = 500


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _q8(x) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def _pool_topk(idx: np.ndarray, w: np.ndarray, n: int, t: int) -> np.ndarray:
    """Pool sparse top-k rows ``(L, H, N, k)`` into ``(L, H, t, t)`` block means."""
    L, H, N, k = idx.shape
    edges = (np.arange(t) * n) // t
    counts = np.diff(np.append(edges, n))
    qb = np.searchsorted(edges, np.arange(N), side="right") - 1  # (N,)
    kb = np.searchsorted(edges, np.where(idx >= 0, idx, 0), side="right") - 1  # (L, H, N, k)
    out = np.zeros((L * H, t * t))
    flat = (qb[None, None, :, None] * t + kb).reshape(L * H, -1)
    np.add.at(out, (np.repeat(np.arange(L * H), N * k), flat.ravel()), np.where(idx >= 0, w, 0).ravel())
    return out.reshape(L, H, t, t) / (counts[:, None] * counts[None, :])


def value_norms(data):
    """``‖v_j W_O^h‖`` (or ``‖v_j‖``) ``(L, H, N)`` behind ``data.contrib``, or ``None`` without it.

    ``contrib[..., i, j] = P_ij · norm_j``, so summing over the queries gives
    ``norm_j · Σ_i P_ij``: the norm is the contributions' column sum over the weights' (0 for a key
    that no query sees).
    """
    if data.contrib is None or data.weights is None:
        return None
    c = data.contrib.sum(-2, dtype=np.float64)  # summed in float64, without a float64 copy of (L, H, N, N)
    w = data.weights.sum(-2, dtype=np.float64)  # (L, H, N): received
    return np.divide(c, w, out=np.zeros_like(c), where=w > 0)


def _sparse(vals: np.ndarray, k: int):
    """Top-``k`` of each row of ``(L, H, N, N)``: (uint16 indices, float16 values), one head's map at a time (the
    partition's int64 indices of one ``(N, N)`` map, not of all)."""
    k = min(k, vals.shape[-1])
    idx = np.empty(vals.shape[:-1] + (k,), dtype="<u2")
    out = np.empty(vals.shape[:-1] + (k,), dtype="<f2")
    for li in range(vals.shape[0]):
        for h in range(vals.shape[1]):
            m = vals[li, h]
            top = np.argpartition(-m, k - 1, axis=-1)[..., :k]
            v = np.take_along_axis(m, top, -1)
            order = np.argsort(-v, axis=-1, kind="stable")
            idx[li, h], out[li, h] = np.take_along_axis(top, order, -1), np.take_along_axis(v, order, -1)
    return idx, out


def payload(data) -> dict:
    """The JSON-able dict the page reads (see the module docstring for the encodings)."""
    L, H, N = data.n_layers, data.n_heads, data.n
    if N > 65536:  # key indices travel as uint16: refuse rather than wrap
        raise ValueError(f"report: {N} tokens is more than the page's 65536 (key indices are 16-bit)")
    views, size_warnings = {}, []
    if data.weights is not None and L * H * N * N <= FULL_CELLS:
        views["weights"] = {"mode": "full", "w": _b64(_q8(data.weights))}
    else:
        k, wanted = _page_topk(data)
        if k < wanted:
            size_warnings.append(f"to keep the page small, the token view embeds each query's top {k} keys (not "
                                 f"{wanted}): {count(L, 'layer')} × {count(H, 'head')} × {count(N, 'token')}")
        if data.weights is not None and data.topk_idx.shape[-1] < k:  # the lens kept fewer: from the weights
            i, w = _sparse(data.weights, k)
        else:  # the lens's own top k (exact weights from the attention pass)
            i = np.where(data.topk_idx[..., :k] >= 0, data.topk_idx[..., :k], 0).astype("<u2")
            w = np.where(data.topk_idx[..., :k] >= 0, data.topk_w[..., :k], 0).astype("<f2")
        views["weights"] = {"mode": "topk", "k": int(i.shape[-1]), "idx": _b64(i), "w": _b64(w)}
    norms = value_norms(data)
    t = min(THUMB, N)
    if data.weights is not None:
        thumbs = pool_means(data.weights, t)
    elif getattr(data, "thumbs", None) is not None:  # pooled in the attention pass (Lens(pool=...)), exact
        thumbs = data.thumbs.astype(np.float64)
        t = thumbs.shape[-1]
    else:
        thumbs = _pool_topk(data.topk_idx, data.topk_w, N, t)
    mx = thumbs.reshape(L, H, -1).max(-1)[..., None, None]
    thumbs = np.divide(thumbs, mx, out=np.zeros_like(thumbs), where=mx > 0)  # each map to its own max (in "max")
    tr = min(ROLLOUT_MAX, data.rollout.shape[-1])  # the rollout may come pooled already (collect, long inputs)
    roll = pool_means(data.rollout, tr)
    rmean = data.received / max(N, 1)  # mean weight a query puts on each key
    rmax = rmean.max(-1, keepdims=True)
    rec = np.clip(np.rint(np.divide(rmean, rmax, out=np.zeros_like(rmean), where=rmax > 0) * 65535), 0, 65535)
    summary = []
    for li, s in enumerate(data.summaries):
        kinds = head_kinds(s, N)
        for h in range(H):
            summary.append({"layer": li, "head": h, "entropy": round(float(s.entropy[h]), 4),
                            "max_weight": round(float(s.max_weight[h]), 4), "first": round(float(s.first[h]), 4),
                            "prev": round(float(s.prev[h]), 4), "self": round(float(s.self[h]), 4),
                            "next": round(float(s.next[h]), 4) if s.next is not None else None,
                            "kind": kind_label(kinds[h][0], s, h, data.tokens)})
    return {"version": 1, "text": data.text, "tokens": list(data.tokens), "model": data.model_name,
            "L": L, "H": H, "N": N, "views": views,
            "norms": None if norms is None else _b64(norms.astype("<f4")),
            "norm_kind": data.contrib_kind.replace("α ", "") if norms is not None else "",
            "segments": None if getattr(data, "segments", None) is None else [int(x) for x in data.segments],
            "cross": _cross(getattr(data, "cross", None)),
            "thumb": {"t": t, "w": _b64(_q8(thumbs)), "max": [float(m) for m in mx.ravel()], "pooled": bool(t < N)},
            "rollout": {"t": tr, "w": _b64(_q8(roll / max(roll.max(), 1e-12))), "max": float(roll.max()),
                        "coverage": round(float(data.rollout_coverage), 4)},
            "received": _b64(rec.astype("<u2")), "received_max": [float(m) for m in rmax.ravel()],
            "summary": summary, "warnings": list(data.warnings) + size_warnings,
            "rows": _rollout_rows(data), "block": _block(data), "kv": _kv(getattr(data, "kv", None)),
            "limits": {"heat_max": HEAT_MAX, "page_tokens": PAGE_TOKENS},
            "initial": dict(zip(("layer", "head", "token"), opening_view(data))),
            "pieces": word_pieces(data.tokens)}


def word_pieces(tokens) -> dict | None:
    """How the token view joins subword pieces into the words a reader sees: ``{"scheme", "text", "join"}`` —
    ``text[i]``: token i without its subword mark, ``join[i]``: it continues the word of token i - 1 (drawn without
    a space, with a thin boundary mark; each piece stays its own hoverable token) — or ``None`` when the tokens
    carry no subword marks.

    - ``"wordpiece"`` (BERT): a piece ``##x`` continues the word before it;
    - ``"bpe"`` (byte-level BPE: GPT-2, RoBERTa): a piece ``Ġx`` (or ``Ċ``, a line break) starts a word, any other
      piece continues one;
    - ``"sentencepiece"`` (T5, Llama): a piece ``▁x`` starts a word, any other piece continues one.

    Special tokens (``[CLS]``, ``<s>``) and the first token never continue a word, and nothing continues one.
    """
    toks = [str(t) for t in tokens]
    if any(t.startswith("##") and len(t) > 2 for t in toks):
        scheme, mark = "wordpiece", "##"
    elif any(t[:1] in ("Ġ", "Ċ") for t in toks):
        scheme, mark = "bpe", "Ġ"
    elif any(t.startswith("▁") for t in toks):
        scheme, mark = "sentencepiece", "▁"
    else:
        return None
    special = [is_special_token(t) for t in toks]
    text, join = [], []
    for i, t in enumerate(toks):
        if scheme == "wordpiece":
            cont = t.startswith("##") and len(t) > 2
        else:
            cont = not t.startswith(mark) and not (scheme == "bpe" and t.startswith("Ċ"))
        cont = cont and i > 0 and not special[i] and not special[i - 1]
        bare = t[len(mark):] if t.startswith(mark) and len(t) > len(mark) else t
        text.append(bare.replace("Ċ", "↵") if scheme == "bpe" else bare)
        join.append(bool(cont))
    return {"scheme": scheme, "text": text, "join": join}


def _page_topk(data) -> tuple:
    """``(k, wanted)``: the keys per query the token view embeds, ``wanted`` = `PAGE_TOPK` (or fewer kept) lowered
    to fit `TOKEN_VIEW_BYTES` (2-byte index + float16 weight per key), at least 1."""
    kept = data.weights.shape[-1] if data.weights is not None else data.topk_idx.shape[-1]
    wanted = min(PAGE_TOPK, kept)
    per_key = data.n_layers * data.n_heads * data.n * 4  # bytes of one key for every query
    return max(1, min(wanted, TOKEN_VIEW_BYTES // per_key)), wanted


def _rows16(R) -> dict:
    """Rows ``(..., N)`` each scaled to its own largest value, 2-byte fixed point: ``{"max": [...], "w": base64}``."""
    R = np.asarray(R, dtype=np.float64)
    mx = R.max(-1)
    scaled = np.divide(R, mx[..., None], out=np.zeros_like(R), where=mx[..., None] > 0)
    return {"max": [float(m) for m in mx.ravel()], "w": _b64(np.clip(np.rint(scaled * 65535), 0, 65535).astype("<u2"))}


def _rollout_rows(data):
    """The exact rollout rows of the payload (see the module docstring), or ``None``."""
    R = getattr(data, "rollout_rows", None)
    if R is None or len(R) == 0:
        return None
    return {"ids": [int(i) for i in data.rollout_row_ids], **_rows16(R)}


def _block(data):
    """The whole-block contributions part of the payload (see the module docstring), or ``None``."""
    b = getattr(data, "block", None)
    if b is None:
        return None
    m = pool_means(np.asarray(b["composed"], dtype=np.float64), min(ROLLOUT_MAX, b["composed"].shape[-1]))
    mx = max(float(m.max()), 1e-12)
    return {"method": b["method"], "t": int(m.shape[-1]), "map": _b64(_q8(m / mx)), "map_max": mx,
            "ids": [int(i) for i in b["row_ids"]], "rows": _rows16(b["rows"]), "layers": _rows16(b["layer_rows"]),
            "full": None if b.get("full") is None else _b64(_q8(b["full"]))}


def _kv(kv):
    """The KV-cache part of the payload: the method and, per layer and token, how many KV heads keep it (1 byte each,
    ``(L_kv, N)``), or ``None``."""
    if kv is None:
        return None
    kept = np.asarray(kv["kept"])
    return {"method": kv["method"], "ratio": float(kv["ratio"]), "window": kv.get("window"),
            "heads": int(kv["heads"]), "layers": [int(x) for x in kv["layers"]], "budget": [int(x) for x in kv["budget"]],
            "sliding": [None if w is None else int(w) for w in kv["sliding"]],
            "kept": _b64(kept.astype(np.uint8))}


def _cross(cross):
    """The cross-attention part of the payload (see the module docstring), or ``None``."""
    if cross is None:
        return None
    w = np.asarray(cross["weights"])  # (Ld, H, Nd, Ne)
    return {"tokens": [str(t) for t in cross["tokens"]], "L": int(w.shape[0]), "H": int(w.shape[1]),
            "Nq": int(w.shape[2]), "w": _b64(_q8(w))}


def json_for_script(obj) -> str:
    """JSON safe inside a ``<script type="application/json">``: ``<``, ``>``, ``&`` (and the
    JavaScript line separators) as ``\\uXXXX`` escapes, so nothing in it can end the element."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def _sha(s: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(s.encode("utf-8")).digest()).decode() + "'"


def _asset(name: str) -> str:
    """A page file shipped in this package (``page.css``, ``page.html``, ``page.js``)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def render(data) -> str:
    """The report page as a string: ``page.html`` with ``page.css`` and ``page.js`` inline."""
    blob = json_for_script(payload(data))
    style, body, script = "\n" + _asset("page.css"), _asset("page.html"), "\n" + _asset("page.js")
    csp = (f"default-src 'none'; script-src {_sha(script)}; style-src {_sha(style)}; img-src data:; "
           f"base-uri 'none'; form-action 'none'")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>attnlens report</title>\n<style>{style}</style></head>\n<body>\n{body}'
            f'<script type="application/json" id="attnlens-data">{blob}</script>\n'
            f'<script>{script}</script>\n</body></html>\n')


def write(data, path, *, overwrite: bool = True, follow_symlinks: bool = True) -> int:
    """Write the page to ``path`` atomically (see `attnlens.report._files.write_atomic`); returns its
    size in bytes. ``overwrite=False`` refuses an existing file, ``follow_symlinks=False`` a
    symbolic link (`attnlens.report._files.TargetError`)."""
    page = render(data).encode("utf-8")
    write_atomic(path, page, overwrite=overwrite, follow_symlinks=follow_symlinks)
    return len(page)
