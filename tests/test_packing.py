import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from easyquant.core.packing import pack, packed_cols, unpack


@st.composite
def code_matrices(draw):
    bits = draw(st.integers(2, 8))
    rows = draw(st.integers(1, 5))
    cols = draw(st.integers(1, 40))
    flat = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=rows * cols, max_size=rows * cols))
    return bits, torch.tensor(flat, dtype=torch.uint8).reshape(rows, cols)


@settings(max_examples=300, deadline=None)
@given(code_matrices())
def test_pack_round_trip(case):
    bits, codes = case
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (codes.shape[0], packed_cols(codes.shape[1], bits))
    assert torch.equal(unpack(packed, bits, codes.shape[1]), codes)


def test_four_bit_layout_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_three_bit_is_dense():
    codes = torch.full((2, 16), 7, dtype=torch.uint8)
    packed = pack(codes, 3)
    assert packed.shape == (2, 6)  # 16 codes * 3 bits = 6 bytes per row
    assert torch.all(packed == 0xFF)


def test_two_bit_layout():
    codes = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [[0b11100100, 0b00011011]]
