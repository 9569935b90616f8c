"""The public path ``attnlens.kv``: importing it hands over `attnlens.integrations.kv` itself (one module object,
so its names, state and patches are the same under both paths)."""
import sys

from .integrations import kv as _module
from .integrations.kv import *  # noqa: F401,F403  (the names, for tools that read this file)

sys.modules[__name__] = _module
