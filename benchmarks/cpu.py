"""CPU benchmark: attnlens against PyTorch's scaled_dot_product_attention, measured in the same run.

Prints a table — backend × N × lens on/off — of times and ratios to SDPA (output only, causal),
then the peak extra memory of the lens and of forward + backward at long N (each measured in a
fresh subprocess from its peak resident set size). With ``--out`` writes a dated Markdown file.

    python benchmarks/cpu.py                      # N in 1k, 4k, 16k; memory at 32k / 16k
    python benchmarks/cpu.py --sizes 1024 --no-memory   # quick look
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

LENS = al.Lens(entropy=True, received=True, topk=8, lse=True, max_weight=True)


def timeit(fn, repeat: int) -> float:
    """Median seconds over ``repeat`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_table(sizes, heads, dim, repeat, torch_backend="torch"):
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in range(3))
        r = max(1, repeat if n <= 4096 else repeat // 2)
        cases = [
            ("sdpa (PyTorch)", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            ("attnlens auto, no lens", lambda: al.attention(q, k, v, causal=True)),
            ("attnlens torch, no lens", lambda: al.attention(q, k, v, causal=True, backend=torch_backend)),
            ("attnlens lens (H, received, top-8)", lambda: al.attention(q, k, v, causal=True, lens=LENS,
                                                                         backend=torch_backend)),
            ("attnlens lens (H, received)", lambda: al.attention(
                q, k, v, causal=True, lens=al.Lens(entropy=True, received=True), backend=torch_backend)),
        ]
        # interleave the cases so drift in machine load hits all of them alike
        times = {name: [] for name, _ in cases}
        for name, fn in cases:
            fn()
        for _ in range(r):
            for name, fn in cases:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["sdpa (PyTorch)"])
        for name, _ in cases:
            t = statistics.median(times[name])
            rows.append({"N": n, "case": name, "seconds": t, "ratio_to_sdpa": t / base})
            print(f"  N={n:6d}  {name:36s} {t * 1e3:9.1f} ms  {t / base:5.2f}x SDPA", flush=True)
    return rows


_MEM_CHILD = r"""
import sys, torch, torch.nn.functional as F, attnlens as al
kind, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 1, n, d, generator=g) for _ in range(3))
grad = kind.endswith("backward")
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
elif kind == "torch-forward-backward":
    al.attention(q, k, v, causal=True, backend="torch").backward(do)
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
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES,
                    help="the torch backend's chunk size (TorchChunkedBackend(chunk_bytes=...))")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--mem-lens-n", type=int, default=32768)
    ap.add_argument("--mem-grad-n", type=int, default=16384)
    ap.add_argument("--window-n", type=int, default=40000, help="sliding-window check: N (0 = skip)")
    ap.add_argument("--window", type=int, default=64, help="sliding-window check: window (w, 0)")
    ap.add_argument("--out", default=None, help="write results (Markdown + JSON) to this path stem")
    args = ap.parse_args(argv)
    torch_backend = al.TorchChunkedBackend(chunk_bytes=args.chunk_bytes)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"attnlens CPU benchmark  {when}\n  {machine()}\n  fp32, causal, B=1, H={args.heads}, D={args.dim}, "
          f"chunk_bytes={args.chunk_bytes}, median of {args.repeat}")
    rows = time_table(args.sizes, args.heads, args.dim, args.repeat, torch_backend) if args.sizes else []
    win = window_check(args.window_n, args.window, args.heads, args.dim, args.repeat) if args.window_n else {}
    mem = {}
    if not args.no_memory:
        gib = 1 << 30
        for key, kind, n in (("lens", "lens", args.mem_lens_n),
                             ("torch-forward-backward", "torch-forward-backward", args.mem_grad_n),
                             ("sdpa-forward-backward", "sdpa-forward-backward", args.mem_grad_n)):
            b = extra_peak_bytes(kind, n, args.dim)
            mem[key] = {"N": n, "extra_peak_bytes": b}
            print(f"  extra peak memory  {key:24s} N={n:6d}, one head, D={args.dim}: {b / gib:6.3f} GiB", flush=True)
    if args.out:
        res = {"when": when, "machine": machine(), "args": vars(args), "times": rows, "memory": mem, "window": win,
               "command": "python benchmarks/cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(f"# CPU benchmark, {when}\n\n`{res['command']}`\n\nMachine: {res['machine']}\n\n"
                    f"fp32, causal, B=1, H={args.heads}, D={args.dim}; median of {args.repeat} interleaved runs; "
                    f"ratios are to SDPA (output only) measured in the same run.\n\n"
                    "| N | case | ms | × SDPA |\n|---|---|---|---|\n")
            for r in rows:
                f.write(f"| {r['N']} | {r['case']} | {r['seconds'] * 1e3:.1f} | {r['ratio_to_sdpa']:.2f} |\n")
            if win:
                f.write(f"\nSliding window (w, 0) = ({args.window}, 0), N = {args.window_n}, no lens, B=1, H={args.heads}, "
                        f"D={args.dim}: `backend=\"auto\"` takes **{win['auto_backend']}**; auto {win['auto_s']:.3f} s, "
                        f"torch {win['torch_s']:.3f} s (auto / torch = {win['auto_s'] / win['torch_s']:.2f}); extra peak "
                        f"memory (one head, fresh process): auto {win['auto_bytes'] / 2**20:.0f} MiB, torch "
                        f"{win['torch_bytes'] / 2**20:.0f} MiB.\n")
            if mem:
                f.write("\nExtra peak resident memory (fresh process, above inputs), one head, D="
                        f"{args.dim}, fp32, causal:\n\n| what | N | GiB |\n|---|---|---|\n")
                for key, m in mem.items():
                    f.write(f"| {key} | {m['N']} | {m['extra_peak_bytes'] / (1 << 30):.3f} |\n")
        print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
