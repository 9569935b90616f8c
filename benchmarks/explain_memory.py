"""Peak memory and time of ``attnlens explain`` at several lengths, each in a fresh process, on this machine.

    python benchmarks/explain_memory.py [--tokens 16,512,965,1300,4800,8192] [--model-dir DIR] [--src SRC]
                                        [--out benchmarks/results/explain-memory-DATE]

The model is all-MiniLM-L6-v2's weights with its position embeddings tiled to the longest length asked for
(``examples/long_model.py``'s ``build_model``; no download), saved to ``--model-dir`` (kept and reused when given, else
a temporary folder); the text is ``N`` tokens of this repository's README (``long_text``), passed with ``--file``.
Each length runs ``attnlens explain --file TEXT --model DIR --out PAGE --force`` in a fresh process, under a fresh
parent that reads its child's peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and wall time.
``--src`` runs another checkout's ``src`` (``PYTHONPATH``), to compare before and after a change in one session.
Whether the full weights were kept is read from the command's warning ("full weights were not kept").
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import report as report_bench  # noqa: E402  (benchmarks/report.py: build_model, long_text)

PARENT = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
print(json.dumps({"rc": p.returncode, "wall": wall, "err": p.stderr[-2000:],
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def measure(n: int, folder: Path, tok, work: Path, src: str | None, text_arg: bool = False) -> dict:
    text = report_bench.long_text(tok, n) if n > 16 else "The animal didn't cross the street because it was too tired."
    f = work / f"text-{n}.txt"
    f.write_text(text, encoding="utf-8")
    env = {**os.environ}
    if src:
        env["PYTHONPATH"] = src
    source = [text] if text_arg else ["--file", str(f)]
    cmd = [sys.executable, "-m", "attnlens", "explain", *source, "--model", str(folder),
           "--out", str(work / f"page-{n}.html"), "--force"]
    out = subprocess.run([sys.executable, "-c", PARENT, *cmd], capture_output=True, text=True, env=env, check=True)
    r = json.loads(out.stdout)
    if r["rc"] != 0:
        raise RuntimeError(f"explain failed at {n} tokens: {r['err']}")
    return {"tokens": len(tok(text)["input_ids"]), "peak_gb": r["maxrss_kb"] * 1024 / 1e9, "wall_s": r["wall"],
            "full": "full weights were not kept" not in r["err"],
            "page_mb": (work / f"page-{n}.html").stat().st_size / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="16,512,965,1300,4800,8192",
                    help="lengths in tokens (965: the longest for which explain keeps every weight of MiniLM)")
    ap.add_argument("--model-dir", default=None, help="keep the tiled model here (reused if it exists)")
    ap.add_argument("--src", default=None, help="PYTHONPATH for the explain processes (another checkout's src)")
    ap.add_argument("--label", default="", help="a name for this run in the output")
    ap.add_argument("--text-arg", action="store_true", help="pass the text as TEXT (for versions without --file)")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json (default: print only)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.tokens.split(",")]
    import transformers

    from attnlens import hf

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        folder = Path(args.model_dir) if args.model_dir else work / "minilm-long"
        if not (folder / "config.json").is_file():
            report_bench.build_model(folder, max(max(sizes), 512))
        _, tok = hf.load(str(folder))
        rows = [measure(n, folder, tok, work, args.src, args.text_arg) for n in sizes]
    lines = [f"# attnlens explain: peak memory and time by length — {datetime.date.today()} {args.label}".rstrip(), "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}. Command: `python benchmarks/explain_memory.py --tokens {args.tokens}"
             + (f" --src {args.src}" if args.src else "") + (" --text-arg" if args.text_arg else "") + "`.", "",
             "Model: all-MiniLM-L6-v2 (6 layers × 12 heads), position embeddings tiled; text: this README, repeated. "
             "Peak = the explain process's largest resident set (ru_maxrss), model and imports included.", "",
             "| tokens | full weights kept | peak RSS | wall time | page |", "|---|---|---|---|---|"]
    lines += [f"| {r['tokens']:,} | {'yes' if r['full'] else 'no'} | {r['peak_gb']:.2f} GB | {r['wall_s']:.1f} s | "
              f"{r['page_mb']:.1f} MB |" for r in rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
