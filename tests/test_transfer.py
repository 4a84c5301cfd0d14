"""Host -> device copies (glmrt.model.transfer) on the CPU: packed arrays come back as themselves,
and image pixels packed into one buffer are taken without another concatenation."""
import numpy as np
import pytest
import torch

from glmrt.model.transfer import pack, spanned, upload_arrays, upload_cat

CPU = torch.device("cpu")


def _pixels(rows: list[int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n, 12), generator=gen, dtype=torch.uint8) for n in rows]


def test_upload_arrays_returns_each_array_in_its_shape_and_dtype():
    arrays = [np.arange(12).reshape(3, 4)[:, 1:], np.array([7], dtype=np.int32), np.zeros((0, 5), dtype=np.int64),
              np.array([True, False, True]), np.arange(5, dtype=np.int32).reshape(5, 1), np.array([1.5, -2], np.float32),
              np.array([-(1 << 62)])]
    out = upload_arrays(arrays, CPU)
    dtypes = [torch.int64, torch.int32, torch.int64, torch.bool, torch.int32, torch.float32, torch.int64]
    for a, t, dtype in zip(arrays, out, dtypes):
        assert t.dtype == dtype and tuple(t.shape) == a.shape and (t.numpy() == a).all()
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1  # one buffer
    with pytest.raises(ValueError, match="got float64"):
        upload_arrays([np.zeros(2)], CPU)


def test_packed_pixels_are_taken_in_place():
    parts = _pixels([5, 1, 9, 3])
    packed = pack(parts, pin=False)
    assert all(torch.equal(a, b) for a, b in zip(parts, packed))
    whole = upload_cat(packed, CPU)
    assert torch.equal(whole, torch.cat(parts)) and whole.data_ptr() == packed[0].data_ptr()  # no copy
    middle = upload_cat(packed[1:3], CPU)  # a step that admits some of them, in order
    assert torch.equal(middle, torch.cat(parts[1:3])) and middle.data_ptr() == packed[1].data_ptr()


def test_pixels_not_back_to_back_are_concatenated():
    parts = _pixels([4, 2, 6], seed=1)
    packed = pack(parts, pin=False)
    others = _pixels([3], seed=2)
    for tensors in ([packed[2], packed[0]], [packed[0], packed[2]], [packed[0], others[0]], parts):
        out = upload_cat(tensors, CPU)
        assert torch.equal(out, torch.cat(tensors))
        assert all(out.data_ptr() != t.data_ptr() for t in tensors[1:])  # a copy, not a stretched view
    mixed = [torch.zeros(2, 12, dtype=torch.uint8), torch.zeros(2, 6, dtype=torch.uint8)]
    assert pack(mixed, pin=False) is mixed  # rows of different shapes stay as they are


def test_splits_back_to_back_span_their_whole():
    """What the runner does with a step's image embeddings: whole prompts encoded together come back
    as the encoder's output itself; any other selection is None (then concatenated)."""
    encoded = torch.randn(20, 8)
    parts = list(encoded.split([3, 5, 1, 11]))
    whole = spanned(parts)
    assert torch.equal(whole, encoded) and whole.data_ptr() == encoded.data_ptr()
    assert torch.equal(spanned(parts[1:3]), encoded[3:9])
    assert spanned([parts[0], parts[2]]) is None and spanned([parts[1], parts[0]]) is None
    assert spanned([parts[0], torch.randn(5, 8)]) is None
    assert spanned([encoded[:, :4]]) is None  # not contiguous
