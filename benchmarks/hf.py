"""Hugging Face targets of issue 3, measured on this machine, printed as a table of ratios.

    python benchmarks/hf.py [--repeats 7] [--tokens 512] [--explain-runs 3] [--threads N]

1. ``attnlens explain`` on a 12-word sentence, end to end in a fresh process (Python start,
   imports, model load, forward, report, summary): median wall time; target < 10 s.
2. MiniLM at ``--tokens`` tokens, batch 1, ``torch.no_grad()``, median of ``--repeats`` interleaved runs:
   - the model's default forward (``sdpa``)                    — the baseline;
   - ``hf.capture`` with ``Lens()`` (lse, max weight, entropy, received) and value norms, and with
     ``Lens(topk=8)``: no full weights; target <= 1.3× the default forward;
   - ``hf.capture`` with ``Lens(rows="all")`` (every weight) against eager with
     ``output_attentions=True``; target: no slower (ratio <= 1.0).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import attnlens as al  # noqa: E402
from attnlens import hf  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog by the river."


def explain_runs(n: int) -> list[float]:
    times = []
    exe = os.path.join(os.path.dirname(sys.executable), "attnlens")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "attnlens"]
    with tempfile.TemporaryDirectory() as d:
        for _ in range(n):
            t0 = time.perf_counter()
            p = subprocess.run([*cmd, "explain", SENTENCE, "--out", os.path.join(d, "r.html"), "--force"], capture_output=True,
                               text=True)
            times.append(time.perf_counter() - t0)
            if p.returncode != 0:
                raise SystemExit(f"explain failed: {p.stderr.strip()}")
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--explain-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"python {platform.python_version()}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"cpu count {os.cpu_count()}")
    et = explain_runs(args.explain_runs)
    print(f"\n1. attnlens explain {SENTENCE!r} (fresh process, model load included)")
    print(f"   runs: {', '.join(f'{t:.2f}' for t in et)} s   median {statistics.median(et):.2f} s   target < 10 s   "
          f"{'OK' if statistics.median(et) < 10 else 'MISSED'}")

    model, tok = hf.load_default()
    enc = tok(" ".join(["the cat sat on the mat ."] * 200), return_tensors="pt", truncation=True,
              max_length=args.tokens)
    n = enc["input_ids"].shape[1]

    def default():
        model(**enc)

    def eager_attn():
        model(**enc, output_attentions=True)

    def cap(lens, values=True):
        def f():
            with hf.capture(model, lens=lens, values=values):
                model(**enc)
        return f

    cases = {
        "default forward (sdpa)": default,
        "capture Lens() + value norms": cap(al.Lens()),
        "capture Lens(topk=8) + value norms": cap(al.Lens(topk=8)),
        "capture Lens(rows='all') (full weights)": cap(al.Lens(rows="all")),
        # what eager output_attentions gives, and nothing more: the like-for-like comparison
        "capture weights only (no stats, no norms)": cap(
            al.Lens(rows="all", lse=False, max_weight=False, entropy=False, received=False), values=False),
        "eager output_attentions=True": eager_attn,
    }
    times = {k: [] for k in cases}
    with torch.no_grad():
        for r in range(args.repeats + 2):  # two warm-up rounds, interleaved so drift hits every case alike
            for name, f in cases.items():
                if name.startswith("eager"):
                    model.set_attn_implementation("eager")
                t0 = time.perf_counter()
                f()
                dt = time.perf_counter() - t0
                if name.startswith("eager"):
                    model.set_attn_implementation("sdpa")
                if r >= 2:
                    times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    base, eager = med["default forward (sdpa)"], med["eager output_attentions=True"]
    print(f"\n2. all-MiniLM-L6-v2, {n} tokens, batch 1, median of {args.repeats}")
    print(f"   {'case':42s} {'ms':>8s} {'vs default':>11s} {'vs eager+attn':>14s}")
    for k, v in med.items():
        print(f"   {k:42s} {1e3 * v:8.1f} {v / base:10.2f}x {v / eager:13.2f}x")
    lens_ratio = med["capture Lens() + value norms"] / base
    topk_ratio = med["capture Lens(topk=8) + value norms"] / base
    full_ratio = med["capture weights only (no stats, no norms)"] / eager
    full_all_ratio = med["capture Lens(rows='all') (full weights)"] / eager
    print(f"\n   lens statistics (Lens(): lse, max weight, entropy, received) + value norms, no full weights: "
          f"{lens_ratio:.2f}x default (target <= 1.3x)  {'OK' if lens_ratio <= 1.3 else 'MISSED'}")
    print(f"   the same with top-8: {topk_ratio:.2f}x default  {'OK' if topk_ratio <= 1.3 else 'over 1.3x'}")
    print(f"   full weights, like for like: {full_ratio:.2f}x eager output_attentions (target <= 1.0x)  "
          f"{'OK' if full_ratio <= 1.0 else 'MISSED'}")
    print(f"   full weights with every statistic and value norms: {full_all_ratio:.2f}x eager output_attentions")


if __name__ == "__main__":
    main()
