"""GPU benchmark of the ``triton`` backend: first correctness, then speed against PyTorch in the same run.

1. Correctness on fresh random inputs at several sizes: the triton output, lens fields and
   gradients against the float64 reference, with DESIGN.md's rule (error <= 2x that of the same
   math done naively by PyTorch in the same dtype, plus a small floor). Any failure stops the run.
2. Timing (CUDA only), bf16, B·N = --tokens, H·D = --hidden, D in --dims, N in --ns, causal and
   not: plain forward, forward + backward, and lens forward (entropy, received, top-8) for
   triton, PyTorch SDPA and FlexAttention (where importable), printing TFLOP/s and ratios.
   FLOPs = 4·B·H·N²·D, halved for causal; forward + backward counts 3.5x the forward.
   ``--variants`` times other kernel configs in the same run: ``[KIND:]BMxBN[xWARPS[xSTAGES]]`` with KIND
   fwd (default; times the plain forward), cols (the lens forward), dkdv or dq (forward + backward) —
   the syntax of benchmarks/triton_compile.py, which checks a config compiles without spills first.
3. Writes ``benchmarks/results/gpu-<date>-<device>.md``.

    python benchmarks/gpu.py                   # the full run on a CUDA machine (~10 min on an H100)
    python benchmarks/gpu.py --tiny            # correctness only at tiny sizes; on CPU under TRITON_INTERPRET=1
    python benchmarks/gpu.py --ns 2048 8192 --dims 128 --variants 128x128 fwd:64x64x4 dkdv:64x64x8
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_compile import parse_variant  # noqa: E402 - one syntax for config variants (imports nothing heavy)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true",
                   help="correctness only, tiny sizes, 16x16 blocks; without CUDA runs under TRITON_INTERPRET=1")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="timing dtype (default bf16)")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="head dims D (default 64 128)")
    p.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                   help="sequence lengths N (default 1k..16k)")
    p.add_argument("--tokens", type=int, default=16384, help="B·N, tokens per batch (default 16384)")
    p.add_argument("--hidden", type=int, default=2048, help="H·D (default 2048)")
    p.add_argument("--variants", nargs="*", default=[],
                   help="other configs [KIND:]BLOCK_MxBLOCK_N[xWARPS[xSTAGES]] to time, e.g. 128x128x8 dkdv:64x64x8")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness stage (not recommended)")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/gpu-<date>-<device>.md)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# correctness


def _naive(q, k, v, causal, mask=None):
    """softmax(q kᵀ/√D) v in q's dtype with plain PyTorch ops (dead rows -> 0): the tolerance yardstick."""
    import torch

    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    Nq, Nk = s.shape[-2:]
    keep = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.arange(Nk, device=q.device)[None, :] <= torch.arange(Nq, device=q.device)[:, None] + (Nk - Nq)
    keep = keep.expand(s.shape)
    if mask is not None:
        keep = keep & mask
    live = keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~live, 0.0)
    return torch.softmax(s, dim=-1) * live @ v


