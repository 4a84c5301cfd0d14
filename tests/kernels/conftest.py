import pytest
import torch


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer a launcher allocates with torch.empty starts poisoned (NaN, or -7 for integer
    tensors), so an element a kernel forgets to write fails its test."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture(scope="package", autouse=True)
def end_compiling_processes():
    """The sm_90 compile tests share long-lived compiling processes (glmrt_testing.hopper): they
    end with this package's tests."""
    yield
    from glmrt_testing import hopper

    hopper.shutdown()
