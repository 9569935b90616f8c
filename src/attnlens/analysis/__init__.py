"""What captured attention says about a sequence: rollout, value-norm contributions, head summaries.

Everything here works on one sequence at a time (``batch=`` picks it) from what a capture recorded
(`attnlens.hf.capture`, `attnlens.nn.capture`) or from plain arrays, and returns float64 NumPy.

- `rollout` (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): average the
  heads, add the identity for the residual connection, re-normalise the rows, multiply through
  the layers. Row i: how much the top layer's token i draws on each input token.
- `contributions` (Kobayashi et al. 2020, "Attention is not only a weight"): ``‖α_ij v_j‖`` — a
  large weight on a tiny value vector moves little; with the output projection,
  ``‖α_ij v_j W_O^h‖`` (what head h actually adds to the residual stream).
- `layer_contributions`: the same through all heads together, ``‖Σ_h α^h_ij v_j W_O^h‖`` — the figure the
  paper reports (the per-head sum is only an upper bound) — for chosen query rows.
- `block_contributions`: what each token contributes through the *whole* attention block — heads, output
  projection, residual and layer norm — by L2 norm (Kobayashi et al. 2021) or by L1 distance (ALTI, Ferrando et al.
  2022), for chosen rows at any length in key tiles; `compose_contributions`: those composed through the layers
  (exact rows carried down like rollout's, or pooled block means).
- `head_summary`: per head, mean entropy and max weight, and how much each head attends to the first
  token and to any fixed token (attention sinks), itself, the previous and next token, the token at each offset up
  to ±8 and a window of ±2 around the query (positional heads), earlier copies of the current token
  (duplicate-token heads) and the token after them (induction heads), or a pattern of your own — key sets taken
  among the sequence's real tokens, so padding changes nothing; scaled as means over queries, or as
  TransformerLens's ``detect_head`` scores (``convention="transformerlens"``).
- `head_kinds`: a name for each head from those scores (previous-token, next-token, offset ±d, local window,
  first-token sink, sink, induction, broad, ...); `kind_label` spells out an offset head's d and a sink's token.
- `informative_links`: the strongest query → key weights between real tokens in the heads that are not routine.

All of it is exact at any length, in linear memory, without full weights: a record of `hf.capture` /
`nn.capture` keeps its layer's inputs (``keep_inputs=True``, the default), and ``record.call.ask(lens)``
recomputes the layer with what an analysis needs — ``Lens(received_from=W)`` (``Pᵀ W``: rollout rows carried
down through the layers) or the weights at chosen keys (``P[i, j] = exp(s_ij − lse_i)``: head scores). Full
weights (``Lens(rows="all")``), when kept, are used directly. Only ``rollout(allow_topk=True)`` approximates
(top-k weights only), and only when asked.

Modules: `records` (reading a record; the record protocol), `rollout`, `heads` (head scores and kinds),
`contributions`, `links`. The analyses use only the core's public API (`attnlens.core`: `Lens`, `AttnCall`'s
re-asks through the block API), never an integration: a record is read through the protocol `records` describes.
"""
from .contributions import block_contributions, compose_contributions, contributions, layer_contributions
from .heads import (
    BROAD_ENTROPY,
    BROAD_MAX_WEIGHT,
    CONVENTIONS,
    HEAD_KINDS,
    KIND_SCORE,
    LOCAL_LIFT,
    LOCAL_WINDOW,
    MAX_OFFSET,
    OFFSETS,
    HeadSummary,
    earlier_same_token,
    head_kinds,
    head_summary,
    kind_label,
)
from .links import focus_heads, informative_links, is_special_token
from .records import as_numpy, has_full_weights, layer_weights, top_received, topk_dense, weights_at
from .rollout import rollout

__all__ = ["as_numpy", "layer_weights", "rollout", "contributions", "layer_contributions", "block_contributions",
           "compose_contributions", "head_summary",
           "HeadSummary", "weights_at", "earlier_same_token", "top_received", "topk_dense", "head_kinds",
           "HEAD_KINDS", "KIND_SCORE", "BROAD_ENTROPY", "BROAD_MAX_WEIGHT", "has_full_weights", "informative_links",
           "kind_label", "CONVENTIONS", "LOCAL_LIFT", "LOCAL_WINDOW", "MAX_OFFSET", "OFFSETS",
           "focus_heads", "is_special_token"]
