import pytest
import torch


@pytest.fixture
def float64():
    """Exact comparisons with closed forms; restores the default dtype afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA; on CPU machines they are reported as skipped with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU-only code path: Transformer Engine specs, NCCL)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
