"""Integrations: attnlens inside other people's code, on the core's public API only.

- `capture`: the capture core (`Recorder`, `Record`, `attend`) that every integration records calls through;
- `nn`: `torch.nn.MultiheadAttention`-style modules and plain functions (`attnlens.nn`);
- `hf`: Hugging Face models with ``attn_implementation="attnlens"`` (`attnlens.hf.capture`, `load`);
  `model_folder` checks a local model folder before transformers is imported;
- `distributed`: ring attention over key shards on the block API (`attnlens.distributed`);
- `kv`: KV-cache scores from the prefill's own attention call and cache compression (`attnlens.kv`).

They reach backends only through `attnlens.attention`, `attnlens.merge` and `attnlens.core.Block` /
`AttnCall` (tests/test_layers.py enforces it).
"""
