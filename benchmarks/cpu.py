"""CPU benchmark: attnlens against PyTorch's scaled_dot_product_attention, measured in the same run.

Prints a table — head dim × causal or not × N × case — of times and ratios to SDPA (forward, output only;
the forward + backward cases against SDPA's forward + backward), the median ratio of each case over the grid,
the fp32 GEMM rate of this CPU (a large ``torch.mm``, same run) and the attention FLOP rate of SDPA and of
attnlens as a share of it; then the peak extra memory of the lens and of forward + backward at long N (each
measured in a fresh subprocess from its peak resident set size). With ``--out`` writes a dated Markdown file.

    python benchmarks/cpu.py                                   # D in 16..128, N in 1k, 4k, 16k, causal and not
    python benchmarks/cpu.py --dims 64 --sizes 1024 --causal yes --no-memory   # quick look
    python benchmarks/cpu.py --cases sdpa auto lens-hr --sizes 4096            # some cases only

Cases (``--cases``): ``sdpa``; ``auto`` (``attention(q, k, v)``, no lens); ``fused`` / ``torch`` (that backend,
no lens); ``lens-hm`` (``Lens(entropy, max_weight)``), ``lens-hr`` (``Lens(entropy=True, received=True)``, the
defaults), ``lens-hrt`` (the same + top-8) — the lens cases through ``backend="auto"``, or ``--lens-backend``;
``fb-sdpa``, ``fb-auto``, ``fb-torch``: forward + backward (``out.backward(dout)``), their ratio to ``fb-sdpa``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import attnlens as al
from attnlens.core.backends.torch_chunked import CHUNK_BYTES

LENSES = {"lens-hm": al.Lens(entropy=True, max_weight=True, received=False),
          "lens-hr": al.Lens(entropy=True, received=True),
          "lens-hrt": al.Lens(entropy=True, received=True, topk=8)}
LABELS = {"sdpa": "sdpa (PyTorch)", "auto": "attnlens auto, no lens", "fused": "attnlens fused, no lens",
          "torch": "attnlens torch, no lens", "lens-hm": "lens (H, max weight)", "lens-hr": "lens (H, received)",
          "lens-hrt": "lens (H, received, top-8)", "fb-sdpa": "fwd+bwd sdpa (PyTorch)", "fb-auto": "fwd+bwd attnlens auto",
          "fb-fused": "fwd+bwd attnlens fused", "fb-torch": "fwd+bwd attnlens torch"}
ALL_CASES = list(LABELS)
DEFAULT_CASES = ["sdpa", "auto", "fused", "torch", "lens-hm", "lens-hr", "lens-hrt", "fb-sdpa", "fb-auto"]


def backend_names() -> set:
    return {b.name for b in al.backends()}


def make_case(key, q, k, v, do, causal, torch_backend, lens_backend):
    if key == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if key == "auto":
        return lambda: al.attention(q, k, v, causal=causal)
    if key == "fused":
        return lambda: al.attention(q, k, v, causal=causal, backend="fused")
    if key == "torch":
        return lambda: al.attention(q, k, v, causal=causal, backend=torch_backend)
    if key in LENSES:
        return lambda: al.attention(q, k, v, causal=causal, lens=LENSES[key], backend=lens_backend)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if key == "fb-sdpa":
        return lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal).backward(do)
    be = {"fb-auto": "auto", "fb-fused": "fused", "fb-torch": torch_backend}[key]
    return lambda: al.attention(qg, kg, vg, causal=causal, backend=be).backward(do)


def attn_flops(n: int, heads: int, dim: int, causal: bool) -> float:
    """Forward FLOPs of attention (two matrix products, 2·D each per visible score): 4·H·D·(visible scores)."""
    visible = n * (n + 1) / 2 if causal else n * n
    return 4.0 * heads * dim * visible


def gemm_rate(n: int = 4096, repeat: int = 3) -> float:
    """fp32 FLOP/s of one large ``torch.mm`` (n × n × n), median of ``repeat`` after a warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(ts)


