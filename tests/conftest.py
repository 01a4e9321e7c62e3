"""Test-session setup: the suite is offline by design.

The hub libraries read their offline switches when first imported, so they are set here, before
any test imports transformers or datasets (tests only; library code never writes os.environ).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (tiny ops: threading overhead dominates on 2 busy cores).

    Use it module-wide with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
