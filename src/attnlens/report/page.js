(function(){
"use strict";
var D = JSON.parse(document.getElementById("attnlens-data").textContent);
var L = D.L, H = D.H, N = D.N;
function el(tag, text, cls){ var e = document.createElement(tag); if (text !== undefined && text !== null) e.textContent = String(text); if (cls) e.className = cls; return e; }
function b64(s){ var bin = atob(s), a = new Uint8Array(bin.length); for (var i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i); return a; }
function u16(s){ var b = b64(s); return new Uint16Array(b.buffer, b.byteOffset, b.length >> 1); }
function f32(s){ var b = b64(s); return new Float32Array(b.buffer, b.byteOffset, b.length >> 2); }
function fmt(x){ return x < 0.0005 && x > 0 ? "<0.001" : x.toFixed(3); }
function byId(id){ return document.getElementById(id); }

byId("sub").textContent = "model " + D.model + " · " + N + " tokens · " + L + " layers × " + H + " heads";
D.warnings.forEach(function(w){ byId("warnings").appendChild(el("div", "⚠ " + w, "warn")); });

// ---- data: the weights (full, or each query's top k keys) and the value norms, decoded once
var Wv = D.views.weights;
var wts = Wv.mode === "full" ? {mode: "full", w: b64(Wv.w)} : {mode: "topk", k: Wv.k, idx: u16(Wv.idx), w: b64(Wv.w)};
var norms = D.norms ? f32(D.norms) : null;  // (L, H, N): ‖v_j W_O^h‖ (or ‖v_j‖)
var NK = D.norm_kind || "‖v‖";
var viewSel = byId("view");
var NKj = NK.replace("v", "vⱼ"), PNKj = "‖Pᵢⱼ " + NKj.slice(1);  // ‖vⱼ W_O‖, ‖Pᵢⱼ vⱼ W_O‖
[["weights", "attention weights P"]].concat(norms ? [["contrib", "value-norm contributions ‖P " + NK.slice(1) + " (shares)"]] : [])
  .forEach(function(p){ var o = el("option", p[1]); o.value = p[0]; viewSel.appendChild(o); });
function contribView(){ return viewSel.value === "contrib"; }
function viewNote(){
  byId("viewnote").textContent = (wts.mode === "full" ? "every weight (1-byte precision)" :
    "each query's top " + wts.k + " keys (the rest not embedded, to keep the page small)") +
    (contribView() ? "; contributions = weight × value norm, as shares of the query's total" : "");
}

// weights of query i in layer l, head h (h >= 0), as a Float32Array of N
function wrow(l, h, i){
  var out = new Float32Array(N), j;
  if (wts.mode === "full"){ var base = ((l * H + h) * N + i) * N; for (j = 0; j < N; j++) out[j] = wts.w[base + j] / 255; }
  else { var b = ((l * H + h) * N + i) * wts.k; for (var t = 0; t < wts.k; t++){ var v = wts.w[b + t]; if (v) out[wts.idx[b + t]] = v / 255; } }
  return out;
}
// ‖P_ij v_j W_O^h‖ for every key j
function crow(l, h, i){ var r = wrow(l, h, i), base = (l * H + h) * N; for (var j = 0; j < N; j++) r[j] *= norms[base + j]; return r; }
function sum(a){ var s = 0; for (var j = 0; j < a.length; j++) s += a[j]; return s; }
function scaleBy(a, s){ for (var j = 0; j < a.length; j++) a[j] *= s; return a; }
// the selected view's row: weights (h = -1: mean of heads), or contribution shares (h = -1: of all heads' sum)
function row(l, h, i){
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
function where(c){ return "layer " + c.l + ", " + (c.h < 0 ? "mean of heads" : "head " + c.h); }
function what(){ return contribView() ? "contribution shares" : "weights"; }

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
  var yl = el("div", null, "yl"); g.appendChild(yl); g.appendChild(cv);
  if (showLabels){
    labels.forEach(function(s, k){ var a = el("span", s, segClass(k)); a.style.width = px + "px"; a.title = s + " #" + k; xl.appendChild(a); });
    rl.forEach(function(s, k){ var b = el("span", s, rowLabels ? "" : segClass(k)); b.style.height = px + "px"; b.style.lineHeight = px + "px"; b.title = s + " #" + k; yl.appendChild(b); });
  }
  paint(cv, vals, t, vmax, c); cv.style.width = (c * px) + "px"; cv.style.height = (t * px) + "px";
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

// ---- token view
var tokBox = byId("tokens"), info = byId("info");
var spans = D.tokens.map(function(t, i){
  if (D.segments && i > 0 && D.segments[i] !== D.segments[i - 1]) tokBox.appendChild(el("span", "¦ segment " + "AB".charAt(D.segments[i]) + ":", "segmark"));
  var s = el("span", t, "tok " + segClass(i)); s.setAttribute("data-i", i); s.title = "#" + i; tokBox.appendChild(s); tokBox.appendChild(document.createTextNode(" ")); return s;
});
if (D.segments) byId("segnote").textContent = " A sentence pair: segment B (after ¦) is underlined.";
var pinned = -1, shown = -1;
function clearHi(){ spans.forEach(function(s){ s.style.backgroundColor = ""; s.classList.remove("q"); }); }
function topKeys(r, k){ return Array.from(r.keys()).filter(function(j){ return r[j] > 0; }).sort(function(a, b){ return r[b] - r[a]; }).slice(0, k); }
function show(i){
  shown = i; clearHi(); drawMix(i); drawPerHead(i);
  if (i < 0){ info.textContent = "Hover or click a token."; return; }
  var c = cur(), r = row(c.l, c.h, i), mx = 0;
  for (var j = 0; j < N; j++) mx = Math.max(mx, r[j]);
  for (j = 0; j < N; j++){ if (r[j] > 0) spans[j].style.backgroundColor = "rgba(47,111,222," + (0.08 + 0.85 * r[j] / (mx || 1)).toFixed(3) + ")"; }
  spans[i].classList.add("q");
  info.textContent = "";
  info.appendChild(el("b", D.tokens[i]));
  info.appendChild(document.createTextNode(" (#" + i + ", " + where(c) + ") " + (contribView() ? "takes its output from: " : "draws on: ") +
    topKeys(r, 5).map(function(j){ return D.tokens[j] + " #" + j + " " + fmt(r[j]); }).join(" · ")));
}
function pin(i){
  if (pinned >= 0) spans[pinned].classList.remove("pinned");
  pinned = pinned === i ? -1 : i;
  if (pinned >= 0){ spans[pinned].classList.add("pinned"); show(pinned); }
}
spans.forEach(function(s, i){
  s.addEventListener("mouseenter", function(){ if (pinned < 0) show(i); });
  s.addEventListener("click", function(){ pin(i); });
});
tokBox.addEventListener("mouseleave", function(){ if (pinned < 0) show(-1); });

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
  var restW = sum(m.w) - order.reduce(function(s, j){ return s + m.w[j]; }, 0);
  var restC = m.total > 0 ? 1 - order.reduce(function(s, j){ return s + m.c[j]; }, 0) / m.total : 0;
  var lines = [(order.length < N ? "Other " + (N - order.length) + " keys: weight " + fmt(Math.max(0, restW)) +
    (norms ? ", share " + (100 * Math.max(0, restC)).toFixed(1) + "%" : "") + ". " : "") +
    "The weights of a row sum to 1" + (wts.mode === "full" ? "" : " (here only each query's top " + wts.k + " keys are embedded)") + "."];
  if (norms) lines.push((one ? "" : "Heads add their terms: the contributions of all heads are summed (their sum's norm is at most this). ") +
    "A large weight on a short value vector moves the output little: compare the weight and share columns.");
  else lines.push("Value norms were not recorded for this report, so only the weights are shown.");
  lines.forEach(function(s){ box.appendChild(el("div", s, "note")); });
}

// ---- one bar per head per key, for one query (bertviz's head view, as numbers)
function headColour(h){ return "hsl(" + Math.round(360 * h / H) + ",65%,50%)"; }
function drawPerHead(i){
  var box = byId("perhead"), c = cur(); box.textContent = "";
  byId("heads-title").textContent = "Per head" + (i >= 0 ? " for “" + D.tokens[i] + "” #" + i : "") + " — layer " + c.l + ", all " + H + " heads";
  byId("heads-note").textContent = "For each key, one bar per head: its " + (contribView() ? "contribution share" : "weight") + " from this query; bar height is linear, full height = 1.";
  if (i < 0){ box.appendChild(el("div", "Hover or click a token.", "note")); return; }
  var rows = [];
  for (var hh = 0; hh < H; hh++) rows.push(row(c.l, hh, i));
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

// ---- the selected head as a labelled heatmap
function drawHeat(){
  var c = cur(), vals = new Float32Array(N * N), vmax = 0;
  for (var i = 0; i < N; i++){ var r = row(c.l, c.h, i); vals.set(r, i * N); }
  for (var p = 0; p < N * N; p++) vmax = Math.max(vmax, vals[p]);
  byId("heat-title").textContent = (contribView() ? "Contribution shares" : "Weights") + " — " + where(c);
  heatmap(byId("heat"), vals, N, D.tokens, vmax, function(i, j, v){ return D.tokens[i] + " #" + i + " ← " + D.tokens[j] + " #" + j + ": " + fmt(v); },
          byId("heatinfo"), function(i){ pin(i); });
}

// ---- grid of heads (always the weights)
var thumbs = b64(D.thumb.w), T = D.thumb.t, grid = byId("grid"), canv = [];
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

// ---- received
var rec = u16(D.received), recBox = byId("received");
function drawReceived(){
  var c = cur(), vals = new Float32Array(N), mx = 0, j;
  recBox.textContent = "";
  byId("rec-title").textContent = "Received " + (contribView() ? "contribution" : "attention") + " — " + where(c);
  byId("rec-note").textContent = contribView() ? "Mean contribution share each token gives a query (the column means of the shares)." :
    "Mean weight each token receives from a query (column sums of P / N) in this layer and head. (The terminal's table averages all layers and heads.)";
  if (contribView()){ for (var i = 0; i < N; i++){ var r = row(c.l, c.h, i); for (j = 0; j < N; j++) vals[j] += r[j] / N; } }
  else { var heads = c.h < 0 ? H : 1, h0 = c.h < 0 ? 0 : c.h; for (var hh = h0; hh < h0 + heads; hh++) for (j = 0; j < N; j++) vals[j] += rec[(c.l * H + hh) * N + j] / 65535 / heads; }
  for (j = 0; j < N; j++) mx = Math.max(mx, vals[j]);
  for (j = 0; j < N; j++){
    var b = el("div", null, "bar"); b.appendChild(el("span", D.tokens[j], "lab " + segClass(j)));
    var f = el("span", null, "fill"); f.style.width = Math.max(1, 180 * vals[j] / (mx || 1)).toFixed(1) + "px"; b.appendChild(f);
    b.appendChild(el("span", fmt(vals[j]))); recBox.appendChild(b);
  }
}

// ---- rollout
(function(){
  var roll = b64(D.rollout.w), RT = D.rollout.t, vals = new Float32Array(RT * RT);
  for (var p = 0; p < RT * RT; p++) vals[p] = roll[p] / 255 * D.rollout.max;
  byId("rollnote").textContent = "Abnar & Zuidema (2020): head mean + identity, rows renormalised, multiplied through the layers. Row i: how much top-layer token i draws on input token j" +
    (RT < N ? " (pooled to " + RT + "×" + RT + ")" : "") + (D.rollout.coverage < 0.9995 ? "; approximate, from top-k (" + (100 * D.rollout.coverage).toFixed(0) + "% of the weight)" : "") + ".";
  heatmap(byId("rollout"), vals, RT, RT === N ? D.tokens : null, D.rollout.max, function(ci, cj, v){
    var ti = Math.floor(ci * N / RT), tj = Math.floor(cj * N / RT);
    return (RT < N ? "block of " : "") + D.tokens[ti] + " #" + ti + " ← " + D.tokens[tj] + " #" + tj + ": " + fmt(v);
  }, byId("rollinfo"));
})();

// ---- summary table
var st = byId("summary"), cols = ["layer", "head", "entropy", "max_weight", "first", "prev", "self"];
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
          byId("crossinfo"), null, N, X.tokens);
}

function refresh(){
  var c = cur();
  drawCross();
  byId("tok-title").textContent = "Token to token — " + what() + ", " + where(c);
  canv.forEach(function(rowc, l){ rowc.forEach(function(cv, h){ cv.classList.toggle("sel", l === c.l && (c.h < 0 || h === c.h)); }); });
  sumRows.forEach(function(tr, k){ tr.classList.toggle("sel", D.summary[k].layer === c.l && (c.h < 0 || D.summary[k].head === c.h)); });
  viewNote(); drawHeat(); drawReceived(); show(pinned >= 0 ? pinned : shown);
}
[layerSel, headSel, viewSel].forEach(function(s){ s.addEventListener("change", refresh); });
refresh();
document.body.setAttribute("data-ready", "1");
})();