def _maxerr(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def check(args, device, dtype) -> bool:
    """Fresh random inputs at several sizes: output, lens and gradients against float64."""
    import torch

    import attnlens as al

    be = al.TritonBackend(config="16x16" if args.tiny else "")
    if args.tiny:
        # (B, Hq, Hkv, Nq, Nk, D, causal, key-padding)
        sizes = [(1, 2, 1, 37, 37, 32, False, False), (2, 2, 2, 20, 45, 64, True, True)]
    else:
        sizes = [(2, 4, 2, 97, 97, 64, False, False), (1, 4, 4, 1000, 1025, 128, True, False),
                 (2, 8, 2, 2049, 2049, 64, True, True), (1, 2, 1, 4096, 4096, 128, False, True)]
    lens = al.Lens(entropy=True, received=True, topk=8, rows=[0, -1])
    ok = True
    print(f"correctness vs float64 ({dtype}; bound = 2 x naive {dtype} error + one rounding to {dtype})")
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # unit roundoff: the floor is u x the largest entry
    for (B, Hq, Hkv, Nq, Nk, D, causal, pad) in sizes:
        g = torch.Generator(device="cpu").manual_seed(1000 * Nq + D)
        q = torch.randn(B, Hq, Nq, D, generator=g).to(device, dtype).requires_grad_()
        k = torch.randn(B, Hkv, Nk, D, generator=g).to(device, dtype).requires_grad_()
        v = torch.randn(B, Hkv, Nk, D, generator=g).to(device, dtype).requires_grad_()
        mask = None
        if pad:
            lengths = torch.randint(1, Nk + 1, (B,), generator=g).to(device)
            mask = (torch.arange(Nk, device=device)[None, :] < lengths[:, None])[:, None, None, :]
        out, res = al.attention(q, k, v, causal=causal, mask=mask, backend=be, lens=lens)
        dout = torch.randn(out.shape, generator=g).to(device, dtype)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        out64 = _naive(*x64, causal, mask)
        grads64 = torch.autograd.grad(out64, x64, dout.double())
        xn = [t.detach().requires_grad_() for t in (q, k, v)]
        naive = _naive(*xn, causal, mask)
        naive_grads = torch.autograd.grad(naive, xn, dout)
        rows = [("out", out, naive, out64)] + [(f"d{n}", a, b, c) for n, a, b, c in zip("qkv", grads, naive_grads, grads64)]
        # lens statistics against dense float64 weights of the same (rounded) inputs
        with torch.no_grad():
            Hg = Hq // Hkv
            kk, vv = x64[1].repeat_interleave(Hg, 1), x64[2].repeat_interleave(Hg, 1)
            s = (x64[0] @ kk.transpose(-1, -2)) * D ** -0.5
            keep = torch.ones(Nq, Nk, dtype=torch.bool, device=device)
            if causal:
                keep = torch.arange(Nk, device=device)[None, :] <= torch.arange(Nq, device=device)[:, None] + (Nk - Nq)
            keep = keep.expand(s.shape) if mask is None else keep & mask
            s = s.masked_fill(~keep, float("-inf"))
            lse = torch.logsumexp(s, -1)
            w = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
            ent = -(w * torch.log(w.clamp_min(1e-300))).sum(-1)
            fin = lse.isfinite()
            stat_ref = {"lse": (res.lse[fin], lse[fin]), "entropy": (res.entropy, ent),
                        "received": (res.received, w.sum(-2)),
                        "top-8 weights": (res.topk_weights, torch.topk(w, 8, -1).values),
                        "weight rows": (res.weights, w[:, :, [0, Nq - 1]])}
        desc = f"B={B} Hq={Hq} Hkv={Hkv} Nq={Nq} Nk={Nk} D={D}{' causal' if causal else ''}{' pad' if pad else ''}"
        for name, a, n, ref in rows:
            ea, en = _maxerr(a, ref), _maxerr(n, ref)
            good = ea <= 2 * en + u * max(1.0, float(ref.detach().abs().max()))
            ok &= good
            print(f"  {desc:52s} {name:4s} err {ea:.2e}  naive {en:.2e}  {'ok' if good else 'FAIL'}")
        for name, (a, ref) in stat_ref.items():
            # fp32 statistics of the rounded inputs: relative to the field's size (received sums up to Nq weights)
            e, size = _maxerr(a, ref), max(1.0, float(ref.abs().max()))
            good = e <= 1e-3 * size
            ok &= good
            print(f"  {desc:52s} {name:13s} err {e:.2e}  (size {size:.3g})  {'ok' if good else 'FAIL'}")
    return ok


# ------------------------------------------------------------------------------------------
# timing


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100))


def try_variant(res: dict, label: str, spec: str, make_fn) -> None:
    """Time ``make_fn(TritonBackend(config=spec))``; a config that fails is reported, not fatal."""
    import attnlens as al

    try:
        res[label] = bench_ms(make_fn(al.TritonBackend(config=spec)))
    except Exception as e:  # noqa: BLE001
        print(f"{label}: {type(e).__name__}: {str(e).splitlines()[0]}")


