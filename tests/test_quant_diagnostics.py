import jax
import numpy as np

from jaxcompress.io.load import load_model
from jaxcompress.models.build import params, with_params
from jaxcompress.quant.config import LayerConfig
from jaxcompress.quant.diagnostics import heldout_hessians, layer_errors, summarize
from jaxcompress.quant.rtn import rtn_params


def test_heldout_layer_error_equals_the_output_error_in_float64():
    model = load_model("random:tiny", param_dtype=np.float32).model
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 16), dtype=np.int32)
    paths = ["layers.0.self_attn.q_proj.kernel", "layers.1.mlp.down_proj.kernel"]
    quant = with_params(model, rtn_params(params(model), {p: LayerConfig(bits=3, group_size=32) for p in paths}))
    hessians = heldout_hessians(model, tokens, batch_size=2)
    errors = layer_errors(model, quant, {p: hessians[p] for p in paths})

    # q_proj of block 0 reads the first RMSNorm of the embeddings.
    x = np.asarray(model.layers[0].input_layernorm(model.embed_tokens(tokens)), np.float64).reshape(-1, 64)
    w = np.asarray(model.layers[0].self_attn.q_proj.kernel.get_value(), np.float64)
    q = np.asarray(quant.layers[0].self_attn.q_proj.kernel.get_value().dequantize(), np.float64)
    expected = np.sum((x @ (q - w)) ** 2) / np.sum((x @ w) ** 2)
    np.testing.assert_allclose(errors[paths[0]], expected, rtol=1e-4)
    assert 1e-4 < errors[paths[1]] < 1.0  # a real 3-bit error, computed through block 1's inputs
    summary = summarize(errors)
    np.testing.assert_allclose(summary["all"], np.mean(list(errors.values())), rtol=1e-6)
    assert set(summary) == {"self_attn.q_proj", "mlp.down_proj", "all"}
