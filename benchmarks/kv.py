"""Issue 20's targets for `attnlens.kv`: exact scores, memory at 32k tokens, prefill time at 8k, in one run.

    python benchmarks/kv.py [--only exact,time,memory] [--tokens 8192] [--long 32768] [--eager 4096 8192]
                            [--repeats 3] [--out benchmarks/results/kv-DATE]

1. exact: random small float64 Llama (GQA), Qwen2, Mistral (sliding window 12) and Gemma 2 (soft-cap 1.0, alternating
   sliding / global layers), a left-padded batch of two (30 and 23 tokens), ratio 0.45, window 6: every method's
   scores against the dense float64 eager oracle of tests/_kv_oracle.py (max relative error) and its kept keys
   (rows of (layer, sequence, KV head) whose kept set is the same). Also the same model in float32 through attnlens
   against the float64 oracle (the kept sets that differ are near-ties of float32 rounding).
2. time: a random 4-layer Llama (hidden 512, 8 query / 2 key-value heads of D = 64, MLP 1024, vocab 32000),
   float32, batch 1, ``--tokens`` tokens: the plain prefill (``model(ids, use_cache=True, logits_to_keep=1)``, its
   default SDPA) against the same call inside ``attnlens.kv.compress(model, method, ratio=0.5)`` (scores + the
   compressed cache), each method; median of ``--repeats``, interleaved. Targets: h2o <= 1.3x, snapkv <= 1.1x.
3. memory: the same model, each in a fresh process: the peak resident memory above the loaded model and inputs
   (``ru_maxrss`` minus the resident size before the call) of the h2o (and snapkv) prefill + scores + compression at
   ``--long`` tokens (target < 2 GiB), beside the eager route that kvpress's ObservedAttentionPress needs
   (``attn_implementation="eager"``: the (B, H, N, N) weights of a layer, scored and dropped in a forward hook, then
   the same compression) at ``--eager`` tokens.
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
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attnlens import kv  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import _kv_oracle as oracle  # noqa: E402  (the float64 oracle of the tests)
from analysis import rss_bytes  # noqa: E402  (benchmarks/analysis.py: this process's resident set)

GIB = float(1 << 30)
VOCAB = 32000


def llama(n_pos: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=n_pos)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------
# 1. exact


def exact() -> list:
    rows = []
    for i, kind in enumerate(["llama", "qwen2", "mistral", "gemma2"]):
        model = oracle.tiny_model(kind, seed=i)
        ids, mask = oracle.left_padded(np.random.default_rng(i), [30, 23], 30)
        m32 = oracle.tiny_model(kind, seed=i).float()
        for method in kv.METHODS:
            kw = dict(method=method, ratio=0.45, window=6, kernel_size=5, sinks=3)
            want = oracle.eager_scores(model, ids, mask, method, ratio=0.45, window=6, kernel=5, sinks=3)
            for dt, mod in (("float64", model), ("float32", m32)):
                got = kv.scores(mod, ids, attention_mask=mask, **kw)
                err, same, total = 0.0, 0, 0
                for ls, (s, keep) in zip(got, want):
                    g = ls.scores.double().numpy()
                    fin = np.isfinite(s)
                    assert np.array_equal(np.isfinite(g), fin)
                    err = max(err, float(np.max(np.abs(g[fin] - s[fin]) / np.abs(s[fin]).clip(min=1e-300))))
                    for b in range(g.shape[0]):
                        for h in range(g.shape[1]):
                            row = [x for x in ls.keep[b, h].tolist() if x >= 0]
                            same += row == keep[b][h]
                            total += 1
                rows.append(dict(model=kind, method=method, dtype=dt, max_rel_err=err, same_keep=same, rows=total))
                print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# 2. time


def prefill(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)


def timing(n: int, repeats: int, methods) -> dict:
    model = llama(n)
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(1))
    runs = {"plain": lambda: prefill(model, ids)}
    for m in methods:
        def run(m=m):
            with kv.compress(model, method=m, ratio=0.5):
                out = prefill(model, ids)
            assert isinstance(out.past_key_values.layers[0] if hasattr(out, "past_key_values") else
                              out.cache.layers[0], kv.CompressedLayer)
        runs[m] = run
    for f in runs.values():  # warm-up (the native kernel, first allocations)
        f()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens": n, "seconds": med, "ratio": {k: med[k] / med["plain"] for k in med}, "all": times}


# ---------------------------------------------------------------------------------------------
# 3. memory (each in a fresh process)


def observed_eager(model, ids, ratio: float):
    """kvpress's ObservedAttentionPress route: eager attention returns each layer's (B, H, N, N) weights; a forward hook
    scores them (sum over queries / (N - j), mean over the group), drops them, and compresses the layer's cache."""
    hooks = []

    def hook(module, args, kwargs, output):
        w = output[1]  # (B, Hq, N, N)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer = cache.layers[module.layer_idx]
        B, Hkv, N, D = layer.keys.shape
        s = w.sum(2) / torch.arange(N, 0, -1, dtype=w.dtype)
        s = s.view(B, Hkv, -1, N).mean(2)
        idx = s.topk(int(N * (1 - ratio)), dim=-1).indices[..., None].expand(-1, -1, -1, D)
        layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
        return output[0], None

    model.set_attn_implementation("eager")
    for layer in model.model.layers:
        hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        return prefill(model, ids)
    finally:
        for h in hooks:
            h.remove()


