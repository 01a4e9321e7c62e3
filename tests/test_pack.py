"""Bit packing: hand-computed words, an independent bitstream oracle, round trips."""

import pytest
import torch

from auto_round.quant.pack import PACK_BITS, pack_bits, packed_length, unpack_bits


def _as_u32(word: int) -> int:
    return word & 0xFFFFFFFF


def _oracle_pack(values, bits):
    """Reference implementation: one Python integer as the little-endian bitstream."""
    stream = 0
    for j, v in enumerate(values):
        stream |= int(v) << (bits * j)
    n_words = packed_length(len(values), bits)
    return [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]


def test_4bit_hand_computed():
    word = pack_bits(torch.arange(1, 9), 4, dim=0)
    assert word.dtype == torch.int32 and word.shape == (1,)
    assert _as_u32(int(word)) == 0x87654321
    assert int(word) < 0  # bit 31 set: stored as a negative int32


def test_4bit_sym_zeros_word():
    word = pack_bits(torch.full((8,), 7, dtype=torch.int32), 4, dim=0)
    assert int(word) == 0x77777777


def test_2bit_and_8bit_hand_computed():
    assert _as_u32(int(pack_bits(torch.tensor([1, 2, 3, 0] * 4), 2, 0))) == 0x39393939
    assert _as_u32(int(pack_bits(torch.tensor([0x11, 0x22, 0x33, 0xFF]), 8, 0))) == 0xFF332211


def test_3bit_crosses_word_boundaries():
    # Element 10 occupies stream bits 30..32: two bits in word 0, one bit in word 1.
    values = torch.zeros(32, dtype=torch.int64)
    values[10] = 0b111
    words = [_as_u32(int(w)) for w in pack_bits(values, 3, dim=0)]
    assert words == [0xC0000000, 0x00000001, 0x00000000]
    # Element 21 occupies bits 63..65: one bit in word 1, two bits in word 2.
    values = torch.zeros(32, dtype=torch.int64)
    values[21] = 0b101
    words = [_as_u32(int(w)) for w in pack_bits(values, 3, dim=0)]
    assert words == [0x00000000, 0x80000000, 0x00000002]


@pytest.mark.parametrize("bits", PACK_BITS)
def test_matches_bitstream_oracle(bits):
    torch.manual_seed(bits)
    values = torch.randint(0, 2**bits, (77,))
    got = [_as_u32(int(w)) for w in pack_bits(values, bits, dim=0)]
    assert got == _oracle_pack(values.tolist(), bits)


@pytest.mark.parametrize("bits", PACK_BITS)
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 100])
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip(bits, n, dim):
    torch.manual_seed(n * 10 + bits)
    shape = (n, 6) if dim == 0 else (6, n)
    values = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack_bits(values, bits, dim=dim)
    expected_shape = list(shape)
    expected_shape[dim] = packed_length(n, bits)
    assert list(packed.shape) == expected_shape
    assert packed.dtype == torch.int32
    back = unpack_bits(packed, bits, dim=dim, length=n)
    assert back.dtype == torch.int32
    assert torch.equal(back, values.to(torch.int32))


def test_all_ones_words_are_negative_and_round_trip():
    values = torch.full((4, 64), 15)
    packed = pack_bits(values, 4, dim=1)
    assert (packed == -1).all()
    assert torch.equal(unpack_bits(packed, 4, 1, 64), values.int())


def test_rejects_out_of_range_and_bad_bits():
    with pytest.raises(ValueError, match="values must lie in"):
        pack_bits(torch.tensor([16]), 4, 0)
    with pytest.raises(ValueError, match="bits=1"):
        pack_bits(torch.tensor([1]), 1, 0)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.tensor([1.0]), 4, 0)
    with pytest.raises(ValueError, match="need 2 words"):
        unpack_bits(torch.zeros(1, dtype=torch.int32), 4, 0, length=9)
