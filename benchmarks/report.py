"""The report at any length (issue 12's targets), measured on this machine.

    python benchmarks/report.py [--tokens 8192] [--opens 5] [--out benchmarks/results/report-DATE]

1. A "small local model" that takes ``--tokens`` tokens: all-MiniLM-L6-v2's weights (6 layers × 12 heads) with its
   512 position embeddings tiled to ``--tokens`` positions (examples/long_model.py), saved with its tokenizer to a
   temporary folder (no download; the attention patterns are MiniLM's, not a random model's).
2. ``attnlens explain TEXT --model FOLDER`` in a fresh process on ``--tokens`` tokens of English (this repository's
   README, repeated): wall time end to end and the report's size (target < 20 MB).
3. The report opened ``--opens`` times in headless Chromium (a fresh tab each time): time from navigation start to
   the end of the page's script (``data-ready-ms``, target < 3 s), then the time a search for a token takes to jump
   there, and a layer change to redraw every panel ("interactive").

Needs Debian's chromium and chromium-driver and selenium (the browser extra).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from long_model import build_model  # noqa: E402  (examples/long_model.py: MiniLM, positions tiled)


def long_text(tok, n: int) -> str:
    """``n`` tokens (with [CLS] and [SEP]) of English: the README's prose, repeated, cut at a word, then filled up
    with "." (one token each)."""
    words = (ROOT / "README.md").read_text(encoding="utf-8").split()
    out, count = [], 2
    while True:
        for w in words:
            k = len(tok.tokenize(w))
            if count + k > n:
                return " ".join(out + ["."] * (n - count))
            out.append(w)
            count += k


def explain(folder: Path, text: str, out: Path) -> float:
    exe = Path(sys.executable).with_name("attnlens")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "attnlens"]
    t = time.perf_counter()
    subprocess.run(cmd + ["explain", text, "--model", str(folder), "--out", str(out), "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def open_times(page: Path, opens: int, needle: str, shot=None) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    import _browser
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    gen = _browser.chrome()
    drv = next(gen)
    rows = []
    try:
        for _ in range(opens):
            drv.get("about:blank")
            t = time.perf_counter()
            drv.get(page.as_uri())
            wall = time.perf_counter() - t
            body = drv.find_element("tag name", "body")
            assert body.get_attribute("data-ready") == "1", "the page script did not finish"
            ready = int(body.get_attribute("data-ready-ms")) / 1000
            box = drv.find_element("id", "search")
            box.clear()
            t = time.perf_counter()
            box.send_keys(needle, Keys.ENTER)
            pinned = drv.execute_script("var p = document.querySelector('#tokens .pinned');"
                                        "return p ? p.textContent : null")
            search = time.perf_counter() - t
            assert pinned and needle in pinned.lower(), f"the search did not jump to {needle!r}: {pinned!r}"
            t = time.perf_counter()
            Select(drv.find_element("id", "layer")).select_by_value("3")
            drv.execute_script("return document.getElementById('heat-title').textContent")
            relayer = time.perf_counter() - t
            errors = _browser.console_errors(drv)
            assert not errors, errors
            rows.append({"ready": ready, "wall": wall, "search": search, "layer": relayer})
        if shot:  # the found token, pinned (the README's picture of a long report)
            Select(drv.find_element("id", "layer")).select_by_value("0")
            drv.execute_script("window.scrollTo(0, 0)")
            drv.save_screenshot(str(shot))
    finally:
        gen.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--opens", type=int, default=5)
    ap.add_argument("--out", default=None, help="write OUT.md (default: print only)")
    ap.add_argument("--screenshot", default=None, metavar="PNG", help="save the page after the last search")
    args = ap.parse_args()
    import transformers

    from attnlens import hf

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "minilm-long"
        build_model(folder, args.tokens)
        _, tok = hf.load(str(folder))
        text = long_text(tok, args.tokens)
        n = len(tok(text)["input_ids"])
        page = Path(d) / "report.html"
        secs = explain(folder, text, page)
        size = page.stat().st_size
        rows = open_times(page, args.opens, "attention", args.screenshot)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    lines = [f"# The report at {n} tokens — {datetime.date.today()}", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}. Command: `python benchmarks/report.py --tokens {args.tokens} "
             f"--opens {args.opens}`.", "",
             f"Model: all-MiniLM-L6-v2's weights, position embeddings tiled to {args.tokens} (6 layers × 12 heads); "
             f"text: this repository's README repeated, {n} tokens.", "",
             "| what | measured | target |", "|---|---|---|",
             f"| `attnlens explain` end to end (fresh process, one run) | {secs:.1f} s | — |",
             f"| report size | {size / 1e6:.2f} MB | < 20 MB |",
             f"| open in headless Chromium, navigation start → script done (median of {len(rows)}) | "
             f"{med['ready']:.2f} s | < 3 s |",
             f"| `driver.get` wall time (median) | {med['wall']:.2f} s | — |",
             f"| search “attention” → pinned and scrolled to (median) | {med['search'] * 1000:.0f} ms | — |",
             f"| change the layer → every panel redrawn (median) | {med['layer'] * 1000:.0f} ms | — |", "",
             "Each open: " + ", ".join(f"{r['ready']:.2f}" for r in rows) + " s."]
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
