"""One self-contained HTML page for a `ReportData`: opens from disk, no network, all CSS/JS inline.

Safety: the input text is data, never markup. Everything input-derived (tokens, the text, the
model name) travels only inside ``<script type="application/json">`` — JSON with ``<``, ``>``
and ``&`` written as ``\\u003c``, ``\\u003e``, ``\\u0026`` so no ``</script>`` can close it — and
the page's own script builds the DOM with ``textContent`` (never ``innerHTML``). A
Content-Security-Policy allows only the page's own script and style (by hash), no network.

Size (what is embedded, and why it stays small at 512 tokens):

- token view: weight and contribution shares quantised to one byte (``round(255·w)``); the full
  ``(L, H, N, N)`` when it has at most ``FULL_CELLS`` cells (N ≲ 150 for 6 × 12 heads), else each
  query's top ``PAGE_TOPK`` keys per head (2-byte index + 1-byte weight): 6 × 12 × 512 × 8 × 3 B
  = 0.9 MB per view before base64;
- layer × head grid: each head's map pooled (block mean) to at most ``THUMB`` × ``THUMB``, 1 byte;
- rollout: pooled to at most ``ROLLOUT_MAX`` × ``ROLLOUT_MAX``, 1 byte;
- received: ``(L, H, N)`` as 2-byte fixed point.
"""
from __future__ import annotations

import base64
import hashlib
import json

import numpy as np

__all__ = ["render", "write", "FULL_CELLS", "PAGE_TOPK", "THUMB", "ROLLOUT_MAX"]

FULL_CELLS = 2_000_000
PAGE_TOPK = 8
THUMB = 48
ROLLOUT_MAX = 256


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _q8(x) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def _pool(m: np.ndarray, t: int) -> np.ndarray:
    """Block-mean pool the last two axes of ``m (..., N, N)`` to ``(..., t, t)`` (t <= N)."""
    n = m.shape[-1]
    if t >= n:
        return m
    edges = (np.arange(t) * n) // t
    counts = np.diff(np.append(edges, n))
    s = np.add.reduceat(np.add.reduceat(m, edges, axis=-1), edges, axis=-2)
    return s / (counts[:, None] * counts[None, :])


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


def _rows_share(c: np.ndarray) -> np.ndarray:
    s = c.sum(-1, keepdims=True)
    return np.divide(c, s, out=np.zeros_like(c), where=s > 0)


def _sparse(vals: np.ndarray, k: int):
    """Top-``k`` of each row of ``(L, H, N, N)``: (uint16 indices, uint8 shares)."""
    k = min(k, vals.shape[-1])
    idx = np.argpartition(-vals, k - 1, axis=-1)[..., :k]
    v = np.take_along_axis(vals, idx, -1)
    order = np.argsort(-v, axis=-1, kind="stable")
    return np.take_along_axis(idx, order, -1).astype("<u2"), _q8(np.take_along_axis(v, order, -1))


