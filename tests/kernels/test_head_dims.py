"""check_head_dims: the head dims the Triton kernels run, refused up front otherwise."""
import pytest
import torch

from glmrt.kernels import MAX_HEAD_DIM, check_head_dims
from glmrt.kernels.attention import varlen_attention
from glmrt.kernels.rope import mrope_write_kv_, vision_qk_norm_rope_


@pytest.mark.parametrize("text, vision", [(128, 64), (16, 16), (2, 4), (80, 24), (256, 256),
                                          (40, 48), (98, 100)])
def test_supported_head_dims_pass(text, vision):
    check_head_dims(text, vision)


@pytest.mark.parametrize("text, vision, message", [
    (127, 64, "text head_dim 127 is not supported by the Triton kernels: it must be a multiple "
              "of 2 from 2 to 256"),
    (264, 64, "text head_dim 264 is not supported"),
    (0, 64, "text head_dim 0 is not supported"),
    (128, 42, "vision head_dim 42 is not supported by the Triton kernels: it must be a multiple "
              "of 4 from 4 to 256"),
    (128, 260, "vision head_dim 260 is not supported"),
    (128, 2, "vision head_dim 2 is not supported"),
])
def test_unsupported_head_dims_name_the_head_dim(text, vision, message):
    with pytest.raises(ValueError, match=message):
        check_head_dims(text, vision)


def _mrope_write_kv(x: torch.Tensor, sections: list[int]) -> None:
    """M-RoPE on x [2, 1, D] as q and k, and the cache write of k and v = x."""
    cache = torch.zeros(1, 16, *x.shape[1:])
    mrope_write_kv_(x.clone(), x.clone(), x, torch.zeros(3, 2, dtype=torch.int64), sections,
                    10000.0, cache, cache.clone(), torch.arange(2))


def test_the_bounds_are_those_of_the_kernels():
    # The smallest and largest head dims check_head_dims accepts run; just past them the kernels
    # refuse with the same error.
    d = MAX_HEAD_DIM
    x = torch.randn(2, 1, d)
    _mrope_write_kv(x, [d // 2, 0, 0])
    _mrope_write_kv(torch.randn(2, 1, 2), [1, 0, 0])
    vision_qk_norm_rope_(torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.ones(4), torch.ones(4),
                         torch.zeros(2, 2, dtype=torch.int64))
    cu = torch.tensor([0, 2], dtype=torch.int32)
    assert varlen_attention(x, x, x, cu, 2, causal=True).shape == x.shape
    big = torch.randn(2, 1, d + 2)
    with pytest.raises(ValueError, match=f"head_dim {d + 2} is not supported"):
        _mrope_write_kv(big, [d // 2 + 1, 0, 0])
    with pytest.raises(ValueError, match=f"head_dim {d + 2} is not supported"):
        varlen_attention(big, big, big, cu, 2, causal=True)
