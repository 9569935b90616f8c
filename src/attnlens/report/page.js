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
