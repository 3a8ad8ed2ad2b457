import pytest
import torch


@pytest.fixture
def float64():
    """Exact comparisons with closed forms; restores the default dtype afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
