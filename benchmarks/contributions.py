"""Issue 21's targets: whole-block contributions (ALTI, Kobayashi 2021 norms) composed through the layers, exact,
in linear memory, measured on this machine.

    python benchmarks/contributions.py [--tokens 512] [--long 8192] [--dense 256,512] [--repeats 3] [--out FILE]

Every measurement runs in a fresh process (peak memory = ``ru_maxrss`` minus the resident size after loading the
model and building the inputs), float32, batch 1, ``torch.no_grad()``:

1. all-MiniLM-L6-v2 at ``--tokens`` tokens: ``hf.capture(Lens())`` forward (median of ``--repeats``) against the
   composed ALTI row of every token (``analysis.compose_contributions(cap.layers())``: all N rows). Targets:
   <= 5x the capture time, < 1 GiB above the model.
2. The random 4-layer Llama of ``benchmarks/analysis.py`` (hidden 128, 8 query / 2 key-value heads) at ``--long``
   tokens: the plain forward (its default ``sdpa``) against capture + 8 composed rows (the last 8 tokens), for
   ALTI and for norms. Targets: < 2 GiB, <= 10x the plain forward.
3. The dense route at ``--dense`` tokens on MiniLM: the papers' and the authors' code's way — eager attention
   weights, every layer's ``(H, N, N, E)`` weighted transformed vectors, summed over heads, residual, LN, L1
   distances, composed — its peak memory above the model and its time, beside ours (rows of every token).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import attnlens as al  # noqa: E402
from attnlens import analysis, hf  # noqa: E402
from analysis import plain_forward_seconds, rss_bytes  # noqa: E402  (benchmarks/analysis.py)

GIB = float(1 << 30)
CHILD_TIMEOUT = 420


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_above(rss0: int) -> float:
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0) / GIB


def llama(n_pos: int):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from analysis import llama as make  # noqa: E402  (benchmarks/analysis.py: the same model)

    return make(n_pos)


def capture(model, ids):
    with torch.no_grad(), hf.capture(model, lens=al.Lens(), keep_blocks=True) as cap:
        model(input_ids=ids)
    return cap.layers()


def child_minilm(n: int, repeats: int) -> dict:
    model, _ = hf.load_default()
    ids = torch.randint(1000, 30000, (1, n), generator=torch.Generator().manual_seed(0))
    capture(model, ids[:, :8])  # warm up
    rss0 = rss_bytes()
    caps, comps = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        recs = capture(model, ids)
        t1 = time.perf_counter()
        R = analysis.compose_contributions(recs)  # (N, N): every token's composed ALTI row
        t2 = time.perf_counter()
        caps.append(t1 - t0)
        comps.append(t2 - t1)
        del recs
    assert R.shape == (n, n) and np.allclose(R.sum(-1), 1.0, atol=1e-4)
    return {"capture_s": statistics.median(caps), "compose_s": statistics.median(comps), "peak_gib": peak_above(rss0)}


def child_llama(n: int, method: str, repeats: int) -> dict:
    model = llama(n)
    ids = torch.randint(0, 30522, (1, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids[:, :8])
    rss0 = rss_bytes()
    plain = [plain_forward_seconds(model, ids) for _ in range(repeats)]
    t0 = time.perf_counter()
    recs = capture(model, ids)
    t1 = time.perf_counter()
    R = analysis.compose_contributions(recs, rows=list(range(n - 8, n)), method=method)
    t2 = time.perf_counter()
    assert R.shape == (8, n) and np.allclose(R.sum(-1), 1.0, atol=1e-4)
    return {"plain_s": statistics.median(plain), "capture_s": t1 - t0, "compose_s": t2 - t1,
            "peak_gib": peak_above(rss0)}


def child_dense(n: int) -> dict:
    """The dense route (the papers' (N, N, E) transformed vectors; the authors' code keeps (H, N, N, E) per layer)."""
    model, _ = hf.load_default()
    ids = torch.randint(1000, 30000, (1, n), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("eager")
    outs, hooks = {}, []
    for li, layer in enumerate(model.encoder.layer):
        hooks.append(layer.attention.register_forward_hook(lambda m, a, o, li=li: outs.__setitem__(li, o[0])))
    with torch.no_grad():
        model(input_ids=ids[:, :8], output_attentions=True)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    with torch.no_grad():
        o = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
        R = None
        for li, layer in enumerate(model.encoder.layer):
            x, P = o.hidden_states[li][0], o.attentions[li][0]  # (N, E), (H, N, N)
            H, E = P.shape[0], x.shape[-1]
            att = layer.attention
            v = att.self.value(x).reshape(n, H, -1).transpose(0, 1)  # (H, N, Dv)
            f = torch.einsum("hnd,hde->hne", v, att.output.dense.weight.T.reshape(H, -1, E))  # (H, N, E)
            weighted = P[..., None] * f[:, None]  # (H, N, N, E): the authors' per-head weighted vectors
            Z = weighted.sum(0)  # (N, N, E)
            del weighted
            Z[torch.arange(n), torch.arange(n)] += x
            ln = att.output.LayerNorm
            u = Z.sum(1) + att.output.dense.bias
            s = torch.sqrt(u.var(-1, unbiased=False, keepdim=True) + ln.eps)
            T = ln.weight * (Z - Z.mean(-1, keepdim=True)) / s[:, None]
            y = outs[li][0]
            c = (y.abs().sum(-1, keepdim=True) - (y[:, None] - T).abs().sum(-1)).clamp(min=0)
            C = c / c.sum(-1, keepdim=True)
            del Z, T
            R = C if R is None else C @ R
    t1 = time.perf_counter()
    for h in hooks:
        h.remove()
    return {"dense_s": t1 - t0, "peak_gib": peak_above(rss0)}


def run_child(args: list) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + [str(a) for a in args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {CHILD_TIMEOUT} s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--long", type=int, default=8192)
    ap.add_argument("--dense", default="256,512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if a.child:
        kind, n = a.child[0], int(a.child[1])
        res = (child_minilm(n, a.repeats) if kind == "minilm" else child_dense(n) if kind == "dense"
               else child_llama(n, a.child[2], max(1, a.repeats - 1)))
        print(json.dumps(res))
        return 0
    cmd = "python benchmarks/contributions.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    m = run_child(["minilm", a.tokens, "--repeats", a.repeats])
    print("minilm", m, flush=True)
    rows.append(("MiniLM", a.tokens, "ALTI, every token's composed row", m))
    for method in ("alti", "norm"):
        r = run_child(["llama", a.long, method, "--repeats", a.repeats])
        print("llama", method, r, flush=True)
        rows.append(("Llama 4L", a.long, f"{method}, 8 composed rows", r))
    dense = []
    for n in [int(x) for x in a.dense.split(",") if x]:
        d = run_child(["dense", n])
        print("dense", n, d, flush=True)
        ours = run_child(["minilm", n, "--repeats", 1]) if n != a.tokens else m
        dense.append((n, d, ours))
    lines = [f"# Whole-block contributions (issue 21) — {datetime.date.today().isoformat()}", "",
             f"Command: `{cmd}` (under `flock -x /work/cpu.lock`).  ",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, no GPU; torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads, float32, batch 1.", "",
             "| model | tokens | what | baseline (s) | capture (s) | contributions (s) | ratio "
             "| peak above model (GiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, n, what, r in rows:
        if "error" in r:
            lines.append(f"| {name} | {n} | {what} | | | {r['error']} | | |")
            continue
        if "plain_s" in r:
            base, tot = r["plain_s"], r["capture_s"] + r["compose_s"]
            lines.append(f"| {name} | {n} | {what} | plain forward {base:.2f} | {r['capture_s']:.2f} | "
                         f"{r['compose_s']:.2f} | {tot / base:.1f}x the forward (capture + rows) | "
                         f"{r['peak_gib']:.2f} |")
        else:
            lines.append(f"| {name} | {n} | {what} | capture {r['capture_s']:.2f} | {r['capture_s']:.2f} | "
                         f"{r['compose_s']:.2f} | {r['compose_s'] / r['capture_s']:.1f}x the capture | "
                         f"{r['peak_gib']:.2f} |")
    lines += ["", "Dense route (every layer's (H, N, N, E) weighted vectors, as the authors' code) against ours "
              "(capture + every token's composed ALTI row), MiniLM:", "",
              "| tokens | dense time (s) | dense peak above model (GiB) | ours time (s) | ours peak (GiB) |",
              "|---|---|---|---|---|"]
    for n, d, ours in dense:
        dt = d.get("error") or f"{d['dense_s']:.2f}"
        dp = "" if "error" in d else f"{d['peak_gib']:.2f}"
        ot = ours.get("error") or f"{ours['capture_s'] + ours['compose_s']:.2f}"
        op = "" if "error" in ours else f"{ours['peak_gib']:.2f}"
        lines.append(f"| {n} | {dt} | {dp} | {ot} | {op} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
