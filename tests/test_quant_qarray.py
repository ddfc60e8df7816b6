"""QArray: dense bit packing, and dequantize() against a float64 numpy reading of the invariant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.quant.qarray import SUPPORTED_BITS, QArray, check_quant_args, pack_codes, unpack_codes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_unpack_round_trip(bits):
    for k, n in [(37, 5), (131, 2)] + ([(1, 1)] if bits == 3 else []):  # odd sizes: codes straddle words
        codes = jax.random.randint(jax.random.key(bits * 1000 + k), (k, n), 0, 2 ** bits)
        packed = pack_codes(codes, bits)
        assert packed.dtype == jnp.uint32
        assert packed.shape == (-(-k * bits // 32), n)  # dense: no padding to a byte
        np.testing.assert_array_equal(np.asarray(unpack_codes(packed, bits, k)), np.asarray(codes))


def test_packing_is_a_little_endian_bit_stream():
    # Hand-checked: 3-bit codes 1..11 of one column; code i occupies bits [3i, 3i + 3).
    codes = np.arange(1, 12, dtype=np.int64) % 8
    expect = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    packed = np.asarray(pack_codes(jnp.asarray(codes)[:, None], 3))[:, 0]
    assert packed.shape == (2,)
    assert int(packed[0]) | (int(packed[1]) << 32) == expect


def _reference(codes, scale, zero, bits, g, perm=None, codebook=None, out_idx=None, out_val=None):
    """The invariant in the QArray docstring, in float64 numpy."""
    k, n = codes.shape
    rows = np.arange(k) // g
    if codebook is not None:
        w = codebook[np.arange(n)[None, :], codes].astype(np.float64)
    else:
        s = scale[rows] if scale.shape[0] > 1 else np.broadcast_to(scale, (k, n))
        z = (np.full((k, n), 2.0 ** (bits - 1)) if zero is None
             else (zero[rows] if zero.shape[0] > 1 else np.broadcast_to(zero, (k, n))))
        w = (codes - z.astype(np.float64)) * s.astype(np.float64)
    if out_idx is not None:
        w = w.reshape(-1)
        w[out_idx] = out_val
        w = w.reshape(k, n)
    if perm is not None:
        out = np.zeros_like(w)
        out[perm] = w
        w = out
    return w


@pytest.mark.parametrize("bits,k,g,sym", [(3, 576, 128, False), (4, 100, 32, True), (5, 70, 70, False),
                                          (6, 45, 16, True), (2, 33, 8, False), (8, 20, 20, True)])
def test_dequantize_matches_reference_with_ragged_last_group(bits, k, g, sym):
    rng = np.random.default_rng(bits)
    n = 6
    groups = -(-k // g)
    codes = rng.integers(0, 2 ** bits, size=(k, n))
    scale = rng.uniform(0.01, 0.1, size=(groups, n)).astype(np.float16)
    zero = None if sym else rng.integers(0, 2 ** bits, size=(groups, n)).astype(np.float16)
    perm = rng.permutation(k)
    q = QArray.from_codes(jnp.asarray(codes), jnp.asarray(scale), None if zero is None else jnp.asarray(zero),
                          bits=bits, group_size=g, dtype=jnp.float32, perm=jnp.asarray(perm))
    assert q.num_groups == groups and q.shape == (k, n)
    np.testing.assert_allclose(np.asarray(q.dequantize()), _reference(codes, scale, zero, bits, g, perm),
                               rtol=1e-6, atol=0)
    words = -(-k * bits // 32)
    assert q.nbytes() == 4 * words * n + 2 * groups * n * (1 if sym else 2) + 4 * k


def test_codebook_outliers_and_per_tensor():
    rng = np.random.default_rng(0)
    k, n, bits = 40, 5, 3
    codes = rng.integers(0, 8, size=(k, n))
    book = np.sort(rng.normal(size=(n, 8)), axis=1).astype(np.float16)
    idx = np.array([3, 77, 199], np.int32)
    val = np.array([9.5, -7.25, 3.0], np.float32)
    q = QArray.from_codes(jnp.asarray(codes), None, bits=bits, group_size=k, dtype=jnp.float32,
                          codebook=jnp.asarray(book), outlier_index=jnp.asarray(idx), outlier_value=jnp.asarray(val))
    ref = _reference(codes, None, None, bits, k, codebook=book, out_idx=idx, out_val=val)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), ref.astype(np.float32))
    # per-tensor: one scale and zero for the whole weight
    scale, zero = np.array([[0.03]], np.float16), np.array([[3.0]], np.float16)
    q = QArray.from_codes(jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(zero), bits=bits, group_size=k,
                          dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(q.dequantize()), _reference(codes, scale, zero, bits, k), rtol=1e-6)


def test_from_codes_rejects_malformed_parameters():
    codes = jnp.zeros((64, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"scale has shape \(3, 4\); expected \(2, 4\)"):
        QArray.from_codes(codes, jnp.ones((3, 4)), bits=4, group_size=32, dtype=jnp.float32)
    with pytest.raises(ConfigError, match="bits=7 is not supported"):
        check_quant_args(7, 32, 64, "layers.0.mlp.up_proj.kernel")
    with pytest.raises(ConfigError, match="layers.1.x: group_size=128 is larger than the input dimension 64"):
        check_quant_args(4, 128, 64, "layers.1.x")
    with pytest.raises(ConfigError, match="group_size=0 must be a positive integer"):
        check_quant_args(4, 0, 64)
