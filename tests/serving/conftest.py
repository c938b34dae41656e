"""Serving fixtures. The real tokenizer (SmolLM2's, fixture ``tokenizer``) comes from tests/conftest.py."""
import pytest
import torch

from .helpers import make_tiny_llama


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The models here are tiny: one intra-op thread is fastest, and on a shared, loaded machine
    OpenMP's spinning threads made each op 10x slower. Restored after each module."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def chat_tokenizer(tokenizer):
    """The same tokenizer, checked for what the serving tests rely on: a chat template and an EOS."""
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    return tokenizer


@pytest.fixture(scope="session")
def llama(tokenizer):
    return make_tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id)
