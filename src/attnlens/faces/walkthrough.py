"""The lesson of ``attnlens walkthrough``, as data: attention on a few words with tiny embeddings.

- `build_example(tokens, seed, dim)` → `Example`: embeddings ``X (n, d)`` from a hash of each word,
  ``W_q, W_k, W_v (d, d)`` from the seed, and ``Q, K, V (n, d)``.
- `build_lesson(ex, causal=, backend=)` → `Lesson`: calls `attnlens.attention` once with
  ``Lens(rows="all", topk=3)`` and lays out every step — its title, the matrices and numbers it
  shows, the explanatory text, and the checks it makes — as plain values (`Prose`, `Matrix`,
  `Table`, `SideBySide`, `Check`). Nothing here prints: `attnlens.cli` renders a `Lesson` as rich
  tables.

The steps: 1 embeddings and projections, 2 dot products (the dot-product view), 3 softmax row by
row, 4 the row view (each output row a convex combination of V's rows), 5 the column view
(Strang's column interpretation: each output column a combination of P's columns, weighted by
V's column), 6 received attention (P's column sums), then cross-checks of attnlens's numbers
against plain NumPy and another backend. Step 5 ends by reading one entry of the output three
ways — dot product, row, column — with the same numbers.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from ..core import Lens, attention

__all__ = ["Example", "build_example", "parse_tokens", "token_embedding", "build_lesson", "Lesson", "Step", "Prose",
           "Matrix", "Table", "Column", "SideBySide", "Check", "num", "vec",
           "DEFAULT_TOKENS", "DEFAULT_SEED", "MAX_TOKENS", "MAX_DIM", "FULL_FORMULA_KEYS", "NEARLY_ALL",
           "TABLE_COLUMNS"]

DEFAULT_TOKENS = "the cat sat on mat"
#: beyond these the n × n and n × d tables stop being readable
MAX_TOKENS = 32
MAX_DIM = 16
#: row-view formulas list every term up to this many keys, then the largest few
FULL_FORMULA_KEYS = 8
#: the column view tabulates every term of the first this many output columns (the others as checks)
TABLE_COLUMNS = 2
#: a row whose largest weight is at least this is pointed out as (almost) copying one value row
NEARLY_ALL = 0.95
#: the default seed shows both a query that (almost) copies one value row and a key that many attend to
DEFAULT_SEED = 6


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


# ---------------------------------------------------------------- the lesson's parts


def num(x: float, nd: int = 3) -> str:
    """``x`` with ``nd`` decimals as the lesson prints it: ``−∞`` for -inf, never ``-0.000``."""
    if x == -math.inf:
        return "−∞"
    s = f"{x:.{nd}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def vec(row, nd: int = 3) -> str:
    """A vector as ``[a, b, ...]`` with `num`."""
    return "[" + ", ".join(num(x, nd) for x in row) + "]"


@dataclass(frozen=True)
class Prose:
    """Plain text (never markup: ``v[cat]`` is literal). ``wide``: a formula, not wrapped at 100 columns."""

    text: str = ""
    style: Optional[str] = None
    wide: bool = False


@dataclass(frozen=True)
class Matrix:
    """Numbers ``values (len(rows), len(cols))`` with token labels as row and column headers.

    ``extra = (header, cells)`` adds a text column; ``bold_max`` marks each row's largest entry;
    entries where the bool matrix ``shown`` is False (masked) are dimmed.
    """

    title: str
    rows: tuple
    cols: tuple
    values: np.ndarray
    corner: str = "token"
    extra: Optional[tuple] = None
    bold_max: bool = False
    shown: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Column:
    header: str
    justify: str = "left"
    style: Optional[str] = None


@dataclass(frozen=True)
class Table:
    """A table of plain-text cells, one tuple per row."""

    title: str
    columns: tuple
    rows: tuple


@dataclass(frozen=True)
class SideBySide:
    """Matrices shown next to each other when they fit, else one after the other."""

    parts: tuple


@dataclass(frozen=True)
class Check:
    """A cross-check the lesson makes on its own numbers: ``ok`` and what it says."""

    ok: bool
    text: str


Item = Union[Prose, Matrix, Table, SideBySide, Check]


@dataclass(frozen=True)
class Step:
    title: str
    items: tuple


@dataclass(frozen=True)
class Lesson:
    """The walkthrough of one `Example`: ``intro`` items, then the ``steps``; ``out (n, d)`` and
    ``result`` are what `attnlens.attention` returned. ``ok``: every `Check` passed."""

    intro: tuple
    steps: tuple
    out: np.ndarray
    result: object

    @property
    def ok(self) -> bool:
        return all(it.ok for s in self.steps for it in s.items if isinstance(it, Check))


# ---------------------------------------------------------------- the lesson


@dataclass(frozen=True)
class _Run:
    """One attention call and what the steps derive from it."""

    ex: Example
    causal: bool
    backend: str
    lens: object
    out: np.ndarray  # (n, d) from attnlens
    res: object  # LensResult
    S: np.ndarray  # (n, n) the dot products Q Kᵀ, for display
    Ss: np.ndarray  # (n, n) scaled and masked: what softmax sees
    visible: np.ndarray  # (n, n) bool

    @property
    def P(self) -> np.ndarray:  # (n, n) the softmax weights, from attnlens
        return self.res.weights


def build_lesson(ex: Example, *, causal: bool = False, backend: str = "auto") -> Lesson:
    """Compute attention on ``ex`` with ``backend`` and lay out the walkthrough.

    Raises the `ValueError` / `TypeError` of `attnlens.attention` when the backend cannot serve it.
    """
    n, d = ex.X.shape
    lens = Lens(rows="all", topk=min(3, n))
    out, res = attention(ex.Q, ex.K, ex.V, causal=causal, lens=lens, backend=backend)
    S = ex.Q @ ex.K.T  # (n, n)
    visible = np.tril(np.ones((n, n), dtype=bool)) if causal else np.ones((n, n), dtype=bool)
    Ss = np.where(visible, S / math.sqrt(d), -np.inf)
    r = _Run(ex=ex, causal=causal, backend=backend, lens=lens, out=out, res=res, S=S, Ss=Ss, visible=visible)
    steps = (_embeddings(r), _scores(r), _softmax(r), _row_view(r), _column_view(r), _received(r), _cross_checks(r))
    return Lesson(intro=_intro(r), steps=steps, out=out, result=res)


def _intro(r: _Run) -> tuple:
    n, d = r.ex.X.shape
    return (
        Prose("attnlens walkthrough — scaled dot-product attention, softmax(Q Kᵀ / √d) V, step by step", style="bold"),
        Prose(f"tokens: {' '.join(r.ex.tokens)}  (n = {n})   embedding size d = {d}   seed = {r.ex.seed}   "
              f"causal = {'yes' if r.causal else 'no'}   backend = {r.backend}"),
        Prose("Attention turns n input vectors into n output vectors. Each output is a weighted average of "
              "'value' vectors — a convex combination: the weights are ≥ 0 and sum to 1. The weights come from "
              "how well one token's 'query' matches each token's 'key'."),
    )


def _embeddings(r: _Run) -> Step:
    ex = r.ex
    n, d = ex.X.shape
    items = [
        Prose(f"Each token is a vector of d = {d} numbers, one row of X. Here they come from a hash of the word and "
              "the seed (so the same word always gets the same vector); a real model learns them."),
        Matrix(f"X  ({n} tokens × {d})", ex.labels, tuple(f"x{c}" for c in range(d)), ex.X),
        Prose(f"Three {d} × {d} matrices (random here, learned in a model) map each embedding to three new vectors:"),
        Prose("  query q = x W_q   what this token is looking for\n"
              "  key   k = x W_k   what this token offers, to be matched against queries\n"
              "  value v = x W_v   what this token passes on to whoever attends to it"),
        SideBySide(tuple(Matrix(name, tuple(str(i) for i in range(d)), tuple(str(c) for c in range(d)), W, corner="")
                         for name, W in (("W_q", ex.W_q), ("W_k", ex.W_k), ("W_v", ex.W_v)))),
        SideBySide(tuple(Matrix(f"{name} = X {w}", ex.labels, tuple(f"{name.lower()}{c}" for c in range(d)), M)
                         for name, w, M in (("Q", "W_q", ex.Q), ("K", "W_k", ex.K), ("V", "W_v", ex.V)))),
    ]
    dups = sorted({t for t in ex.tokens if ex.tokens.count(t) > 1})
    if dups:
        items.append(Prose(f"Note: {', '.join(repr(t) for t in dups)} appears more than once. Same word → same x → "
                           "same q, k and v: attention by itself does not know word order (models add position "
                           "information to X for that)."))
    return Step("Step 1 · Embeddings X, and Q = X W_q, K = X W_k, V = X W_v", tuple(items))


def _scores(r: _Run) -> Step:
    ex, L = r.ex, r.ex.labels
    n, d = ex.X.shape
    i, j = min(1, n - 1), 0
    terms = " + ".join(f"({num(a)})·({num(b)})" for a, b in zip(ex.Q[i], ex.K[j]))
    items = [
        Prose("Entry S[i, j] is the dot product of query i with key j (row i of Q against column j of Kᵀ): "
              "large when the two vectors point the same way, negative when they point apart. "
              "Row i scores every key for query i."),
        Prose(f"For example  S[{L[i]}, {L[j]}] = q[{L[i]}] · k[{L[j]}] = {terms} = {num(r.S[i, j])}", wide=True),
        Prose("In the tables below rows are queries and columns are keys."),
        Matrix("S = Q Kᵀ", L, L, r.S, corner="query \\ key"),
        Prose(f"Dot products grow with the vector size (typically like √d), so attention multiplies them by "
              f"1/√d = 1/√{d} = {num(1.0 / math.sqrt(d))}; this keeps softmax (next step) from becoming "
              f"all-or-nothing as d grows."),
    ]
    if r.causal:
        items.append(Prose("Causal mask (--causal): query i may look only at itself and earlier tokens (keys j ≤ i), "
                           "as when a model writes text left to right. The scores of later keys are set to −∞ before "
                           "softmax, and exp(−∞) = 0: future keys get weight exactly 0."))
    items.append(Matrix(f"S / √{d}" + ("   (causal mask: −∞ above the diagonal)" if r.causal else ""), L, L, r.Ss,
                        corner="query \\ key", shown=r.visible))
    return Step("Step 2 · Dot products: scores S = Q Kᵀ, then scaled by 1/√d", tuple(items))


def _softmax(r: _Run) -> Step:
    P, L, d = r.P, r.ex.labels, r.ex.X.shape[1]
    sums = P.sum(axis=1)  # (n,)
    return Step("Step 3 · Softmax, row by row: the weights P", (
        Prose("Scores can be any numbers; softmax turns each row into weights: P[i, j] = exp(s_ij) / Σ_k exp(s_ik). "
              "Every weight is ≥ 0, each row sums to 1, and within a row a higher score always gets a higher weight."),
        Prose("These weights are attnlens's own (res.weights); the largest in each row is in bold on a terminal."),
        Matrix(f"P = softmax(S / √{d}), row by row", L, L, P, corner="query \\ key", bold_max=True,
               shown=r.visible, extra=("row sum", tuple(num(s) for s in sums))),
        Check(bool((P >= 0).all()) and bool(np.allclose(sums, 1.0, atol=1e-9)),
              f"all weights ≥ 0 (smallest {P.min():.3g}{', the masked future keys' if r.causal else ''}); "
              "row sums: " + " ".join(num(s) for s in sums)),
    ))


def _row_formula(r: _Run, i: int) -> str:
    """``out[i] = Σ_j P[i, j]·v[j] = [...]``: every term, or the largest few and the rest summed."""
    P, L = r.P, r.ex.labels
    keep = [j for j in np.argsort(-P[i], kind="stable") if P[i, j] > 0]
    listed = keep if len(keep) <= FULL_FORMULA_KEYS else keep[:FULL_FORMULA_KEYS - 2]
    parts = [f"{num(P[i, j])}·v[{L[j]}]" for j in sorted(listed)]
    rest = [j for j in keep if j not in listed]
    if rest:
        parts.append(f"({len(rest)} smaller terms, total weight {num(P[i, rest].sum())})")
    return f"out[{L[i]}] = " + " + ".join(parts) + f" = {vec(r.out[i])}"


def _row_view(r: _Run) -> Step:
    P, L, out, V = r.P, r.ex.labels, r.out, r.ex.V
    n, d = r.ex.X.shape
    items = [Prose("Multiplying P by V row by row: row i of P is a list of weights, and row i of the output is the "
                   "rows of V mixed with those weights. Query i 'draws on' the values of the keys it weights most.")]
    items += [Prose(_row_formula(r, i), wide=True) for i in range(n)]
    items.append(Prose("So if a token attends 100% to itself, its output row is a copy of its own V row (and if 100% "
                       "to another token, a copy of that token's V row); the more evenly it spreads its weight, the "
                       "closer its output gets to the plain average of the V rows."))
    for i in range(n):
        j = int(np.argmax(P[i]))
        if P[i, j] >= NEARLY_ALL:
            who = "itself" if i == j else L[j]
            same = "equals" if P[i, j] == 1 else "is close to"
            items.append(Prose(f"  Here: {L[i]} puts {num(P[i, j])} of its weight on {who}, so out[{L[i]}] = "
                               f"{vec(out[i])} {same} v[{L[j]}] = {vec(V[j])}.", wide=True))
    lo, hi = V.min(axis=0), V.max(axis=0)
    items += [
        Prose("Stacking these rows gives the output matrix: this is what attnlens.attention returns."),
        Matrix(f"out = P V   ({n} × {d})", L, tuple(f"out{c}" for c in range(d)), out),
        Check(bool(((out >= lo - 1e-12) & (out <= hi + 1e-12)).all()),
              "each output column lies within the range of the same column of V (an average cannot leave it)"),
        Prose("Which keys each query draws on, and how focused it is. Max weight 1 means the query copies one "
              "value row. Entropy (in nats) is 0 when all weight is on one key and log(#keys it sees) when the "
              "weight is spread evenly over them."),
        _focus_table(L, r.res, r.visible.sum(axis=1)),
    ]
    return Step("Step 4 · Row view: output row i = Σ_j P[i, j] · v_j, a weighted average of the rows of V",
                tuple(items))


def _column_view(r: _Run) -> Step:
    P, V, L, out = r.P, r.ex.V, r.ex.labels, r.out
    n, d = V.shape
    items = [Prose("The same product P V read by columns (Strang's column interpretation): column c of the output "
                   "is a combination of the columns of P, and the weights are the entries of V's column c — "
                   "column j of P (what every query takes from key j) scaled by V[j, c], then added up. "
                   f"Each of the {d} output columns is its own combination of the same {n} columns of P.")]
    for c in range(d):
        terms = " + ".join(f"({num(V[j, c])})·P[:, {L[j]}]" for j in range(n))
        items.append(Prose(f"out[:, {c}] = Σ_j V[j, {c}] · P[:, j] = {terms}", wide=True))
    items.append(Prose(f"In the tables below, the column headed 'key×a' is column 'key' of P times a = V[key, c]; "
                       "adding across a row gives that query's entry of output column c (last column), the same "
                       "number as in out = P V above."))
    for c in range(min(d, TABLE_COLUMNS)):
        cols = tuple(f"{lab}×{num(V[j, c])}" for j, lab in enumerate(L))
        items.append(Matrix(f"out[:, {c}] column by column: P[:, j] · V[j, {c}]", L, cols, P * V[:, c],
                            corner="query \\ key",
                            extra=(f"= out[:, {c}]", tuple(num(x) for x in (P * V[:, c]).sum(axis=1)))))
    if d > TABLE_COLUMNS:
        items.append(Prose(f"(Columns {TABLE_COLUMNS}..{d - 1} work the same way; the check below covers all.)"))
    cols_sum = np.stack([(P * V[:, c]).sum(axis=1) for c in range(d)], axis=1)  # (n, d): column by column
    items += [Check(bool(np.abs(cols_sum - out).max() < 1e-9),
                    f"the columns Σ_j V[j, c] · P[:, j], stacked side by side, = out = P V   "
                    f"(max |diff| {np.abs(cols_sum - out).max():.1e})"),
              *_three_readings(r)]
    return Step("Step 5 · Column view: output column c = Σ_j V[j, c] · (column j of P)", tuple(items))


def _three_readings(r: _Run) -> tuple:
    """One entry of the output read as a dot product (step 2's kind), from the row view (step 4) and
    from the column view (step 5): the same numbers, three orders of adding them up."""
    P, V, L, out = r.P, r.ex.V, r.ex.labels, r.out
    n = P.shape[0]
    i, c = min(1, n - 1), 0
    terms = " + ".join(f"{num(P[i, j])}·({num(V[j, c])})" for j in range(n))
    dot, row, col = P[i] @ V[:, c], (P[i] @ V)[c], (P @ V[:, c])[i]
    return (
        Prose(f"Three readings, one matrix. Entry out[{L[i]}, {c}] is every product P[{L[i]}, j]·V[j, {c}] added up; "
              "the three views only group the additions differently:"),
        Prose(f"  dot product:  row {L[i]} of P · column {c} of V = {terms} = {num(dot)}\n"
              f"  row view:     coordinate {c} of out[{L[i]}] = Σ_j P[{L[i]}, j]·v_j  (step 4) = {num(row)}\n"
              f"  column view:  entry {L[i]} of out[:, {c}] = Σ_j V[j, {c}]·P[:, j]  (above) = {num(col)}",
              wide=True),
        Check(bool(max(abs(dot - out[i, c]), abs(row - out[i, c]), abs(col - out[i, c])) < 1e-9),
              f"the three readings of out[{L[i]}, {c}] agree with attnlens's output {num(out[i, c])}"),
    )


def _received(r: _Run) -> Step:
    n = r.ex.X.shape[0]
    items = [Prose(f"Summing a column of P instead of weighting it: column j of P holds what every query takes from "
                   f"key j, and its sum, received[j], is key j's total share. This is not an output of attention "
                   f"but a statistic of the weights. Each of the {n} queries hands out exactly 1, so received adds "
                   f"up to {n} and averages 1.0: above 1 = attended more than average. (Heavy-hitter KV-cache "
                   "eviction keeps the keys that receive most.)")]
    if r.causal:
        items.append(Prose("With the causal mask early tokens are visible to more queries, so they tend to receive "
                           "more."))
    items.append(_received_table(r.ex.labels, r.res.received))
    return Step("Step 6 · Received attention: the column sums of P", tuple(items))


def _received_table(labels, received, width: int = 30) -> Table:
    n = len(labels)
    top = float(max(received.max(), 1e-12))
    cols = (Column("key", style="bold"), Column("received", "right"), Column("share", "right"), Column(""))
    rows = tuple((lab, num(x), f"{100 * x / n:.1f}%", "█" * int(round(width * x / top)))
                 for lab, x in zip(labels, received))
    return Table(f"received = column sums of P   (total {num(received.sum())} = n)", cols, rows)


def _focus_table(labels, res, n_visible) -> Table:
    cols = (Column("query", style="bold"), Column("draws most on (weight)"), Column("max weight", "right"),
            Column("entropy (nats)", "right"), Column("even spread = log(#keys seen)", "right"))
    rows = []
    for i, lab in enumerate(labels):
        top = ", ".join(f"{labels[j]} {num(w)}" for j, w in zip(res.topk_indices[i], res.topk_weights[i]) if j >= 0)
        seen = int(n_visible[i])
        rows.append((lab, top, num(res.max_weight[i]), num(res.entropy[i]),
                     f"{num(math.log(seen))}  ({seen} key{'s' if seen != 1 else ''})"))
    return Table("Each query: the keys it draws on most, and how focused it is", cols, tuple(rows))


def _cross_checks(r: _Run) -> Step:
    ex, P, out, causal, topk = r.ex, r.P, r.out, r.causal, r.lens.topk
    call = f"attnlens.attention(Q, K, V, {'causal=True, ' if causal else ''}lens=Lens(rows=\"all\", topk={topk}), " \
           f"backend={r.backend!r})"
    from_weights = np.abs(P @ ex.V - out).max()
    with np.errstate(invalid="ignore"):
        e = np.exp(r.Ss - r.Ss.max(axis=1, keepdims=True))
    soft = np.abs(e / e.sum(axis=1, keepdims=True) - P).max()
    other = "reference" if r.backend != "reference" else "torch"
    out2, res2 = attention(ex.Q, ex.K, ex.V, causal=causal, lens=r.lens, backend=other)
    diff = max(np.abs(out2 - out).max(), np.abs(res2.weights - P).max())
    return Step("Cross-checks", (
        Prose(f"Every weight and output above is what {call} returned (rounded for display)."),
        Check(from_weights < 1e-9, f"Σ_j P[i, j] · v_j computed from the weights = the output   "
                                   f"(max |diff| {from_weights:.1e})"),
        Check(soft < 1e-9, f"softmax of the scaled scores of step 2 = attnlens's weights   (max |diff| {soft:.1e})"),
        Check(diff < 1e-9, f"backend {r.backend!r} agrees with backend {other!r}   (max |diff| {diff:.1e})"),
        Prose(),
        Prose("Try: --seed 1 (other numbers), --tokens \"a b c d\", --dim 4" + ("" if causal else ", --causal")
              + ".  In Python:"),
        Prose(f"  out, res = attnlens.attention(Q, K, V{', causal=True' if causal else ''}, "
              f"lens=attnlens.Lens(rows=\"all\", topk={topk}))\n"
              "  res.weights  res.received  res.entropy  res.topk_indices  res.topk_weights"),
    ))
