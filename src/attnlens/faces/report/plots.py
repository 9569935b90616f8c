"""PNG heatmaps of a `ReportData` with matplotlib (the Agg backend: no screen needed).

``write_pngs(data, folder, layer=, head=)`` writes

- ``rollout.png``: the attention rollout ``(N, N)``, with a colour bar (linear, from 0);
- ``heads.png``: the layer × head grid, each head's weights (or top-k) pooled to at most 64 × 64;
- ``layer{L}_head{H}.png``: one head's weights (``head=-1``: the mean of the heads), with a colour bar;
- ``received.png``: mean received attention per token, per layer (heads averaged).

Each file is written atomically, never through a symbolic link or over a file unless asked.
Token labels are drawn up to ``MAX_LABELS`` tokens (as plain text: matplotlib's mathtext is off).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ...analysis import topk_dense
from .data import pool_means
from .files import check_target, write_atomic

__all__ = ["write_pngs", "png_names", "MAX_LABELS"]

MAX_LABELS = 48


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams["text.usetex"] = False
    plt.rcParams["text.parse_math"] = False  # tokens such as "$x$" stay text
    return plt


def _labels(ax, tokens, x=True, y=True):
    n = len(tokens)
    if n > MAX_LABELS:
        return
    if x:
        ax.set_xticks(range(n))
        ax.set_xticklabels(tokens, rotation=90, fontsize=7)
    if y:
        ax.set_yticks(range(n))
        ax.set_yticklabels(tokens, fontsize=7)


def _head_map(data, layer: int, head: int) -> np.ndarray:
    if data.weights is not None:
        w = data.weights[layer]
    elif getattr(data, "thumbs", None) is not None:  # long inputs: the exact pooled maps, never N × N
        w = data.thumbs[layer]
    else:
        w = topk_dense(data.topk_idx[layer], data.topk_w[layer], data.n)
    return w.mean(0) if head < 0 else w[head]


def png_names(layer: int = 0, head: int = -1) -> list[str]:
    """The files `write_pngs` writes, in order."""
    return ["rollout.png", "heads.png", f"layer{layer}_head{'mean' if head < 0 else head}.png", "received.png"]


def write_pngs(data, folder, *, layer: int = 0, head: int = -1, overwrite: bool = True,
               follow_symlinks: bool = True) -> list[Path]:
    """Write the PNGs into ``folder`` (created if missing); returns their paths.

    Every file is checked before the first is written (``overwrite=False``: none may exist;
    ``follow_symlinks=False``: none may be a symbolic link; else `attnlens.report._files.TargetError`),
    and each is written atomically.
    """
    plt = _plt()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in png_names(layer, head)]
    for p in paths:
        check_target(p, overwrite=overwrite, follow_symlinks=follow_symlinks)
    draws = (lambda: _rollout(plt, data), lambda: _heads(plt, data), lambda: _one_head(plt, data, layer, head),
             lambda: _received(plt, data))
    for p, draw in zip(paths, draws):
        fig, kw = draw()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", **kw)
        plt.close(fig)
        write_atomic(p, buf.getvalue(), overwrite=overwrite, follow_symlinks=follow_symlinks)
    return paths


def _size(data) -> float:
    return 4 + min(data.n, MAX_LABELS) * 0.12


def _rollout(plt, data):
    fig, ax = plt.subplots(figsize=(_size(data), _size(data)))
    im = ax.imshow(data.rollout, cmap="Blues", interpolation="nearest", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title("attention rollout (row: top-layer token, column: input token)", fontsize=9)
    _labels(ax, list(data.tokens))
    fig.tight_layout()
    return fig, dict(dpi=110)


def _heads(plt, data):
    L, H = data.n_layers, data.n_heads
    fig, axes = plt.subplots(L, H, figsize=(1.1 * H, 1.1 * L), squeeze=False)
    t = min(64, data.n)
    for li in range(L):
        for h in range(H):
            ax = axes[li][h]
            ax.imshow(pool_means(_head_map(data, li, h).astype(np.float64), t), cmap="Blues", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if li == 0:
                ax.set_title(f"h{h}", fontsize=7)
            if h == 0:
                ax.set_ylabel(f"L{li}", fontsize=7)
    fig.suptitle("attention weights per layer and head", fontsize=9)
    fig.tight_layout()
    return fig, dict(dpi=100)


def _one_head(plt, data, layer: int, head: int):
    fig, ax = plt.subplots(figsize=(_size(data), _size(data)))
    im = ax.imshow(_head_map(data, layer, head), cmap="Blues", interpolation="nearest", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(f"layer {layer}, {'mean of heads' if head < 0 else f'head {head}'} (row: query, column: key)",
                 fontsize=9)
    _labels(ax, list(data.tokens))
    fig.tight_layout()
    return fig, dict(dpi=110)


def _received(plt, data):
    L = data.n_layers
    rec = data.received.mean(1) / max(data.n, 1)  # (L, N)
    fig, ax = plt.subplots(figsize=(max(6.0, min(data.n, MAX_LABELS) * 0.25), 1.2 + 0.35 * L))
    ax.imshow(rec, cmap="Blues", aspect="auto", interpolation="nearest")
    ax.set_yticks(range(L))
    ax.set_yticklabels([f"L{i}" for i in range(L)], fontsize=7)
    _labels(ax, list(data.tokens), y=False)
    ax.set_title("received attention per token (mean weight from a query; heads averaged)", fontsize=9)
    return fig, dict(dpi=110, bbox_inches="tight")
