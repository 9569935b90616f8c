"""The public path ``attnlens.distributed``: importing it hands over `attnlens.integrations.distributed` itself
(one module object, so its names, state and patches are the same under both paths)."""
import sys

from .integrations import distributed as _module
from .integrations.distributed import *  # noqa: F401,F403  (the names, for tools that read this file)

sys.modules[__name__] = _module