def time_table(dims, sizes, causals, heads, repeat, cases, torch_backend, lens_backend):
    rows = []
    have = backend_names()
    cases = [c for c in cases if not (c in ("fused", "fb-fused") and "fused" not in have)]
    for dim in dims:
        for causal in causals:
            for n in sizes:
                g = torch.Generator().manual_seed(n + dim)
                q, k, v, do = (torch.randn(1, heads, n, dim, generator=g) for _ in range(4))
                r = max(1, repeat if n <= 4096 else repeat // 2)
                fns = [(c, make_case(c, q, k, v, do, causal, torch_backend, lens_backend)) for c in cases]
                times = {c: [] for c in cases}
                for _, fn in fns:  # warm-up
                    fn()
                for _ in range(r):  # interleaved, so drift in machine load hits every case alike
                    for c, fn in fns:
                        t0 = time.perf_counter()
                        fn()
                        times[c].append(time.perf_counter() - t0)
                med = {c: statistics.median(times[c]) for c in cases}
                for c in cases:
                    base = med.get("fb-sdpa") if c.startswith("fb-") else med.get("sdpa")
                    ratio = med[c] / base if base else float("nan")
                    rows.append({"D": dim, "causal": causal, "N": n, "case": c, "seconds": med[c],
                                 "ratio": ratio, "gflops": attn_flops(n, heads, dim, causal) / med[c] / 1e9})
                    print(f"  D={dim:3d} {'causal' if causal else 'full  '} N={n:6d}  {LABELS[c]:28s} "
                          f"{med[c] * 1e3:9.1f} ms  {ratio:5.2f}x", flush=True)
    return rows


def summary(rows) -> list[dict]:
    out = []
    for c in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == c]
        worst = max(rs, key=lambda r: r["ratio"])
        out.append({"case": c, "median_ratio": statistics.median(r["ratio"] for r in rs), "max_ratio": worst["ratio"],
                    "max_at": f"D={worst['D']} {'causal' if worst['causal'] else 'full'} N={worst['N']}",
                    "cells": len(rs)})
    return out


_MEM_CHILD = r"""
import sys, torch, torch.nn.functional as F, attnlens as al
kind, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 1, n, d, generator=g) for _ in range(3))
grad = "backward" in kind
if grad:
    q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
    do = torch.randn(1, 1, n, d, generator=g)
# warm up the code paths on a small problem so one-time allocations are not counted
s = 256
al.attention(q[..., :s, :].detach(), k[..., :s, :].detach(), v[..., :s, :].detach(), causal=True, lens=al.Lens(topk=8))
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current resident size
    f.write("5")
before = status_kib("VmRSS")
if kind == "lens":
    out, res = al.attention(q, k, v, causal=True, lens=al.Lens(entropy=True, received=True, topk=8))
elif kind.endswith("-forward-backward") and not kind.startswith("sdpa"):  # <backend>-forward-backward
    al.attention(q, k, v, causal=True, backend=kind[:-len("-forward-backward")]).backward(do)
elif kind == "sdpa-forward-backward":
    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)
elif kind.startswith("window-"):  # window-<backend>-<left>: a causal sliding window, no lens
    _, backend, left = kind.split("-")
    al.attention(q, k, v, window=(int(left), 0), backend=backend)
print(max(0, status_kib("VmHWM") - before) * 1024)
"""


def extra_peak_bytes(kind: str, n: int, d: int) -> int:
    """Peak resident memory above what the process held just before the call: a fresh process whose
    high-water mark is reset (Linux ``/proc/self/clear_refs``) right before the call."""
    out = subprocess.run([sys.executable, "-c", _MEM_CHILD, kind, str(n), str(d)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def window_check(n: int, w: int, heads: int, dim: int, repeat: int) -> dict:
    """``backend="auto"`` on a causal sliding window (w, 0) at length n: which backend it takes, its time against
    ``backend="torch"`` (interleaved, median) and the extra peak memory of each (one head, fresh process)."""
    from attnlens.core import dispatch
    from attnlens.core.inputs import validate

    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in range(3))
    chosen = dispatch.select(validate(q, k, v, window=(w, 0))).name
    times = {"auto": [], "torch": []}
    for _ in range(max(1, repeat)):
        for name in times:
            t0 = time.perf_counter()
            al.attention(q, k, v, window=(w, 0), backend=name)
            times[name].append(time.perf_counter() - t0)
    res = {"auto_backend": chosen, "auto_s": statistics.median(times["auto"]),
           "torch_s": statistics.median(times["torch"]),
           "auto_bytes": extra_peak_bytes(f"window-auto-{w}", n, dim),
           "torch_bytes": extra_peak_bytes(f"window-torch-{w}", n, dim)}
    print(f"  window ({w}, 0), N={n}: auto -> {chosen}, {res['auto_s']:.3f} s vs torch {res['torch_s']:.3f} s; extra "
          f"peak memory auto {res['auto_bytes'] / 2**20:.0f} MiB, torch {res['torch_bytes'] / 2**20:.0f} MiB", flush=True)
    return res


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 4096, 16384])
    ap.add_argument("--dims", type=int, nargs="*", default=[16, 32, 64, 128])
    ap.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5, help="interleaved runs per cell (half above N = 4096)")
    ap.add_argument("--cases", nargs="*", default=DEFAULT_CASES, choices=ALL_CASES)
    ap.add_argument("--lens-backend", default="auto", help="backend of the lens cases")
    ap.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES,
                    help="the torch backend's chunk size (TorchChunkedBackend(chunk_bytes=...))")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--mem-dim", type=int, default=64, help="head dim of the memory checks")
    ap.add_argument("--mem-lens-n", type=int, default=32768)
    ap.add_argument("--mem-grad-n", type=int, default=16384)
    ap.add_argument("--window-n", type=int, default=0, help="sliding-window check: N (0 = skip)")
    ap.add_argument("--window", type=int, default=64, help="sliding-window check: window (w, 0)")
    ap.add_argument("--out", default=None, help="write results (Markdown + JSON) to this path stem")
    args = ap.parse_args(argv)
    torch_backend = al.TorchChunkedBackend(chunk_bytes=args.chunk_bytes)
    causals = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"attnlens CPU benchmark  {when}\n  {machine()}\n  fp32, B=1, H={args.heads}, D in {args.dims}, "
          f"chunk_bytes={args.chunk_bytes}, median of {args.repeat} interleaved", flush=True)
    gemm = gemm_rate()
    print(f"  fp32 GEMM rate (torch.mm 4096^3): {gemm / 1e9:.1f} GFLOP/s", flush=True)
    rows = time_table(args.dims, args.sizes, causals, args.heads, args.repeat, args.cases, torch_backend,
                      args.lens_backend) if args.sizes else []
    gemm_after = gemm_rate()
    print(f"  fp32 GEMM rate after the table: {gemm_after / 1e9:.1f} GFLOP/s", flush=True)
    summ = summary(rows)
    for s in summ:
        print(f"  {LABELS[s['case']]:28s} median {s['median_ratio']:.2f}x  max {s['max_ratio']:.2f}x ({s['max_at']})")
    win = window_check(args.window_n, args.window, args.heads, args.mem_dim, args.repeat) if args.window_n else {}
    mem = {}
    if not args.no_memory:
        gib = 1 << 30
        kinds = [("lens", "lens", args.mem_lens_n)]
        kinds += [(f"{b}-forward-backward", f"{b}-forward-backward", args.mem_grad_n)
                  for b in ("auto", "torch", "sdpa")]
        for key, kind, n in kinds:
            b = extra_peak_bytes(kind, n, args.mem_dim)
            mem[key] = {"N": n, "extra_peak_bytes": b}
            print(f"  extra peak memory  {key:24s} N={n:6d}, one head, D={args.mem_dim}: {b / gib:6.3f} GiB", flush=True)
    if args.out:
        write(args, argv, when, gemm, gemm_after, rows, summ, win, mem)


