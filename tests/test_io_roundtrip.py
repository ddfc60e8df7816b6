"""Round trips: HF folder -> jaxcompress -> `export_hf_folder` -> transformers, and orbax
`save_checkpoint` / `load_checkpoint` (bit-exact, dense and with a QArray leaf)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

import hf_models
from jaxcompress.io.checkpoint import load_checkpoint, save_checkpoint
from jaxcompress.io.hf import export_hf_folder, load_hf_folder
from jaxcompress.models.build import flat_params, path_str
from jaxcompress.models.presets import preset
from jaxcompress.quant.qarray import QArray, pack_codes


@pytest.mark.parametrize("kind,tie", [("llama", False), ("qwen2", True)])
def test_hf_export_roundtrip_through_transformers(tmp_path, kind, tie):
    hf = hf_models.build(kind, num_heads=4, num_kv_heads=2, tie=tie)
    model, cfg = load_hf_folder(hf_models.save(hf, tmp_path / "src"))
    out = tmp_path / "exported"
    export_hf_folder(model, str(out))
    # The exported tensors are the original ones, bit for bit (fp32 in, fp32 out).
    exported = load_file(str(out / "model.safetensors"))
    original = {k: v.numpy() for k, v in hf.state_dict().items()}
    if tie:
        original.pop("lm_head.weight")
    assert exported.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    # And transformers, reading only what we wrote, computes the same logits.
    again = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    assert again.config.tie_word_embeddings == tie
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 40))
    np.testing.assert_allclose(hf_models.hf_logits(again, tokens), hf_models.hf_logits(hf, tokens), atol=1e-5, rtol=0)


def _random_qarray(rng, k, n, bits=4, group=32):
    codes = jnp.asarray(rng.integers(0, 2 ** bits, size=(k, n)), jnp.int32)
    return QArray(codes=pack_codes(codes, bits),
                  scale=jnp.asarray(rng.uniform(0.01, 0.1, (k // group, n)), jnp.float16),
                  zero=jnp.asarray(rng.integers(0, 2 ** bits, (k // group, n)), jnp.float16),
                  perm=jnp.asarray(rng.permutation(k), jnp.int32),
                  bits=bits, group_size=group, shape=(k, n), dtype="float32")


def _assert_same_leaves(a, b):
    fa, fb = flat_params(a), flat_params(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        la, lb = jax.tree_util.tree_leaves(fa[path]), jax.tree_util.tree_leaves(fb[path])
        assert type(fa[path]) is type(fb[path]) and len(la) == len(lb), path_str(path)
        for x, y in zip(la, lb):
            assert x.dtype == y.dtype, path_str(path)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path_str(path))


def _seeded_model(cfg, seed=0):
    """A model with seeded random weights, filled on the host (no compile)."""
    from flax import nnx

    from jaxcompress.models.build import abstract_model, model_from_tensors

    rng = np.random.default_rng(seed)
    _, state = nnx.split(abstract_model(cfg, jnp.bfloat16, jnp.float32))
    tensors = [(path, rng.standard_normal(var.get_value().shape).astype(np.float32), "seeded")
               for path, var in nnx.to_flat_state(state)]
    return model_from_tensors(cfg, tensors, jnp.bfloat16, jnp.float32)


def test_orbax_checkpoint_roundtrip_is_bit_exact(tmp_path):
    """Dense bf16 leaves and a QArray leaf (uint32 codes, fp16 scale/zero, act-order perm)."""
    model = _seeded_model(preset("tiny"))
    proj = model.layers[1].self_attn.q_proj
    proj.kernel.set_value(_random_qarray(np.random.default_rng(0), *proj.kernel.get_value().shape))
    save_checkpoint(model, str(tmp_path / "ckpt"), extra={"recipe": {"name": "test"}})
    loaded, tokenizer, meta = load_checkpoint(str(tmp_path / "ckpt"))
    assert tokenizer is None and meta["recipe"] == {"name": "test"}
    assert loaded.config == model.config and jnp.dtype(loaded.dtype) == jnp.float32
    _assert_same_leaves(model, loaded)
    restored = loaded.layers[1].self_attn.q_proj.kernel.get_value()
    assert isinstance(restored, QArray)
    assert (restored.bits, restored.group_size, restored.shape, restored.dtype) == (4, 32, (64, 64), "float32")
    np.testing.assert_array_equal(np.asarray(restored.dequantize()), np.asarray(proj.kernel.get_value().dequantize()))
