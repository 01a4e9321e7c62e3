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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny Llama (random weights) with the code-made test tokenizer, one folder per test module."""
    from tiny_models import tiny_llama
    from tokenizer_fixture import make_tokenizer

    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d
