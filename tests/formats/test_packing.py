"""Golden tests of the packed format v1 (the examples in llmquant/formats/packing.py's docstring)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmquant.formats.packing import dequantize_packed, pack_rows, packed_words, unpack_rows


def test_worked_example_4bit():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    packed = pack_rows(q, 4)
    assert packed.shape == (1, 4)  # one block of 32 codes = 4 words, padded with code 0
    assert packed[0, 0].item() == -2023406815  # 0x87654321 as int32
    assert packed[0, 0].item() & 0xFFFFFFFF == 0x87654321
    assert packed[0, 1:].tolist() == [0, 0, 0]


def test_8bit_code0_in_lowest_byte():
    q = torch.tensor([[0x11, 0x22, 0x33, 0x44]])
    assert pack_rows(q, 8)[0, 0].item() == 0x44332211


def test_2bit_sixteen_per_word():
    q = torch.tensor([[3] + [0] * 15 + [1]])
    packed = pack_rows(q, 2)
    assert packed[0, 0].item() == 3 and packed[0, 1].item() == 1


def test_3bit_straddles_words():
    # code 10 starts at bit 30: its low two bits end word 0, its top bit starts word 1
    q = torch.zeros(1, 32, dtype=torch.long)
    q[0, 10] = 0b101
    packed = pack_rows(q, 3)
    assert packed.shape == (1, 3)
    assert packed[0, 0].item() & 0xFFFFFFFF == 0b01 << 30
    assert packed[0, 1].item() == 0b1
    assert packed[0, 2].item() == 0
    q[0, 10] = 0
    q[0, 31] = 0b111  # last code: bits 93..95 = top of word 2
    assert pack_rows(q, 3)[0, 2].item() & 0xFFFFFFFF == 0b111 << 29


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_roundtrip(bits, data):
    n = data.draw(st.integers(1, 5))
    k = data.draw(st.integers(1, 100))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (n, k), generator=g)
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (n, packed_words(k, bits))
    assert torch.equal(unpack_rows(packed, bits, k).long(), q)


def test_out_of_range_codes_rejected():
    with pytest.raises(ValueError, match="out of range"):
        pack_rows(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_rows(torch.tensor([[1]]), 5)


def test_unpack_checks_width():
    with pytest.raises(ValueError, match="expected 4 for K=8"):
        unpack_rows(torch.zeros(1, 8, dtype=torch.int32), 4, 8)


def test_dequant_formula_sym_asym_ragged():
    # K=5, G=2: groups [0,1], [2,3], [4] (ragged)
    q = torch.tensor([[0, 15, 8, 9, 3]])
    scales = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float16)
    w = dequantize_packed(pack_rows(q, 4), scales, None, bits=4, group_size=2, in_features=5)
    assert w.tolist() == [[-4.0, 3.5, 0.0, 1.0, -10.0]]  # (q - 8) * s
    zeros = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    w = dequantize_packed(pack_rows(q, 4), scales, zeros, bits=4, group_size=2, in_features=5)
    assert w.tolist() == [[-0.5, 7.0, 6.0, 7.0, 0.0]]  # (q - z) * s
