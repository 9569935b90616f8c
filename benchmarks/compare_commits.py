"""Speed of two checkouts of attnlens side by side, in one session, interleaved (a change that moves code keeps speed).

Each round runs one fresh process per tree (alternating A, B, B, A, ...), which times every case once after
a warm-up, through the public API only (``attnlens.attention``) so any two commits compare. Medians over
the rounds; ratios to PyTorch's SDPA are taken within each tree's own process (same round, same load).

    git worktree add /tmp/before <commit>
    python benchmarks/compare_commits.py /tmp/before . --sizes 1024 4096 16384 --rounds 5 \\
        --out benchmarks/results/seam-2026-11-29
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import json, sys, time, torch, torch.nn.functional as F, attnlens as al
n, heads, dim = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(n)
q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in range(3))
lens = al.Lens(entropy=True, received=True, topk=8)
cases = {
    "sdpa (PyTorch)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "auto, no lens": lambda: al.attention(q, k, v, causal=True),
    "torch, no lens": lambda: al.attention(q, k, v, causal=True, backend="torch"),
    "lens (H, received, top-8)": lambda: al.attention(q, k, v, causal=True, lens=lens),
    "lens (H, received)": lambda: al.attention(q, k, v, causal=True, lens=al.Lens(entropy=True, received=True)),
}
out = {}
for name, fn in cases.items():
    fn()
for name, fn in cases.items():
    t0 = time.perf_counter(); fn(); out[name] = time.perf_counter() - t0
print(json.dumps(out))
"""


def run(tree: str, n: int, heads: int, dim: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "src"))
    r = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(heads), str(dim)], capture_output=True, text=True,
                       env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def commit_of(tree: str) -> str:
    r = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return r.stdout.strip() + (" + uncommitted changes" if dirty else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="write Markdown + JSON to this path stem")
    args = ap.parse_args(argv)
    trees = {"before": args.before, "after": args.after}
    commits = {k: commit_of(t) for k, t in trees.items()}
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{when}  before={commits['before']}  after={commits['after']}", flush=True)
    rows = []
    for n in args.sizes:
        times = {k: [] for k in trees}
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for k in order:
                times[k].append(run(trees[k], n, args.heads, args.dim))
        for case in times["before"][0]:
            row = {"N": n, "case": case}
            for k in trees:
                ratios = [t[case] / t["sdpa (PyTorch)"] for t in times[k]]
                row[f"{k}_ms"] = statistics.median(t[case] for t in times[k]) * 1e3
                row[f"{k}_ratio"] = statistics.median(ratios)
            row["change"] = row["after_ratio"] / row["before_ratio"] - 1
            rows.append(row)
            print(f"N={n:6d} {case:28s} before {row['before_ms']:9.1f} ms ({row['before_ratio']:.2f}x)  after "
                  f"{row['after_ms']:9.1f} ms ({row['after_ratio']:.2f}x)  {row['change']:+.1%}", flush=True)
    if args.out:
        cmd = "python benchmarks/compare_commits.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.out + ".json", "w") as f:
            json.dump({"when": when, "commits": commits, "command": cmd, "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(f"# Before / after, {when}\n\n`{cmd}`\n\nbefore: `{commits['before']}`, after: "
                    f"`{commits['after']}`; fp32, causal, B=1, H={args.heads}, D={args.dim}; {args.rounds} rounds, "
                    "trees alternating, one fresh process per tree and round; medians; × SDPA is within each "
                    "process.\n\n| N | case | before ms | before × SDPA | after ms | after × SDPA | change of ratio |\n"
                    "|---|---|---|---|---|---|---|\n")
            for r in rows:
                f.write(f"| {r['N']} | {r['case']} | {r['before_ms']:.1f} | {r['before_ratio']:.2f} | "
                        f"{r['after_ms']:.1f} | {r['after_ratio']:.2f} | {r['change']:+.1%} |\n")
        print(f"wrote {args.out}.md / .json")


if __name__ == "__main__":
    main()
