"""The core: exact attention and its lens — entry points, the block API, lens, masks, validation, dispatch, backends.

The core knows nothing above it (integrations, analysis, faces). Its public API — what the layers above may
import — is this package's names and the modules `api`, `blocks`, `lens` and `masks`; `inputs` (validation),
`dispatch`, `scores`, `capabilities` internals and `backends` are the core's inside, reached from above only
through `Block` (tests/test_layers.py enforces it).

    api           attention(), merge()
    blocks        Block (one checked block + its backend: forward / backward / column_sums / pair_weights / rows),
                  AttnCall (a recorded call, asked again), differentiable (the one autograd wrapper)
    lens          Lens, LensResult, Merger (partial results merged through their lse)
    masks         band geometry (causal, window, offset), padding masks, ALiBi slopes
    inputs        validate() -> AttnInputs (checked rank-4 torch views)
    capabilities  typed capabilities: Memory, MaskFeature, LensField, ScoreMod, Capabilities
    dispatch      backend priority, selection, use_backend, info()
    scores        scores and weights of chosen (query, key) pairs under a call's rules
    reference     the float64 NumPy oracle
    backends/     the seam (Backend) and its implementations: reference, torch (chunked + native row kernel),
                  sdpa, triton
"""
from . import masks
from .api import attention, merge
from .blocks import AttnCall, Block, differentiable
from .capabilities import FLOAT_DTYPES, Capabilities, LensField, MaskFeature, Memory, ScoreMod
from .dispatch import INFO_COLUMNS, BackendInfo, info, table, use_backend
from .inputs import check_dropout, check_softcap, stat_dtype
from .lens import Lens, LensResult, Merger
from .version import __version__

__all__ = ["attention", "merge", "Block", "AttnCall", "differentiable", "Lens", "LensResult", "Merger", "masks",
           "FLOAT_DTYPES", "Capabilities", "LensField", "MaskFeature", "Memory", "ScoreMod", "BackendInfo", "INFO_COLUMNS", "info",
           "use_backend", "check_dropout", "check_softcap", "stat_dtype", "backends", "__version__"]


def backends() -> list:
    """The backends in ``backend="auto"`` priority order: each a `BackendInfo` (``name``, ``description``,
    typed ``capabilities``; ``describe()`` gives display strings)."""
    return table()
