"""The f16x2 helpers (pallas_kernels/f16x2.py) in interpret mode, against numpy fp16: the
arithmetic the GPU's inline PTX performs, rounding for rounding."""

import jax.numpy as jnp
import numpy as np

from pallas_kernels import f16x2


def _pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
    words = np.zeros(codes.shape[:-1], np.uint32)
    for t in range(32 // bits):
        words |= codes[..., t].astype(np.uint32) << np.uint32(t * bits)
    return words


def test_pack_unpack_and_code_fma():
    """The interpret-mode f16x2 helpers against numpy fp16: pack/unpack, FMA, and the code
    extraction (codes masked in place into 2**(10 - o), less the centre) at every pair offset."""
    rng = np.random.default_rng(0)
    lo, hi = (rng.normal(size=(4, 8)).astype(np.float32) for _ in range(2))
    packed = f16x2.h2_pack(jnp.asarray(lo), jnp.asarray(hi), asm=False)
    got_lo, got_hi = f16x2.h2_unpack(packed, asm=False)
    np.testing.assert_array_equal(np.asarray(got_lo), lo.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(got_hi), hi.astype(np.float16).astype(np.float32))
    for bits in (2, 4, 8):
        codes = rng.integers(0, 1 << bits, size=(4, 8, 32 // bits))
        words = np.zeros((4, 8), np.uint32)
        for t in range(32 // bits):
            words |= codes[..., t].astype(np.uint32) << np.uint32(t * bits)
        half = 16 // bits
        for j, (shifted, o) in enumerate(f16x2.h2_positions(bits)):
            w = jnp.asarray((words >> np.uint32(f16x2.H2_SHIFT if shifted else 0)).view(np.int32))
            field = ((1 << bits) - 1) << o
            e = (25 - o) << 10
            mid = (1 << (bits - 1)) << o
            acc = f16x2.h2_code_fma(w, jnp.int32(field | field << 16), jnp.int32(e | e << 16),
                                 jnp.int32(e | mid | (e | mid) << 16), packed, jnp.zeros((4, 8), jnp.int32), asm=False)
            a_lo, a_hi = f16x2.h2_unpack(acc, asm=False)
            mid_code = 1 << (bits - 1)
            want = [(codes[..., j + i * half] - mid_code) * x.astype(np.float16).astype(np.float32) for i, x in
                    enumerate((lo, hi))]
            np.testing.assert_allclose(np.asarray(a_lo), want[0], rtol=2 ** -11)
            np.testing.assert_allclose(np.asarray(a_hi), want[1], rtol=2 ** -11)



def test_codes_and_sum_halves():
    """h2_codes gives the exact centred codes (slot j low, slot j + half high) at every pair of
    2-, 4- and 8-bit words; h2_sum_halves adds the halves with one fp16 rounding."""
    rng = np.random.default_rng(1)
    for bits in (2, 4, 8):
        codes = rng.integers(0, 1 << bits, size=(4, 8, 32 // bits))
        words = _pack_words(codes, bits)
        half = 16 // bits
        for j, (shifted, o) in enumerate(f16x2.h2_positions(bits)):
            w = jnp.asarray((words >> np.uint32(f16x2.H2_SHIFT if shifted else 0)).view(np.int32))
            got = f16x2.h2_codes(w, *f16x2.h2_pair_constants(bits, o), asm=False)
            lo, hi = f16x2.h2_unpack(got, asm=False)
            mid = 1 << (bits - 1)
            np.testing.assert_array_equal(np.asarray(lo), codes[..., j] - mid)
            np.testing.assert_array_equal(np.asarray(hi), codes[..., j + half] - mid)
    lo, hi = (rng.normal(size=(16,)).astype(np.float32) * 100 for _ in range(2))
    s = f16x2.h2_sum_halves(f16x2.h2_pack(jnp.asarray(lo), jnp.asarray(hi), asm=False), asm=False)
    want = (lo.astype(np.float16).astype(np.float32) + hi.astype(np.float16).astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(s), want.astype(np.float32))


def test_interpret_pairs_and_packed_words_agree():
    """Interpret mode's f16x2 value is a (low, high) pair of fp32 arrays holding fp16 values; the
    helpers take packed int32 words too (fp16 meta read from memory) and give the same numbers
    either way; h2_zeros is (0, 0) in both forms."""
    rng = np.random.default_rng(2)
    lo, hi, c_lo, c_hi = (rng.normal(size=(3, 5)).astype(np.float16) for _ in range(4))
    pack = lambda a, b: jnp.asarray((a.view(np.uint16).astype(np.uint32) | b.view(np.uint16).astype(np.uint32) << 16)  # noqa: E731
                                    .view(np.int32))
    pair = f16x2.h2_pack(jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32), asm=False)
    c_pair = f16x2.h2_pack(jnp.asarray(c_lo, jnp.float32), jnp.asarray(c_hi, jnp.float32), asm=False)
    from_words = f16x2.h2_unpack(f16x2.h2_fma(pack(lo, hi), pack(lo, hi), pack(c_lo, c_hi), asm=False), asm=False)
    from_pairs = f16x2.h2_unpack(f16x2.h2_fma(pair, pair, c_pair, asm=False), asm=False)
    want = [(x.astype(np.float32) ** 2 + c.astype(np.float32)).astype(np.float16) for x, c in ((lo, c_lo), (hi, c_hi))]
    for got in (from_words, from_pairs):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), w.astype(np.float32))
    zero_pair = f16x2.h2_zeros((3, 5), asm=False)
    np.testing.assert_array_equal(np.asarray(f16x2.h2_mul(pair, zero_pair, asm=False)[0]), 0.0)
    words = f16x2.h2_zeros((3, 5), asm=True)
    assert words.dtype == jnp.int32 and not np.asarray(words).any()
    assert [np.asarray(x).tolist() for x in f16x2.h2_unpack(words, asm=False)] == [np.zeros((3, 5)).tolist()] * 2
