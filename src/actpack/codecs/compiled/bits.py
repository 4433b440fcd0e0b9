"""Bit packing compiled for the CPU by TorchInductor, contiguous loads only.

The stream is the reference's (:mod:`actpack.codecs.pack`): element ``i``
occupies bits ``[i*bits, (i+1)*bits)``, least significant first.  Gathering
the ``8 // bits`` codes of a byte would make Inductor load with a stride,
one element at a time.  Instead the uint8 codes are viewed as words of four
(int32) or eight (int64) codes, little-endian, and each word is folded with
shifts into the ``bits * codes / 8`` bytes it packs to: one byte for 1 and 2
bits, several for the others.  Unpacking spreads each word's bytes back into
one word of uint8 codes the same way.  (int16 words would suit 4 bits, but
Inductor does not vectorise int16.)

The encoders pack inside their compiled bodies when a group holds whole
words (:func:`pack_rows`, :func:`packs_rows`): the codes are viewed as words
along each group only, which keeps the body's 2-D index (a body that
flattened its codes for the view would be compiled as one flat loop with a
division per index), and one compiled call replaces two.  Other group sizes
pack the body's uint8 codes here, compiled once per bit width
(:func:`pack_codes`).  The codes array (a quarter of a float32 input) is the
only full-size temporary either way.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from actpack.codecs import pack as ref
from actpack.codecs.compiled import build
from actpack.codecs.compiled.arith import to_uint8
from actpack.codecs.compiled.verify import same_bits
from actpack.codecs.pack import _check_bits, packed_numel

__all__ = [
    "pack_bits",
    "pack_codes",
    "pack_mask",
    "pack_rows",
    "packs_rows",
    "unpack_bits",
    "unpack_codes",
    "unpack_mask",
]


def _word(bits: int) -> tuple[int, torch.dtype, int]:
    """(codes per word, word dtype, packed bytes per word) for ``bits`` < 8."""
    per = 4 if bits % 2 == 0 else 8  # 4 codes of an even width fill whole bytes
    return per, (torch.int32 if per == 4 else torch.int64), per * bits // 8


def _fold(word: Tensor, bits: int) -> Tensor:
    """Words of ``per`` uint8 codes -> their packed bytes, shape (..., nbytes)."""
    per, _, nbytes = _word(bits)
    mask = (1 << bits) - 1
    folded = word & mask  # codes < 128: words are never negative
    for i in range(1, per):
        folded = folded | ((word >> (8 * i - bits * i)) & (mask << (bits * i)))
    if nbytes == 1:
        return to_uint8(folded).unsqueeze(-1)
    return to_uint8(torch.stack([(folded >> (8 * m)) & 0xFF for m in range(nbytes)], dim=-1))


def _as_words(codes: Tensor, dtype: torch.dtype) -> Tensor:
    """uint8 ``codes`` viewed as ``dtype`` (int32 or int64) words, through
    the float dtype of that width: Inductor on AVX2 loads an integer vector
    through a stack buffer (a store-forwarding stall on every load; the
    packing loop ran 2.2x slower), a float one with one instruction, and
    the bit cast back costs nothing."""
    return codes.view(torch.float32 if dtype == torch.int32 else torch.float64).view(dtype)


def packs_rows(bits: int, width: int) -> bool:
    """Whether :func:`pack_rows` packs rows of ``width`` codes (whole words)."""
    return bits < 8 and width % _word(bits)[0] == 0


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """uint8 ``codes`` (rows, width) packed row by row, for use inside a codec
    body (``packs_rows(bits, width)``): (rows, width * bits // 8) uint8, each row
    the stream of its codes, so the rows together are the stream of all.

    Viewed as words along the last dimension only, the codes keep their 2-D
    index: no flat loop, no division per index (see the module docstring)."""
    rows = codes.shape[0]
    # contiguous: codes of a strided input keep its strides, which the word
    # view cannot take; in the body it only fixes the layout Inductor writes.
    return _fold(_as_words(codes.contiguous(), _word(bits)[1]), bits).reshape(rows, -1)


def _packer(bits: int):
    per, dtype, _ = _word(bits)

    def pack_words(codes: Tensor):
        n = codes.shape[0]
        pad = -n % per
        if pad:
            codes = F.pad(codes, (0, pad))
        return _fold(_as_words(codes, dtype), bits).reshape(-1)[: (n * bits + 7) // 8]

    return pack_words


def _unpacker(bits: int):
    per, dtype, nbytes = _word(bits)
    mask = (1 << bits) - 1

    def unpack_words(stream: Tensor, words: Tensor):
        # ``words``: an empty (count, 0) tensor whose first size is the word count.
        if nbytes == 1:
            word = stream.to(dtype)
        else:
            count = words.shape[0]
            stream = F.pad(stream, (0, count * nbytes - stream.shape[0])).view(count, nbytes)
            word = stream[:, 0].to(dtype)
            for m in range(1, nbytes):
                word = word | (stream[:, m].to(dtype) << (8 * m))
        spread = word & mask
        for i in range(1, per):
            spread = spread | (((word >> (bits * i)) & mask) << (8 * i))
        return spread

    return unpack_words


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Packed stream of contiguous uint8 ``codes`` (any shape; 8 bits: the codes
    themselves, not a copy)."""
    flat = codes.reshape(-1)
    if bits == 8 or flat.numel() == 0:
        return flat if bits == 8 else ref.pack_bits(flat, bits)
    with torch.no_grad():
        out = build.run(_packer, (bits,), (flat,), functools.partial(_check_packer, bits))
    return ref.pack_bits(flat, bits) if out is None else out


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The first ``numel`` codes of a packed stream, 1-D uint8 (8 bits: a view)."""
    need = packed_numel(numel, bits)
    if packed.numel() < need:
        raise ValueError(f"packed holds {packed.numel()} bytes, {need} needed for {numel} codes")
    stream = packed.detach().reshape(-1)[:need]
    if bits == 8 or numel == 0:
        return stream
    words = -(-numel // _word(bits)[0])
    with torch.no_grad():
        args = (stream, stream.new_empty(words, 0))
        out = build.run(_unpacker, (bits,), args, functools.partial(_check_unpacker, bits))
    if out is None:
        return ref.unpack_bits(stream, bits, numel)
    return out.view(torch.uint8)[:numel]


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Compiled :func:`actpack.codecs.pack_bits` (bool inputs are read as 0/1)."""
    _check_bits(bits)
    flat = codes.detach().reshape(-1)
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool else flat.to(torch.uint8)
    return flat.clone() if bits == 8 else pack_codes(flat, bits)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Compiled :func:`actpack.codecs.unpack_bits`: 1-D uint8 codes of length ``numel``."""
    _check_bits(bits)
    codes = unpack_codes(packed, bits, numel)
    return codes.clone() if bits == 8 or numel == 0 else codes


def pack_mask(mask: Tensor) -> Tensor:
    """A bool tensor packed 1 bit per element (no uint8 copy of the mask)."""
    return pack_bits(mask, 1)


def unpack_mask(packed: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`pack_mask`: a bool tensor of ``shape``."""
    shape = torch.Size(shape)
    return unpack_bits(packed, 1, shape.numel()).view(torch.bool).view(shape)


def _probe_codes(bits: int) -> Tensor:
    """Codes of every value, extremes first, in whole words of every bit width
    (1024 codes): what packed saved tensors mostly hold, so that the artifact
    compiled for the probe (the one verified) also serves them.  A stream with
    a tail that fills no word gets an artifact of its own (Inductor guards the
    tail), tested against the reference in tests/test_compiled_codecs.py."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (1024,), generator=gen, dtype=torch.uint8)
    codes[: 1 << bits] = torch.arange(1 << bits, dtype=torch.uint8)
    return codes


def _check_packer(bits: int) -> bool:
    """Whether the packer for ``bits`` writes the reference's stream."""
    codes = _probe_codes(bits)
    return same_bits(pack_codes(codes, bits), ref.pack_bits(codes, bits))


def _check_unpacker(bits: int) -> bool:
    """Whether the unpacker for ``bits`` reads the reference's stream back."""
    codes = _probe_codes(bits)
    return same_bits(unpack_codes(ref.pack_bits(codes, bits), bits, codes.numel()), codes)
