"""``attnlens.report`` is `attnlens.faces.report` itself: importing this path hands over that package and its
modules (``attnlens.report.html`` is `attnlens.faces.report.html`, and so on)."""
import sys

from .faces import report as _package
from .faces.report import *  # noqa: F401,F403  (the names, for tools that read this file)
from .faces.report import data, files, from_model, html, plots

for _m in (data, files, from_model, html, plots):
    sys.modules[f"{__name__}.{_m.__name__.rsplit('.', 1)[1]}"] = _m
sys.modules[__name__] = _package
