from collections.abc import Iterator
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``): models this
    small gain nothing from a second thread, and on a busy 2-core machine two threads per op made training ten times
    slower (spinning OpenMP workers); ONNX Runtime, LiteRT and OpenVINO follow torch's setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module (tests/browser_helpers.py: which one, and when tests skip)."""
    from playwright.sync_api import sync_playwright

    from browser_helpers import CHROMIUM

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()
