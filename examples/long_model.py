"""A model folder for long texts: all-MiniLM-L6-v2's weights with its 512 position embeddings tiled to ``--tokens``
positions, saved with its tokenizer, for ``attnlens explain --model FOLDER`` (no download).

    python examples/long_model.py FOLDER [--tokens 8192]
    attnlens explain --file long.txt --model FOLDER

The attention patterns are MiniLM's own (its 6 layers × 12 heads and their weights), at positions past 512 it was
never trained on: a way to read the report and the exact analyses at any length on this machine, not a long-context
model. Any local Hugging Face model folder that takes long inputs works the same way with ``--model``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build_model(folder, n: int) -> None:
    """MiniLM with its position embeddings tiled to ``n`` positions, and its tokenizer (``model_max_length=n``)."""
    import torch
    import transformers

    from attnlens import hf

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar
    model, tok = hf.load_default()
    old = model.embeddings.position_embeddings.weight.data  # (512, 384)
    cfg = model.config
    cfg.max_position_embeddings = n
    big = transformers.BertModel(cfg)
    state = model.state_dict()
    state["embeddings.position_embeddings.weight"] = old.repeat(-(-n // old.shape[0]), 1)[:n].clone()
    state = {k: v for k, v in state.items() if k in big.state_dict()}
    state["embeddings.position_ids"] = torch.arange(n)[None]
    big.load_state_dict(state, strict=False)
    big.save_pretrained(folder)
    tok.model_max_length = n
    tok.save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="where to write the model folder")
    ap.add_argument("--tokens", type=int, default=8192, help="positions (the longest text it takes; default 8192)")
    args = ap.parse_args()
    if args.tokens < 512:
        ap.error(f"--tokens: expected at least 512 (MiniLM's own length), got {args.tokens}")
    build_model(Path(args.folder), args.tokens)
    print(f"{args.folder}: all-MiniLM-L6-v2, {args.tokens} positions; "
          f"attnlens explain --file FILE --model {args.folder}")


if __name__ == "__main__":
    main()
