"""Shared fixtures. The hub is switched off for every test: a hub id must fail fast, never hang."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    from sae_utils.models import load_pipeline

    return load_pipeline("tiny", device="cpu")


@pytest.fixture(scope="session")
def tokenizer():
    from sae_utils.models import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
