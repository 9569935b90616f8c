"""Faces: what a person runs — `cli` (``attnlens explain | walkthrough | info``), `walkthrough` (the lesson as
data), `notebook` (`attnlens.explain` in Jupyter) and `report/` (the explain report: data, page assets as files,
plots, the terminal summary). They use every layer below them; nothing below imports them.
"""
