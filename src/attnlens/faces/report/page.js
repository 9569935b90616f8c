(function(){
"use strict";
var D = JSON.parse(document.getElementById("attnlens-data").textContent);
var L = D.L, H = D.H, N = D.N;
function el(tag, text, cls){ var e = document.createElement(tag); if (text !== undefined && text !== null) e.textContent = String(text); if (cls) e.className = cls; return e; }
function b64(s){ var bin = atob(s), a = new Uint8Array(bin.length); for (var i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i); return a; }
function u16(s){ var b = b64(s); return new Uint16Array(b.buffer, b.byteOffset, b.length >> 1); }
var F16 = (function(){ var t = new Float32Array(65536); for (var h = 0; h < 65536; h++){ var e = (h >> 10) & 31, m = h & 1023;
  var v = e === 0 ? m * Math.pow(2, -24) : e === 31 ? (m ? NaN : Infinity) : (1 + m / 1024) * Math.pow(2, e - 15); t[h] = h & 0x8000 ? -v : v; } return t; })();
function f16(s){ var u = u16(s), out = new Float32Array(u.length); for (var i = 0; i < u.length; i++) out[i] = F16[u[i]]; return out; }
function f32(s){ var b = b64(s); return new Float32Array(b.buffer, b.byteOffset, b.length >> 2); }
function fmt(x){ return x < 0.0005 && x > 0 ? "<0.001" : x.toFixed(3); }
function byId(id){ return document.getElementById(id); }

function count(n, noun){ return n + " " + noun + (n === 1 ? "" : "s"); }  // 1 layer, 6 layers
byId("sub").textContent = "model " + D.model + " · " + count(N, "token") + " · " + count(L, "layer") + " × " + count(H, "head");
D.warnings.forEach(function(w){ byId("warnings").appendChild(el("div", "⚠ " + w, "warn")); });

// ---- data: the weights (full, or each query's top k keys) and the value norms, decoded once
var Wv = D.views.weights;
var wts = Wv.mode === "full" ? {mode: "full", w: b64(Wv.w)} : {mode: "topk", k: Wv.k, idx: u16(Wv.idx), w: f16(Wv.w)};
var norms = D.norms ? f32(D.norms) : null;  // (L, H, N): ‖v_j W_O^h‖ (or ‖v_j‖)
var NK = D.norm_kind || "‖v‖";
var viewSel = byId("view");
var NKj = NK.replace("v", "vⱼ"), PNKj = "‖Pᵢⱼ " + NKj.slice(1);  // ‖vⱼ W_O‖, ‖Pᵢⱼ vⱼ W_O‖
var BKF = D.block && D.block.full ? b64(D.block.full) : null;  // (L, N, N): whole-block contributions, 1 byte
[["weights", "attention weights P"]].concat(norms ? [["contrib", "value-norm contributions ‖P " + NK.slice(1) + " (shares)"]] : [])
  .concat(BKF ? [["block", "whole-block contributions (" + (D.block.method === "alti" ? "ALTI" : "norms") + ", all heads, residual, LN)"]] : [])
  .forEach(function(p){ var o = el("option", p[1]); o.value = p[0]; viewSel.appendChild(o); });
function contribView(){ return viewSel.value === "contrib"; }
function blockView(){ return viewSel.value === "block"; }
function brow(l, i){ var out = new Float32Array(N), base = (l * N + i) * N; for (var j = 0; j < N; j++) out[j] = BKF[base + j] / 255; return out; }
function viewNote(){
  byId("viewnote").textContent = (wts.mode === "full" ? "every weight (1-byte precision)" :
    "each query's top " + wts.k + " keys (the rest not embedded, to keep the page small)") +
    (contribView() ? "; contributions = weight × value norm, as shares of the query's total" : "") +
    (blockView() ? "; whole-block contributions of the layer (every head, the residual and the layer norm; the head choice does not apply), 1-byte precision" : "");
}

// weights of query i in layer l, head h (h >= 0), as a Float32Array of N
function wrow(l, h, i){
  var out = new Float32Array(N), j;
  if (wts.mode === "full"){ var base = ((l * H + h) * N + i) * N; for (j = 0; j < N; j++) out[j] = wts.w[base + j] / 255; }
  else { var b = ((l * H + h) * N + i) * wts.k; for (var t = 0; t < wts.k; t++){ var v = wts.w[b + t]; if (v > 0) out[wts.idx[b + t]] = v; } }
  return out;
}
// ‖P_ij v_j W_O^h‖ for every key j
function crow(l, h, i){ var r = wrow(l, h, i), base = (l * H + h) * N; for (var j = 0; j < N; j++) r[j] *= norms[base + j]; return r; }
function sum(a){ var s = 0; for (var j = 0; j < a.length; j++) s += a[j]; return s; }
function scaleBy(a, s){ for (var j = 0; j < a.length; j++) a[j] *= s; return a; }
// the selected view's row: weights (h = -1: mean of heads), or contribution shares (h = -1: of all heads' sum)
function row(l, h, i){
  if (blockView()) return brow(l, i);  // the whole block: every head together, the residual and the layer norm
  var heads = h < 0 ? H : 1, h0 = h < 0 ? 0 : h, out = new Float32Array(N);
  for (var hh = h0; hh < h0 + heads; hh++){ var r = contribView() ? crow(l, hh, i) : wrow(l, hh, i); for (var j = 0; j < N; j++) out[j] += r[j]; }
  var s = contribView() ? sum(out) : heads;
  return s > 0 ? scaleBy(out, 1 / s) : out;
}

// ---- controls
var layerSel = byId("layer"), headSel = byId("head");
for (var l = 0; l < L; l++){ var o = el("option", l); o.value = l; layerSel.appendChild(o); }
var om = el("option", "mean of heads"); om.value = -1; headSel.appendChild(om);
for (var h = 0; h < H; h++){ var oh = el("option", h); oh.value = h; headSel.appendChild(oh); }
layerSel.value = Math.min(Math.max(D.initial.layer, 0), L - 1);
headSel.value = D.initial.head;
function cur(){ return {l: +layerSel.value, h: +headSel.value}; }
function where(c){ return "layer " + c.l + ", " + (blockView() ? "whole block" : c.h < 0 ? "mean of heads" : "head " + c.h); }
function what(){ return blockView() ? "whole-block contributions" : contribView() ? "contribution shares" : "weights"; }

// ---- colour: linear from white (0) to blue (1)
function rgb(x){ x = Math.max(0, Math.min(1, x)); return [Math.round(255 - 208 * x), Math.round(255 - 144 * x), Math.round(255 - 33 * x)]; }
function paint(cv, vals, t, vmax, cols){
  cols = cols || t; cv.width = cols; cv.height = t; var ctx = cv.getContext("2d"), img = ctx.createImageData(cols, t);
  for (var p = 0; p < t * cols; p++){ var c = rgb(vmax > 0 ? vals[p] / vmax : 0); img.data[4*p] = c[0]; img.data[4*p+1] = c[1]; img.data[4*p+2] = c[2]; img.data[4*p+3] = 255; }
  ctx.putImageData(img, 0, 0);
}
function legend(box, lo, hi, text){
  var d = el("div", null, "legend"), cv = document.createElement("canvas"), ramp = new Float32Array(128 * 128);
  for (var p = 0; p < 128 * 128; p++) ramp[p] = (p % 128) / 127;
  paint(cv, ramp, 128, 1); cv.className = "ramp";
  d.appendChild(el("span", lo)); d.appendChild(cv); d.appendChild(el("span", hi)); d.appendChild(el("span", text, "note"));
  box.appendChild(d);
}
// a labelled t × c heatmap of vals (row-major), colour linear in [0, vmax]; hover(i, j) -> text for info.
// labels: the column labels (and the row labels, unless rowLabels); c defaults to t
function heatmap(box, vals, t, labels, vmax, hover, info, onclick, c, rowLabels){
  box.textContent = ""; c = c || t;
  var px = Math.max(1, Math.min(18, Math.floor(420 / Math.max(t, c)))), g = el("div", null, "hm"), cv = document.createElement("canvas");
  var showLabels = labels && px >= 9, rl = rowLabels || labels;
  g.appendChild(el("div")); var xl = el("div", null, "xl"); g.appendChild(xl);
  var yl = el("div", null, "yl"), wrap = el("div", null, "hmwrap"); g.appendChild(yl); wrap.appendChild(cv); g.appendChild(wrap);
  if (showLabels){
    labels.forEach(function(s, k){ var a = el("span", s, segClass(k)); a.style.width = px + "px"; a.title = s + " #" + k; xl.appendChild(a); });
    rl.forEach(function(s, k){ var b = el("span", s, rowLabels ? "" : segClass(k)); b.style.height = px + "px"; b.style.lineHeight = px + "px"; b.title = s + " #" + k; yl.appendChild(b); });
  }
  paint(cv, vals, t, vmax, c); cv.style.width = (c * px) + "px"; cv.style.height = (t * px) + "px"; cv.setAttribute("data-px", px);
  cv.addEventListener("mousemove", function(ev){
    var r = cv.getBoundingClientRect(), j = Math.floor((ev.clientX - r.left) / r.width * c), i = Math.floor((ev.clientY - r.top) / r.height * t);
    if (i >= 0 && j >= 0 && i < t && j < c) info.textContent = hover(i, j, vals[i * c + j]);
  });
  if (onclick) cv.addEventListener("click", function(ev){ var r = cv.getBoundingClientRect(); onclick(Math.floor((ev.clientY - r.top) / r.height * t)); });
  box.appendChild(g);
  legend(box, "0", fmt(vmax), "linear; darkest = " + fmt(vmax) + (showLabels ? "" : " · no token labels at " + t + " rows: hover for them"));
  return cv;
}
function segClass(k){ return D.segments && D.segments[k] ? "seg1" : ""; }

// ---- token view: every token up to D.limits.page_tokens, else one page at a time (find and the key links reach any)
var tokBox = byId("tokens"), info = byId("info"), PT = D.limits.page_tokens, paged = N > PT, pages = Math.ceil(N / PT);
var pageSel = byId("page"), colourSel = byId("colour"), page = 0, spans = {}, pinned = -1, shown = -1;
function tokIndex(t){ return t && t.classList && t.classList.contains("tok") ? +t.getAttribute("data-i") : -1; }
var PC = D.pieces;  // subword pieces: the text without its mark, and whether it continues the word before it
function drawTokens(){
  tokBox.textContent = ""; spans = {};
  var a = paged ? page * PT : 0, b = paged ? Math.min(N, a + PT) : N;
  for (var i = a; i < b; i++){
    if (D.segments && i > 0 && D.segments[i] !== D.segments[i - 1]) tokBox.appendChild(el("span", "¦ segment " + "AB".charAt(D.segments[i]) + ":", "segmark"));
    var joined = PC && PC.join[i] && i > a, s = el("span", PC ? PC.text[i] : D.tokens[i], "tok " + segClass(i) + (joined ? " cont" : ""));
    s.setAttribute("data-i", i); s.title = "#" + i + (PC && PC.text[i] !== D.tokens[i] ? " " + D.tokens[i] : "");
    if (i === pinned) s.classList.add("pinned");
    if (i > a && !joined) tokBox.appendChild(document.createTextNode(" "));
    tokBox.appendChild(s); spans[i] = s;
  }
}
function setPage(p){ if (!paged || p === page) return; page = p; pageSel.value = p; drawTokens(); show(pinned >= 0 ? pinned : -1); }
if (paged){
  byId("pager").hidden = false;
  for (var pg = 0; pg < pages; pg++){ var po = el("option", "tokens " + pg * PT + "–" + (Math.min(N, (pg + 1) * PT) - 1) + " of " + N); po.value = pg; pageSel.appendChild(po); }
  pageSel.addEventListener("change", function(){ setPage(+pageSel.value); });
  byId("page-prev").addEventListener("click", function(){ setPage(Math.max(0, page - 1)); });
  byId("page-next").addEventListener("click", function(){ setPage(Math.min(pages - 1, page + 1)); });
  byId("tok-note").appendChild(document.createTextNode(" " + N + " tokens, " + PT + " to a page: find one by its text or #index, or follow a key's link."));
}
drawTokens();
if (D.segments) byId("segnote").textContent = " A sentence pair: segment B (after ¦) is underlined.";
// bring token i into view (its page, scrolled to, outlined for a moment)
function goTo(i){
  setPage(Math.floor(i / PT));
  var s = spans[i]; if (!s) return;
  s.scrollIntoView({block: "nearest"}); s.classList.add("flash");
  setTimeout(function(){ s.classList.remove("flash"); }, 1200);
}
function jumpLink(j, text){ var a = el("a", text, "jump"); a.addEventListener("click", function(ev){ ev.stopPropagation(); goTo(j); }); return a; }
function clearHi(){ Object.keys(spans).forEach(function(k){ spans[k].style.backgroundColor = ""; spans[k].classList.remove("q"); }); }
function topKeys(r, k){
  var out = [];  // the k largest positive entries, largest first (one pass: r may have 65,536 entries)
  for (var j = 0; j < r.length; j++){
    if (!(r[j] > 0) || (out.length === k && r[j] <= r[out[k - 1]])) continue;
    var p = out.length < k ? out.length : k - 1;
    while (p > 0 && r[out[p - 1]] < r[j]){ out[p] = out[p - 1]; p--; }
    out[p] = j;
  }
  return out;
}
function shade(vals){  // colour the page's tokens by vals, relative to the largest over all N
  var mx = 0, j; for (j = 0; j < vals.length; j++) mx = Math.max(mx, vals[j]);
  Object.keys(spans).forEach(function(k){ var v = vals[k]; if (v > 0) spans[k].style.backgroundColor = "rgba(47,111,222," + (0.08 + 0.85 * v / (mx || 1)).toFixed(3) + ")"; });
}
function show(i){
  shown = i; clearHi(); drawMix(i); drawPerHead(i);
  var c = cur(), byReceived = colourSel.value === "received";
  if (byReceived) shade(receivedRow(c));
  if (i < 0){ info.textContent = byReceived ? "Tokens shaded by the attention they receive (" + where(c) + "). Hover or click a token." : "Hover or click a token."; return; }
  var r = row(c.l, c.h, i);
  if (!byReceived) shade(r);
  if (spans[i]) spans[i].classList.add("q");
  info.textContent = "";
  info.appendChild(el("b", D.tokens[i]));
  info.appendChild(document.createTextNode(" (#" + i + ", " + where(c) + ") " + (contribView() || blockView() ? "takes its output from: " : "draws on: ")));
  topKeys(r, 5).forEach(function(j, n){ if (n) info.appendChild(document.createTextNode(" · ")); info.appendChild(jumpLink(j, D.tokens[j] + " #" + j)); info.appendChild(document.createTextNode(" " + fmt(r[j]))); });
}
function pin(i){
  if (pinned >= 0 && spans[pinned]) spans[pinned].classList.remove("pinned");
  pinned = pinned === i ? -1 : i;
  markHeatRow();
  if (pinned >= 0){ if (spans[pinned]) spans[pinned].classList.add("pinned"); show(pinned); selectRollRow(pinned); }
}
tokBox.addEventListener("mouseover", function(ev){ var i = tokIndex(ev.target); if (i >= 0 && pinned < 0 && i !== shown) show(i); });
tokBox.addEventListener("click", function(ev){ var i = tokIndex(ev.target); if (i >= 0) pin(i); });
tokBox.addEventListener("mouseleave", function(){ if (pinned < 0) show(-1); });
colourSel.addEventListener("change", function(){ show(pinned >= 0 ? pinned : shown); });

// ---- find: a word (case-insensitive, anywhere in the token; subword marks ignored) or #index; Enter / "next" = next hit
var searchBox = byId("search"), searchNote = byId("searchnote"), lastHit = -1;
function plain(t){ return String(t).toLowerCase().replace(/^(##|Ġ|▁|Ċ)/, ""); }
function find(){
  var q = searchBox.value.trim(), m = /^#?(\d+)$/.exec(q), hits = [];
  if (!q){ searchNote.textContent = ""; return; }
  if (m){ hits = +m[1] < N ? [+m[1]] : []; }
  else { q = plain(q); for (var i = 0; i < N; i++) if (plain(D.tokens[i]).indexOf(q) >= 0) hits.push(i); }
  if (!hits.length){ searchNote.textContent = m ? "no token #" + m[1] + " (0.." + (N - 1) + ")" : "no token contains “" + searchBox.value.trim() + "”"; return; }
  var k = 0; while (k < hits.length && hits[k] <= lastHit) k++;
  if (k === hits.length) k = 0;
  lastHit = hits[k];
  searchNote.textContent = "#" + lastHit + " — hit " + (k + 1) + " of " + hits.length;
  goTo(lastHit); if (pinned !== lastHit) pin(lastHit);
}
searchBox.addEventListener("keydown", function(ev){ if (ev.key === "Enter"){ ev.preventDefault(); find(); } });
searchBox.addEventListener("input", function(){ lastHit = -1; searchNote.textContent = ""; });
byId("search-go").addEventListener("click", find);

// ---- the row view of one query: weights, value norms, contributions, shares
function cell(tr, text, cls){ var td = el("td", text, cls); tr.appendChild(td); return td; }
function mixRows(c, i){
  // per key: weight (mean over heads for h = -1), value norm (one head only), contribution, share
  var heads = c.h < 0 ? H : 1, h0 = c.h < 0 ? 0 : c.h, w = new Float32Array(N), ct = new Float32Array(N);
  for (var hh = h0; hh < h0 + heads; hh++){
    var r = wrow(c.l, hh, i);
    for (var j = 0; j < N; j++){ w[j] += r[j] / heads; if (norms) ct[j] += r[j] * norms[(c.l * H + hh) * N + j]; }
  }
  return {w: w, c: ct, total: sum(ct)};
}
function drawMix(i){
  var box = byId("mix"), c = cur(); box.textContent = "";
  byId("mix-title").textContent = "Row view" + (i >= 0 ? " of “" + D.tokens[i] + "” #" + i : "") + " — " + where(c);
  if (i < 0){ box.appendChild(el("div", "Hover or click a token.", "note")); return; }
  if (blockView()){ drawBlockMix(box, c, i); return; }
  var m = mixRows(c, i), order = topKeys(norms && contribView() ? m.c : m.w, 10), one = c.h >= 0;
  var t = el("table", null, "mix"), hr = el("tr");
  ["key", "#", one ? "weight Pᵢⱼ" : "mean weight"].concat(norms ? (one ? [NKj, PNKj] : ["Σ over heads " + PNKj]).concat(["share of output", ""]) : [""])
    .forEach(function(s){ hr.appendChild(el("th", s)); });
  t.appendChild(hr);
  order.forEach(function(j){
    var tr = el("tr"); cell(tr, D.tokens[j], "lab " + segClass(j)); cell(tr, j); cell(tr, fmt(m.w[j]));
    var share = norms && m.total > 0 ? m.c[j] / m.total : m.w[j];
    if (norms){ if (one) cell(tr, norms[(c.l * H + c.h) * N + j].toFixed(2)); cell(tr, m.c[j].toFixed(3)); cell(tr, (100 * share).toFixed(1) + "%"); }
    var bar = el("span", null, "fill"); bar.style.width = Math.max(1, 120 * share).toFixed(1) + "px"; cell(tr, null).appendChild(bar);
    t.appendChild(tr);
  });
  box.appendChild(t);
  var restW = (wts.mode === "full" ? sum(m.w) : 1) - order.reduce(function(s, j){ return s + m.w[j]; }, 0);  // rows sum to 1
  var restC = m.total > 0 ? 1 - order.reduce(function(s, j){ return s + m.c[j]; }, 0) / m.total : 0;
  var lines = [(order.length < N ? "Other " + (N - order.length) + " keys: weight " + fmt(Math.max(0, restW)) +
    (norms ? ", share " + (100 * Math.max(0, restC)).toFixed(1) + "%" : "") + ". " : "") +
    "The weights of a row sum to 1" + (wts.mode === "full" ? "" : " (only each query's top " + wts.k + " keys are embedded: the other keys' weight is 1 minus the shown)") + "."];
  if (norms) lines.push((one ? "" : "Heads add their terms: the contributions of all heads are summed (their sum's norm is at most this). ") +
    "A large weight on a short value vector moves the output little: compare the weight and share columns.");
  else lines.push("Value norms were not recorded for this report, so only the weights are shown.");
  lines.forEach(function(s){ box.appendChild(el("div", s, "note")); });
}

function drawBlockMix(box, c, i){  // the row view in the whole-block view: each key's share of the block's output
  var r = brow(c.l, i), t = el("table", null, "mix"), hr = el("tr");
  ["key", "#", "contribution", "attention weight (mean of heads)", ""].forEach(function(s){ hr.appendChild(el("th", s)); });
  t.appendChild(hr);
  var w = mixRows({l: c.l, h: -1}, i).w;
  topKeys(r, 10).forEach(function(j){
    var tr = el("tr"); cell(tr, D.tokens[j], "lab " + segClass(j)); cell(tr, j); cell(tr, fmt(r[j])); cell(tr, fmt(w[j]));
    var bar = el("span", null, "fill"); bar.style.width = Math.max(1, 120 * r[j]).toFixed(1) + "px"; cell(tr, null).appendChild(bar);
    t.appendChild(tr);
  });
  box.appendChild(t);
  box.appendChild(el("div", "The block's output for this token, split into one vector per input token (all heads through the output projection, its own residual, the layer norm); contribution = each vector's share (rows sum to 1). Compare with the weights: a token's own residual counts, and a large weight on a short value vector counts little.", "note"));
}

// ---- one bar per head per key, for one query (bertviz's head view, as numbers)
function headColour(h){ return "hsl(" + Math.round(360 * h / H) + ",65%,50%)"; }
function drawPerHead(i){
  var box = byId("perhead"), c = cur(); box.textContent = "";
  byId("heads-title").textContent = "Per head" + (i >= 0 ? " for “" + D.tokens[i] + "” #" + i : "") + " — layer " + c.l + ", all " + H + " heads";
  byId("heads-note").textContent = "For each key, one bar per head: its " + (contribView() ? "contribution share" : "weight") + " from this query; bar height is linear, full height = 1." +
    (blockView() ? " (Whole-block contributions mix every head, so the bars show the weights.)" : "");
  if (i < 0){ box.appendChild(el("div", "Hover or click a token.", "note")); return; }
  var rows = [];
  for (var hh = 0; hh < H; hh++) rows.push(blockView() ? wrow(c.l, hh, i) : row(c.l, hh, i));
  var mean = new Float32Array(N);
  rows.forEach(function(r){ for (var j = 0; j < N; j++) mean[j] += r[j] / H; });
  topKeys(mean, 8).forEach(function(j){
    var d = el("div", null, "ph"); d.appendChild(el("span", D.tokens[j] + " #" + j, "lab " + segClass(j)));
    var bars = el("span", null, "phbars");
    rows.forEach(function(r, hh){ var b = el("span", null, "phb"); b.style.height = Math.max(1, 40 * r[j]).toFixed(1) + "px"; b.style.backgroundColor = headColour(hh); b.title = "head " + hh + ": " + fmt(r[j]); bars.appendChild(b); });
    d.appendChild(bars); d.appendChild(el("span", "mean " + fmt(mean[j]), "note")); box.appendChild(d);
  });
  var keyl = el("div", null, "phkey");
  for (hh = 0; hh < H; hh++){ var k = el("span", "h" + hh); k.style.borderBottomColor = headColour(hh); keyl.appendChild(k); }
  box.appendChild(keyl);
}

// ---- the selected head as a labelled heatmap: every weight up to D.limits.heat_max tokens, else the pooled map
var HM = D.limits.heat_max, thumbs = b64(D.thumb.w), T = D.thumb.t;
function range(b, t){ var a = Math.floor(b * N / t), z = Math.floor((b + 1) * N / t) - 1; return a === z ? D.tokens[a] + " #" + a : "#" + a + "–#" + z + " (" + D.tokens[a] + " … " + D.tokens[z] + ")"; }
function pooledHead(c){  // (T, T) block means of the head's weights (mean of heads for h = -1), absolute
  var heads = c.h < 0 ? H : 1, h0 = c.h < 0 ? 0 : c.h, vals = new Float32Array(T * T);
  for (var hh = h0; hh < h0 + heads; hh++){ var k = c.l * H + hh, m = D.thumb.max[k] / 255 / heads; for (var p = 0; p < T * T; p++) vals[p] += thumbs[k * T * T + p] * m; }
  return vals;
}
function markHeatRow(){  // an outline over the pinned query's row (its block's row when pooled)
  var cv = byId("heat").querySelector("canvas"), old = byId("heat").querySelector(".hmrow");
  if (old) old.parentNode.removeChild(old);
  if (!cv || pinned < 0) return;
  var px = +cv.getAttribute("data-px"), r = pinned;
  if (N > HM){ r = 0; while (r + 1 < T && Math.floor((r + 1) * N / T) <= pinned) r++; }
  var m = el("div", null, "hmrow"); m.style.top = (1 + r * px) + "px"; m.style.height = px + "px"; m.style.width = cv.style.width;
  m.title = "pinned: " + D.tokens[pinned] + " #" + pinned; cv.parentNode.appendChild(m);
}
function drawHeat(){
  var c = cur(), vmax = 0, p;
  if (N > HM){
    var pv = pooledHead(c);
    for (p = 0; p < T * T; p++) vmax = Math.max(vmax, pv[p]);
    byId("heat-title").textContent = "Weights, pooled to " + T + "×" + T + " — " + where(c);
    heatmap(byId("heat"), pv, T, null, vmax, function(i, j, v){ return range(i, T) + " ← " + range(j, T) + ": mean weight " + fmt(v); },
            byId("heatinfo"), function(i){ goTo(Math.floor(i * N / T)); });
    byId("heat").appendChild(el("div", "Each cell: the mean weight from the queries of a block of ~" + Math.round(N / T) + " tokens to the keys of another (exact block means from the attention pass" +
      (contribView() ? "; the pooled map shows weights, not contributions" : "") + "). Click a row to go to its tokens.", "note"));
    markHeatRow();
    return;
  }
  var vals = new Float32Array(N * N);
  for (var i = 0; i < N; i++){ var r = row(c.l, c.h, i); vals.set(r, i * N); }
  for (p = 0; p < N * N; p++) vmax = Math.max(vmax, vals[p]);
  byId("heat-title").textContent = (blockView() ? "Whole-block contributions" : contribView() ? "Contribution shares" : "Weights") + " — " + where(c);
  heatmap(byId("heat"), vals, N, D.tokens, vmax, function(i, j, v){ return D.tokens[i] + " #" + i + " ← " + D.tokens[j] + " #" + j + ": " + fmt(v); },
          byId("heatinfo"), function(i){ pin(i); });
  markHeatRow();
}

// ---- grid of heads (always the weights)
var grid = byId("grid"), canv = [];
var hr0 = el("tr"); hr0.appendChild(el("th", "")); for (h = 0; h < H; h++) hr0.appendChild(el("th", "h" + h)); grid.appendChild(hr0);
for (l = 0; l < L; l++){
  var tr = el("tr"); tr.appendChild(el("th", "L" + l)); canv.push([]);
  for (h = 0; h < H; h++){
    var td = el("td"), cv = document.createElement("canvas"); cv.title = "layer " + l + ", head " + h;
    cv.setAttribute("data-l", l); cv.setAttribute("data-h", h);
    paint(cv, thumbs.subarray((l * H + h) * T * T, (l * H + h + 1) * T * T), T, 255);
    cv.addEventListener("click", function(ev){ layerSel.value = ev.target.getAttribute("data-l"); headSel.value = ev.target.getAttribute("data-h"); refresh(); });
    td.appendChild(cv); tr.appendChild(td); canv[l].push(cv);
  }
  grid.appendChild(tr);
}
legend(byId("gridlegend"), "0", "max", "linear, each head to its own largest weight" + (T < N ? "; pooled to " + T + "×" + T + " (block means)" : ""));

// ---- received: one bar per token up to D.limits.heat_max tokens, else the top tokens and a strip over all positions
var rec = u16(D.received), recBox = byId("received");
var recMemo = {key: "", vals: null};  // the received row of the view shown (drawn, and shaded on every hover)
function receivedRow(c){  // (N,): mean weight (or contribution share) a token receives from a query
  var key = c.l + "/" + c.h + "/" + viewSel.value;
  if (recMemo.key === key) return recMemo.vals;
  var vals = new Float32Array(N), j;
  recMemo = {key: key, vals: vals};
  if (contribView() || blockView()){ for (var i = 0; i < N; i++){ var r = row(c.l, c.h, i); for (j = 0; j < N; j++) vals[j] += r[j] / N; } }
  else { var heads = c.h < 0 ? H : 1, h0 = c.h < 0 ? 0 : c.h; for (var hh = h0; hh < h0 + heads; hh++) { var m = D.received_max[c.l * H + hh] / 65535 / heads; for (j = 0; j < N; j++) vals[j] += rec[(c.l * H + hh) * N + j] * m; } }
  return vals;
}
function strip(box, vals, onclick, hover, infoEl){  // the maximum of each bin of positions, linear colour, full width = N tokens
  var w = Math.min(N, 600), bins = new Float32Array(w), mx = 0, cv = document.createElement("canvas");
  for (var j = 0; j < N; j++){ var b = Math.floor(j * w / N); bins[b] = Math.max(bins[b], vals[j]); mx = Math.max(mx, vals[j]); }
  paint(cv, bins, 1, mx, w); cv.className = "strip"; box.appendChild(cv);
  var at = function(ev){ var r = cv.getBoundingClientRect(); return Math.min(N - 1, Math.floor((ev.clientX - r.left) / r.width * N)); };
  cv.addEventListener("click", function(ev){ onclick(at(ev)); });
  cv.addEventListener("mousemove", function(ev){ infoEl.textContent = hover(at(ev)); });
  return mx;
}
function recBar(j, v, mx){
  var b = el("div", null, "bar"), lab = el("span", null, "lab " + segClass(j));
  lab.appendChild(N > HM ? jumpLink(j, D.tokens[j]) : document.createTextNode(D.tokens[j])); b.appendChild(lab);
  var f = el("span", null, "fill"); f.style.width = Math.max(1, 180 * v / (mx || 1)).toFixed(1) + "px"; b.appendChild(f);
  b.appendChild(el("span", fmt(v) + (N > HM ? "  #" + j : ""))); return b;
}
function drawReceived(){
  var c = cur(), vals = receivedRow(c), mx = 0, j;
  recBox.textContent = "";
  byId("rec-title").textContent = "Received " + (contribView() || blockView() ? "contribution" : "attention") + " — " + where(c);
  byId("rec-note").textContent = (contribView() || blockView() ? "Mean contribution share each token gives a query (the column means of the shares)." :
    "Mean weight each token receives from a query (column sums of P / N) in this layer and head. (The terminal's table averages all layers and heads.)") +
    (N > HM ? " The strip spans all " + N + " tokens (each pixel: the largest in its bin; click to go there); below, the 30 tokens that receive most." : "");
  for (j = 0; j < N; j++) mx = Math.max(mx, vals[j]);
  if (N > HM){
    var hov = el("div", null, "hminfo");
    strip(recBox, vals, goTo, function(k){ return D.tokens[k] + " #" + k + ": " + fmt(vals[k]); }, hov); recBox.appendChild(hov);
    topKeys(vals, 30).forEach(function(k){ recBox.appendChild(recBar(k, vals[k], mx)); });
    return;
  }
  for (j = 0; j < N; j++) recBox.appendChild(recBar(j, vals[j], mx));
}

// ---- rollout: the map (exact, or exact block means beyond ROLLOUT_MAX tokens) and the exact rows
var RR = D.rows, rrw = RR ? u16(RR.w) : null, rollSel = byId("rollrow");
(function(){
  var roll = b64(D.rollout.w), RT = D.rollout.t, vals = new Float32Array(RT * RT);
  for (var p = 0; p < RT * RT; p++) vals[p] = roll[p] / 255 * D.rollout.max;
  byId("rollnote").textContent = "Abnar & Zuidema (2020): head mean + identity, rows renormalised, multiplied through the layers. Row i: how much top-layer token i draws on input token j" +
    (RT < N ? " (exact block means, pooled to " + RT + "×" + RT + ")" : "") + (D.rollout.coverage < 0.9995 ? "; approximate, from top-k (" + (100 * D.rollout.coverage).toFixed(0) + "% of the weight)" : "") + ".";
  heatmap(byId("rollout"), vals, RT, RT === N ? D.tokens : null, D.rollout.max, function(ci, cj, v){
    return RT < N ? range(ci, RT) + " ← " + range(cj, RT) + ": " + fmt(v) : D.tokens[ci] + " #" + ci + " ← " + D.tokens[cj] + " #" + cj + ": " + fmt(v);
  }, byId("rollinfo"));
})();
if (RR){
  RR.ids.forEach(function(i, k){ var o = el("option", D.tokens[i] + " #" + i); o.value = k; rollSel.appendChild(o); });
  rollSel.addEventListener("change", drawRollRow);
} else { byId("rows-title").hidden = true; rollSel.parentNode.hidden = true; }
function selectRollRow(i){ if (!RR) return; var k = RR.ids.indexOf(i); if (k >= 0 && +rollSel.value !== k){ rollSel.value = k; drawRollRow(); } }
function drawRollRow(){
  if (!RR) return;
  var box = byId("rollrows"), k = +rollSel.value, i = RR.ids[k], r = new Float32Array(N), mx = RR.max[k];
  for (var j = 0; j < N; j++) r[j] = rrw[k * N + j] / 65535 * mx;
  box.textContent = "";
  byId("rows-note").textContent = "Row #" + i + " of the rollout, exact (2-byte precision relative to its largest entry): the input tokens that top-layer token “" + D.tokens[i] + "” draws on through all layers. " +
    "The page holds " + RR.ids.length + " rows (pass rollout_rows= / pin a token listed here); the strip spans all " + N + " input tokens.";
  var hov = el("div", null, "hminfo");
  strip(box, r, goTo, function(q){ return D.tokens[q] + " #" + q + ": " + fmt(r[q]); }, hov); box.appendChild(hov);
  topKeys(r, 12).forEach(function(q){ box.appendChild(recBar(q, r[q], mx)); });
}
drawRollRow();

// ---- whole-block contributions (ALTI / norms: heads, W_O, residual, LayerNorm), composed through the layers
var BK = D.block, bkRows = BK ? u16(BK.rows.w) : null, bkLayers = BK ? u16(BK.layers.w) : null, bkSel = byId("blockrow");
function bkRow(w, mx, k){ var r = new Float32Array(N); for (var j = 0; j < N; j++) r[j] = w[k * N + j] / 65535 * mx; return r; }
if (BK){
  byId("block-card").hidden = false;
  var BT = BK.t, bm = b64(BK.map), bvals = new Float32Array(BT * BT);
  for (var p0 = 0; p0 < BT * BT; p0++) bvals[p0] = bm[p0] / 255 * BK.map_max;
  byId("block-title").textContent = "Contributions through the whole block (" + (BK.method === "alti" ? "ALTI" : "norms") + ", composed through the layers)";
  byId("block-note").textContent = "What each input token makes up of a token's output, through the whole attention block: all heads mixed by the output projection, the residual connection and the layer norm " +
    (BK.method === "alti" ? "(ALTI, Ferrando et al. 2022: L1 distance of each token's transformed vector to the block output, rows normalised)" : "(Kobayashi et al. 2021: L2 norms of each token's transformed vector, rows normalised)") +
    "; each layer's matrix multiplied through the layers like rollout. Unlike attention weights, a token's own residual counts, and a large weight on a small value vector counts little. Map: rows = top-layer tokens, columns = input tokens" +
    (BT < N ? " (exact block means, pooled to " + BT + "×" + BT + ")" : "") + ".";
  heatmap(byId("blockmap"), bvals, BT, BT === N ? D.tokens : null, BK.map_max, function(ci, cj, v){
    return BT < N ? range(ci, BT) + " ← " + range(cj, BT) + ": " + fmt(v) : D.tokens[ci] + " #" + ci + " ← " + D.tokens[cj] + " #" + cj + ": " + fmt(v);
  }, byId("blockinfo"));
  BK.ids.forEach(function(i, k){ var o = el("option", D.tokens[i] + " #" + i); o.value = k; bkSel.appendChild(o); });
  bkSel.value = BK.ids.length - 1;
  bkSel.addEventListener("change", drawBlockRow);
}
function drawBlockRow(){
  if (!BK) return;
  var k = +bkSel.value, i = BK.ids[k], l = +layerSel.value, box = byId("blockrows"), lbox = byId("blocklayer");
  var r = bkRow(bkRows, BK.rows.max[k], k), lr = bkRow(bkLayers.subarray(l * BK.ids.length * N), BK.layers.max[l * BK.ids.length + k], k);
  box.textContent = ""; lbox.textContent = "";
  var hov = el("div", null, "hminfo");
  strip(box, r, goTo, function(q){ return D.tokens[q] + " #" + q + ": " + fmt(r[q]); }, hov); box.appendChild(hov);
  topKeys(r, 10).forEach(function(q){ box.appendChild(recBar(q, r[q], BK.rows.max[k])); });
  byId("blocklayer-title").textContent = "In layer " + l + " alone (its block's contributions to “" + D.tokens[i] + "” #" + i + ")";
  topKeys(lr, 6).forEach(function(q){ lbox.appendChild(recBar(q, lr[q], BK.layers.max[l * BK.ids.length + k])); });
}

// ---- what is exact and what is pooled
(function(){
  var ul = byId("exactness"), k = wts.mode === "full" ? 0 : wts.k;
  [(k ? "Token view, row view, per-head bars: each query's top " + k + " keys per head (their exact weights to 3 significant digits); the other keys are not embedded, so a row's shown weights may sum to less than 1."
       : "Token view, row view, per-head bars: every weight (1-byte precision)."),
   N > HM ? "Heatmap: exact block means of the selected head's weights, pooled to " + T + "×" + T + " (computed in the attention pass; nothing N×N was stored)." : "Heatmap: " + (k ? "the embedded top keys of every query." : "every weight."),
   "Received: exact column sums of every weight (2-byte precision relative to each head's largest)" + (N > HM ? "; the panel lists the top 30 tokens and a strip of all " + N + "." : "."),
   "Layer × head grid: " + (D.thumb.pooled ? "exact block means pooled to " + T + "×" + T + "." : "every weight."),
   "Rollout map: " + (D.rollout.t < N ? "exact block means pooled to " + D.rollout.t + "×" + D.rollout.t + "; " : "exact; ") + (RR ? RR.ids.length + " rows exact (below it)." : "no exact rows."),
   "Head summary: exact means over every query (from the inputs, not from the top keys).",
   BK ? "Contributions through the whole block: " + (BK.t < N ? "map as exact block means pooled to " + BK.t + "×" + BK.t + "; " : "map exact; ") + BK.ids.length + " rows exact (composed, and per layer; 2-byte precision relative to each row's largest)." : "Contributions through the whole block: not computed (attnlens explain --contributions).",
   D.kv ? "KV cache: the keys " + D.kv.method + " keeps, exactly as attnlens.kv.compress would keep them (scores from each layer's own attention call)." : "",
   "Size: linear in the number of tokens (the token view's top keys, received, the exact rollout rows) plus fixed-size pooled maps."
  ].forEach(function(t){ if (t) ul.appendChild(el("li", t)); });
})();

// ---- summary table
var st = byId("summary"), cols = ["layer", "head", "kind", "entropy", "max_weight", "first", "prev", "next", "self"];
var thr = el("tr"); ["layer", "head", "kind", "entropy", "max weight", "→ first", "→ previous", "→ next", "→ self"].forEach(function(c){ thr.appendChild(el("th", c)); }); st.appendChild(thr);
var sumRows = [];
D.summary.forEach(function(s){
  var tr = el("tr");
  cols.forEach(function(c){
    var v = s[c], txt = (c === "layer" || c === "head" || c === "kind") ? String(v) : v === null || v === undefined ? "—" : v.toFixed(3);
    tr.appendChild(el("td", txt));
  });
  tr.addEventListener("click", function(){ layerSel.value = s.layer; headSel.value = s.head; refresh(); });
  st.appendChild(tr); sumRows.push(tr);
});

// ---- what a KV-cache compression keeps (attnlens explain --kv): layers (rows) × tokens (columns), shade = KV heads keeping it
(function(){
  var K = D.kv;
  if (!K) return;
  var kept = b64(K.kept), nl = K.layers.length, vals = new Float32Array(nl * N);
  for (var p = 0; p < nl * N; p++) vals[p] = kept[p] / K.heads;
  byId("kv-card").hidden = false;
  byId("kv-title").textContent = "What the KV cache keeps — " + K.method + ", ratio " + K.ratio + (K.window ? ", window " + K.window : "");
  byId("kv-note").textContent = "After the prefill, attnlens.kv scores every key from the layer's own attention and keeps the best " +
    Math.round((1 - K.ratio) * 100) + "% per KV head; generation continues on those. Rows: layers, columns: tokens; shade = how many of the layer's " +
    K.heads + " KV heads keep the token (white = evicted by all, darkest = kept by all). Click a column to find the token." +
    (K.sliding.some(function(w){ return w; }) ? " Sliding-window layers keep only from their last window − 1 tokens." : "");
  heatmap(byId("kv"), vals, nl, D.tokens, 1, function(i, j){
      return "layer " + K.layers[i] + (K.sliding[i] ? " (sliding window " + K.sliding[i] + ")" : "") + ", " + D.tokens[j] + " #" + j +
        ": kept by " + kept[i * N + j] + " of " + K.heads + " KV heads (the layer keeps " + K.budget[i] + " keys per head)"; },
    byId("kvinfo"), null, N, K.layers.map(function(l){ return "L" + l; }));
  byId("kv").querySelector("canvas").addEventListener("click", function(ev){
    var r = ev.target.getBoundingClientRect(); goTo(Math.min(N - 1, Math.floor((ev.clientX - r.left) / r.width * N))); });
})();

// ---- an encoder-decoder model's cross-attention: decoder tokens (rows) over the encoder's (columns)
var X = D.cross, xw = X ? b64(X.w) : null, xlayer = byId("xlayer");
if (X){ for (var xl0 = 0; xl0 < X.L; xl0++){ var xo = el("option", xl0); xo.value = xl0; xlayer.appendChild(xo); } xlayer.addEventListener("change", function(){ drawCross(); }); }
function drawCross(){
  if (!X) return;
  var c = cur(), card = byId("cross-card"), nq = X.Nq, l = +xlayer.value, hsel = c.h < X.H ? c.h : -1;
  var heads = hsel < 0 ? X.H : 1, h0 = hsel < 0 ? 0 : hsel, vals = new Float32Array(nq * N), vmax = 0;
  for (var hh = h0; hh < h0 + heads; hh++) for (var p = 0; p < nq * N; p++) vals[p] += xw[((l * X.H + hh) * nq) * N + p] / 255 / heads;
  for (p = 0; p < nq * N; p++) vmax = Math.max(vmax, vals[p]);
  card.hidden = false;
  byId("cross-title").textContent = "Cross-attention, decoder → encoder — decoder " + where({l: l, h: hsel});
  heatmap(byId("cross"), vals, nq, D.tokens, vmax, function(i, j, v){ return X.tokens[i] + " #" + i + " (decoder) ← " + D.tokens[j] + " #" + j + ": " + fmt(v); },
          byId("crossinfo"), function(i){ crossRow = i; drawCrossRow(vals); }, N, X.tokens);
  drawCrossRow(vals);
}
var crossRow = -1;
function drawCrossRow(vals){  // the row view of one decoder token: the encoder tokens it reads, largest first
  var box = byId("crossrow"); box.textContent = "";
  if (crossRow < 0 || crossRow >= X.Nq){ box.appendChild(el("div", "Click a row of the heatmap to list the encoder tokens that decoder token reads.", "note")); return; }
  var r = vals.subarray(crossRow * N, (crossRow + 1) * N), mx = 0;
  for (var j = 0; j < N; j++) mx = Math.max(mx, r[j]);
  box.appendChild(el("div", "Decoder token “" + X.tokens[crossRow] + "” #" + crossRow + " reads (weights, largest first):", "note"));
  topKeys(r, 8).forEach(function(j){ box.appendChild(recBar(j, r[j], mx)); });
}

function refresh(){
  var c = cur();
  drawCross();
  byId("tok-title").textContent = "Token to token — " + what() + ", " + where(c);
  canv.forEach(function(rowc, l){ rowc.forEach(function(cv, h){ cv.classList.toggle("sel", l === c.l && (c.h < 0 || h === c.h)); }); });
  sumRows.forEach(function(tr, k){ tr.classList.toggle("sel", D.summary[k].layer === c.l && (c.h < 0 || D.summary[k].head === c.h)); });
  viewNote(); drawHeat(); drawReceived(); drawBlockRow(); show(pinned >= 0 ? pinned : shown);
}
[layerSel, headSel, viewSel].forEach(function(s){ s.addEventListener("change", refresh); });
refresh();
if (D.initial.token >= 0 && D.initial.token < N){ setPage(Math.floor(D.initial.token / PT)); show(D.initial.token); }  // shown, not pinned: hovering works at once
document.body.setAttribute("data-ready-ms", String(Math.round(performance.now())));  // since navigation start
document.body.setAttribute("data-ready", "1");
})();
