"""Attention backends. Each declares what it supports and why it cannot serve a given call.

A backend's ``run(inp)`` takes checked `AttnInputs` (rank-4 torch views) and returns
``(out (B, Hq, Nq, Dv) in q's dtype, LensResult of rank-4 torch tensors or None)``.
"""
from __future__ import annotations

import torch

from .._inputs import AttnInputs


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Lens statistics and internal accumulation: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Backend:
    name: str = ""
    description: str = ""
    #: capability table shown by ``attnlens.backends()`` / ``attnlens info``
    capabilities: dict = {}

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        """Why this backend cannot serve the call (empty: it can)."""
        raise NotImplementedError

    def auto_reasons(self, inp: AttnInputs) -> list[str]:
        """Why ``backend="auto"`` should pass over this backend although it could serve the call when
        named (e.g. a slow test mode). Empty by default."""
        return []

    def run(self, inp: AttnInputs):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attnlens backend {self.name!r}>"
