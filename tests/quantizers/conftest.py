import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test on one torch thread: its tensors are tiny, and on a busy 2-core machine a second
    OpenMP thread only adds waiting. The previous count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
