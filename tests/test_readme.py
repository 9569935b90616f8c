"""The README's code runs as written.

Every fenced Python block of README.md (```` ```python ````, ```` ```py ````, ```` ```python3 ````; indented fences
too) runs as it is, each in a fresh process started from an empty folder (so it cannot lean on this repository's
files); a block that starts a ``torch.distributed`` process group runs under ``torchrun`` with 2 gloo ranks. The
blocks are found by reading the file, not listed here, so a section added to the README later is run without
touching this test; the test counts the blocks it ran and asserts that count.

A block may be left out only with its reason in the README itself, visible to every reader, as the block's first
line: ``# not run by tests/test_readme.py: <why>``; the test prints each such block and its reason.

The README's own ``torchrun --nproc-per-node 2`` command line (a ``bash`` block) runs too. The other ``bash`` blocks
are not run here: ``scripts/run.sh`` / ``scripts/test.sh`` build the virtual environment and run this suite, the
8-GPU line needs 8 GPUs, and the long-text lines take minutes (``benchmarks/explain_memory.py`` measures them).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_LANGS = {"python", "py", "python3"}
SKIP = re.compile(r"\A# not run by tests/test_readme\.py: (\S.{9,})$", re.M)
# the README's blocks run as a reader runs them: no HF_HUB_OFFLINE (the default model is read from disk anyway)
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))}
ENV.update(PYTHONIOENCODING="utf-8",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
TIMEOUT = 600


def fenced_blocks(text: str) -> list[tuple[str, int, str, str]]:
    """``(lang, line, section, code)`` for every fenced block (```` ``` ```` fences, indented or not), in order.

    Raises:
        AssertionError: a fence that is never closed.
    """
    blocks, section, open_at = [], "", None
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if open_at is None:
            if line.startswith("#") and not s.startswith("```"):
                section = line.lstrip("#").strip()
            if s.startswith("```"):
                open_at, lang = n, (s[3:].split() or [""])[0].lower()
        elif s == "```":
            code = textwrap.dedent("\n".join(lines[open_at:n - 1])) + "\n"
            blocks.append((lang, open_at, section, code))
            open_at = None
    assert open_at is None, f"README.md line {open_at}: a fence that is never closed"
    return blocks


BLOCKS = fenced_blocks(README)
PYTHON = [b for b in BLOCKS if b[0] in PYTHON_LANGS]


def _name(block) -> str:
    return f"README.md line {block[1]} ({block[2] or 'top'})"


def _run(block, tmp_path: Path) -> str | None:
    """Run one block in a fresh process from its own empty folder; the failure's account, or None."""
    _, line, _, code = block
    work = tmp_path / f"block-{line}"
    work.mkdir()
    if "init_process_group" in code:
        script = work / "block.py"
        script.write_text(code, encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    else:
        cmd = [sys.executable, "-c", code]
    try:
        p = subprocess.run(cmd, cwd=work, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"{_name(block)}: still running after {TIMEOUT} s"
    bad = [why for why, hit in (("exit status %d" % p.returncode, p.returncode != 0),
                                ("a traceback", "Traceback" in p.stderr), ("SIGABRT", "SIGABRT" in p.stderr)) if hit]
    return f"{_name(block)}: {', '.join(bad)}\n{code}--- stderr:\n{p.stderr[-3000:]}" if bad else None


def test_the_readme_has_python_blocks_and_every_fence_is_read():
    raw = re.findall(r"^[ \t]*```[ \t]*(python3?|py)\b", README, re.M | re.I)
    assert len(PYTHON) == len(raw) >= 7, (len(PYTHON), len(raw))
    assert "~~~" not in README, "use ``` fences: tests/test_readme.py reads only those"
    assert all(code.strip() for *_, code in PYTHON)


def test_every_python_block_of_the_readme_runs_as_written(tmp_path):
    skipped = [(b, SKIP.search(b[3]).group(1)) for b in PYTHON if SKIP.search(b[3])]
    to_run = [b for b in PYTHON if not SKIP.search(b[3])]
    for b in to_run:  # a process group left open crashed 3 of 7 runs at exit (SIGABRT): one run rarely shows it
        if "init_process_group" in b[3]:
            assert "destroy_process_group()" in b[3], f"{_name(b)}: call dist.destroy_process_group() at its end"
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: the imports of one overlap the other's work
        failures = [f for f in pool.map(lambda b: _run(b, tmp_path), to_run) if f]
    for b, why in skipped:
        print(f"not run: {_name(b)}: {why}")
    print(f"ran {len(to_run)} of the README's {len(PYTHON)} python blocks ({len(skipped)} not run, reasons above)")
    assert not failures, "\n\n".join(failures)
    assert len(to_run) + len(skipped) == len(PYTHON) and len(to_run) >= 7


def test_the_readme_torchrun_command_runs():
    lines = [line.split("#")[0].strip() for lang, _, _, code in BLOCKS if lang in ("bash", "sh", "console")
             for line in code.splitlines()]
    cmd = next(line for line in lines if line.startswith("torchrun") and "--nproc-per-node 2" in line)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", *shlex.split(cmd)[1:]], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]


def test_fenced_blocks_reads_indented_fences_sections_and_skip_reasons():
    text = ("# A\n```python\nx = 1\n```\n## B\n- item:\n\n  ```py\n  # not run by tests/test_readme.py: needs 8 GPUs"
            " and NCCL\n  y = 2\n  ```\n```bash\nls\n```\n")
    blocks = fenced_blocks(text)
    assert [(lang, line, sec) for lang, line, sec, _ in blocks] == [("python", 2, "A"), ("py", 8, "B"),
                                                                     ("bash", 12, "B")]
    assert blocks[1][3] == "# not run by tests/test_readme.py: needs 8 GPUs and NCCL\ny = 2\n"
    assert SKIP.search(blocks[1][3]).group(1) == "needs 8 GPUs and NCCL"
    assert SKIP.search("# not run by tests/test_readme.py: \nx\n") is None  # a reason is required
    with pytest.raises(AssertionError, match="line 1: a fence that is never closed"):
        fenced_blocks("```python\nx = 1\n")
