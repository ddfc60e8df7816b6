"""KV memory accounting (exact against allocations and hand-checked numbers) and the kv_cache
recipe section (normalization, errors, calibration, composition with weight recipes)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.kv import KIVICodec, KVCalibration, KVQuantCodec, UniformCodec
from jaxcompress.kv import memory
from jaxcompress.models.presets import preset

LLAMA2 = preset("llama2-7b")
SMOL = preset("smollm2-135m")
CAL = KVCalibration({"k_mid": np.zeros((30, 3, 64), np.float32), "k_half": np.ones((30, 3, 64), np.float32),
                     "k_codebook": np.linspace(-1, 1, 8, dtype=np.float32)[None].repeat(30, 0),
                     "v_codebook": np.linspace(-1, 1, 4, dtype=np.float32)[None].repeat(30, 0),
                     "k_scale": np.ones(30, np.float32), "k_zero": np.zeros(30, np.float32),
                     "v_scale": np.ones(30, np.float32), "v_zero": np.zeros(30, np.float32)})
CODECS = [KIVICodec(2, 2), KIVICodec(4, 2, group_size=64), KIVICodec(3, 3), UniformCodec(8, 8),
          UniformCodec(4, 2, symmetric=True, granularity="token"), UniformCodec(2, 2, granularity="tensor", calibration=CAL),
          KVQuantCodec(3, 2, calibration=CAL)]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_bytes_per_token_is_the_exact_allocation_slope(codec):
    """codec.bytes_per_token = (bytes of a 2L-token cache - bytes of an L-token one) / L."""
    n = 2560 * 4  # a multiple of every packing block (320 * 8, 512 * 5)
    for batch in (1, 3):
        grow = memory.layer_nbytes(SMOL, codec, batch, 2 * n) - memory.layer_nbytes(SMOL, codec, batch, n)
        assert grow / n == pytest.approx(batch * codec.bytes_per_token(SMOL.num_kv_heads, SMOL.head_dim, jnp.bfloat16),
                                         rel=1e-12)


def test_hand_checked_llama2_numbers():
    # KIVI-2, G=32, 32 heads x 128 channels per layer and token:
    # keys 4096 * (2/8 + 2*2/32) = 1536 B, values 4096 * 2/8 + 32 * (128/32) * 2*2 = 1536 B.
    assert KIVICodec(2, 2).bytes_per_token(32, 128) == 3072
    # bf16: 2 * 4096 * 2 = 16384 B per layer; a 32k cache of 32 layers is 16 GiB (+ positions).
    assert memory.cache_nbytes(LLAMA2, None, 1, 32768) == 32 * 16384 * 32768 + 32768 * 4 + 4
    # the residual window (a ring of R + G = 160 slots of keys and values, bf16: at most 159
    # tokens plus the slot a flush frees) is a fixed 2 * 160 * 4096 * 2 B a layer
    kivi = memory.layer_nbytes(LLAMA2, KIVICodec(), 1, 32768)
    assert kivi == 3072 * 32768 + 2 * 160 * 4096 * 2 + 4


@pytest.mark.parametrize("cfg", [SMOL, LLAMA2], ids=["smollm2", "llama2"])
def test_kv2_at_least_4_5x_smaller_than_bf16(cfg):
    """The target, scales, zeros, residual window and slot positions all counted."""
    for context in (8192, 16384, 32768):
        assert memory.compression_ratio(cfg, KIVICodec(2, 2), context) >= 4.5
    assert memory.compression_ratio(cfg, KIVICodec(4, 4), 8192) >= 2.9


def test_max_batch_and_context_fit_exactly():
    weights, mem = 13_476_839_424, 80 * 2 ** 30
    for codec in (None, KIVICodec()):
        b = memory.max_batch(LLAMA2, codec, 32768, mem, weights)
        budget = 0.9 * mem - weights
        assert memory.cache_nbytes(LLAMA2, codec, b, 32768) <= budget < memory.cache_nbytes(LLAMA2, codec, b + 1, 32768)
        n = memory.max_context(LLAMA2, codec, 1, mem, weights)
        assert memory.cache_nbytes(LLAMA2, codec, 1, n) <= budget < memory.cache_nbytes(LLAMA2, codec, 1, n + 256)
    assert memory.max_batch(LLAMA2, KIVICodec(), 32768, mem, weights) >= 5 * memory.max_batch(LLAMA2, None, 32768, mem, weights)
    lines = memory.info_lines(LLAMA2, KIVICodec(), weights, mem)
    assert lines[0].startswith("kv cache     kivi-k2v2-g32-r128 at 8192 tokens") and "largest batch" in lines[3]


# --------------------------------------------------------------------------------- recipes
def test_recipe_section_normalization_and_errors():
    from jaxcompress.experiments.recipes import load_recipe

    r = load_recipe("kivi_k4v2")["kv_cache"]
    assert r == {"method": "kivi", "key_bits": 4, "value_bits": 2, "group_size": 32, "residual": 128,
                 "sink": 0, "attention": "auto", "layout": "auto", "columns": 32, "flush_per_step": True,
                 "values_pass": "auto"}
    with pytest.raises(ConfigError, match="layout=channel_words needs key_bits == value_bits"):
        load_recipe("kivi_k4v2", ["kv_cache.layout=channel_words"])
    assert load_recipe("kv_int4", ["kv_cache.granularity=tensor"])["kv_cache"]["calibration"]["num_samples"] == 16
    with pytest.raises(ConfigError, match="key_bits=5 is not supported"):
        load_recipe("kivi_k2v2", ["kv_cache.key_bits=5"])
    with pytest.raises(ConfigError, match="kv_cache.outlier_fraction is not an option of method kivi"):
        load_recipe({"kv_cache": {"method": "kivi", "outlier_fraction": 0.01}})
    assert load_recipe({"kv_cache": {"method": "kivi", "sink": 1}})["kv_cache"]["sink"] == 1
    with pytest.raises(ConfigError, match="kv_cache.method='kiwi'"):
        load_recipe({"kv_cache": {"method": "kiwi"}})
    with pytest.raises(ConfigError, match="calibration is not used"):
        load_recipe({"kv_cache": {"method": "kivi", "calibration": {"num_samples": 2}}})


def test_recipes_apply_calibrate_and_compose():
    from jaxcompress.experiments.recipes import apply_recipe, load_recipe
    from jaxcompress.io.load import load_model
    from jaxcompress.quant.qarray import QArray

    loaded = load_model("random:tiny", param_dtype=jnp.float32)
    # W4 + KV2: the weights become QArrays, the cache codec is KIVI; the record has the bytes.
    both = apply_recipe(loaded, load_recipe("kivi_k2v2_w4", ["weights.group_size=32", "kv_cache.group_size=16"]))
    assert isinstance(both.kv_codec, KIVICodec) and both.kv_codec.group_size == 16
    assert isinstance(both.model.layers[0].mlp.up_proj.kernel.get_value(), QArray)
    record = both.recipe["applied"]["kv_cache"]
    context = loaded.config.max_position_embeddings  # 512: the 143-token window weighs here
    assert record["codec"] == "kivi-k2v2-g16-r128" and record["context"] == context
    assert record["bytes_per_token"] == pytest.approx(memory.bytes_per_token(loaded.config, both.kv_codec, context))
    assert record["compression_ratio"] == pytest.approx(memory.compression_ratio(loaded.config, both.kv_codec, context))
    # A group that does not divide the head dimension (16) fails when applied, naming both.
    with pytest.raises(ConfigError, match="group_size=32 does not divide head_dim=16"):
        apply_recipe(loaded, load_recipe("kivi_k2v2"))
    # Calibrated codecs fit on the calibration section's data (random tokens for random models).
    tiny_cal = ["kv_cache.calibration.source=random", "kv_cache.calibration.num_samples=2",
                "kv_cache.calibration.seqlen=32"]
    out = apply_recipe(loaded, load_recipe("kvquant_2bit", tiny_cal))
    codec = out.kv_codec
    assert isinstance(codec, KVQuantCodec) and codec.calibration.num_layers == loaded.config.num_layers
    assert codec.calibration.arrays["k_codebook"].shape == (2, 4)
    assert np.all(np.diff(codec.calibration.arrays["k_codebook"], axis=1) > 0)
    assert out.recipe["applied"]["kv_cache"]["calibration"]["source"] == "random"
    from jaxcompress.models.cache import KVCache

    cache = KVCache.create(loaded.config, 1, 16, jnp.float32, codec)  # each layer its own ranges
    np.testing.assert_array_equal(cache.layers[1]["k"].zero[0, :, 0], codec.calibration.arrays["k_mid"][1])


def test_calibration_is_hashed_by_content_and_saved(tmp_path):
    same = KVCalibration({k: v.copy() for k, v in CAL.arrays.items()})
    assert same == CAL and hash(same) == hash(CAL) and KVQuantCodec(calibration=same) == KVQuantCodec(calibration=CAL)
    other = KVCalibration({**CAL.arrays, "k_mid": CAL.arrays["k_mid"] + 1})
    assert other != CAL
    CAL.save(str(tmp_path / "cal.npz"))
    assert KVCalibration.load(str(tmp_path / "cal.npz")) == CAL


def test_kv4_recipe_builds_the_codec_it_names():
    """kivi_k4v4_g16_sink (the KV4 recipe within 1% at the full protocol): KIVI-4, groups of 16,
    the first token exact, in the CUDA-core decode body's layout."""
    from jaxcompress.experiments.recipes import load_recipe
    from jaxcompress.kv.recipe import build_codec

    codec = build_codec(load_recipe("kivi_k4v4_g16_sink")["kv_cache"])
    assert codec.name == "kivi-k4v4-g16-r128-s1" and codec.store_layout == "channel_words"
