"""LoRA / QLoRA leaves: the matmul, zero init, merge / unmerge, re-quantization, adapters on disk,
checkpoints, and target selection errors."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcompress.errors import ConfigError
from jaxcompress.ops.linear import linear
from jaxcompress.quant.config import LayerConfig
from jaxcompress.quant.qarray import QArray
from jaxcompress.train.config import ALL_PROJECTIONS
from jaxcompress.train.lora import (LoRA, add_lora, load_adapters, merge_lora, named_weights, save_adapters,
                                    unmerge_lora, with_dropout_keys)
from jaxcompress.train.qat import quantize_weights, requantize_like
from test_train_common import TINY1, logits, numpy_model, pure_tree


@pytest.fixture(scope="module")
def tiny():
    graphdef, tree = pure_tree(numpy_model(TINY1, seed=0))
    tokens = np.random.default_rng(1).integers(0, TINY1.vocab_size, (2, 24)).astype(np.int32)
    return graphdef, tree, tokens


def randomize_b(tree, key):
    """Non-zero adapters (a trained state) so merge tests see a real delta."""
    counter = iter(range(10_000))

    def f(_, w):
        if isinstance(w, LoRA):
            return dataclasses.replace(w, b=0.05 * jax.random.normal(jax.random.fold_in(key, next(counter)), w.b.shape))
        return w

    from jaxcompress.train.lora import map_weights
    return map_weights(f, tree)


def test_lora_linear_matches_float64_reference():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k1, (3, 5, 48))
    base = jax.random.normal(k2, (48, 40)) * 0.1
    a = jax.random.normal(k3, (48, 6)) * 0.1
    b = jax.random.normal(k4, (6, 40)) * 0.1
    w = LoRA(base=base, a=a, b=b, alpha=12.0)
    got = np.asarray(jax.jit(linear)(x, w), np.float64)
    xd, bd, ad, bbd = (np.asarray(t, np.float64) for t in (x, base, a, b))
    want = xd @ bd + (12.0 / 6) * (xd @ ad) @ bbd
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(w.dequantize(), np.float64), bd + 2.0 * ad @ bbd, rtol=1e-6, atol=1e-6)


def test_zero_init_lora_leaves_logits_unchanged(tiny):
    graphdef, tree, tokens = tiny
    wrapped = add_lora(tree, ALL_PROJECTIONS, rank=4, alpha=8.0, key=jax.random.key(0))
    assert sum(isinstance(w, LoRA) for w in named_weights(wrapped).values()) == 7  # every projection of the one layer
    np.testing.assert_array_equal(logits(graphdef, wrapped, tokens), logits(graphdef, tree, tokens))
    # QLoRA: wrapping a quantized base changes nothing either.
    qtree = quantize_weights(tree, ALL_PROJECTIONS, LayerConfig(bits=4, group_size=32))
    qwrapped = add_lora(qtree, ALL_PROJECTIONS, rank=4, alpha=8.0, key=jax.random.key(0))
    assert isinstance(named_weights(qwrapped)["layers.0.mlp.up_proj.kernel"].base, QArray)
    np.testing.assert_array_equal(logits(graphdef, qwrapped, tokens), logits(graphdef, qtree, tokens))


def test_merged_equals_unmerged_and_unmerge_inverts(tiny):
    graphdef, tree, tokens = tiny
    wrapped = randomize_b(add_lora(tree, ALL_PROJECTIONS, 4, 8.0, jax.random.key(3)), jax.random.key(4))
    merged = merge_lora(wrapped)
    assert not any(isinstance(w, LoRA) for w in named_weights(merged).values())
    unmerged_logits = logits(graphdef, wrapped, tokens)
    assert np.abs(unmerged_logits - logits(graphdef, tree, tokens)).max() > 1e-3  # the adapters matter
    np.testing.assert_allclose(logits(graphdef, merged, tokens), unmerged_logits, rtol=1e-5, atol=1e-5)
    back = unmerge_lora(merged, wrapped)
    for name, w in named_weights(wrapped).items():
        if isinstance(w, LoRA):
            np.testing.assert_allclose(np.asarray(named_weights(back)[name].base), np.asarray(w.base), atol=1e-6)


def test_qlora_merge_requantizes_onto_the_base_grid(tiny):
    graphdef, tree, tokens = tiny
    layer = LayerConfig(bits=4, group_size=32, symmetric=False)
    qtree = quantize_weights(tree, ALL_PROJECTIONS, layer)
    wrapped = randomize_b(add_lora(qtree, ALL_PROJECTIONS, 4, 8.0, jax.random.key(5)), jax.random.key(6))
    merged = merge_lora(wrapped, requantize=requantize_like)
    for name, w in named_weights(wrapped).items():
        if not isinstance(w, LoRA):
            continue
        q = named_weights(merged)[name]
        assert isinstance(q, QArray) and (q.bits, q.group_size, q.symmetric) == (4, 32, False)
        exact = np.asarray(w.base.dequantize_storage_order() + w.delta())
        step = np.repeat(np.asarray(q.scale, np.float32), 32, axis=0)[: exact.shape[0]]
        # Round to nearest on a min-max grid: every weight within half a step of its code, plus
        # what rounding the scale to fp16 (half an ulp, 2**-11 relative) moves the top code.
        bound = (0.5 + 15 * 2.0 ** -11) * step
        assert np.all(np.abs(np.asarray(q.dequantize_storage_order()) - exact) <= bound)


def test_lora_dropout_masks_the_adapter_input_only():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(k1, (4, 32))
    w = LoRA(base=jax.random.normal(k2, (32, 16)), a=jax.random.normal(k3, (32, 4)),
             b=jax.random.normal(k4, (4, 16)), alpha=4.0, dropout=0.5)
    keyed = with_dropout_keys({"kernel": w}, jax.random.key(8))["kernel"]

    @jax.jit
    def reference(x, w):
        keep = jax.random.bernoulli(w.dropout_key, 0.5, x.shape)
        return x @ w.base + (jnp.where(keep, x / 0.5, 0) @ w.a) @ w.b

    np.testing.assert_allclose(np.asarray(jax.jit(linear)(x, keyed)), np.asarray(reference(x, keyed)),
                               rtol=1e-5, atol=1e-5)
    # Without a key (evaluation) there is no dropout.
    np.testing.assert_allclose(np.asarray(jax.jit(linear)(x, w)), np.asarray(x @ w.dequantize()), rtol=1e-5, atol=1e-5)


def test_adapters_round_trip_in_peft_layout(tiny, tmp_path):
    from safetensors.numpy import load_file

    graphdef, tree, tokens = tiny
    wrapped = randomize_b(add_lora(tree, r"layers\.\d+\.mlp\.(gate|up)_proj\.kernel", 4, 8.0, jax.random.key(9)),
                          jax.random.key(10))
    save_adapters(wrapped, str(tmp_path / "adapters"), base_model="random:tiny")
    cfg = json.load(open(tmp_path / "adapters" / "adapter_config.json"))
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 8.0)
    assert sorted(cfg["target_modules"]) == ["gate_proj", "up_proj"]
    tensors = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (160, 4)  # PEFT: A [r, in], B [out, r]
    restored = load_adapters(tree, str(tmp_path / "adapters"))
    np.testing.assert_array_equal(logits(graphdef, restored, tokens), logits(graphdef, wrapped, tokens))


def test_lora_over_qarray_checkpoint_round_trip(tiny, tmp_path):
    from jaxcompress.io.checkpoint import load_checkpoint, save_checkpoint

    graphdef, tree, tokens = tiny
    qtree = quantize_weights(tree, ALL_PROJECTIONS, LayerConfig(bits=4, group_size=32))
    wrapped = randomize_b(add_lora(qtree, ALL_PROJECTIONS, 4, 8.0, jax.random.key(11)), jax.random.key(12))
    save_checkpoint(nnx.merge(graphdef, wrapped), str(tmp_path / "ckpt"))
    model, _, _ = load_checkpoint(str(tmp_path / "ckpt"))
    w = model.layers[0].self_attn.o_proj.kernel.get_value()
    assert isinstance(w, LoRA) and isinstance(w.base, QArray) and w.base.bits == 4
    restored = pure_tree(model)[1]
    np.testing.assert_array_equal(logits(graphdef, restored, tokens), logits(graphdef, wrapped, tokens))


def test_target_regex_errors_are_clear(tiny):
    _, tree, _ = tiny
    with pytest.raises(ConfigError, match=r"lora.targets=\['.*nope.*'\] matches no parameter; names look like "
                                          r"embed_tokens.embedding"):
        add_lora(tree, r".*nope_proj\.kernel", 4, 8.0, jax.random.key(0))
    with pytest.raises(ConfigError, match="embed_tokens.embedding, which is not a projection kernel"):
        add_lora(tree, r"embed_tokens\.embedding", 4, 8.0, jax.random.key(0))
    with pytest.raises(ConfigError, match="invalid regex"):
        add_lora(tree, r"layers\.(", 4, 8.0, jax.random.key(0))
    with pytest.raises(ConfigError, match="lora.rank=0"):
        add_lora(tree, ALL_PROJECTIONS, 0, 8.0, jax.random.key(0))


def test_adapter_folder_errors(tiny, tmp_path):
    from jaxcompress.errors import CheckpointError

    _, tree, _ = tiny
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not an adapter folder"):
        load_adapters(tree, str(tmp_path / "empty"))


def test_qlora_gradients_match_the_dense_reference():
    """Through a quantized base, gradients reach x and the adapters exactly as through its dense
    (dequantized) weight; the base itself gets none."""
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(13), 5)
    base = quantize_weights({"p": {"kernel": jax.random.normal(k1, (64, 48)) * 0.05}}, r"p\.kernel",
                            LayerConfig(bits=4, group_size=32))["p"]["kernel"]
    a, b = jax.random.normal(k2, (64, 4)) * 0.1, jax.random.normal(k3, (4, 48)) * 0.1
    x, g = jax.random.normal(k4, (2, 5, 64)), jax.random.normal(k5, (2, 5, 48))

    def loss(x, a, b, w):
        return jnp.sum(linear(x, LoRA(base=w, a=a, b=b, alpha=8.0)) * g)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    got, want = grads(x, a, b, base), grads(x, a, b, base.dequantize())
    for gg, ww in zip(got, want):
        np.testing.assert_allclose(np.asarray(gg), np.asarray(ww), rtol=1e-5, atol=1e-6)
    dbase = jax.jit(jax.grad(loss, argnums=3, allow_int=True))(x, a, b, base)
    assert float(jnp.abs(dbase.scale).max()) == 0.0
