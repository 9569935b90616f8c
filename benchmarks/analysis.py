"""Issue 10's targets: exact analyses at any length, in linear memory, measured on this machine.

    python benchmarks/analysis.py [--tokens 8192] [--long 32768] [--explain-tokens 4000] [--repeats 3] [--out FILE]

A random 4-layer Llama (hidden 128, 8 query / 2 key-value heads, D = 16) built from a config (``LlamaModel``:
no LM head, so no (N × vocab) logits), float32, batch 1, ``torch.no_grad()``:

1. ``--tokens`` tokens: the model's plain forward (its default ``sdpa``) against ``hf.capture`` with ``Lens()``
   + the exact rollout row of the last token (``analysis.rollout(rows=[-1])``) + exact head summaries with
   ``input_ids`` (first, self, prev, duplicate, induction) for every layer; median of ``--repeats``,
   interleaved. Target: <= 3x (aim 2x).
2. ``--long`` tokens, the same analysis in a fresh process: peak resident memory above the loaded model
   (``ru_maxrss`` minus the resident size after loading and building the inputs). Target: < 2 GiB (aim 1).
3. ``attnlens explain`` on an ``--explain-tokens``-token text with that model saved to a local folder (with the
   all-MiniLM-L6-v2 tokenizer): peak memory of the process and wall time, against the capture alone (model
   load + ``hf.capture(Lens())`` forward, also a fresh process). Targets: < 1.5 GiB, <= 2x the capture.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import attnlens as al  # noqa: E402
from attnlens import analysis, hf  # noqa: E402

GIB = float(1 << 30)


def llama(n_pos: int, vocab: int = 30522):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=n_pos)
    return LlamaModel(cfg).eval()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def analyse(model, ids):
    """Capture with Lens(), the exact rollout row of the last token, exact head summaries of every layer."""
    with torch.no_grad(), hf.capture(model, lens=al.Lens()) as cap:
        model(input_ids=ids)
    recs = cap.layers()
    row = analysis.rollout(recs, rows=[-1])
    sums = [analysis.head_summary(r, ids) for r in recs]
    return row, sums


def plain_forward_seconds(model, ids) -> float:
    """Seconds of one plain forward of ``model`` on ``ids`` (``torch.no_grad()``, its default attention)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids)
    return time.perf_counter() - t0


def timing(n: int, repeats: int) -> dict:
    model = llama(n)
    ids = torch.randint(0, 30522, (1, n), generator=torch.Generator().manual_seed(1))
    plain, full = [], []
    for _ in range(repeats):
        plain.append(plain_forward_seconds(model, ids))
        t0 = time.perf_counter()
        analyse(model, ids)
        full.append(time.perf_counter() - t0)
    p, f = statistics.median(plain), statistics.median(full)
    return {"tokens": n, "plain_s": p, "analysis_s": f, "ratio": f / p}


def memory(n: int) -> dict:
    """Run in a fresh process (`--child-memory`): the peak above the loaded model and inputs."""
    model = llama(n)
    ids = torch.randint(0, 30522, (1, n), generator=torch.Generator().manual_seed(1))
    base = rss_bytes()
    t0 = time.perf_counter()
    row, sums = analyse(model, ids)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens": n, "peak_above_model_gib": (peak - base) / GIB, "seconds": dt,
            "rollout_row_sum": float(row.sum()), "induction_l0": [round(float(x), 4) for x in sums[0].induction]}


def child(mode: str, *args) -> dict:
    p = subprocess.run([sys.executable, __file__, mode, *map(str, args)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def save_model(folder: str, n_pos: int) -> None:
    model = llama(n_pos)
    _, tok = hf.load_default()
    tok.model_max_length = n_pos
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def text_of(tokens: int) -> str:
    rng = np.random.default_rng(0)
    words = ("the cat sat on a mat while dogs ran past old red houses near green fields and quiet rivers under "
             "grey skies").split()
    return " ".join(rng.choice(words, tokens - 2))  # one token per word, plus [CLS] and [SEP]


def capture_alone(folder: str, text: str) -> dict:
    t0 = time.perf_counter()
    model, tok = hf.load(folder)
    enc = tok(text, return_tensors="pt")
    with torch.no_grad(), hf.capture(model, lens=al.Lens(topk=8)):
        model(**enc)
    return {"seconds": time.perf_counter() - t0, "tokens": int(enc["input_ids"].shape[1]),
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def explain(folder: str, text: str) -> dict:
    exe = os.path.join(os.path.dirname(sys.executable), "attnlens")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "attnlens"]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        p = subprocess.run([*cmd, "explain", text, "--model", folder, "--out", os.path.join(d, "r.html")],
                           capture_output=True, text=True)
        dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"explain failed: {p.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"seconds": dt, "peak_gib": peak / GIB}


def report(args, t, m, cap, exp) -> str:
    day = datetime.date.today().isoformat()
    lines = [f"# Exact analyses in linear memory (issue 10), {day}", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
             f"(shared with other jobs while measured), torch {torch.__version__}, threads {torch.get_num_threads()}.",
             "Model: random LlamaModel, 4 layers, hidden 128, 8 query / 2 key-value heads (D = 16), float32.", "",
             "| target | measured | goal |", "|---|---|---|",
             f"| {t['tokens']} tokens: capture Lens() + exact rollout row + head summaries vs plain forward | "
             f"{t['analysis_s']:.2f} s vs {t['plain_s']:.2f} s = **{t['ratio']:.2f}x** | <= 3x (aim 2x) |",
             f"| {m['tokens']} tokens: the same, peak memory above the loaded model | "
             f"**{m['peak_above_model_gib']:.2f} GiB** ({m['seconds']:.1f} s) | < 2 GiB (aim 1) |",
             f"| `attnlens explain`, {cap['tokens']} tokens: peak memory (whole process) | "
             f"**{exp['peak_gib']:.2f} GiB** | < 1.5 GiB |",
             f"| `attnlens explain` vs the capture alone (fresh processes, load included) | {exp['seconds']:.1f} s vs "
             f"{cap['seconds']:.1f} s = **{exp['seconds'] / cap['seconds']:.2f}x** | <= 2x |", "",
             f"Command: `python benchmarks/analysis.py --tokens {args.tokens} --long {args.long} "
             f"--explain-tokens {args.explain_tokens} --repeats {args.repeats}`"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--long", type=int, default=32768)
    ap.add_argument("--explain-tokens", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    args = ap.parse_args(argv)
    t = timing(args.tokens, args.repeats)
    print(json.dumps(t))
    m = child("--child-memory", args.long)
    print(json.dumps(m))
    with tempfile.TemporaryDirectory() as folder:
        save_model(folder, max(args.explain_tokens, 512) * 2)
        text = text_of(args.explain_tokens)
        cap = child("--child-capture", folder, text)
        exp = child("--child-explain", folder, text)  # its own parent: RUSAGE_CHILDREN is explain's alone
    print(json.dumps(cap), json.dumps(exp))
    md = report(args, t, m, cap, exp)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-memory":
        print(json.dumps(memory(int(sys.argv[2]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-explain":
        print(json.dumps(explain(sys.argv[2], sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-capture":
        print(json.dumps(capture_alone(sys.argv[2], sys.argv[3])))
    else:
        main()
