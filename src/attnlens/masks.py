"""The public path ``attnlens.masks``: importing it hands over `attnlens.core.masks` itself (one module object,
so its names, state and patches are the same under both paths)."""
import sys

from .core import masks as _module
from .core.masks import *  # noqa: F401,F403  (the names, for tools that read this file)

sys.modules[__name__] = _module
