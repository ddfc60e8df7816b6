"""QAT: the fake-quantized forward pass is the QArray grid, its gradients are the straight-through
estimator (and LSQ for learned scales), and a QAT model exports to the QArray model it trained."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.quant.config import LayerConfig
from jaxcompress.quant.qarray import QArray
from jaxcompress.train.config import ALL_PROJECTIONS
from jaxcompress.train.lora import named_weights
from jaxcompress.train.qat import FakeQuant, add_fake_quant, fake_quantize_ste, finalize_qat, quantize_weights
from test_train_common import TINY1, logits, numpy_model, pure_tree

K, N = 80, 24  # 80 rows in groups of 32: the last group is narrower (16 rows)


PROJ = r"proj\.kernel"


def one(w):
    """A parameter tree with one projection kernel, named `proj.kernel`."""
    return {"proj": {"kernel": w}}


def weight(seed=0):
    return jax.random.normal(jax.random.key(seed), (K, N)) * 0.05


def grid_float64(w: np.ndarray, bits: int, g: int, symmetric: bool):
    """GPTQ's min-max quantizer in float64 (scale rounded to fp16 as stored): (w_hat, scale, zero, code)."""
    maxq = 2 ** bits - 1
    w = w.astype(np.float64)
    out, codes = np.empty_like(w), np.empty_like(w)
    scales, zeros = [], []
    for g0 in range(0, w.shape[0], g):
        blk = w[g0:g0 + g]
        lo, hi = np.minimum(blk.min(0), 0), np.maximum(blk.max(0), 0)
        if symmetric:
            hi = np.maximum(-lo, hi)
            lo = -hi
        s = ((hi - lo) / maxq).astype(np.float16).astype(np.float64)
        z = np.full_like(s, 2 ** (bits - 1)) if symmetric else np.clip(np.round(-lo / s), 0, maxq)
        q = np.clip(np.round(blk / s) + z, 0, maxq)
        out[g0:g0 + g], codes[g0:g0 + g] = (q - z) * s, q
        scales.append(s)
        zeros.append(z)
    return out, np.stack(scales), np.stack(zeros), codes


@pytest.mark.parametrize("bits,symmetric", [(3, False), (4, True)])
@pytest.mark.parametrize("scales", ["minmax", "learned"])
def test_fake_quant_is_the_qarray_grid(bits, symmetric, scales):
    w = weight()
    layer = LayerConfig(bits=bits, group_size=32, symmetric=symmetric)
    fq = add_fake_quant(one(w), PROJ, layer, scales)["proj"]["kernel"]
    assert isinstance(fq, FakeQuant) and fq.group_size == 32
    want, _, _, _ = grid_float64(np.asarray(w), bits, 32, symmetric)
    got = np.asarray(fq.dequantize())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    q = fq.to_qarray()
    assert isinstance(q, QArray) and q.symmetric == symmetric and q.bits == bits
    np.testing.assert_array_equal(np.asarray(q.dequantize_storage_order()), got)  # bit for bit


def test_straight_through_gradient():
    w = weight(1)
    bits = 3
    layer = LayerConfig(bits=bits, group_size=32, symmetric=True)
    fq = add_fake_quant(one(w), PROJ, layer, "fixed")["proj"]["kernel"]
    upstream = jax.random.normal(jax.random.key(2), w.shape)
    grad = jax.grad(lambda m: jnp.sum(fake_quantize_ste(m, fq.scale, fq.zero, bits, 32) * upstream))(fq.w)
    # Straight through where the rounded code lies on the grid, zero where it was clipped.
    _, s, z, _ = grid_float64(np.asarray(w), bits, 32, True)
    rows = np.arange(K) // 32
    raw = np.round(np.asarray(w, np.float64) / s[rows]) + z[rows]
    inside = (raw >= 0) & (raw <= 2 ** bits - 1)
    assert (~inside).any() and inside.mean() > 0.9  # symmetric grids clip the top code
    grad = np.asarray(grad)
    assert np.all(grad[~inside] == 0)
    # (round(w / s) + z) * s differentiates to s * (1 / s): one up to fp32 rounding.
    np.testing.assert_allclose(grad[inside], np.asarray(upstream)[inside], rtol=1e-6, atol=0)


