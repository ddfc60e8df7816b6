"""AWQ: scale folding keeps the float function, the search against a float64 transliteration of
the reference loop, the clip search, and AWQ beating RTN on activations with outlier channels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcompress.calibrate import Block, _call_layer, calibrate
from jaxcompress.models.build import flat_params, path_str, random_model
from jaxcompress.models.presets import preset
from jaxcompress.quant.awq import AWQ, GROUPS, apply_scale, clip_weight, search_scale
from jaxcompress.quant.config import LayerConfig
from jaxcompress.quant.rtn import rtn_quantize
from jaxcompress.quant.tree import replace_leaves

CFG = LayerConfig(method="awq", bits=3, group_size=32)


@pytest.fixture(scope="module")
def model():
    # Multi-head attention (so v -> o is scaled too) with q/k/v biases (Qwen2-style).
    cfg = preset("tiny").replace(num_kv_heads=4, qkv_bias=True, num_layers=1)
    m = random_model(cfg, jnp.float32, seed=0)
    # Outlier input channels, as trained LLMs have: a few hidden channels 20x larger.
    emb = m.embed_tokens.embedding.get_value()
    m = replace_leaves(m, {"embed_tokens.embedding": emb.at[:, :3].multiply(20.0)})
    m = replace_leaves(m, {f"layers.{i}.{n}.bias": 0.1 * jax.random.normal(jax.random.key(i), (64,))
                           for i in range(1) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")})
    return m


def tokens(n=4, t=32, seed=0):
    return jax.random.randint(jax.random.key(seed), (n, t), 0, 512)


def test_folding_scales_keeps_the_float_block(model):
    layer = nnx.clone(model.layers[0])
    x = model.embed_tokens(tokens())
    call = nnx.jit(_call_layer)
    before = call(layer, x)
    block = Block(0, layer, 4)
    for i, group in enumerate(GROUPS):
        k = block.weight(group.linears[0]).shape[0]
        apply_scale(block, group, jnp.exp(jax.random.normal(jax.random.key(i), (k,))))
    np.testing.assert_allclose(np.asarray(call(layer, x)), np.asarray(before), rtol=2e-4, atol=2e-5)
    assert not np.allclose(np.asarray(layer.mlp.down_proj.kernel.get_value()),
                           np.asarray(model.layers[0].mlp.down_proj.kernel.get_value()))


def reference_search(x, w, bits, g, grid):
    """llm-awq's `_search_module_scale` for a single linear, float64: (best ratio, errors)."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    w = w.astype(np.float64)
    org = x @ w
    x_max = np.abs(x).mean(0)
    errors = []
    for i in range(grid):
        s = np.maximum(x_max ** (i / grid), 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        ws = w * s[:, None]
        q = np.empty_like(ws)
        for start in range(0, ws.shape[0], g):  # the same min-max grid as GPTQ's, per group
            blk = ws[start:start + g]
            lo, hi = np.minimum(blk.min(0), 0), np.maximum(blk.max(0), 0)
            scale = ((hi - lo) / (2 ** bits - 1)).astype(np.float16).astype(np.float64)
            zero = np.round(-lo / scale)
            q[start:start + g] = (np.clip(np.round(blk / scale) + zero, 0, 2 ** bits - 1) - zero) * scale
        errors.append(np.mean((x @ (q / s[:, None]) - org) ** 2))
    return int(np.argmin(errors)) / grid, errors


def test_scale_search_matches_reference_and_lowers_the_error(model):
    layer = nnx.clone(model.layers[0])
    block = Block(0, layer, 2)
    down = GROUPS[3]
    x = jax.random.normal(jax.random.key(1), (4, 16, 160)) * jnp.exp(2 * jax.random.normal(jax.random.key(2), (160,)))
    s, ratio, errors = search_scale(block, down, x, {"mlp.down_proj": CFG}, grid=20)
    ref_ratio, ref_errors = reference_search(np.asarray(x), np.asarray(block.weight("mlp.down_proj")), 3, 32, 20)
    np.testing.assert_allclose(list(errors.values()), ref_errors, rtol=1e-4)
    assert ratio == ref_ratio
    assert errors[ratio] < 0.9 * errors[0.0]  # alpha = 0 is plain RTN


def test_clip_search_never_increases_the_group_output_error():
    w = jax.random.normal(jax.random.key(3), (64, 8)).at[5, 2].set(9.0)
    x = jax.random.normal(jax.random.key(4), (256, 64))
    clipped, shrink = clip_weight(w, x, CFG, "w", tokens=256)
    assert shrink < 1.0 and float(clipped[5, 2]) < 9.0

    def group_err(v):
        q = np.asarray(rtn_quantize(v, CFG).dequantize(), np.float64)
        xs, wv = np.asarray(x, np.float64), np.asarray(w, np.float64)
        return np.stack([np.mean((xs[:, g:g + 32] @ (q[g:g + 32] - wv[g:g + 32])) ** 2, 0) for g in (0, 32)])

    assert np.all(group_err(clipped) <= group_err(w) * (1 + 1e-6))
    assert group_err(clipped).sum() < group_err(w).sum()


def test_awq_beats_rtn_on_outlier_activations(model):
    tok = tokens(8, 32, seed=5)
    logits = nnx.jit(lambda m, t: m(t)[0])
    ref = logits(model, tok)
    targets = {f"layers.{i}.{n}.kernel": CFG for i in range(1)
               for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    awq, report = calibrate(model, tok, AWQ(grid=10), targets, batch_size=4)
    leaves = {path_str(p): v for p, v in flat_params(model).items()}
    rtn = replace_leaves(model, {p: rtn_quantize(leaves[p], CFG, p) for p in targets})
    err = lambda m: float(jnp.mean((logits(m, tok) - ref) ** 2))  # noqa: E731
    assert err(awq) < err(rtn)
    assert any(v.get("awq_alpha", 0) > 0 for v in report["layers"].values())
    assert "awq_clip_shrink" in report["layers"]["layers.0.mlp.down_proj.kernel"]
    assert "awq_clip_shrink" not in report["layers"]["layers.0.self_attn.q_proj.kernel"]  # q/k never clipped

