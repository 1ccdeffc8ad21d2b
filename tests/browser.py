"""Debian's chromium driven by Playwright (no browser download), for the
dashboard's tests and ``make screenshot``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import Browser, sync_playwright

#: Debian's chromium (scripts/install-system-packages --browser).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Headless, as root (no sandbox), and quiet: no background connections out.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@contextmanager
def chromium() -> Iterator[Browser]:
    """Start headless chromium; close it (and Playwright's driver) at the end."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=FLAGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()
