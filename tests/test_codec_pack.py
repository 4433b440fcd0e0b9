"""Bit packing: exact round trips for every width and awkward sizes."""

from __future__ import annotations

import pytest
import torch

from actpack.codecs import pack, pack_bits, packed_numel, unpack_bits

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 13, 255, 1001])
def test_round_trip(bits: int, numel: int, device: str) -> None:
    gen = torch.Generator().manual_seed(1000 * bits + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=gen, dtype=torch.uint8).to(device)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_numel(numel, bits) == -(-numel * bits // 8)
    out = unpack_bits(packed, bits, numel)
    assert out.dtype == torch.uint8 and out.shape == (numel,)
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_any_shape_and_noncontiguous(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (5, 7, 3), dtype=torch.uint8).transpose(0, 2)
    assert not codes.is_contiguous()
    out = unpack_bits(pack_bits(codes, bits), bits, codes.numel())
    assert torch.equal(out, codes.reshape(-1))


def test_layout_is_lsb_first() -> None:
    # 2 bits: 1 | 2 << 2 | 3 << 4 | 0 << 6 = 57.
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [57]
    # 3 bits cross a byte boundary: 7 in bits 0-2, 0 in 3-5, 5 (101) in 6-8.
    assert pack_bits(torch.tensor([7, 0, 5], dtype=torch.uint8), 3).tolist() == [71, 1]


def test_max_codes_do_not_bleed() -> None:
    for bits in range(1, 9):
        codes = torch.full((37,), 2**bits - 1, dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, 37), codes)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True, None])
def test_invalid_bits(bits) -> None:
    codes = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="1..8"):
        pack_bits(codes, bits)
    with pytest.raises(ValueError, match="1..8"):
        unpack_bits(codes, bits, 4)
    with pytest.raises(ValueError, match="1..8"):
        packed_numel(4, bits)


def test_unpack_too_short() -> None:
    with pytest.raises(ValueError, match="needed"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape",
    [(0,), (1,), (7,), (8,), (13,), (3, 64), (5, 7, 9)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_masks_are_the_one_bit_stream(shape, device) -> None:
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    mask = (torch.rand(shape, generator=gen) > 0.4).to(device)
    packed = pack.pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (-(-mask.numel() // 8),)
    assert torch.equal(packed, pack_bits(mask.reshape(-1).to(torch.uint8), 1))
    back = pack.unpack_mask(packed, shape)
    assert back.dtype == torch.bool and torch.equal(back, mask)


def test_masks_of_strided_and_sliced_views() -> None:
    base = torch.rand(9, 31, generator=torch.Generator().manual_seed(3)) > 0.5
    for mask in (base.t(), base[:, 5:17], base[::2], base.t()[3]):
        packed = pack.pack_mask(mask)
        assert torch.equal(packed, pack_bits(mask.reshape(-1).to(torch.uint8), 1))
        assert torch.equal(pack.unpack_mask(packed, mask.shape), mask)
    # a packed stream read from a longer buffer: only its first bytes count
    longer = torch.cat([pack.pack_mask(base), torch.full((3,), 255, dtype=torch.uint8)])
    assert torch.equal(pack.unpack_mask(longer, base.shape), base)


def test_masks_of_bools_that_are_not_zero_or_one_bytes() -> None:
    # a bool view of arbitrary bytes: nonzero is True, as .to(uint8) reads it
    raw = torch.tensor([0, 1, 2, 255, 0, 0, 0, 4, 1], dtype=torch.uint8)
    mask = raw.view(torch.bool)
    assert torch.equal(pack.pack_mask(mask), pack_bits((raw != 0).to(torch.uint8), 1))


def test_mask_errors() -> None:
    with pytest.raises(ValueError, match="bool"):
        pack.pack_mask(torch.ones(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="2 needed for 9 bits"):
        pack.unpack_mask(torch.zeros(1, dtype=torch.uint8), (9,))
    # the backend reads another dtype as mask != 0 (a 2 would otherwise set two bits)
    from actpack.codecs import backend

    codes = torch.tensor([0, 2, 1, 0, 3], dtype=torch.uint8)
    assert torch.equal(
        backend.pack_mask(codes, backend="reference"), torch.tensor([0b10110]).to(torch.uint8)
    )