def time_all(args, device, dtype):
    import torch
    import torch.nn.functional as F

    import attnlens as al

    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = (torch.compile(flex_attention), create_block_mask)
        except Exception as e:  # noqa: BLE001 - optional comparison
            print(f"FlexAttention unavailable: {e}")
    lens = al.Lens(entropy=True, received=True, topk=8)
    rows = []
    for D in args.dims:
        for N in args.ns:
            B, H = max(1, args.tokens // N), max(1, args.hidden // D)
            for causal in (False, True):
                g = torch.Generator(device=device).manual_seed(N + D)
                q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g).requires_grad_()
                           for _ in range(3))
                dout = torch.randn_like(q)
                fl = 4 * B * H * N * N * D / (2 if causal else 1)
                shipped = al.TritonBackend()

                def tri_fwd(be=shipped):
                    return al.attention(q, k, v, causal=causal, backend=be)

                def tri_lens(be=shipped):
                    return al.attention(q, k, v, causal=causal, backend=be, lens=lens)[0]

                def sdpa_fwd():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                cases = {"sdpa": sdpa_fwd, "triton": tri_fwd}
                if flex is not None:
                    bm = flex[1](lambda b, h, qi, kv: kv <= qi, None, None, N, N, device=device) if causal else None
                    cases["flex"] = lambda: flex[0](q, k, v, block_mask=bm)
                res = {}
                with torch.no_grad():
                    for name, fn in cases.items():
                        res[f"{name} fwd"] = bench_ms(fn)
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    res["triton lens fwd"] = bench_ms(tri_lens)
                    lens_extra = torch.cuda.max_memory_allocated() - base
                    for var in args.variants:
                        kind, spec = parse_variant(var)
                        if kind in ("fwd", "cols"):
                            try_variant(res, f"triton {'lens ' if kind == 'cols' else ''}fwd [{var}]", spec,
                                        lambda be, f=tri_fwd if kind == "fwd" else tri_lens: lambda: f(be))
                for name, fn in cases.items():
                    res[f"{name} fwd+bwd"] = bench_ms(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), dout))
                for var in args.variants:
                    kind, spec = parse_variant(var)
                    if kind in ("dkdv", "dq"):
                        try_variant(res, f"triton fwd+bwd [{var}]", spec,
                                    lambda be: lambda: torch.autograd.grad(tri_fwd(be), (q, k, v), dout))
                for name, ms in res.items():
                    mult = 3.5 if "fwd+bwd" in name else 1.0
                    base_name = "sdpa fwd+bwd" if "fwd+bwd" in name else "sdpa fwd"
                    rows.append({"D": D, "N": N, "B": B, "H": H, "causal": causal, "case": name, "ms": ms,
                                 "tflops": mult * fl / ms * 1e-9, "vs_sdpa": res[base_name] / ms,
                                 "vs_triton_fwd": ms / res["triton fwd"] if "lens" in name else None,
                                 "lens_extra_mb": lens_extra / 2**20 if "lens" in name else None})
                    r = rows[-1]
                    extra = (f"  lens/plain {r['vs_triton_fwd']:.2f}x  peak extra {r['lens_extra_mb']:.1f} MiB"
                             if r["vs_triton_fwd"] else "")
                    print(f"D={D:3d} N={N:5d} {'causal' if causal else 'full  '} {name:22s} {ms:8.3f} ms "
                          f"{r['tflops']:7.1f} TFLOP/s  sdpa/this {r['vs_sdpa']:.2f}x{extra}")
                del q, k, v, dout
    return rows


def write_results(args, rows, check_log, device_name):
    import torch

    date = datetime.date.today().isoformat()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"gpu-{date}-{slug}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    import triton

    lines = [f"# GPU benchmark, {date}", "", f"`python {' '.join(sys.argv)}`", "",
             f"Device: {device_name}; torch {torch.__version__}, triton {triton.__version__}, "
             f"python {platform.python_version()}", "",
             f"{args.dtype}, B·N = {args.tokens}, H·D = {args.hidden}; FLOPs = 4·B·H·N²·D (halved for causal), "
             "fwd+bwd = 3.5x fwd; times: triton.testing.do_bench medians. `sdpa/this` > 1 means faster than "
             "PyTorch SDPA in the same run; `lens/plain` = lens forward (entropy, received, top-8) over the plain "
             "triton forward.", "",
             "| D | N | causal | case | ms | TFLOP/s | sdpa/this | lens/plain | lens peak extra MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lens = "" if r["vs_triton_fwd"] is None else f"{r['vs_triton_fwd']:.2f}"
        mem = "" if r["lens_extra_mb"] is None else f"{r['lens_extra_mb']:.1f}"
        lines.append(f"| {r['D']} | {r['N']} | {'yes' if r['causal'] else 'no'} | {r['case']} | {r['ms']:.3f} | "
                     f"{r['tflops']:.1f} | {r['vs_sdpa']:.2f} | {lens} | {mem} |")
    lines += ["", "## Correctness stage", "", "```", *check_log, "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    import torch  # after argument parsing, so --help is instant

    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        if not args.tiny:
            print("no CUDA device: run with --tiny for the correctness stage under the Triton interpreter",
                  file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels module imports triton
    device = "cuda" if has_cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device_name = torch.cuda.get_device_name() if has_cuda else f"cpu ({platform.machine()}, TRITON_INTERPRET)"
    print(f"device: {device_name}")

    log = []
    if not args.skip_check:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ok = check(args, device, dtype)
        log = buf.getvalue().splitlines()
        print("\n".join(log))
        if not ok:
            print("correctness check FAILED: not timing", file=sys.stderr)
            return 1
    if args.tiny or not has_cuda:
        print("--tiny: correctness only, no timing")
        return 0
    rows = time_all(args, device, dtype)
    write_results(args, rows, log, device_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
