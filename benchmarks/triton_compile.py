"""Compile the triton backend's kernels for NVIDIA GPUs without one, and report what each binary needs.

For every architecture, dtype and head dim asked for, compiles (with Triton's own compiler, down to a
cubin) every kernel that `attnlens.attention` launches for three calls — a causal forward + backward
without the lens, a causal forward with ``Lens(topk=8, rows=[0, 1])`` (entropy, received, top-8, weight
rows), and both with a key-padding mask and grouped-query heads (4 query heads per 2 kv heads: a
kernel's GQA loop is compiled away when the group is 1) — with the block sizes `ops.block_config` picks,
and prints per kernel: registers per thread, spilled bytes (local memory), shared memory per block
against the architecture's limit, and the tensor-core instruction the dots became (Hopper ``wgmma`` /
Ampere ``mma``). These are static facts of the binaries, checked before any GPU time is spent: a kernel
over the shared-memory limit cannot launch; one that spills runs from local memory. They are not timings.
Run it with TRITON_INTERPRET unset.

    python benchmarks/triton_compile.py            # sm_90/80/86/89/120, bf16/fp16/fp32, D 32..256 (~10 min cold)
    python benchmarks/triton_compile.py --arch 90 --dtypes bf16 --dims 128 \
        --variants dkdv:32x128x8 dkdv:64x64x4 dq:64x64x4                 # alternatives for one kind's config

A variant is ``KIND:BLOCK_MxBLOCK_N[xWARPS[xSTAGES]]`` with KIND one of fwd, cols, dkdv, dq (benchmarks/gpu.py
takes the same syntax to time them).
Writes ``benchmarks/results/triton-compile-<date>.md`` (``--out`` to change; ``--no-write`` not to).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

KIND_OF = {"attn_fwd_kernel": "fwd", "attn_received_kernel": "cols", "attn_weights_kernel": "cols",
           "attn_bwd_preprocess_kernel": "pre", "attn_bwd_dkdv_kernel": "dkdv", "attn_bwd_dq_kernel": "dq"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80, 86, 89, 120],
                   help="compute capabilities x10 (default 90 80 86 89 120)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256], help="head dims (default 32 64 128 256)")
    p.add_argument("--variants", nargs="*", default=[], help="KIND:BMxBN[xWARPS[xSTAGES]] configs to compile as well")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/triton-compile-<date>.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def parse_variant(text: str) -> tuple[str, str]:
    """``KIND:BMxBN[xWARPS[xSTAGES]]`` (KIND fwd when left out) -> (kind, the config string for TritonBackend)."""
    from attnlens.core.backends.triton import ops

    spec = text if ":" in text else f"fwd:{text}"
    try:
        (kind,) = ops.parse_config(spec)
    except ValueError as e:
        raise SystemExit(f"--variants: {e}") from None
    return kind, spec


def builds_for(aot, Lens, arch, dtype, d, config=""):
    """The kernels of a causal fwd+bwd (no lens), of a causal lens forward, and of both with a key-padding
    mask and GQA (the HAS_BIAS variants, and the dK/dV loop over query heads), deduplicated; ``config``: overrides
    as `ops.parse_config` reads them."""
    calls = [dict(backward=True), dict(lens=Lens(topk=8, rows=[0, 1])),
             dict(backward=True, key_padding=True, lens=Lens(topk=8, rows=[0, 1]), kv_heads=2)]
    seen, out = set(), []
    for kw in calls:
        for b in aot.compile_attention(arch=arch, dtype=dtype, d=d, causal=True, config=config, **kw):
            key = (b.kernel, tuple(sorted(b.constants.items())), b.num_warps, b.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(b)
    return out


def main(argv=None):
    args = parse_args(argv)
    variants = [parse_variant(v) for v in args.variants]
    import torch
    import triton

    from attnlens import Lens
    from attnlens.core.backends.triton import aot, ops

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    header = ["sm", "dtype", "D", "kernel", "config", "warps", "stages", "regs", "spill B", "smem KiB", "fits", "mma"]
    rows, problems = [], []
    t0 = time.time()
    jobs = [(arch, dt, d, None, "shipped") for arch in args.arch for dt in args.dtypes for d in args.dims]
    jobs += [(arch, dt, d, spec, f"variant {spec}") for (kind, spec) in variants
             for arch in args.arch for dt in args.dtypes for d in args.dims]
    for i, (arch, dt, d, override, label) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] sm_{arch} {dt} D={d} {label} ...", file=sys.stderr, flush=True)
        try:
            builds = builds_for(aot, Lens, arch, dtypes[dt], d, override or "")
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result, reported
            rows.append([arch, dt, d, label, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"] + [""] * 7)
            problems.append(rows[-1])
            continue
        for b in builds:
            kind = KIND_OF[b.kernel]
            if override is not None and kind not in ops.parse_config(override):
                continue
            r = b.row()
            row = [arch, dt, d, b.kernel.replace("attn_", "").replace("_kernel", "") +
                   ("" if override is None else f" [{label}]"), r["config"].replace("BLOCK_", ""), r["warps"],
                   r["stages"], r["regs"], r["spill B"], r["smem KiB"], r["fits"], r["mma"]]
            rows.append(row)
            print("  " + "  ".join(str(x) for x in row[3:]), file=sys.stderr, flush=True)
            if not b.fits or b.spill_bytes:
                problems.append(row)
    elapsed = time.time() - t0

    def table(rs):
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rs]
        return lines

    date = datetime.date.today().isoformat()
    cmd = "python benchmarks/triton_compile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = [f"# Triton kernels compiled without a GPU, {date}", "", f"`{cmd.strip()}`", "",
            f"triton {triton.__version__}, torch {torch.__version__}; targets sm_{', sm_'.join(map(str, args.arch))}; "
            f"{elapsed:.0f} s on this machine (Triton's on-disk cache serves kernels compiled before). "
            "Static facts of the cubins (cuobjdump -res-usage and Triton's metadata), not timings: "
            "regs = registers per thread (255 max), spill B = local memory per thread, smem = dynamic shared "
            "memory per block (limit sm_90 227 KiB, sm_80 163 KiB, sm_86/89/120 99 KiB), mma = the tensor-core "
            "instruction of the dots. Calls: causal forward+backward without lens, causal forward with "
            "Lens(topk=8, rows=[0, 1]) (entropy, received, top-8, weight rows), and both with a key-padding mask "
            "(HAS_BIAS=True) and GQA (4 query heads, 2 kv heads).", "",
            f"Spilling or not fitting: {len(problems)} of {len(rows)} rows.", "", *table(rows), ""]
    print("\n".join(text))
    if not args.no_write:
        path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"triton-compile-{date}.md")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(text))
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
