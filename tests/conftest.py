"""Test session set-up.

Without a CUDA GPU the Triton kernels run in Triton's CPU interpreter; TRITON_INTERPRET must be
set before any kernel module is imported, which is why it happens here, first.
Tests marked `gpu` are skipped cleanly when no GPU is present.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
