"""Forward cost of the score modifications on the torch backend (CPU), side by side with the plain call.

    python benchmarks/score_mods.py [--n 4096] [--heads 8] [--dim 64] [--repeats 5] [--lens]

B=1, causal, float32, ``backend="torch"``, ``torch.no_grad()``. Each round runs every variant once, in
order (interleaved, so a machine that slows down slows all of them); the table gives the median of
``--repeats`` rounds and its ratio to the plain call (target: <= 1.15 for each feature alone).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import attnlens as al
from attnlens.masks import alibi_slopes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lens", action="store_true", help="also ask for Lens(entropy, received, topk=8)")
    args = ap.parse_args(argv)
    H, N, D = args.heads, args.n, args.dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
    lens = al.Lens(entropy=True, received=True, topk=8) if args.lens else None
    variants = {
        "plain": {},
        "softcap=30": dict(softcap=30.0),
        "sinks (H,)": dict(sinks=torch.randn(H, generator=g)),
        "alibi_slopes (H,)": dict(alibi_slopes=alibi_slopes(H)),
        "all three": dict(softcap=30.0, sinks=torch.randn(H, generator=g), alibi_slopes=alibi_slopes(H)),
    }
    times = {name: [] for name in variants}
    with torch.no_grad():
        for kw in variants.values():  # warm-up (native kernel build, allocator)
            al.attention(q, k, v, causal=True, backend="torch", lens=lens, **kw)
        for _ in range(args.repeats):
            for name, kw in variants.items():
                t0 = time.perf_counter()
                al.attention(q, k, v, causal=True, backend="torch", lens=lens, **kw)
                times[name].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); B=1 H={H} N={N} D={D} causal fp32, "
          f"backend='torch', lens={'Lens(entropy, received, topk=8)' if lens else 'None'}, median of {args.repeats}")
    base = statistics.median(times["plain"])
    print(f"\n| call | median | × plain | runs (ms) |\n|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.0f} ms | {med / base:.3f} | {', '.join(f'{t * 1e3:.0f}' for t in ts)} |")


if __name__ == "__main__":
    main()
