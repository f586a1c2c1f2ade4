import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchshrink.binary.packing import pack_binary, pack_ternary, unpack_binary, unpack_ternary
from torchshrink.core.errors import DataError

torch.set_num_threads(1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=3), st.integers(0, 2**31 - 1))
def test_binary_round_trip_odd_shapes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.where(torch.rand(*shape, generator=g) > 0.5, 1.0, -1.0)
    packed = pack_binary(t)
    assert packed.dtype == torch.uint8 and packed.numel() == (t.numel() + 7) // 8
    assert torch.equal(unpack_binary(packed, t.shape), t)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(0, 2**31 - 1))
def test_ternary_round_trip_odd_shapes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, tuple(shape), generator=g).float()
    packed = pack_ternary(t)
    assert packed.numel() == (t.numel() + 3) // 4
    assert torch.equal(unpack_ternary(packed, t.shape), t)


def test_bit_layout_is_little_endian_one_for_plus():
    t = torch.tensor([1.0, -1, -1, -1, -1, -1, -1, 1, 1])
    assert pack_binary(t).tolist() == [0b10000001, 0b1]
    assert pack_ternary(torch.tensor([1.0, -1, 0, 1, -1])).tolist() == [0b01_00_10_01, 0b10]


def test_storage_is_one_and_two_bits_per_weight():
    w = torch.where(torch.randn(4096, 4096) > 0, 1.0, -1.0)
    assert pack_binary(w).numel() * 32 == w.numel() * 4
    assert pack_ternary(torch.zeros(1000, 999)).numel() == 249750


def test_packing_non_binary_raises_with_values():
    with pytest.raises(DataError, match=r"only -1 and \+1.*1 of 3 entries.*0\.5"):
        pack_binary(torch.tensor([1.0, -1.0, 0.5]))
    with pytest.raises(DataError, match="only -1 and"):
        pack_binary(torch.tensor([0.0, 1.0]))
    with pytest.raises(DataError, match=r"-1, 0 and \+1.*e\.g\. 2"):
        pack_ternary(torch.tensor([2.0, 0.0]))


def test_unpack_wrong_size_and_corrupt_code():
    with pytest.raises(DataError, match="expected 2 uint8 bytes"):
        unpack_binary(torch.zeros(3, dtype=torch.uint8), (3, 3))
    with pytest.raises(DataError, match="invalid code 3"):
        unpack_ternary(torch.tensor([0b11], dtype=torch.uint8), (1,))
