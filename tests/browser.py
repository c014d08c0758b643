"""Headless Chromium for the page tests (the monitor's and the chat page's): Debian's package, which `make test`
installs when run as root."""

from __future__ import annotations

import shutil

import pytest

HEADLESS_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_binary() -> str:
    """The browser's path; skips the calling test when there is none."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.skip("no Chromium: `make test` installs Debian's chromium when run as root")
    return binary
