"""Ring attention on CPU processes (gloo): time and peak memory per rank at world 1, 2, 4, same total N.

For each world size it spawns that many processes on 127.0.0.1; each holds its zigzag shard of
one causal problem and measures, after a warm-up:

* ``lens``: `ring_attention` forward with ``Lens(entropy, max_weight, received, topk=8)``;
* ``fwd+bwd``: `ring_attention` forward + backward (no lens);

as the median time of ``--repeat`` runs (ranks start together after a barrier; the slowest rank
counts) and the peak resident memory above what the rank held *before its inputs were made*
(Linux: the high-water mark VmHWM is reset by writing 5 to /proc/self/clear_refs, then read from
/proc/self/status; each rank makes its own shards, never the full tensors), the largest over ranks.
So the peak counts the rank's data (q/k/v/dout shards, output, lens, gradients, K/V blocks in
flight) as well as workspace: context parallelism divides the first, not the second. With two N at
the same H the script fits peak = a + b · N_local per world size and case (a: the fixed part). World 1 also measures plain ``attnlens.attention``
(``backend="torch"``, no process group) in the same process, as the baseline.

    python benchmarks/distributed.py                                  # N=4096 and 8192, H=16, with the fit
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


def measure(make, fn, repeat: int, sync):
    """(median seconds, peak bytes): one untimed run, then ``repeat`` runs, each starting after ``sync()``
    from a reset high-water mark. The peak is taken above the resident size *before* ``make()`` creates
    the rank's inputs, so it counts the rank's own data (its q/k/v/dout shards, outputs, lens,
    gradients, K/V blocks in flight) as well as workspace: what context parallelism divides."""
    x = make()
    sync()
    fn(x)
    del x
    times, peak = [], 0
    for _ in range(repeat):
        sync()
        _trim()
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size
            f.write("5")
        before = _kib("VmRSS")
        x = make()
        sync()
        t0 = time.perf_counter()
        result = fn(x)
        times.append(time.perf_counter() - t0)
        peak = max(peak, (_kib("VmHWM") - before) * 1024)
        del x, result
    return statistics.median(times), peak


def _rank(rank, world, port, n, heads, dim, repeat, threads, outdir):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    # warm up every code path on a small problem (one-time allocations, the native kernel)
    s = 64 * world
    small = [shard(torch.randn(1, heads, s, dim), rank, world, "zigzag").clone().requires_grad_() for _ in range(3)]
    ring_attention(*small, causal=True, layout="zigzag", lens=LENS)
    ring_attention(*small, causal=True, layout="zigzag").sum().backward()
    del small
    n_local = shard(torch.empty(n, 0), rank, world, "zigzag", dim=0).shape[0]

    def make(grad=False):
        """This rank's zigzag shards of q, k, v, dout, made directly (never the full tensors). The values do
        not matter for time or memory; each rank draws its own."""
        g = torch.Generator().manual_seed(1000 + rank)
        x = [torch.randn(1, heads, n_local, dim, generator=g) for _ in range(4 if grad else 3)]
        for t in x[:3] if grad else ():
            t.requires_grad_()
        return x

    def lens_fwd(x):
        q, k, v = x
        with torch.no_grad():
            return ring_attention(q, k, v, causal=True, layout="zigzag", lens=LENS)

    def fwd_bwd(x):
        q, k, v, do = x
        ring_attention(q, k, v, causal=True, layout="zigzag").backward(do)
        return q.grad, k.grad, v.grad

    res = {"rank": rank, "n_local": n_local, "threads": threads,
           "lens": measure(make, lens_fwd, repeat, dist.barrier),
           "fwd+bwd": measure(lambda: make(True), fwd_bwd, repeat, dist.barrier)}
    if world == 1:  # the baseline: one process, no ring
        def base_lens(x):
            q, k, v = x
            with torch.no_grad():
                return al.attention(q, k, v, causal=True, lens=LENS, backend="torch")

        def base_fb(x):
            q, k, v, do = x
            al.attention(q, k, v, causal=True, backend="torch").backward(do)
            return q.grad, k.grad, v.grad

        res["single lens"] = measure(make, base_lens, repeat, lambda: None)
        res["single fwd+bwd"] = measure(lambda: make(True), base_fb, repeat, lambda: None)
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
    ap.add_argument("--configs", nargs="+", default=["4096x16", "8192x16"], help="N x heads (fp32, B=1)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as Markdown to this file")
    ap.add_argument("--mmap-threshold", type=int, default=None,
                    help="run the ranks with glibc's MALLOC_MMAP_THRESHOLD_ fixed to this many bytes: larger "
                         "allocations are mmapped and go back to the OS when freed, so the peak shows what is live "
                         "rather than what the heap keeps")
    args = ap.parse_args(argv)
    if args.mmap_threshold is not None:  # read by glibc at the start of each spawned rank
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
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
            f"time = slowest rank; memory = largest over ranks of the peak resident memory above the rank's "
            f"resident size *before its inputs were made* (VmHWM reset there), so it counts the rank's q/k/v "
            f"(and dout) shards, outputs, lens, gradients and K/V blocks in flight as well as workspace; "
            f"T = one fp32 (B, H, N_local, D) shard tensor; threads per rank = max(1, cores // world); malloc: "
            f"{'MALLOC_MMAP_THRESHOLD_=' + str(args.mmap_threshold) if args.mmap_threshold else 'glibc default'}.\n")
    print(head, flush=True)
    lines = [head]
    mib = 1 << 20
    name = {"lens": "ring, lens (H, max, received, top-8)", "fwd+bwd": "ring, forward + backward",
            "single lens": "attention(), no ring: lens", "single fwd+bwd": "attention(), no ring: fwd + bwd"}
    peaks = {}  # (heads, world, case) -> {N: bytes}
    for cfg in args.configs:
        n, heads = (int(x) for x in cfg.split("x"))
        sub = (f"\n## N = {n}, H = {heads} (one fp32 q/k/v tensor: {heads * n * args.dim * 4 / mib:.0f} MiB at "
               f"world 1)\n\n"
               "| world | N_local | case | time (s) | peak per rank (MiB) | peak / T | memory × world 1 |\n"
               "|---|---|---|---|---|---|---|\n")
        print(sub, end="", flush=True)
        lines.append(sub)
        base = {}
        for world in args.worlds:
            ranks = run_world(world, n, heads, args.dim, args.repeat)
            n_local = max(r["n_local"] for r in ranks)
            shard_bytes = heads * n_local * args.dim * 4
            cases = ["lens", "fwd+bwd"] + (["single lens", "single fwd+bwd"] if world == 1 else [])
            for case in cases:
                t = max(r[case][0] for r in ranks)
                m = max(r[case][1] for r in ranks)
                peaks.setdefault((heads, world, case), {})[n] = m
                key = case.replace("single ", "")
                if world == 1 and not case.startswith("single"):
                    base[key] = m
                ratio = f"{m / base[key]:.2f}" if key in base and base[key] else "—"
                row = (f"| {world} | {n_local} | {name[case]} | {t:.2f} | {m / mib:.1f} | {m / shard_bytes:.1f} | "
                       f"{ratio} |\n")
                print(row, end="", flush=True)
                lines.append(row)
    fits = [(k, v) for k, v in sorted(peaks.items()) if len(v) >= 2]
    if fits:  # peak = a + b · N_local from the two largest N at the same H and world
        sub = ("\n## Fit: peak = a + b · N_local (two N at the same H and world)\n\n"
               "| H | world | case | N values | a: fixed part (MiB) | b · N_local at the larger N (MiB) | "
               "b in shard tensors T |\n|---|---|---|---|---|---|---|\n")
        print(sub, end="", flush=True)
        lines.append(sub)
        for (heads, world, case), by_n in fits:
            n1, n2 = sorted(by_n)[-2:]
            l1, l2 = n1 // world, n2 // world
            b = (by_n[n2] - by_n[n1]) / (l2 - l1)
            a = by_n[n2] - b * l2
            row = (f"| {heads} | {world} | {name[case]} | {n1}, {n2} | {a / mib:.1f} | {b * l2 / mib:.1f} | "
                   f"{b / (heads * args.dim * 4):.1f} |\n")
            print(row, end="", flush=True)
            lines.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("".join(lines))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
