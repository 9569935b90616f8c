"""Ring attention on CPU processes (gloo): time and peak memory per rank at world 1, 2, 4, same total N.

For each world size it spawns that many processes on 127.0.0.1; each holds its zigzag shard of
one causal problem and measures, after a warm-up:

* ``lens``: `ring_attention` forward with ``Lens(entropy, max_weight, received, topk=8)``;
* ``fwd+bwd``: `ring_attention` forward + backward (no lens);

as the median time of ``--repeat`` runs (ranks start together after a barrier; the slowest rank
counts) and the peak resident memory above what the rank held just before the call (Linux: the
high-water mark VmHWM is reset by writing 5 to /proc/self/clear_refs, then read from
/proc/self/status), the largest over ranks. World 1 also measures plain ``attnlens.attention``
(``backend="torch"``, no process group) in the same process, as the baseline.

    python benchmarks/distributed.py                                  # N=16384, H=1 and N=8192, H=16
    python benchmarks/distributed.py --configs 4096x1 --worlds 1 2    # quick look
    python benchmarks/distributed.py --out benchmarks/results/distributed-DATE.md

On a machine with fewer cores than ranks the ranks share cores (threads per rank =
max(1, cores // world)), so times at world 4 on 2 cores show overhead, not speed-up.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnlens as al
from attnlens.distributed import ring_attention, shard

LENS = al.Lens(entropy=True, max_weight=True, received=True, topk=8)


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _trim():
    """Give freed heap memory back to the OS (glibc), so the resident size before a call is what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn, repeat: int, sync):
    """(median seconds, peak extra bytes): one untimed run, then each run starts after ``sync()`` with a
    reset high-water mark."""
    sync()
    fn()
    times, peak = [], 0
    for _ in range(repeat):
        sync()
        _trim()
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size
            f.write("5")
        before = _kib("VmRSS")
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        peak = max(peak, (_kib("VmHWM") - before) * 1024)
    return statistics.median(times), peak


def _rank(rank, world, port, n, heads, dim, repeat, threads, outdir):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, heads, n, dim, generator=g) for _ in range(4)]
    q, k, v, do = (shard(x, rank, world, "zigzag").clone() for x in full)
    del full
    # warm up every code path on a small problem (one-time allocations, the native kernel)
    s = 64 * world
    small = [shard(torch.randn(1, heads, s, dim), rank, world, "zigzag").clone().requires_grad_() for _ in range(3)]
    ring_attention(*small, causal=True, layout="zigzag", lens=LENS)
    ring_attention(*small, causal=True, layout="zigzag").sum().backward()
    del small

    def lens_fwd():
        with torch.no_grad():
            ring_attention(q, k, v, causal=True, layout="zigzag", lens=LENS)

    def fwd_bwd():
        qg, kg, vg = (x.requires_grad_() for x in (q, k, v))
        ring_attention(qg, kg, vg, causal=True, layout="zigzag").backward(do)
        for x in (qg, kg, vg):
            x.grad = None
            x.requires_grad_(False)

    res = {"rank": rank, "n_local": q.shape[2], "threads": threads,
           "lens": measure(lens_fwd, repeat, dist.barrier), "fwd+bwd": measure(fwd_bwd, repeat, dist.barrier)}
    if world == 1:  # the baseline: one process, no ring
        def base_lens():
            al.attention(q, k, v, causal=True, lens=LENS, backend="torch")

        def base_fb():
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            al.attention(qg, kg, vg, causal=True, backend="torch").backward(do)

        res["single lens"] = measure(base_lens, repeat, lambda: None)
        res["single fwd+bwd"] = measure(base_fb, repeat, lambda: None)
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def run_world(world, n, heads, dim, repeat):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_rank, args=(world, port, n, heads, dim, repeat, threads, outdir), nprocs=world,
                           start_method="spawn")
        return [json.load(open(os.path.join(outdir, f"rank{r}.json"))) for r in range(world)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["16384x1", "8192x16"], help="N x heads (fp32, B=1)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as Markdown to this file")
    args = ap.parse_args(argv)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/distributed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cpu = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    head = (f"# Ring attention on CPU processes (gloo), {when}\n\n`{cmd}`\n\nMachine: {cpu}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}. fp32, causal, zigzag layout, B=1, D={args.dim}; median of {args.repeat}; "
            f"time = slowest rank, memory = largest peak resident memory above the rank's inputs (VmHWM reset "
            f"before each call); threads per rank = max(1, cores // world).\n")
    print(head, flush=True)
    lines = [head]
    mib = 1 << 20
    for cfg in args.configs:
        n, heads = (int(x) for x in cfg.split("x"))
        shard_mib = 4 * heads * n * args.dim * 4 / mib
        sub = (f"\n## N = {n}, H = {heads} (q, k, v, dout together: {shard_mib:.0f} MiB at world 1)\n\n"
               "| world | N_local | case | time (s) | peak extra memory per rank (MiB) | memory × world 1 |\n"
               "|---|---|---|---|---|---|\n")
        print(sub, end="", flush=True)
        lines.append(sub)
        base = {}
        for world in args.worlds:
            ranks = run_world(world, n, heads, args.dim, args.repeat)
            cases = ["lens", "fwd+bwd"] + (["single lens", "single fwd+bwd"] if world == 1 else [])
            for case in cases:
                t = max(r[case][0] for r in ranks)
                m = max(r[case][1] for r in ranks)
                key = case.replace("single ", "")
                if world == 1 and not case.startswith("single"):
                    base[key] = m
                ratio = f"{m / base[key]:.2f}" if key in base and base[key] else "—"
                name = {"lens": "ring, lens (H, max, received, top-8)", "fwd+bwd": "ring, forward + backward",
                        "single lens": "attention(), no ring: lens", "single fwd+bwd": "attention(), no ring: fwd + bwd"}
                row = (f"| {world} | {max(r['n_local'] for r in ranks)} | {name[case]} | {t:.2f} | {m / mib:.1f} | "
                       f"{ratio} |\n")
                print(row, end="", flush=True)
                lines.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("".join(lines))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
