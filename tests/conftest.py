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


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The tests run tiny models: a second thread gains nothing, and on a shared CPU threads mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
