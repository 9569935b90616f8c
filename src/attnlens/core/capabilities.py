"""What a backend can serve, as data: typed capability declarations that dispatch, ``attnlens info`` and the CLI read.

Four small enums name what a call may need and a backend may offer, and `Capabilities` holds one backend's set of
each. A call's needs come from its checked inputs (`attnlens.core.inputs.AttnInputs`: ``mask_features``,
``score_mods``; `attnlens.Lens.requested`), so "can this backend serve this call?" is set arithmetic
(`attnlens.core.backends.Backend.not_supported_reasons`), never a comparison of display strings.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch

#: the input dtypes attnlens computes in (float16/bfloat16 with float32 accumulation)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


class Memory(enum.Enum):
    """The extra memory of a call beyond its inputs, outputs and O(N) statistics (`Backend.memory`)."""

    LINEAR = "O(N)"  #: linear in the sequence (fused kernels)
    CHUNKED = "O(chunk·Nk)"  #: a bounded workspace of query chunks × keys
    DENSE = "O(Nq·Nk)"  #: the whole score matrix (``auto`` avoids it when a linear-memory backend serves the call)

    def __str__(self) -> str:
        return self.value


class MaskFeature(enum.Enum):
    """What a call's ``mask`` needs of a backend (`AttnInputs.mask_features`)."""

    BOOL = "bool"  #: a bool mask (True = may attend)
    FLOAT = "float"  #: an additive float mask
    QUERY = "query"  #: a mask that varies along the queries (not only a key mask ``(B|1, H|1, 1, Nk)``)
    FLOAT_GRAD = "float_grad"  #: a gradient with respect to a float mask

    def __str__(self) -> str:
        return self.value


class LensField(enum.Enum):
    """One thing a `attnlens.Lens` can ask for (`Lens.requested`)."""

    LSE = "lse"
    MAX_WEIGHT = "max_weight"
    ENTROPY = "entropy"
    RECEIVED = "received"
    TOPK = "topk"
    ROWS = "rows"
    RECEIVED_FROM = "received_from"
    AT = "at"
    POOL = "pool"

    def __str__(self) -> str:
        return self.value


class ScoreMod(enum.Enum):
    """A modification of the scores (`AttnInputs.score_mods`); ``label`` names it with its argument."""

    SOFTCAP = "softcap"
    SINKS = "sinks"
    ALIBI = "alibi"

    @property
    def label(self) -> str:
        return {"softcap": "logit soft-capping (softcap)", "sinks": "attention sinks (sinks)",
                "alibi": "ALiBi (alibi_slopes)"}[self.value]

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Capabilities:
    """What a backend can serve. Every field is data; `describe` renders it for people.

    Attributes:
        devices: torch device types it runs on (``None``: any device torch has).
        dtypes: input dtypes it takes.
        max_head_dim: largest D / Dv (``None``: any).
        lens: the `LensField`s it computes inside its pass; empty: output only.
        max_topk: largest ``Lens.topk`` (``None``: any).
        masks: the `MaskFeature`s it takes.
        score_mods: the `ScoreMod`s it applies.
        dropout: applies dropout.
        backward: gradients (through the block primitive, or PyTorch's own autograd when ``block`` is False).
        block: implements the block primitives (forward with lse, backward into buffers, column sums).
        seqlens: serves padded batches with per-sequence lengths (``seqlens_q`` / ``seqlens_k``: FlashAttention's
            varlen semantics, each sequence's own offset and key bound in the band). Off unless declared.
        memory: the `Memory` class of an ordinary call.
        worst_memory: the `Memory` class of the calls that need more (``None``: none do); `Backend.memory` says
            which class a given call has.
        notes: one line for people (``attnlens info``).
    """

    devices: Optional[frozenset] = None
    dtypes: frozenset = frozenset(FLOAT_DTYPES)
    max_head_dim: Optional[int] = None
    lens: frozenset = frozenset(LensField)
    max_topk: Optional[int] = None
    masks: frozenset = frozenset(MaskFeature)
    score_mods: frozenset = frozenset(ScoreMod)
    dropout: bool = True
    backward: bool = True
    block: bool = True
    seqlens: bool = False
    memory: Memory = Memory.LINEAR
    worst_memory: Optional[Memory] = None
    notes: str = ""

    def __post_init__(self):
        for name, kind in (("lens", LensField), ("masks", MaskFeature), ("score_mods", ScoreMod)):
            bad = [x for x in getattr(self, name) if not isinstance(x, kind)]
            if bad:
                raise TypeError(f"Capabilities.{name} must hold {kind.__name__} members, got {bad}")
        for name in ("memory", "worst_memory"):
            val = getattr(self, name)
            if not isinstance(val, Memory) and not (name == "worst_memory" and val is None):
                raise TypeError(f"Capabilities.{name} must be a Memory, got {val!r}")

    def describe(self) -> dict:
        """The capabilities as short strings, for tables (``attnlens info``)."""
        lens = "no" if not self.lens else ("yes" if self.max_topk is None else f"yes (top-k <= {self.max_topk})")
        grad = "no" if not self.backward else ("yes" if self.block else "yes (PyTorch autograd)")
        return {"lens": lens, "grad": grad, "dropout": "yes" if self.dropout else "no",
                "dtypes": ", ".join(_DTYPE_NAMES[d] for d in FLOAT_DTYPES if d in self.dtypes),
                "devices": "any" if self.devices is None else ", ".join(sorted(self.devices)),
                "masks": ", ".join([str(m) for m in MaskFeature if m in self.masks]
                                   + (["seqlens"] if self.seqlens else [])) or "none",
                "score mods": ", ".join(str(m) for m in ScoreMod if m in self.score_mods) or "none",
                "head dims": "any" if self.max_head_dim is None else f"<= {self.max_head_dim}",
                "memory": str(self.memory) + ("" if self.worst_memory is None else f", {self.worst_memory} for some")}
