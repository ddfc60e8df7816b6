"""GPTQ on the real default model (SmolLM2-135M-Instruct): it still knows the capital of France."""

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxcompress.experiments.recipes import apply_recipe, load_recipe
from jaxcompress.io.load import load_model
from jaxcompress.quant.qarray import QArray

pytestmark = pytest.mark.slow


def test_gptq_w4_smollm2_still_answers_paris():
    loaded = load_model("smollm2-135m", dtype=jnp.float32, param_dtype=jnp.float32)
    # A few short calibration windows keep this a CPU test; the published protocol is 128 x 2048.
    recipe = load_recipe("gptq_w4_g128", ["calibration.num_samples=4", "calibration.seqlen=128"])
    out = apply_recipe(loaded, recipe)
    q = out.model.layers[0].self_attn.q_proj.kernel.get_value()
    assert isinstance(q, QArray) and q.shape == (576, 576) and q.num_groups == 5  # 576 = 4 x 128 + 64
    assert out.recipe["applied"]["weights"]["quantized"] == 30 * 7
    ids = loaded.tokenizer("The capital of France is")["input_ids"]
    logits = nnx.jit(lambda m, t: m(t)[0][0, -1])(out.model, jnp.asarray([ids]))
    assert loaded.tokenizer.decode([int(jnp.argmax(logits))]) == " Paris"


def test_h2_kernel_on_real_activations():
    """The "h2" GEMV (fp16 pair arithmetic, x scaled per program) on SmolLM2's own activations:
    the inputs of q_proj (after the norm) and down_proj (the MLP product, the widest range) of
    early, middle and last layers, RTN W4 g128 asymmetric weights, batch 1 and 2, interpret
    mode. Within the kernel tolerance of the reference, and as accurate as the fp32 "fma" path."""
    import jax

    from jaxcompress.models.rope import rope_cos_sin
    from pallas_kernels.quant_matmul import TileConfig, quant_matmul, quant_matmul_reference
    from pallas_kernels.testing import float64_reference, relative_error

    loaded = load_model("smollm2-135m", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = apply_recipe(loaded, load_recipe("rtn_w4_g128")).model
    ids = loaded.tokenizer("The quick brown fox jumps over the lazy dog near the riverbank.")["input_ids"]
    tokens = jnp.asarray([ids])
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    cos_sin = rope_cos_sin(loaded.config, positions)
    x = model.embed_tokens(tokens).astype(model.dtype)
    probes = []
    for i, layer in enumerate(model.layers):
        h = layer.input_layernorm(x)
        if i in (1, 15, 29):
            probes.append((f"layer {i} q_proj", h[0, -2:], layer.self_attn.q_proj.kernel.get_value()))
        attn, _ = layer.self_attn(h, positions, cos_sin)
        x = x + attn
        h = layer.post_attention_layernorm(x)
        mlp_in = jax.nn.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h)
        if i in (1, 15, 29):
            probes.append((f"layer {i} down_proj", mlp_in[0, -2:], layer.mlp.down_proj.kernel.get_value()))
        x = x + layer.mlp.down_proj(mlp_in)
    assert max(float(jnp.abs(a).max()) for _, a, _ in probes) > 10  # a real range, not unit noise
    for what, acts, w in probes:
        assert isinstance(w, QArray) and w.zero is not None
        for m in (1, 2):
            xm = acts[:m].astype(jnp.bfloat16)
            ref = float64_reference(xm, w)
            err = {dq: relative_error(quant_matmul(xm, w, interpret=True, config=TileConfig(
                block_n=64, block_m=m, dequant=dq, acc2d=True, split_k=2, prefetch=dq == "h2")), ref)
                for dq in ("fma", "h2")}
            assert err["h2"] <= 1e-2 and err["h2"] <= 1.2 * err["fma"] + 1e-4, (what, m, err)
            assert relative_error(quant_matmul_reference(xm, w), ref) <= 1e-2
