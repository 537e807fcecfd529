"""Packing round trips, and independent decoders written from the published layouts."""

import pytest
import torch

from edgequant.pack import (
    pack_awq_gemm,
    pack_bits,
    packed_words,
    unpack_awq_gemm,
    unpack_bits,
)


def codes(rows, n, bits, seed=0):
    return torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [32, 64, 96, 128, 40])
def test_pack_unpack_identity(bits, n):
    q = codes(5, n, bits)
    p = pack_bits(q, bits)
    assert p.dtype == torch.int32 and p.shape == (5, packed_words(n, bits))
    assert torch.equal(unpack_bits(p, bits, n).long(), q)


def reference_stream_decode(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    # written from the layout description alone: concatenate each row's words as 32-bit
    # little-endian bit strings, then read `bits` bits per value, lowest bit first
    out = torch.zeros(p.shape[0], n, dtype=torch.long)
    for r in range(p.shape[0]):
        stream = []
        for word in p[r].tolist():
            word &= 0xFFFFFFFF
            stream += [(word >> b) & 1 for b in range(32)]
        for j in range(n):
            out[r, j] = sum(stream[j * bits + b] << b for b in range(bits))
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_independent_stream_decoder(bits):
    q = codes(3, 64, bits, seed=bits)
    assert torch.equal(reference_stream_decode(pack_bits(q, bits), bits, 64), q)


def test_int4_is_sequential_nibbles():
    q = torch.arange(16).reshape(1, 16) % 16
    p = pack_bits(q, 4)
    assert p.shape == (1, 2)
    assert p[0, 0].item() & 0xFFFFFFFF == 0x76543210


@pytest.mark.parametrize("group", [32, 64, 128])
def test_awq_gemm_roundtrip_and_layout(group):
    out, n_in = 24, 256
    q = codes(out, n_in, 4, seed=group)
    zero = codes(out, n_in // group, 4, seed=1).float()
    scale = torch.rand(out, n_in // group) + 0.01
    t = pack_awq_gemm(q, zero, scale)
    assert t["qweight"].shape == (n_in, out // 8) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (n_in // group, out // 8)
    assert t["scales"].shape == (n_in // group, out) and t["scales"].dtype == torch.float16
    q2, z2, s2 = unpack_awq_gemm(t["qweight"], t["qzeros"], t["scales"])
    assert torch.equal(q2.long(), q) and torch.equal(z2, zero)
    assert torch.equal(s2, scale.half().float())
    # independent decode: nibble i of word (k, j) is output column 8j + [0,2,4,6,1,3,5,7][i]
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    k, j = 5, 2
    word = t["qweight"][k, j].item() & 0xFFFFFFFF
    for i in range(8):
        assert (word >> (4 * i)) & 0xF == q[8 * j + order[i], k].item()