def payload(data) -> dict:
    """The JSON-able dict the page reads (see the module docstring for the encodings)."""
    L, H, N = data.n_layers, data.n_heads, data.n
    if N > 65536:  # key indices travel as uint16: refuse rather than wrap
        raise ValueError(f"report: {N} tokens is more than the page's 65536 (key indices are 16-bit)")
    views = {}
    if data.weights is not None and L * H * N * N <= FULL_CELLS:
        views["weights"] = {"mode": "full", "w": _b64(_q8(data.weights))}
        if data.contrib is not None:
            views["contrib"] = {"mode": "full", "w": _b64(_q8(_rows_share(data.contrib)))}
    else:
        if data.weights is not None:
            i, w = _sparse(data.weights, PAGE_TOPK)
        else:
            k = min(PAGE_TOPK, data.topk_idx.shape[-1])
            i = np.where(data.topk_idx[..., :k] >= 0, data.topk_idx[..., :k], 0).astype("<u2")
            w = _q8(data.topk_w[..., :k])
        views["weights"] = {"mode": "topk", "k": int(i.shape[-1]), "idx": _b64(i), "w": _b64(w)}
        if data.contrib is not None:
            i, w = _sparse(_rows_share(data.contrib), PAGE_TOPK)
            views["contrib"] = {"mode": "topk", "k": int(i.shape[-1]), "idx": _b64(i), "w": _b64(w)}
    t = min(THUMB, N)
    if data.weights is not None:
        thumbs = _pool(data.weights.astype(np.float64), t)
    else:
        thumbs = _pool_topk(data.topk_idx, data.topk_w, N, t)
    mx = thumbs.reshape(L, H, -1).max(-1)[..., None, None]
    thumbs = np.divide(thumbs, mx, out=np.zeros_like(thumbs), where=mx > 0)  # each map to its own max
    tr = min(ROLLOUT_MAX, N)
    roll = _pool(data.rollout, tr)
    rec = np.clip(np.rint(data.received / max(N, 1) * 65535), 0, 65535).astype("<u2")  # mean weight per query
    summary = []
    for li, s in enumerate(data.summaries):
        for h in range(H):
            summary.append({"layer": li, "head": h, "entropy": round(float(s.entropy[h]), 4),
                            "max_weight": round(float(s.max_weight[h]), 4), "first": round(float(s.first[h]), 4),
                            "prev": round(float(s.prev[h]), 4), "prev_hi": round(float(s.prev_hi[h]), 4),
                            "self": round(float(s.self[h]), 4), "self_hi": round(float(s.self_hi[h]), 4),
                            "exact": bool(s.exact)})
    return {"version": 1, "text": data.text, "tokens": list(data.tokens), "model": data.model_name,
            "L": L, "H": H, "N": N, "views": views, "contrib_kind": data.contrib_kind,
            "thumb": {"t": t, "w": _b64(_q8(thumbs))}, "rollout": {"t": tr, "w": _b64(_q8(roll / max(roll.max(), 1e-12))),
                                                                 "max": float(roll.max()),
                                                                 "coverage": round(float(data.rollout_coverage), 4)},
            "received": _b64(rec), "summary": summary, "warnings": list(data.warnings),
            "initial": {"layer": int(getattr(data, "initial_layer", 0)), "head": int(getattr(data, "initial_head", -1))}}


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


def render(data) -> str:
    """The report page as a string."""
    blob = json_for_script(payload(data))
    csp = (f"default-src 'none'; script-src {_sha(_SCRIPT)}; style-src {_sha(_STYLE)}; img-src data:; "
           f"base-uri 'none'; form-action 'none'")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>attnlens report</title>\n<style>{_STYLE}</style></head>\n<body>\n{_BODY}\n'
            f'<script type="application/json" id="attnlens-data">{blob}</script>\n'
            f'<script>{_SCRIPT}</script>\n</body></html>\n')


def write(data, path) -> int:
    """Write the page to ``path``; returns its size in bytes."""
    page = render(data).encode("utf-8")
    with open(path, "wb") as f:
        f.write(page)
    return len(page)


_STYLE = """
:root{--fg:#1d2330;--mut:#667085;--bg:#fbfbfd;--card:#fff;--acc:#2f6fde;--line:#e3e6ee}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg);margin:0;padding:18px 22px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:0 0 8px}
.sub{color:var(--mut);margin-bottom:10px}
.warn{background:#fff4e0;border:1px solid #f0c27a;padding:6px 10px;border-radius:6px;margin:6px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 14px;margin:12px 0}
.row{display:flex;gap:14px;flex-wrap:wrap;align-items:flex-start}
.controls label{margin-right:12px}
select{font:inherit;padding:2px 4px}
#tokens{line-height:2.1;max-height:360px;overflow:auto;border:1px solid var(--line);padding:6px;border-radius:6px}
.tok{padding:2px 3px;margin:0 1px;border-radius:3px;cursor:pointer;white-space:pre;border:1px solid transparent;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
.tok.q{border-color:#d0342c;outline:1px solid #d0342c}
.tok.pinned{border-color:#d0342c;background:#fde8e7}
#info{min-height:2.6em;color:var(--fg);margin-top:6px;font-size:13px}
#grid{border-collapse:collapse}#grid td,#grid th{padding:1px;text-align:center;font-size:11px;color:var(--mut)}
#grid canvas{width:44px;height:44px;image-rendering:pixelated;border:2px solid transparent;cursor:pointer;display:block}
#grid canvas.sel{border-color:#d0342c}
#rollout{width:360px;height:360px;image-rendering:pixelated;border:1px solid var(--line)}
#rollinfo{font-size:13px;min-height:1.5em}
#received{max-height:380px;overflow:auto;min-width:320px}
.bar{display:flex;align-items:center;gap:6px;font-size:12px;font-family:ui-monospace,Menlo,Consolas,monospace}
.bar .lab{width:110px;overflow:hidden;text-overflow:ellipsis;white-space:pre;text-align:right}
.bar .fill{height:10px;background:var(--acc);border-radius:2px}
table.sum{border-collapse:collapse;font-size:12px}
table.sum th,table.sum td{border-bottom:1px solid var(--line);padding:2px 8px;text-align:right}
table.sum tr.sel td{background:#fde8e7}
#sumwrap{max-height:380px;overflow:auto}
.note{color:var(--mut);font-size:12px}
"""