def memory(route: str, n: int) -> dict:
    model = llama(n)
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(1))
    base = rss_bytes()
    t0 = time.perf_counter()
    if route == "eager-h2o":
        out = observed_eager(model, ids, 0.5)
    else:
        with kv.compress(model, method=route, ratio=0.5):
            out = prefill(model, ids)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    return {"route": route, "tokens": n, "peak_above_model_gib": (peak - base) / GIB, "seconds": dt,
            "cache_keys": int(cache.layers[0].keys.shape[2])}


def child(*args) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if p.returncode != 0:
        return {"route": args[0], "tokens": int(args[1]), "failed": p.stderr.strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def report(args, ex, t, mem) -> str:
    day = datetime.date.today().isoformat()
    out = [f"# attnlens.kv: exact, memory, time (issue 20), {day}", "",
           f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs; "
           f"timed under `flock -x /work/cpu.lock`), torch {torch.__version__}, threads {torch.get_num_threads()}.", "",
           f"Command: `python benchmarks/kv.py --only {args.only} --tokens {args.tokens} --long {args.long} "
           f"--eager {' '.join(map(str, args.eager))} --repeats {args.repeats}`", ""]
    if ex:
        out += ["## Exact: every method against the dense float64 eager oracle", "",
                "Left-padded batch (30 and 23 tokens), ratio 0.45, window 6, kernel 5, sinks 3; rows = (layer, "
                "sequence, KV head) whose kept set equals the oracle's.", "",
                "| model | method | max rel. error (float64) | kept sets equal (float64) | max rel. error (float32) | "
                "kept sets equal (float32) |", "|---|---|---|---|---|---|"]
        by = {(r["model"], r["method"], r["dtype"]): r for r in ex}
        for (model, method, dt), r in by.items():
            if dt != "float64":
                continue
            r32 = by[(model, method, "float32")]
            out.append(f"| {model} | {method} | {r['max_rel_err']:.1e} | {r['same_keep']}/{r['rows']} | "
                       f"{r32['max_rel_err']:.1e} | {r32['same_keep']}/{r32['rows']} |")
        out.append("")
    if t:
        out += [f"## Time: prefill at {t['tokens']} tokens (4-layer Llama, D = 64, float32; median of {args.repeats})",
                "", "| run | seconds | × plain prefill | target |", "|---|---|---|---|"]
        goals = {"h2o": "<= 1.3x", "snapkv": "<= 1.1x"}
        for k, s in t["seconds"].items():
            out.append(f"| {'plain prefill (SDPA)' if k == 'plain' else 'compress ' + k} | {s:.2f} | "
                       f"**{t['ratio'][k]:.2f}** | {goals.get(k, '')} |")
        out.append("")
    if mem:
        out += ["## Memory: prefill + scores + compression, peak above the loaded model (fresh process each)", "",
                "| route | tokens | peak above model | seconds | keys kept per layer |", "|---|---|---|---|---|"]
        for m in mem:
            if "failed" in m:
                out.append(f"| {m['route']} | {m['tokens']} | failed: {m['failed']} | | |")
            else:
                out.append(f"| {m['route']} | {m['tokens']} | **{m['peak_above_model_gib']:.2f} GiB** | "
                           f"{m['seconds']:.1f} | {m['cache_keys']} |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="exact,time,memory")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--long", type=int, default=32768, help="h2o and snapkv memory at this length (0: skip)")
    ap.add_argument("--eager", type=int, nargs="*", default=[4096, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="h2o,snapkv,tova,knorm")
    ap.add_argument("--out", default=None, help="write FILE.md and FILE.json")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    ex = exact() if "exact" in parts else None
    t = timing(args.tokens, args.repeats, args.methods.split(",")) if "time" in parts else None
    if t:
        print(json.dumps(t), flush=True)
    mem = []
    if "memory" in parts:
        longs = [("h2o", args.long), ("snapkv", args.long)] if args.long else []  # --long 0: the eager pairs only
        for route, n in longs + [(r, n) for n in args.eager for r in ("h2o", "eager-h2o")]:
            mem.append(child(route, n))
            print(json.dumps(mem[-1]), flush=True)
    md = report(args, ex, t, mem)
    print(md)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(md)
        with open(args.out + ".json", "w") as f:
            json.dump({"exact": ex, "time": t, "memory": mem}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(memory(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
