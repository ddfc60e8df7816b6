"""Fused projections (q|k|v, gate|up): the same function as the unfused model, dense and
quantized, against transformers and against the parts' own dequantization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_models
from jaxcompress.errors import ConfigError
from jaxcompress.io.hf import load_hf_folder
from jaxcompress.models.fuse import fuse_projections
from jaxcompress.models.generate import SamplingConfig, generate_tokens
from jaxcompress.quant.config import LayerConfig
from jaxcompress.quant.qarray import QArray, concat_columns
from jaxcompress.quant.rtn import rtn_params
from jaxcompress.models.build import params, path_str, with_params
from jaxcompress.quant.tree import replace_leaves
from jaxcompress.train.lora import LoRA
from pallas_kernels.layout import repack_for_gpu


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """Qwen2 has q/k/v biases (randomised by hf_models) and GQA: both fuse paths are exercised."""
    hf = hf_models.build("qwen2", num_heads=4, num_kv_heads=2)
    model, _ = load_hf_folder(hf_models.save(hf, tmp_path_factory.mktemp("fuse")))
    return hf, model


def _logits(model, tokens):
    return np.asarray(model(jnp.asarray(tokens))[0])


def test_fused_dense_model_matches_transformers(qwen2):
    hf, model = qwen2
    tokens = np.random.default_rng(0).integers(0, 200, size=(2, 9))
    fused, report = fuse_projections(model)
    assert len(report.fused) == 2 * model.config.num_layers and not report.skipped
    attn, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
    assert attn.q_proj is None and mlp.gate_proj is None
    assert attn.qkv_proj.kernel.get_value().shape == (64, 64 + 2 * 32)
    assert attn.qkv_proj.bias is not None
    ref = hf_models.hf_logits(hf, tokens)
    np.testing.assert_allclose(_logits(fused, tokens), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_logits(fused, tokens), _logits(model, tokens), rtol=1e-5, atol=1e-5)
    assert model.layers[0].self_attn.qkv_proj is None  # the input model is unchanged


def test_fused_greedy_generation_is_unchanged(qwen2):
    _, model = qwen2
    fused, _ = fuse_projections(model)
    prompts = [[5, 9, 3, 17], [8, 2]]
    sampling = SamplingConfig(max_new_tokens=10)
    assert generate_tokens(fused, prompts, sampling) == generate_tokens(model, prompts, sampling)


def _quantized(model, bits_of):
    """RTN on every projection; bits_of(path) -> (bits, group, symmetric)."""
    state = params(model)
    names = [path_str(p) for p, _ in nnx.to_flat_state(state) if path_str(p).endswith("proj.kernel")]
    policy = {}
    for name in names:
        bits, group, sym = bits_of(name)
        policy[name] = LayerConfig(bits=bits, group_size=group, symmetric=sym)
    return with_params(model, rtn_params(state, policy))


def test_fused_quantized_weight_dequantizes_to_its_parts(qwen2):
    """Symmetric q, asymmetric k/v (so the symmetric zero is written out), W4 g16: the fused
    QArray's dequantization is bit-for-bit the concatenation of the parts'."""
    _, model = qwen2
    qmodel = _quantized(model, lambda name: (4, 16, "q_proj" in name or "gate" in name))
    fused, report = fuse_projections(qmodel)
    assert not report.skipped
    for part_names, fused_linear, parent in (
            (("q_proj", "k_proj", "v_proj"), fused.layers[1].self_attn.qkv_proj, qmodel.layers[1].self_attn),
            (("gate_proj", "up_proj"), fused.layers[1].mlp.gate_up_proj, qmodel.layers[1].mlp)):
        w = fused_linear.kernel.get_value()
        assert isinstance(w, QArray) and w.zero is not None
        parts = [getattr(parent, n).kernel.get_value().dequantize() for n in part_names]
        np.testing.assert_array_equal(np.asarray(w.dequantize(), np.float32),
                                      np.asarray(jnp.concatenate(parts, axis=1), np.float32))
    tokens = np.random.default_rng(1).integers(0, 200, size=(1, 7))
    np.testing.assert_allclose(_logits(fused, tokens), _logits(qmodel, tokens), rtol=1e-5, atol=1e-5)


def test_fused_quantized_model_runs_the_kernel(qwen2, monkeypatch):
    """The fused W4 projections through the Pallas kernel (interpret mode) equal the unfused
    model through the reference path."""
    _, model = qwen2
    qmodel = _quantized(model, lambda name: (4, 32, False))
    tokens = np.random.default_rng(2).integers(0, 200, size=(1, 5))
    monkeypatch.setenv("JAXCOMPRESS_QUANT_KERNEL", "reference")
    expect = _logits(qmodel, tokens)
    fused, _ = fuse_projections(qmodel)
    monkeypatch.setenv("JAXCOMPRESS_QUANT_KERNEL", "interpret")
    np.testing.assert_allclose(_logits(fused, tokens), expect, rtol=2e-3, atol=2e-3)


def _rand_qarray(rng, k, n, bits, g, *, sym, per_tensor=False, perm=None, codebook=False, outliers=0):
    codes = jnp.asarray(rng.integers(0, 2 ** bits, size=(k, n)))
    groups = 1 if per_tensor else -(-k // g)
    scale_shape = (1, 1) if per_tensor else (groups, n)
    scale = jnp.asarray(rng.uniform(0.01, 0.1, size=scale_shape), jnp.float16)
    zero = None if sym else jnp.asarray(rng.integers(0, 2 ** bits, size=scale_shape), jnp.float16)
    kw = {}
    if codebook:
        kw["codebook"] = jnp.asarray(rng.normal(size=(n, 2 ** bits)), jnp.float16)
        scale = zero = None
    if outliers:
        kw["outlier_index"] = jnp.asarray(rng.choice(k * n, size=outliers, replace=False), jnp.int32)
        kw["outlier_value"] = jnp.asarray(rng.normal(size=outliers) * 5, jnp.float16)
    return QArray.from_codes(codes, scale, zero, bits=bits, group_size=g, dtype=jnp.float32, perm=perm, **kw)


def _assert_concat_exact(parts):
    got = concat_columns(parts)
    assert got.shape == (parts[0].shape[0], sum(p.shape[1] for p in parts))
    np.testing.assert_array_equal(np.asarray(got.dequantize()),
                                  np.asarray(jnp.concatenate([p.dequantize() for p in parts], axis=1)))
    return got


def test_concat_columns_mixed_grids_outliers_act_order_codebooks():
    rng = np.random.default_rng(3)
    k = 72  # ragged last group of 32
    perm = jnp.asarray(rng.permutation(k))
    _assert_concat_exact([_rand_qarray(rng, k, 24, 4, 32, sym=True, perm=perm, outliers=5),
                          _rand_qarray(rng, k, 8, 4, 32, sym=False, perm=perm),
                          _rand_qarray(rng, k, 16, 4, 32, sym=True, perm=perm, outliers=3)])
    # per-tensor next to grouped: broadcast to the groups
    got = _assert_concat_exact([_rand_qarray(rng, k, 16, 3, 32, sym=True, per_tensor=True),
                                _rand_qarray(rng, k, 8, 3, 32, sym=True)])
    assert got.scale.shape == (3, 24) and got.zero is None
    _assert_concat_exact([_rand_qarray(rng, k, 8, 4, 32, sym=True, codebook=True),
                          _rand_qarray(rng, k, 8, 4, 32, sym=True, codebook=True, outliers=2)])


def test_concat_columns_keeps_the_tiled_gpu_layout():
    rng = np.random.default_rng(4)
    parts = [repack_for_gpu(_rand_qarray(rng, 256, n, 4, 128, sym=False), rows=32) for n in (32, 16)]
    got = _assert_concat_exact(parts)
    assert type(got) is type(parts[0]) and got.rows == 32


def test_unfusable_parts_are_clear_errors(qwen2):
    rng = np.random.default_rng(5)
    with pytest.raises(ConfigError, match="layers.0.self_attn.qkv_proj.*differ in layout"):
        concat_columns([_rand_qarray(rng, 64, 8, 4, 32, sym=True), _rand_qarray(rng, 64, 8, 8, 32, sym=True)],
                       "layers.0.self_attn.qkv_proj")
    with pytest.raises(ConfigError, match="act-order"):
        concat_columns([_rand_qarray(rng, 64, 8, 4, 32, sym=True, perm=jnp.arange(64)),
                        _rand_qarray(rng, 64, 8, 4, 32, sym=True, perm=jnp.arange(64)[::-1])])
    _, model = qwen2
    mixed = _quantized(model, lambda name: (8, 32, True) if "v_proj" in name else (4, 32, True))
    with pytest.raises(ConfigError, match=r"layers\.0\.self_attn\.qkv_proj"):
        fuse_projections(mixed)
    fused, report = fuse_projections(mixed, strict=False)
    assert len(report.skipped) == model.config.num_layers and "differ in layout" in report.summary()
    assert fused.layers[0].self_attn.qkv_proj is None and fused.layers[0].mlp.gate_up_proj is not None
    tokens = np.random.default_rng(6).integers(0, 200, size=(1, 6))
    np.testing.assert_allclose(_logits(fused, tokens), _logits(mixed, tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.gate_up_proj is already fused"):
        fuse_projections(fused)


def test_adapters_do_not_fuse(qwen2):
    _, model = qwen2
    w = model.layers[0].self_attn.q_proj.kernel.get_value()
    lora = LoRA(base=w, a=jnp.zeros((w.shape[0], 2), w.dtype), b=jnp.zeros((2, w.shape[1]), w.dtype), alpha=2.0)
    adapted = replace_leaves(model, {"layers.0.self_attn.q_proj.kernel": lora})
    with pytest.raises(ConfigError, match="type .*LoRA.*Merge adapters"):
        fuse_projections(adapted)
