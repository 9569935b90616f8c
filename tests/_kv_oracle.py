"""A dense float64 oracle for `attnlens.kv`, written from the methods' definitions (kvpress 0.5.4's ``*Press.score``
with eager attention weights), independent of the code under test:

* `tiny_model(kind)`: random small float64 causal LMs — Llama (GQA), Qwen2 (GQA, biases), Mistral (sliding window
  12) and Gemma 2 (alternating sliding / global layers, logit soft-cap 1.0, query_pre_attn_scalar) — built from a
  config, no download.
* `eager_scores`: every layer's dense ``(B, Hq, N, N)`` weights (``output_attentions`` of a float64 eager attention
  registered for the test: softmax of the masked scores, rows that see no key are zeros) and the norms of the
  (post-rotary) keys it saw; then each method's scores and kept keys by plain NumPy.
* `masked_logits`: generation's reference — the whole sequence recomputed at every step (no cache) by a float64
  eager attention whose mask hides, for the generated tokens only, the prompt keys a layer's KV head evicted.
"""
from __future__ import annotations

import math

import numpy as np
import torch

VOCAB = 101


def tiny_model(kind: str, seed: int = 0, layers: int = 3):
    """A random float64 causal LM of ``kind`` (llama, qwen2, mistral, gemma2), eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=12))
    elif kind == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=16, sliding_window=12, query_pre_attn_scalar=24,
                                                    attn_logit_softcapping=1.0, final_logit_softcapping=None))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # larger weights than the default init: peaked attention, so the methods disagree
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
    return model.to(torch.float64).eval()


def left_padded(rng, lengths, n):
    """``(ids (B, n), mask (B, n))``: random tokens, each sequence left-padded to ``n``."""
    ids = rng.integers(1, VOCAB, size=(len(lengths), n))
    mask = np.zeros((len(lengths), n), dtype=np.int64)
    for b, L in enumerate(lengths):
        mask[b, n - L:] = 1
        ids[b, : n - L] = 0
    return torch.tensor(ids), torch.tensor(mask)


def windows(model):
    """The sliding window of every layer (None: full attention), from the config."""
    cfg = model.config
    w = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    return [(w if t == "sliding_attention" else None) for t in types] if types else [w] * cfg.num_hidden_layers


def eager_run(model, ids, mask):
    """``(weights per layer (B, Hq, N, N), norms of the keys the attention saw (post-rotary) per layer (B, Hkv, N))``
    from a float64 forward through the oracle's dense attention, positions counted from each sequence's first token
    (as generate counts them)."""
    _register()
    _KEEP.clear()
    _KEEP["n"] = ids.shape[1]  # no generated rows: nothing hidden
    prev = model.config._attn_implementation
    model.set_attn_implementation("kv_oracle")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True,
                        use_cache=False)
    finally:
        model.set_attn_implementation(prev)
    return [a.numpy() for a in out.attentions], [_NORMS[i] for i in range(len(out.attentions))]


def positions(mask):
    """Position ids as generate makes them: counted from each sequence's first token (0 on padding)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _pad_top(s, live, n):
    top = np.where(live[:, None, : s.shape[-1]], s, -np.inf).max(axis=(1, 2), keepdims=True) + 1
    return np.concatenate([s, np.broadcast_to(top, s.shape[:2] + (n,))], axis=-1)


def method_scores(name, A, knorm, live, window_of_layer, *, ratio, window, kernel, sinks):
    """One layer's scores ``(B, Hkv, N)`` from its eager weights ``A (B, Hq, N, N)``; ``live (B, N)``."""
    B, Hq, N, _ = A.shape
    Hkv = knorm.shape[1]
    G = Hq // Hkv
    start = N - live.sum(1)
    if name == "h2o":
        cnt = np.zeros((B, N))
        for b in range(B):  # queries i >= start that see key j: i >= j, and i - w < j under a window
            for j in range(int(start[b]), N):
                hi = N if window_of_layer is None else min(N, j + window_of_layer)
                cnt[b, j] = hi - j
        s = A.sum(2) / np.maximum(cnt, 1)[:, None, :]
        s = s.reshape(B, Hkv, G, N).mean(2)
    elif name in ("snapkv", "pyramidkv"):
        a = A[:, :, N - window:, : N - window].mean(2)  # (B, Hq, N - w)
        h = kernel // 2
        padded = np.concatenate([np.zeros((B, Hq, h)), a, np.zeros((B, Hq, h))], axis=-1)
        pooled = sum(padded[..., t: t + a.shape[-1]] for t in range(kernel)) / kernel
        s = _pad_top(pooled.reshape(B, Hkv, G, -1).mean(2), live, window)
    elif name == "tova":
        a = A[:, :, N - 1, : N - 1].mean(1, keepdims=True)  # (B, 1, N - 1)
        s = _pad_top(np.repeat(a, Hkv, axis=1), live, 1)
    elif name == "streamingllm":
        s = np.ones((B, Hkv, N))
        for b in range(B):
            n = N - int(start[b])
            pruned = n - int(n * (1 - ratio))
            s[b, :, int(start[b]) + sinks: int(start[b]) + sinks + pruned] = 0
    elif name == "knorm":
        s = -knorm
    else:
        raise ValueError(name)
    return np.where(live[:, None, :], s, -np.inf)


