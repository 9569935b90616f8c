"""The `attnlens explain` report: run a model on a text under `attnlens.hf.capture`, analyse, render.

- `collect(text, model, tokenizer)` → `ReportData` (NumPy arrays per layer and head); `collect_any` also takes
  encoder-decoder models (module `from_model`).
- `from_records(records, tokens)` → `ReportData` from a capture you already ran (`attnlens.hf.capture`
  or `attnlens.nn.capture`: one self-attention record per layer) (module `data`).
- `attnlens.report.html.render(data)` → one self-contained HTML page (no network, all inline).
- `attnlens.report.plots.write_pngs(data, folder)` → matplotlib heatmaps.
- `attnlens.report.files`: writing files safely (atomic, no symbolic links followed unless asked).

The functions that run a model import transformers (seconds) when first called, not when this package is imported.
"""
from .data import (
    DEFAULT_MODEL_LABEL,
    DEFAULT_TOPK,
    FULL_BYTES,
    ROLLOUT_BLOCKS,
    ROLLOUT_ROWS,
    THUMB,
    ReportData,
    default_rollout_rows,
    from_records,
    pool_means,
    pooled_rollout,
    rollout_views,
)
from .from_model import collect, collect_any, collect_seq2seq, model_max_length, tokenize

__all__ = ["ReportData", "collect", "collect_any", "collect_seq2seq", "from_records", "pooled_rollout",
           "rollout_views", "default_rollout_rows", "model_max_length", "tokenize", "pool_means", "FULL_BYTES",
           "DEFAULT_TOPK", "ROLLOUT_BLOCKS", "ROLLOUT_ROWS", "THUMB", "DEFAULT_MODEL_LABEL"]