def write(args, argv, when, gemm, gemm_after, rows, summ, win, mem):
    res = {"when": when, "machine": machine(), "args": vars(args), "gemm_flops": [gemm, gemm_after], "times": rows,
           "summary": summ, "memory": mem, "window": win,
           "command": "python benchmarks/cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    g = max(gemm, gemm_after)
    with open(args.out + ".md", "w") as f:
        f.write(f"# CPU benchmark, {when}\n\n`{res['command']}`\n\nMachine: {res['machine']}\n\n"
                f"fp32, B=1, H={args.heads}; median of {args.repeat} interleaved runs (half above N = 4096); ratios "
                f"are to SDPA (output only) measured in the same run, the forward + backward cases to SDPA's forward "
                f"+ backward. fp32 GEMM rate (`torch.mm`, 4096³, same run): {gemm / 1e9:.1f} GFLOP/s before the table, "
                f"{gemm_after / 1e9:.1f} after; *% GEMM* is a case's attention FLOP rate (4·H·D per visible score, "
                f"forward) as a share of the larger.\n\n")
        f.write("Summary over the grid (ratio to SDPA):\n\n| case | median | max | max at |\n|---|---|---|---|\n")
        for s in summ:
            f.write(f"| {LABELS[s['case']]} | {s['median_ratio']:.2f} | {s['max_ratio']:.2f} | {s['max_at']} |\n")
        f.write("\n| D | mask | N | case | ms | × SDPA | GFLOP/s | % GEMM |\n|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            fl = "" if r["case"].startswith("fb-") else f"{r['gflops']:.1f} | {100 * r['gflops'] * 1e9 / g:.0f}"
            fl = fl or " | "
            f.write(f"| {r['D']} | {'causal' if r['causal'] else 'none'} | {r['N']} | {LABELS[r['case']]} | "
                    f"{r['seconds'] * 1e3:.1f} | {r['ratio']:.2f} | {fl} |\n")
        if win:
            f.write(f"\nSliding window (w, 0) = ({args.window}, 0), N = {args.window_n}, no lens, B=1, H={args.heads}, "
                    f"D={args.mem_dim}: `backend=\"auto\"` takes **{win['auto_backend']}**; auto {win['auto_s']:.3f} s, "
                    f"torch {win['torch_s']:.3f} s (auto / torch = {win['auto_s'] / win['torch_s']:.2f}); extra peak "
                    f"memory (one head, fresh process): auto {win['auto_bytes'] / 2**20:.0f} MiB, torch "
                    f"{win['torch_bytes'] / 2**20:.0f} MiB.\n")
        if mem:
            f.write("\nExtra peak resident memory (fresh process, above inputs), one head, D="
                    f"{args.mem_dim}, fp32, causal:\n\n| what | N | GiB |\n|---|---|---|\n")
            for key, m in mem.items():
                f.write(f"| {key} | {m['N']} | {m['extra_peak_bytes'] / (1 << 30):.3f} |\n")
    print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
