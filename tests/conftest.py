"""Test-session setup: the suite is offline by design.

The hub libraries read their offline switches when first imported, so they are set here, before
any test imports transformers or datasets (tests only; library code never writes os.environ).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
