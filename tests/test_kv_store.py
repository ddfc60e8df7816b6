"""The packed token store: bit layout, in-place writes, and grids against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.kv.store import (QTokens, minmax_scale_zero, nearest_codes, pack_tokens, uniform_codes,
                                  unpack_tokens, write_codes)


def test_pack_layout_hand_checked():
    # 2-bit, rows=2: a block is 16 slots * 2 rows = 32 tokens; token t = i * rows + w sits in
    # word w at bits [2i, 2i + 2).
    codes = np.zeros((1, 1, 32, 1), np.int32)
    codes[0, 0, 3, 0] = 3   # i=1, w=1 -> word 1, bits 2-3
    codes[0, 0, 30, 0] = 2  # i=15, w=0 -> word 0, bits 30-31 (the sign bit of the int32 word)
    words = np.asarray(pack_tokens(jnp.asarray(codes), bits=2, rows=2))
    assert words.shape == (1, 1, 2, 1)
    assert words[0, 0, 1, 0] == 3 << 2
    assert words[0, 0, 0, 0].view(np.uint32) == 2 << 30


def test_pack_unpack_round_trip():
    rows = 16
    for bits in (2, 3, 4, 8):
        s = 2 * (32 // bits) * rows
        codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=(2, 3, s, 8))
        words = jax.jit(pack_tokens, static_argnums=(1, 2))(codes, bits, rows)
        assert words.shape == (2, 3, s // (32 // bits), 8) and words.dtype == jnp.int32
        np.testing.assert_array_equal(jax.jit(unpack_tokens, static_argnums=(1, 2))(words, bits, rows), codes)


# (bits, start, tokens): one token (the decode read-modify-write) at a block's first slot, at a
# word's high bits, with 3-bit codes; several tokens straddling packing blocks.
@pytest.mark.parametrize("bits,start,t", [(2, 0, 1), (2, 511, 1), (3, 159, 1), (4, 5, 70), (3, 250, 70)])
def test_write_codes_equals_unpack_update_repack(bits, start, t):
    rows, s = 16, 640 if bits == 3 else 512
    rng = np.random.default_rng(start)
    old = rng.integers(0, 2 ** bits, size=(2, 2, s, 4))
    new = rng.integers(0, 2 ** bits, size=(2, 2, t, 4))

    @jax.jit
    def run(old, new, start):
        return unpack_tokens(write_codes(pack_tokens(old, bits, rows), new, start, bits, rows), bits, rows)

    expect = old.copy()
    expect[:, :, start:start + t] = new
    np.testing.assert_array_equal(run(old, new, jnp.int32(start)), expect)


def _np_grid(x, axes, bits, symmetric):
    """float64 reference: fp16 scale (and zero), round-half-even codes, dequantized values.
    The scale is divided in fp32 before its fp16 rounding, as the codec does (rounding the
    float64 quotient instead can differ by one fp16 ulp)."""
    x32 = x.astype(np.float32)
    if symmetric:
        scale = (np.abs(x32).max(axis=axes, keepdims=True) / np.float32(2 ** (bits - 1) - 1)).astype(np.float16)
        scale = np.where(scale > 0, scale, 1).astype(np.float64)
        q = np.clip(np.round(x / scale) + 2 ** (bits - 1), 0, 2 ** bits - 1)
        return (q - 2 ** (bits - 1)) * scale
    lo, hi = x32.min(axis=axes, keepdims=True), x32.max(axis=axes, keepdims=True)
    scale = ((hi - lo) / np.float32(2 ** bits - 1)).astype(np.float16)
    scale = np.where(scale > 0, scale, 1).astype(np.float64)
    zero = lo.astype(np.float16).astype(np.float64)
    q = np.clip(np.round((x - zero) / scale), 0, 2 ** bits - 1)
    return q * scale + zero


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, False), (4, True), (8, True), (8, False)])
def test_uniform_grid_matches_float64(bits, symmetric):
    x = (np.random.default_rng(bits).normal(size=(2, 3, 64, 16)) * np.linspace(0.1, 4, 16)).astype(np.float32)
    x = x.astype(np.float64)
    @jax.jit
    def grid(x):
        scale, zero = minmax_scale_zero(x, (3,), bits, symmetric)
        return uniform_codes(x, scale, zero, bits), scale, zero

    codes, scale, zero = grid(jnp.asarray(x, jnp.float32))
    got = np.asarray(codes, np.float64)
    got = (got - 2 ** (bits - 1)) * np.asarray(scale, np.float64) if symmetric else \
        got * np.asarray(scale, np.float64) + np.asarray(zero, np.float64)
    np.testing.assert_allclose(got, _np_grid(x, 3, bits, symmetric), rtol=0, atol=1e-6)
    # and the grid error is at most half a step (asymmetric; symmetric also clips one side)
    if not symmetric:
        step = np.asarray(scale, np.float64)
        assert np.all(np.abs(got - x) <= step / 2 + 1e-3 * step)


def test_nearest_codes():
    cb = jnp.asarray([-1.0, -0.2, 0.1, 0.9])
    x = jnp.asarray([-5.0, -0.61, -0.59, -0.05, -0.04, 0.49, 0.51, 3.0])
    np.testing.assert_array_equal(nearest_codes(x, cb), [0, 0, 1, 1, 2, 2, 3, 3])


def test_dequantize_broadcasts_groups_and_overrides_outliers():
    # keys-style store: scale per (group of 4 tokens, channel); one outlier per token.
    rows, bits, b, k, s, d = 16, 4, 1, 2, 128, 4
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(b, k, s, d))
    scale = rng.uniform(0.5, 1, size=(b, k, s // 4, d)).astype(np.float16)
    zero = rng.normal(size=(b, k, s // 4, d)).astype(np.float16)
    idx = rng.integers(0, d + 1, size=(b, k, s, 1)).astype(np.uint8)
    idx[idx == d] = 255
    val = rng.normal(size=(b, k, s, 1)).astype(np.float32)
    store = QTokens(pack_tokens(jnp.asarray(codes), bits, rows), jnp.asarray(scale), jnp.asarray(zero),
                    outlier_index=jnp.asarray(idx), outlier_value=jnp.asarray(val),
                    bits=bits, rows=rows, token_group=4, channel_group=1)
    expect = codes * np.repeat(scale.astype(np.float64), 4, axis=2) + np.repeat(zero.astype(np.float64), 4, axis=2)
    hit = idx[..., 0] < 255
    b_, k_, t_ = np.nonzero(hit)
    expect[b_, k_, t_, idx[hit][:, 0]] = val[hit][:, 0]
    np.testing.assert_allclose(np.asarray(jax.jit(QTokens.dequantize)(store)), expect, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ channel_words
def test_channel_words_layout_hand_checked():
    # 4-bit: 8 codes a word; token t sits in word column t // 8 of its channel at bits 4 * (t % 8).
    from jaxcompress.kv.store import pack_channel_words

    codes = np.zeros((1, 1, 16, 2), np.int32)
    codes[0, 0, 9, 1] = 5    # word column 1, slot 1 -> bits 4-7 of words[.., channel 1, 1]
    codes[0, 0, 7, 0] = 15   # word column 0, slot 7 -> bits 28-31 (the sign bit)
    words = np.asarray(pack_channel_words(jnp.asarray(codes), bits=4))
    assert words.shape == (1, 1, 2, 2)  # [B, K, D, S // 8]
    assert words[0, 0, 1, 1] == 5 << 4 and words[0, 0, 1, 0] == 0
    assert words[0, 0, 0, 0].view(np.uint32) == 15 << 28


@pytest.mark.parametrize("bits,start,t", [(2, 0, 1), (2, 511, 1), (4, 5, 70), (8, 130, 200)])
def test_channel_words_write_equals_token_order_update(bits, start, t):
    from jaxcompress.kv.store import pack_channel_words, unpack_channel_words, write_channel_words

    s = 512
    rng = np.random.default_rng(start + bits)
    old = rng.integers(0, 2 ** bits, size=(2, 2, s, 4))
    new = rng.integers(0, 2 ** bits, size=(2, 2, t, 4))
    words = pack_channel_words(jnp.asarray(old), bits)
    np.testing.assert_array_equal(unpack_channel_words(words, bits), old)
    expect = old.copy()
    expect[:, :, start:start + t] = new
    out = jax.jit(write_channel_words, static_argnums=3)(words, jnp.asarray(new), jnp.int32(start), bits)
    np.testing.assert_array_equal(unpack_channel_words(out, bits), expect)


def test_code_order_and_meta_writes():
    """Per-token meta of a channel_words store sits in code order: token t = m * 512 + w * 16 + j
    (2-bit) at m * 512 + j * 32 + w; with_meta writes there and dequantize reads it back."""
    from jaxcompress.kv.store import code_positions, to_code_order

    s = 1024
    t = np.arange(s)
    m, w, j = t // 512, (t % 512) // 16, t % 16
    np.testing.assert_array_equal(code_positions(jnp.asarray(t), 2), m * 512 + j * 32 + w)
    np.testing.assert_array_equal(np.asarray(to_code_order(jnp.asarray(t), 2))[m * 512 + j * 32 + w], t)
    store = QTokens(jnp.zeros((1, 1, 4, s // 16), jnp.int32), jnp.zeros((1, 1, 2, s), jnp.float16),
                    jnp.zeros((1, 1, 2, s), jnp.float16), bits=2, token_group=1, channel_group=2,
                    layout="channel_words")
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(1, 1, s, 4))
    scale = rng.uniform(0.5, 1, size=(1, 1, s, 2)).astype(np.float16)
    zero = rng.normal(size=(1, 1, s, 2)).astype(np.float16)
    # two writes: a prefill of 700 tokens, then one token (the decode write) at 700
    store = store.with_codes(jnp.asarray(codes[:, :, :700]), 0).with_meta(
        0, scale=jnp.asarray(scale[:, :, :700]), zero=jnp.asarray(zero[:, :, :700]))
    store = jax.jit(lambda st: st.with_codes(jnp.asarray(codes[:, :, 700:701]), jnp.int32(700)).with_meta(
        jnp.int32(700), scale=jnp.asarray(scale[:, :, 700:701]), zero=jnp.asarray(zero[:, :, 700:701])))(store)
    np.testing.assert_array_equal(np.asarray(store.scale)[0, 0, 1, code_positions(jnp.int32(700), 2)],
                                  scale[0, 0, 700, 1])
    expect = (codes * np.repeat(scale, 2, -1).astype(np.float64) + np.repeat(zero, 2, -1))[:, :, :701]
    np.testing.assert_allclose(np.asarray(store.dequantize())[:, :, :701], expect, rtol=1e-6)


def test_capacity_rounds_to_whole_decode_pass_tiles_when_that_costs_at_most_an_eighth():
    """2-bit codes, 32 word columns a block (512 slots), passes of 128 columns (2048 slots)."""
    from jaxcompress.kv.store import capacity_for

    cap = lambda n, tile=2048: capacity_for(n, (2, 2), 32, multiple_of=32, pass_tile=tile)  # noqa: E731
    assert cap(32768) == 32768                  # already whole tiles
    assert cap(32768 + 24) == 34816             # 17 tiles (was 65 blocks of 512: one warp a pass)
    assert cap(8200) == 9216                    # 5 x 2048 would add 25%: 9 x 1024 adds 12%
    assert cap(300) == 512                      # one block: nothing to round
    assert cap(32768 + 24, tile=None) == 33280  # without a pass tile: whole blocks only


def test_kivi_store_at_an_odd_length_keeps_the_full_decode_pass_width():
    """A decode loop's cache holds context + new tokens: the cw2 passes still read 128 columns."""
    from jaxcompress.kv.kivi import KIVICodec
    from pallas_kernels.decode_attention import KEY_COLUMNS, _key_columns

    codec = KIVICodec(key_bits=2, value_bits=2, group_size=32, residual=128)
    state = jax.eval_shape(lambda: codec.init(1, 32768 + 24, 2, 128, jnp.bfloat16))
    assert state["k"].capacity == state["v"].capacity == 34816
    assert _key_columns(state["k"]) == KEY_COLUMNS == 128
