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
