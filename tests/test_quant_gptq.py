"""GPTQ against a float64 numpy transliteration of the reference algorithm, and its properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import UserError
from jaxcompress.quant.config import GPTQOptions, LayerConfig
from jaxcompress.quant.gptq import gptq_quantize
from jaxcompress.quant.rtn import rtn_quantize


def _find_params(x, bits, sym, scale_dtype=np.float16):
    """GPTQ's Quantizer.find_params over the columns of x [rows, g]; the scale rounded to
    `scale_dtype` before the zero point and the codes are chosen (the published code keeps it in
    float32; jaxcompress stores float16 by default and picks codes for the stored grid)."""
    maxq = 2 ** bits - 1
    xmin, xmax = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
    if sym:
        xmax = np.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty], xmax[empty] = -1, 1
    scale = ((xmax - xmin) / maxq).astype(scale_dtype).astype(np.float64)
    zero = np.full_like(scale, 2 ** (bits - 1)) if sym else np.round(-xmin / scale)
    return scale, zero


def reference_gptq(w, h, bits, g, sym, act_order=False, static_groups=False, blocksize=128, percdamp=0.01,
                   scale_dtype=np.float16):
    """The reference `GPTQ.fasterquant` in float64, torch layout W [out, in]; returns Q [out, in]."""
    w, h = w.T.astype(np.float64).copy(), h.astype(np.float64).copy()
    cols = w.shape[1]
    maxq = 2 ** bits - 1
    quant = lambda x, s, z: s * (np.clip(np.round(x / s) + z, 0, maxq) - z)  # noqa: E731
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    find = lambda x: _find_params(x, bits, sym, scale_dtype)  # noqa: E731
    params = find(w)  # per-channel (g == cols)
    groups = [find(w[:, i:i + g]) for i in range(0, cols, g)] if static_groups else None
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
        w, h = w[:, perm], h[perm][:, perm]
    h[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    q = np.zeros_like(w)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, err1, hinv1 = w[:, i1:i2].copy(), np.zeros((w.shape[0], i2 - i1)), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if g < cols:
                if not static_groups and (i1 + i) % g == 0:
                    params = find(w[:, i1 + i:i1 + i + g])
                elif static_groups:
                    params = groups[(perm[i1 + i] if act_order else i1 + i) // g]
            x = w1[:, i]
            q[:, i1 + i] = quant(x, *params)
            err1[:, i] = (x - q[:, i1 + i]) / hinv1[i, i]
            w1[:, i:] -= np.outer(err1[:, i], hinv1[i, i:])
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if act_order:
        q = q[:, np.argsort(perm)]
    return q.T


def correlated_inputs(k, tokens=512, seed=0):
    """Inputs with correlated channels of very different scales (what makes GPTQ matter)."""
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + 0.4 * rng.normal(size=(k, k)) / np.sqrt(k)
    return (rng.normal(size=(tokens, k)) @ mix) * np.exp(rng.normal(size=k))


# Shapes and options shared across tests, so the compiled programs are reused.
K, N = 100, 24
GROUPED = dict(bits=4, group_size=32, gptq=GPTQOptions(block_size=64))  # ragged last group, 2 blocks
WIDE = dict(bits=3, group_size=50, symmetric=True, gptq=GPTQOptions(block_size=32, act_order=True))  # group > block
STATIC = dict(bits=3, group_size=32, gptq=GPTQOptions(act_order=True, static_groups=True, block_size=64))
FP32_SCALES = dict(GROUPED, scale_dtype="float32")  # the published Quantizer's float32 grid


@pytest.mark.parametrize("opts", [GROUPED, WIDE, STATIC, FP32_SCALES], ids=["grouped", "wide_group", "static", "fp32_scales"])
def test_matches_reference_algorithm(opts):
    k = K
    x = correlated_inputs(k)
    h = x.T @ x / len(x)
    w = np.asarray(jax.random.normal(jax.random.key(k), (k, N)), np.float64) * 0.1
    cfg = LayerConfig(method="gptq", **opts)
    q, info = gptq_quantize(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), cfg, "layer")
    ref = reference_gptq(w, h, cfg.bits, cfg.group_size, cfg.symmetric, cfg.gptq.act_order,
                         cfg.gptq.static_groups, cfg.gptq.block_size, scale_dtype=np.dtype(cfg.scale_dtype))
    ours = np.asarray(q.dequantize(), np.float64)
    # fp32 against float64: every weight lands on the same grid point (these seeded inputs
    # hit no rounding tie), so the values agree to fp32 precision.
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
    assert (q.perm is not None) == (cfg.gptq.act_order and not cfg.gptq.static_groups)
    assert info["damp"] == 0.01


def test_identity_hessian_equals_rtn():
    w = jax.random.normal(jax.random.key(0), (K, N))
    for opts in (GROUPED, WIDE):
        cfg = LayerConfig(method="gptq", **opts)
        q, _ = gptq_quantize(w, jnp.eye(K), cfg, "layer")
        np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(rtn_quantize(w, cfg).dequantize()))


def test_lowers_layer_output_error_below_rtn_and_act_order_helps():
    x = correlated_inputs(K, seed=1)
    h = jnp.asarray(x.T @ x / len(x), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (K, N)) * 0.1
    err = lambda q: float(np.linalg.norm(x @ (np.asarray(q.dequantize(), np.float64) - np.asarray(w))))  # noqa
    cfg = LayerConfig(method="gptq", **GROUPED)
    rtn = err(rtn_quantize(w, cfg))
    plain = err(gptq_quantize(w, h, cfg, "l")[0])
    ordered = err(gptq_quantize(w, h, LayerConfig(method="gptq", **{**GROUPED, "gptq": GPTQOptions(
        block_size=64, act_order=True)}), "l")[0])
    assert plain < rtn
    assert ordered < plain


def test_dead_features_are_zeroed_and_damping_escalates():
    k = K
    x = correlated_inputs(k, seed=2)
    x[:, 7] = 0  # a feature calibration never activates
    h = x.T @ x / len(x)
    w = jax.random.normal(jax.random.key(2), (k, N))
    cfg = LayerConfig(method="gptq", **GROUPED)
    q, _ = gptq_quantize(w, jnp.asarray(h, jnp.float32), cfg, "l")
    assert bool(jnp.all(q.dequantize()[7] == 0))
    # One slightly negative eigenvalue: damp 0.01 of the mean diagonal is not enough, 0.1 is.
    h2 = np.eye(k)
    h2[3, 3] = -0.05
    _, info = gptq_quantize(w, jnp.asarray(h2, jnp.float32), cfg, "l")
    assert info["damp"] == pytest.approx(0.1)


def test_non_positive_definite_hessian_names_the_layer():
    cfg = LayerConfig(method="gptq", bits=4, group_size=32, gptq=GPTQOptions(max_damp=0.1, block_size=64))
    with pytest.raises(UserError, match=r"layers.3.mlp.up_proj.kernel: the Hessian .* not positive definite "
                                        r"even with damp=0.1 \(tried 0.01, 0.1"):
        gptq_quantize(jnp.ones((K, N)), -jnp.eye(K), cfg, "layers.3.mlp.up_proj.kernel")


def test_sink_weight_reaches_the_hessian_statistic():
    from jaxcompress.calibrate import Hessian
    from jaxcompress.experiments.recipes import load_recipe
    from jaxcompress.quant.config import parse_weights
    from jaxcompress.quant.gptq import GPTQ

    published = parse_weights(load_recipe("gptq_w4_g128")["weights"]).layer
    variant = parse_weights(load_recipe("gptq_w4_g128_sink")["weights"]).layer
    assert GPTQ().statistic("p", published) == Hessian()  # the published algorithm: a plain mean
    assert GPTQ().statistic("p", variant) == Hessian(first_token_weight=100.0)
