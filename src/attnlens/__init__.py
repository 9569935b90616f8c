"""attnlens: exact scaled dot-product attention that shows what attention does.

>>> import attnlens as al
>>> out, res = al.attention(q, k, v, causal=True, lens=al.Lens(entropy=True, received=True, topk=8))

The package in layers (each a folder; a layer imports only from those below it, tests/test_layers.py):

    core/          attention(), merge(), Lens, the block API (Block, AttnCall), masks, validation, dispatch, backends
    integrations/  nn (modules + capture), hf (Hugging Face models), distributed (ring attention), capture (shared)
    analysis/      rollout, head scores and kinds, contributions, informative links — exact at any length
    faces/         cli, walkthrough (the lesson), notebook (explain -> Report), report/ (data, page, plots)

The public module paths ``attnlens.nn``, ``attnlens.hf``, ``attnlens.distributed``, ``attnlens.masks`` and
``attnlens.report`` are those modules themselves (the small modules of the same names here hand them over).
"""
from .core import (
    FLOAT_DTYPES,
    INFO_COLUMNS,
    AttnCall,
    BackendInfo,
    Block,
    Lens,
    LensResult,
    attention,
    backends,
    info,
    masks,
    merge,
    use_backend,
)
from .core.backends.fused import FusedCpuBackend
from .core.backends.reference import ReferenceBackend
from .core.backends.sdpa import SdpaBackend
from .core.backends.torch_chunked import TorchChunkedBackend
from .core.backends.triton import TritonBackend
from .core.version import __version__
from .faces.notebook import Report, explain, explain_capture
from .integrations import nn

__all__ = ["attention", "merge", "Lens", "LensResult", "Block", "AttnCall", "backends", "info", "use_backend",
           "BackendInfo", "FusedCpuBackend", "TorchChunkedBackend", "TritonBackend", "SdpaBackend", "ReferenceBackend", "masks", "nn",
           "explain", "explain_capture", "Report", "FLOAT_DTYPES", "INFO_COLUMNS", "__version__"]
