"""Headless Chromium for the report's browser tests (`browser` fixture in conftest.py).

Debian's ``chromium`` and ``chromium-driver`` with selenium; a fresh profile per session, no
network features (``--disable-background-networking`` ...). ``ATTNLENS_CI=1`` turns a missing
browser into a failure instead of a skip. ``ATTNLENS_SCREENSHOTS=DIR`` keeps a copy of every
screenshot a test takes, to look at.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def chrome():
    """Yield a selenium Chrome driver (skips, or fails under ATTNLENS_CI=1, without one)."""
    required = os.environ.get("ATTNLENS_CI") == "1"  # CI installs all of it: a skip would hide a failure
    if not (CHROMIUM and CHROMEDRIVER):
        msg = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        pytest.fail(msg) if required else pytest.skip(msg)
    if required:
        import selenium.webdriver as webdriver
    else:
        webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the browser extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="attnlens-chromium-")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
              f"--user-data-dir={profile}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(drv, path):
    """Open a file and check that the report's script ran to its end."""
    drv.get("file://" + os.path.abspath(path))
    assert drv.find_element("tag name", "body").get_attribute("data-ready") == "1", "the page script did not finish"


def console_errors(drv) -> list:
    return [e for e in drv.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def screenshot(drv, path, *, full_page: bool = False):
    """Save a screenshot (the whole page's height with ``full_page``), check it is not blank, and keep
    a copy in ``$ATTNLENS_SCREENSHOTS`` when set."""
    if full_page:
        h = drv.execute_script("return document.documentElement.scrollHeight")
        drv.set_window_size(1400, min(int(h) + 40, 6000))
    drv.save_screenshot(str(path))
    if full_page:
        drv.set_window_size(1400, 1000)
    assert_not_blank(path)
    keep = os.environ.get("ATTNLENS_SCREENSHOTS")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(path, os.path.join(keep, os.path.basename(path)))


def assert_not_blank(path):
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 500 and img.shape[1] > 800
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert colours > 50, f"screenshot looks blank ({colours} colours)"
    assert (img < 200).any(axis=-1).mean() > 0.02  # some dark pixels: text and heatmaps were drawn