def pyramid(n, layer, n_layers, ratio, window, beta):
    """kvpress PyramidKVPress.get_layer_budget, from its docstring and code."""
    cap = window + n * (1 - ratio)
    lo = (cap - window) / beta
    hi = (cap - window) * 2 - lo
    if hi >= n - window:
        hi = n - window
        lo = (cap - window) * 2 - hi
    if not (n >= hi >= lo >= window) or n_layers < 2:
        return round(n * (1 - ratio))
    return round(hi - layer * (hi - lo) / (n_layers - 1))


def kept(name, s, live, window_of_layer, layer, n_layers, *, ratio, window, beta, shared=False):
    """The kept positions per (b, h): a list of lists of sorted ints (the oracle of `select`)."""
    B, H, N = s.shape
    cand = live.copy()
    if window_of_layer is not None:
        cand[:, : max(0, N - (window_of_layer - 1))] = False
    s = np.where(cand[:, None, :], s, -np.inf)
    if shared:
        s = np.repeat(s.mean(1, keepdims=True), H, axis=1)
    out = []
    for b in range(B):
        c = int(cand[b].sum())
        nb = pyramid(c, layer, n_layers, ratio, window, beta) if name == "pyramidkv" else int(c * (1 - ratio))
        nb = min(c, max(0, nb))
        out.append([sorted(np.argsort(-s[b, h], kind="stable")[:nb].tolist()) for h in range(H)])
    return out


def eager_scores(model, ids, mask, name, *, ratio, window=6, kernel=5, sinks=4, beta=20, shared=False):
    """``[(scores (B, Hkv, N), kept lists) per layer]`` by the float64 oracle."""
    A, norms = eager_run(model, ids, mask)
    live = mask.numpy().astype(bool)
    ws = windows(model)
    out = []
    for i, (a, kn) in enumerate(zip(A, norms)):
        s = method_scores(name, a, kn, live, ws[i], ratio=ratio, window=window, kernel=kernel, sinks=sinks)
        out.append((s, kept(name, s, live, ws[i], i, len(A), ratio=ratio, window=window, beta=beta, shared=shared)))
    return out


# ---------------------------------------------------------------------------------------------
# generation's reference: the full cache with the evicted keys masked

_KEEP = {}  # layer -> (B, Hkv, N) bool of kept prompt keys; the prompt length under "n"
_NORMS = {}  # layer -> (B, Hkv, T) norms of the keys of the last call


def _oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
    B, Hq, T, D = query.shape
    G = Hq // key.shape[1]
    _NORMS[module.layer_idx] = key.norm(dim=-1).numpy()
    k, v = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    s = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else 1 / math.sqrt(D))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    base = attention_mask if attention_mask is not None else torch.ones(T, T, dtype=torch.bool).tril()
    n = _KEEP["n"]
    allowed = base.expand(B, Hq, T, T).clone()
    if T > n:  # rows of generated tokens see only the kept prompt keys
        keep = _KEEP[module.layer_idx].repeat_interleave(G, 1)  # (B, Hq, n)
        allowed[:, :, n:, :n] &= keep[:, :, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row that sees no key (padding) is zeros
    return (p @ v).transpose(1, 2).contiguous(), p


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def bool_mask(*a, **k):
        k["allow_is_causal_skip"] = False
        return sdpa_mask(*a, **k)

    AttentionInterface.register("kv_oracle", _oracle_attention)
    AttentionMaskInterface.register("kv_oracle", bool_mask)


def masked_logits(model, ids, mask, new_tokens, keeps):
    """The logits ``(steps, B, V)`` of each generated token's prediction, with ``new_tokens (B, steps)`` fed back
    (teacher forcing): step t runs the prompt + the first t new tokens without a cache, and the generated rows see
    only the prompt keys ``keeps[layer] (B, Hkv, N)`` kept (all keys when ``keeps`` is None)."""
    _register()
    n = ids.shape[1]
    _KEEP.clear()
    _KEEP["n"] = n
    for layer in range(model.config.num_hidden_layers):
        B, Hkv = ids.shape[0], model.config.num_key_value_heads
        _KEEP[layer] = torch.ones(B, Hkv, n, dtype=torch.bool) if keeps is None else keeps[layer]
    prev = model.config._attn_implementation
    model.set_attn_implementation("kv_oracle")
    out = []
    try:
        with torch.no_grad():
            for t in range(new_tokens.shape[1]):
                seq = torch.cat([ids, new_tokens[:, :t]], 1)
                m = torch.cat([mask, torch.ones(mask.shape[0], t, dtype=mask.dtype)], 1)
                logits = model(input_ids=seq, attention_mask=m, position_ids=positions(m), use_cache=False).logits
                out.append(logits[:, -1])
    finally:
        model.set_attn_implementation(prev)
    return torch.stack(out)