def test_learned_scale_gets_the_lsq_gradient():
    w = weight(3)
    bits = 4
    fq = add_fake_quant(one(w), PROJ, LayerConfig(bits=bits, group_size=32), "learned")["proj"]["kernel"]
    upstream = np.asarray(jax.random.normal(jax.random.key(4), w.shape), np.float64)
    grad = jax.grad(lambda s: jnp.sum(fake_quantize_ste(fq.w, s, fq.zero, bits, 32) * upstream))(fq.scale)
    # d w_hat / d s = (code - z) - w / s inside the grid (LSQ), (code - z) where clipped.
    s, z = np.asarray(fq.scale, np.float64), np.asarray(fq.zero, np.float64)
    rows = np.arange(K) // 32
    wd = np.asarray(w, np.float64)
    raw = np.round(wd / s[rows]) + z[rows]
    code = np.clip(raw, 0, 2 ** bits - 1)
    inside = raw == code
    dwds = np.where(inside, (code - z[rows]) - wd / s[rows], code - z[rows])
    want = np.stack([(dwds * upstream)[rows == g].sum(0) for g in range(3)])
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)


def test_qat_model_exports_to_the_quantized_model_it_trained():
    graphdef, tree = pure_tree(numpy_model(TINY1, seed=5))
    tokens = np.random.default_rng(6).integers(0, TINY1.vocab_size, (2, 16)).astype(np.int32)
    layer = LayerConfig(bits=4, group_size=32)
    qat_tree = add_fake_quant(tree, ALL_PROJECTIONS, layer, "minmax")
    exported = finalize_qat(qat_tree)
    assert all(isinstance(exported_w, QArray) for n, exported_w in named_weights(exported).items() if "proj" in n)
    np.testing.assert_allclose(logits(graphdef, exported, tokens), logits(graphdef, qat_tree, tokens),
                               rtol=1e-5, atol=1e-6)
    # The same as plain RTN on the same grid: QAT starts from round-to-nearest.
    rtn = quantize_weights(tree, ALL_PROJECTIONS, layer)
    for name, q in named_weights(rtn).items():
        if isinstance(q, QArray):
            np.testing.assert_array_equal(np.asarray(named_weights(exported)[name].codes), np.asarray(q.codes))


def test_qat_from_a_recipe_output_keeps_its_grid():
    w = weight(7)
    q = quantize_weights(one(w), PROJ, LayerConfig(bits=3, group_size=32, clip="mse"))["proj"]["kernel"]
    fq = add_fake_quant(one(q), PROJ, LayerConfig(bits=8, group_size=64), "fixed")["proj"]["kernel"]
    assert (fq.bits, fq.group_size) == (3, 32)  # the recipe's grid, not the config's
    np.testing.assert_array_equal(np.asarray(fq.dequantize()), np.asarray(q.dequantize_storage_order()))
    np.testing.assert_array_equal(np.asarray(fq.to_qarray().codes), np.asarray(q.codes))


def test_bad_qat_settings_are_clear():
    with pytest.raises(ConfigError, match="qat.scales='dynamic'"):
        add_fake_quant(one(weight()), PROJ, LayerConfig(), "dynamic")
    with pytest.raises(ConfigError, match="group_size=128 is larger than the input dimension 80"):
        add_fake_quant(one(weight()), PROJ, LayerConfig(group_size=128), "minmax")
    with pytest.raises(ConfigError, match="quant.targets"):
        add_fake_quant(one(weight()), r"nothing\.kernel", LayerConfig(group_size=32), "minmax")