_BODY = """<h1>attnlens report</h1>
<div class="sub" id="sub"></div>
<div id="warnings"></div>
<div class="card controls">
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <label>show <select id="view"></select></label>
  <span class="note" id="viewnote"></span>
</div>
<div class="card"><h2>Token to token</h2>
  <div class="note">Hover a token to see where it attends (its row of the attention weights); click to pin it.</div>
  <div id="tokens"></div><div id="info"></div></div>
<div class="row">
  <div class="card"><h2>Layer × head</h2><div class="note">Each head's weights (rows: queries, columns: keys), scaled to its own maximum. Click one to select it.</div><table id="grid"></table></div>
  <div class="card"><h2>Received attention</h2><div class="note">Mean weight each token receives from all queries (column sums / N).</div><div id="received"></div></div>
</div>
<div class="row">
  <div class="card"><h2>Attention rollout</h2><div class="note" id="rollnote"></div><canvas id="rollout"></canvas><div id="rollinfo"></div></div>
  <div class="card"><h2>Head summary</h2><div class="note">Mean over queries: entropy (nats), largest weight, weight on the first token, the previous token, itself.</div><div id="sumwrap"><table class="sum" id="summary"></table></div></div>
</div>"""

_SCRIPT = r"""
(function(){
"use strict";
var D = JSON.parse(document.getElementById("attnlens-data").textContent);
var L = D.L, H = D.H, N = D.N;
function el(tag, text, cls){ var e = document.createElement(tag); if (text !== undefined && text !== null) e.textContent = String(text); if (cls) e.className = cls; return e; }
function b64(s){ var bin = atob(s), a = new Uint8Array(bin.length); for (var i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i); return a; }
function u16(s){ var b = b64(s); return new Uint16Array(b.buffer, b.byteOffset, b.length >> 1); }
function fmt(x){ return x < 0.0005 && x > 0 ? "<0.001" : x.toFixed(3); }

document.getElementById("sub").textContent = "model " + D.model + " · " + N + " tokens · " + L + " layers × " + H + " heads";
var W = document.getElementById("warnings");
D.warnings.forEach(function(w){ W.appendChild(el("div", "⚠ " + w, "warn")); });

// ---- views: decode once
var views = {};
Object.keys(D.views).forEach(function(name){
  var v = D.views[name];
  views[name] = v.mode === "full" ? {mode: "full", w: b64(v.w)} : {mode: "topk", k: v.k, idx: u16(v.idx), w: b64(v.w)};
});
var viewSel = document.getElementById("view");
var viewNames = {weights: "attention weights", contrib: "value-norm contributions " + (D.contrib_kind || "")};
Object.keys(views).forEach(function(n){ var o = el("option", viewNames[n]); o.value = n; viewSel.appendChild(o); });
function viewNote(){
  var v = views[viewSel.value];
  document.getElementById("viewnote").textContent = v.mode === "full" ? "every weight (1-byte precision)" :
    "each query's top " + v.k + " keys (the rest not embedded, to keep the page small)";
}

// one query row of layer l, head h (h = -1: mean over heads), as a Float32Array of N
function row(l, h, i){
  var v = views[viewSel.value], out = new Float32Array(N), heads = h < 0 ? H : 1, h0 = h < 0 ? 0 : h;
  for (var hh = h0; hh < h0 + heads; hh++){
    if (v.mode === "full"){
      var base = ((l * H + hh) * N + i) * N;
      for (var j = 0; j < N; j++) out[j] += v.w[base + j] / 255 / heads;
    } else {
      var b = ((l * H + hh) * N + i) * v.k;
      for (var t = 0; t < v.k; t++){ var wv = v.w[b + t]; if (wv) out[v.idx[b + t]] += wv / 255 / heads; }
    }
  }
  return out;
}

// ---- controls
var layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
for (var l = 0; l < L; l++){ var o = el("option", l); o.value = l; layerSel.appendChild(o); }
var om = el("option", "mean of heads"); om.value = -1; headSel.appendChild(om);
for (var h = 0; h < H; h++){ var oh = el("option", h); oh.value = h; headSel.appendChild(oh); }
layerSel.value = Math.min(Math.max(D.initial.layer, 0), L - 1);
headSel.value = D.initial.head;
function cur(){ return {l: +layerSel.value, h: +headSel.value}; }

// ---- token view
var tokBox = document.getElementById("tokens"), info = document.getElementById("info");
var spans = D.tokens.map(function(t, i){
  var s = el("span", t, "tok"); s.setAttribute("data-i", i); s.title = "#" + i; tokBox.appendChild(s); tokBox.appendChild(document.createTextNode(" ")); return s;
});
var pinned = -1, shown = -1;
function clearHi(){ spans.forEach(function(s){ s.style.backgroundColor = ""; s.classList.remove("q"); }); }
function show(i){
  shown = i; clearHi();
  if (i < 0){ info.textContent = "Hover or click a token."; return; }
  var c = cur(), r = row(c.l, c.h, i), mx = 0;
  for (var j = 0; j < N; j++) mx = Math.max(mx, r[j]);
  for (j = 0; j < N; j++){ if (r[j] > 0) spans[j].style.backgroundColor = "rgba(47,111,222," + (0.08 + 0.85 * r[j] / (mx || 1)).toFixed(3) + ")"; }
  spans[i].classList.add("q");
  var order = Array.from(r.keys()).sort(function(a, b){ return r[b] - r[a]; }).slice(0, 5);
  info.textContent = "";
  info.appendChild(el("b", D.tokens[i]));
  info.appendChild(document.createTextNode(" (#" + i + ", layer " + c.l + ", " + (c.h < 0 ? "mean of heads" : "head " + c.h) + ") draws on: " +
    order.filter(function(j){ return r[j] > 0; }).map(function(j){ return D.tokens[j] + " #" + j + " " + fmt(r[j]); }).join(" · ")));
}
spans.forEach(function(s, i){
  s.addEventListener("mouseenter", function(){ if (pinned < 0) show(i); });
  s.addEventListener("click", function(){
    if (pinned === i){ pinned = -1; s.classList.remove("pinned"); return; }
    if (pinned >= 0) spans[pinned].classList.remove("pinned");
    pinned = i; s.classList.add("pinned"); show(i);
  });
});
tokBox.addEventListener("mouseleave", function(){ if (pinned < 0) show(-1); });

// ---- grid of heads
var thumbs = b64(D.thumb.w), T = D.thumb.t, grid = document.getElementById("grid"), canv = [];
var hr = el("tr"); hr.appendChild(el("th", "")); for (h = 0; h < H; h++) hr.appendChild(el("th", "h" + h)); grid.appendChild(hr);
function paint(cv, data, off, t, gamma){
  cv.width = t; cv.height = t; var ctx = cv.getContext("2d"), img = ctx.createImageData(t, t);
  for (var p = 0; p < t * t; p++){ var x = Math.pow(data[off + p] / 255, gamma); img.data[4*p] = 255 - 208*x; img.data[4*p+1] = 255 - 144*x; img.data[4*p+2] = 255 - 33*x; img.data[4*p+3] = 255; }
  ctx.putImageData(img, 0, 0);
}
for (l = 0; l < L; l++){
  var tr = el("tr"); tr.appendChild(el("th", "L" + l)); canv.push([]);
  for (h = 0; h < H; h++){
    var td = el("td"), cv = document.createElement("canvas"); cv.title = "layer " + l + ", head " + h;
    cv.setAttribute("data-l", l); cv.setAttribute("data-h", h);
    paint(cv, thumbs, (l * H + h) * T * T, T, 0.6);
    cv.addEventListener("click", function(ev){ layerSel.value = ev.target.getAttribute("data-l"); headSel.value = ev.target.getAttribute("data-h"); refresh(); });
    td.appendChild(cv); tr.appendChild(td); canv[l].push(cv);
  }
  grid.appendChild(tr);
}

// ---- received
var rec = u16(D.received), recBox = document.getElementById("received");
function drawReceived(){
  var c = cur(); recBox.textContent = "";
  var vals = new Float32Array(N), heads = c.h < 0 ? H : 1, h0 = c.h < 0 ? 0 : c.h, mx = 0;
  for (var hh = h0; hh < h0 + heads; hh++) for (var j = 0; j < N; j++) vals[j] += rec[(c.l * H + hh) * N + j] / 65535 / heads;
  for (j = 0; j < N; j++) mx = Math.max(mx, vals[j]);
  for (j = 0; j < N; j++){
    var b = el("div", null, "bar"); b.appendChild(el("span", D.tokens[j], "lab"));
    var f = el("span", null, "fill"); f.style.width = Math.max(1, 180 * vals[j] / (mx || 1)).toFixed(1) + "px"; b.appendChild(f);
    b.appendChild(el("span", fmt(vals[j]))); recBox.appendChild(b);
  }
}

// ---- rollout
var rc = document.getElementById("rollout"), roll = b64(D.rollout.w), RT = D.rollout.t;
paint(rc, roll, 0, RT, 0.5);
document.getElementById("rollnote").textContent = "Abnar & Zuidema (2020): head mean + identity, rows renormalised, multiplied through the layers. Row i: how much top-layer token i draws on input token j" +
  (RT < N ? " (pooled to " + RT + "×" + RT + ")" : "") + (D.rollout.coverage < 0.9995 ? "; approximate, from top-k (" + (100 * D.rollout.coverage).toFixed(0) + "% of the weight)" : "") + ".";
rc.addEventListener("mousemove", function(ev){
  var r = rc.getBoundingClientRect(), cj = Math.floor((ev.clientX - r.left) / r.width * RT), ci = Math.floor((ev.clientY - r.top) / r.height * RT);
  if (ci < 0 || cj < 0 || ci >= RT || cj >= RT) return;
  var ti = Math.floor(ci * N / RT), tj = Math.floor(cj * N / RT);
  document.getElementById("rollinfo").textContent = (RT < N ? "block of " : "") + D.tokens[ti] + " #" + ti + " ← " + D.tokens[tj] + " #" + tj + ": " + fmt(roll[ci * RT + cj] / 255 * D.rollout.max);
});

// ---- summary table
var st = document.getElementById("summary"), cols = ["layer", "head", "entropy", "max_weight", "first", "prev", "self"];
var thr = el("tr"); ["layer", "head", "entropy", "max weight", "→ first", "→ previous", "→ self"].forEach(function(c){ thr.appendChild(el("th", c)); }); st.appendChild(thr);
var sumRows = [];
D.summary.forEach(function(s){
  var tr = el("tr");
  cols.forEach(function(c){
    var v = s[c], txt = (c === "layer" || c === "head") ? String(v) : v.toFixed(3);
    if (!s.exact && (c === "prev" || c === "self")) txt = "[" + v.toFixed(3) + ", " + s[c + "_hi"].toFixed(3) + "]";
    tr.appendChild(el("td", txt));
  });
  tr.addEventListener("click", function(){ layerSel.value = s.layer; headSel.value = s.head; refresh(); });
  st.appendChild(tr); sumRows.push(tr);
});

function refresh(){
  var c = cur();
  canv.forEach(function(rowc, l){ rowc.forEach(function(cv, h){ cv.classList.toggle("sel", l === c.l && (c.h < 0 || h === c.h)); }); });
  sumRows.forEach(function(tr, k){ tr.classList.toggle("sel", D.summary[k].layer === c.l && (c.h < 0 || D.summary[k].head === c.h)); });
  viewNote(); drawReceived(); show(pinned >= 0 ? pinned : shown);
}
[layerSel, headSel, viewSel].forEach(function(s){ s.addEventListener("change", refresh); });
refresh();
document.body.setAttribute("data-ready", "1");
})();
"""
