"""The public path ``attnlens.hf``: importing it hands over `attnlens.integrations.hf` itself (one module object,
so its names, state and patches are the same under both paths)."""
import sys

from .integrations import hf as _module
from .integrations.hf import *  # noqa: F401,F403  (the names, for tools that read this file)

sys.modules[__name__] = _module
