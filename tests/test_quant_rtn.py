"""RTN and the uniform grid: float64 numpy reference of the grid, invariants, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.quant.config import LayerConfig
from jaxcompress.quant.rtn import rtn_quantize


def reference_rtn(w, bits, g, sym):
    """GPTQ's reference min-max grid per group of g rows (float64; scale rounded to fp16)."""
    k, n = w.shape
    maxq = 2 ** bits - 1
    out = np.empty_like(w)
    scales = []
    for start in range(0, k, g):
        x = w[start:start + g]
        xmin, xmax = np.minimum(x.min(0), 0), np.maximum(x.max(0), 0)
        if sym:
            xmax = np.maximum(-xmin, xmax)
            xmin = -xmax
        scale = ((xmax - xmin) / maxq).astype(np.float16).astype(np.float64)
        zero = np.full(n, 2.0 ** (bits - 1)) if sym else np.round(-xmin / scale)
        q = np.clip(np.round(x / scale) + zero, 0, maxq)
        out[start:start + g] = (q - zero) * scale
        scales.append(scale)
    return out, np.stack(scales)


@pytest.mark.parametrize("bits,g,sym", [(4, 32, False), (3, 48, True), (2, 100, False), (8, 100, True)])
def test_rtn_matches_reference_grid(bits, g, sym):
    w = np.asarray(jax.random.normal(jax.random.key(bits), (100, 24)), np.float64) * 0.05
    cfg = LayerConfig(bits=bits, group_size=g, symmetric=sym)
    q = rtn_quantize(jnp.asarray(w, jnp.float32), cfg, "w")
    ref, scales = reference_rtn(w, bits, g, sym)
    np.testing.assert_allclose(np.asarray(q.scale, np.float64), scales, rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(q.dequantize(), np.float64), ref, rtol=1e-6, atol=1e-9)
    assert (q.zero is None) == sym
    # Every weight inside the grid's range is within half a step of its grid point; the
    # symmetric grid [-2^(b-1), 2^(b-1) - 1] * step clips the top of the range to its last point.
    step = np.repeat(scales, g, axis=0)[:100]
    deq = np.asarray(q.dequantize(), np.float64)
    top = (2 ** (bits - 1) - 1) * step if sym else np.inf
    inside = w <= top + step / 2
    assert np.all(np.abs(deq - w)[inside] <= step[inside] / 2 * (1 + 1e-3))
    np.testing.assert_allclose(deq[~inside], top[~inside] if sym else deq[~inside], rtol=1e-6)


def test_rtn_granularities_and_mse_clip():
    w = jax.random.normal(jax.random.key(1), (96, 16)) * jnp.linspace(0.1, 2.0, 16)
    w = w.at[5, 3].set(12.0)  # an outlier: min-max wastes the grid on it, MSE clipping does not
    errs = {}
    for gs in ("tensor", "channel", 32):
        for clip in ("minmax", "mse"):
            q = rtn_quantize(w, LayerConfig(bits=3, group_size=gs, clip=clip), "w")
            shape = {"tensor": (1, 1), "channel": (1, 16), 32: (3, 16)}[gs]
            assert q.scale.shape == shape and q.zero.shape == shape
            errs[gs, clip] = float(jnp.sum(jnp.abs(q.dequantize() - w) ** 2.4))
        assert errs[gs, "mse"] < errs[gs, "minmax"]
    assert errs[32, "minmax"] < errs["channel", "minmax"] < errs["tensor", "minmax"]


def test_all_zero_group_and_fp16_scale_underflow_stay_finite():
    w = jnp.zeros((64, 4)).at[:, 1].set(1e-9)  # fp16 cannot hold 1e-9 / 15
    q = rtn_quantize(w, LayerConfig(bits=4, group_size=32), "w")
    d = q.dequantize()
    assert bool(jnp.all(jnp.isfinite(d))) and bool(jnp.all(d[:, 0] == 0))
    assert float(jnp.max(jnp.abs(d - w))) < 1e-7


@pytest.mark.parametrize("change,message", [
    (dict(bits=7), r"layers.0.mlp.up_proj.kernel: bits=7 is not supported"),
    (dict(group_size=128), r"layers.0.mlp.up_proj.kernel: group_size=128 is larger than the input dimension 64"),
])
def test_bad_bits_and_group_size_name_the_layer(change, message):
    cfg = LayerConfig(**{"bits": 4, "group_size": 32, **change})
    with pytest.raises(ConfigError, match=message):
        rtn_quantize(jnp.ones((64, 8)), cfg, "layers.0.mlp.up_proj.kernel")


def test_grid_divides_exactly_like_the_reference():
    """Scale, zero point and the codes of the range ends equal numpy's correctly rounded float32
    division (torch's too). XLA alone would multiply by a rounded reciprocal: for a symmetric
    range [-m, m] the zero point 7.5 +/- 1 ulp then rounds the other way in many groups."""
    from jaxcompress.quant.grid import GridSpec, quantize, range_params

    m = np.abs(np.random.default_rng(0).normal(size=4096)).astype(np.float32) + np.float32(1e-3)
    spec = GridSpec(bits=4, symmetric=False, scale_dtype="float32")
    scale, zero = jax.jit(lambda lo, hi: range_params(lo, hi, spec))(-m, m)
    ref_scale = (m - (-m)) / np.float32(15)
    ref_zero = np.clip(np.round(m / ref_scale), 0, 15)
    np.testing.assert_array_equal(np.asarray(scale), ref_scale)
    np.testing.assert_array_equal(np.asarray(zero), ref_zero)
    ends = np.stack([-m, m])  # the clipped weights sit exactly on the range ends
    codes = jax.jit(lambda w, s, z: quantize(w, s, z, 4))(ends, ref_scale[None], ref_zero[None])
    ref_codes = np.clip(np.round(ends / ref_scale[None]) + ref_zero[None], 0, 15)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
