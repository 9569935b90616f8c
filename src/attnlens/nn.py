"""The public path ``attnlens.nn``: importing it hands over `attnlens.integrations.nn` itself (one module object,
so its names, state and patches are the same under both paths)."""
import sys

from .integrations import nn as _module
from .integrations.nn import *  # noqa: F401,F403  (the names, for tools that read this file)

sys.modules[__name__] = _module
