"""PNG heatmaps of a `ReportData` with matplotlib (the Agg backend: no screen needed).

``write_pngs(data, folder, layer=, head=)`` writes

- ``rollout.png``: the attention rollout ``(N, N)``;
- ``heads.png``: the layer × head grid, each head's weights (or top-k) pooled to at most 64 × 64;
- ``layer{L}_head{H}.png``: one head's weights (``head=-1``: the mean of the heads);
- ``received.png``: mean received attention per token, per layer (heads averaged).

Token labels are drawn up to ``MAX_LABELS`` tokens (as plain text: matplotlib's mathtext is off).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_pngs", "MAX_LABELS"]

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
    else:
        from ..analysis import topk_dense

        w = topk_dense(data.topk_idx[layer], data.topk_w[layer], data.n)
    return w.mean(0) if head < 0 else w[head]


def write_pngs(data, folder, *, layer: int = 0, head: int = -1) -> list[Path]:
    """Write the PNGs into ``folder`` (created if missing); returns their paths."""
    from .html import _pool

    plt = _plt()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    toks = list(data.tokens)
    size = 4 + min(data.n, MAX_LABELS) * 0.12

    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(data.rollout, cmap="Blues", interpolation="nearest")
    ax.set_title("attention rollout (row: top-layer token, column: input token)", fontsize=9)
    _labels(ax, toks)
    fig.tight_layout()
    paths.append(folder / "rollout.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    L, H = data.n_layers, data.n_heads
    fig, axes = plt.subplots(L, H, figsize=(1.1 * H, 1.1 * L), squeeze=False)
    t = min(64, data.n)
    for li in range(L):
        for h in range(H):
            ax = axes[li][h]
            ax.imshow(_pool(_head_map(data, li, h).astype(np.float64), t), cmap="Blues", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if li == 0:
                ax.set_title(f"h{h}", fontsize=7)
            if h == 0:
                ax.set_ylabel(f"L{li}", fontsize=7)
    fig.suptitle("attention weights per layer and head", fontsize=9)
    fig.tight_layout()
    paths.append(folder / "heads.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(_head_map(data, layer, head), cmap="Blues", interpolation="nearest", vmin=0)
    ax.set_title(f"layer {layer}, {'mean of heads' if head < 0 else f'head {head}'} (row: query, column: key)",
                 fontsize=9)
    _labels(ax, toks)
    fig.tight_layout()
    paths.append(folder / f"layer{layer}_head{'mean' if head < 0 else head}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    rec = data.received.mean(1) / max(data.n, 1)  # (L, N)
    fig, ax = plt.subplots(figsize=(max(6.0, min(data.n, MAX_LABELS) * 0.25), 1.2 + 0.35 * L))
    ax.imshow(rec, cmap="Blues", aspect="auto", interpolation="nearest")
    ax.set_yticks(range(L))
    ax.set_yticklabels([f"L{i}" for i in range(L)], fontsize=7)
    _labels(ax, toks, y=False)
    ax.set_title("received attention per token (mean weight from a query; heads averaged)", fontsize=9)
    paths.append(folder / "received.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths
