"""Ring attention with the lens across processes, checked against single-process attention.

    torchrun --nproc-per-node 2 examples/ring_attention.py                 # CPU: gloo, float64
    torchrun --nproc-per-node 8 examples/ring_attention.py --seq-len 65536 --no-check   # GPUs: NCCL, bf16

Every rank builds the same full q, k, v from one seed, keeps its zigzag shard, runs causal
`ring_attention` with the lens and a backward pass, then rank 0 gathers the shards and compares
them with `attnlens.attention` on the full tensors (on CPU; at sizes where one process can).
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist

import attnlens as al
from attnlens.distributed import gather, ring_attention, shard


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=1000, help="total sequence length (all ranks)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    ap.add_argument("--dtype", default=None, help="float64 on CPU, bfloat16 on CUDA by default")
    ap.add_argument("--no-check", action="store_true", help="skip the single-process check on rank 0")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:  # one GPU per process: torchrun sets LOCAL_RANK
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120),
                            **({"device_id": device} if cuda else {}))
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float64)

    g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    B, H, Hkv, N, D = 1, args.heads, args.kv_heads, args.seq_len, args.dim
    full = [torch.randn(B, h, N, D, generator=g) for h in (H, Hkv, Hkv, H)]  # q, k, v, dout
    q, k, v, do = (shard(x, rank, world, args.layout).to(device, dtype).contiguous() for x in full)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    lens = al.Lens(entropy=True, max_weight=True, received=True, topk=4)
    t0 = time.perf_counter()
    out, res = ring_attention(q, k, v, causal=True, layout=args.layout, lens=lens)
    out.backward(do)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    print(f"rank {rank}/{world}: {args.layout} shard of {q.shape[2]} of {N} positions, forward+backward "
          f"{secs:.2f} s; entropy mean {res.entropy.float().mean():.4f}, received sum {res.received.float().sum():.1f}",
          flush=True)

    layout = args.layout
    shards = {"out": (out.detach(), -2), "lse": (res.lse, -1), "entropy": (res.entropy, -1),
              "max_weight": (res.max_weight, -1), "received": (res.received, -1),
              "topk_indices": (res.topk_indices, -2), "dq": (q.grad, -2), "dk": (k.grad, -2), "dv": (v.grad, -2)}
    got = {name: gather(t.contiguous(), layout=layout, dim=dim) for name, (t, dim) in shards.items()}
    if rank == 0 and not args.no_check:
        # single process, on the CPU in float64: the ground truth for every dtype
        q1, k1, v1 = (x.double().requires_grad_() for x in full[:3])
        out1, res1 = al.attention(q1, k1, v1, causal=True, lens=lens)
        out1.backward(full[3].double())
        want = {"out": out1.detach(), "lse": res1.lse, "entropy": res1.entropy, "max_weight": res1.max_weight,
                "received": res1.received, "dq": q1.grad, "dk": k1.grad, "dv": v1.grad}
        tol = 1e-8 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 5e-2
        print(f"check against single-process attention (float64), {dtype}, tolerance {tol}:")
        ok = True
        for name, w in want.items():
            err = (got[name].cpu().double() - w).abs().max().item()
            scale = max(1.0, w.abs().max().item()) if name in ("received", "dq", "dk", "dv") else 1.0
            ok &= err <= tol * scale
            print(f"  {name:11s} max |ring - single| = {err:.2e}")
        same_top = (got["topk_indices"].cpu() == res1.topk_indices).float().mean().item()
        print(f"  top-4 global key indices equal in {100 * same_top:.1f}% of entries")
        print("OK" if ok else "MISMATCH")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
