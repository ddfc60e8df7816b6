"""GGUF reading: every supported tensor type against a float64 decoder written here from the
block layouts of ggml (ggml-common.h / ggml-quants.c), and tiny llama.cpp-style GGUF models
against transformers (which proves the q/k un-permutation and the config mapping)."""

import logging
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import gguf_models
import hf_models
from jaxcompress.errors import CheckpointError, ConfigError
from jaxcompress.io.gguf import (SUPPORTED_TYPES, _tokenizer_cache_folder, dequantize, load_gguf, load_gguf_tokenizer,
                                 metadata, open_gguf, unpermute_qk)
from jaxcompress.models.config import RopeScaling

QK_K = 256


# ----------------------------------------------------------------- float64 reference decoders
def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 little-endian halves -> [n, 1] float64."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float64)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1/Q5 layout: element j < 16 is the low nibble of qs[j], j + 16 its high nibble."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int64)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the little-endian uint32 qh is the fifth bit of element j."""
    word = np.ascontiguousarray(qh).view("<u4").astype(np.int64)  # [n, 1]
    return (word >> np.arange(32)) & 1


def _scale_min_k4(j: int, s: np.ndarray):
    """ggml's get_scale_min_k4 over blocks: 6-bit scale and min of sub-block j."""
    s = s.astype(np.int64)
    if j < 4:
        return s[:, j] & 63, s[:, j + 4] & 63
    return (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4), (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)


def ref_q8_0(b):
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float64)


def ref_q4_0(b):
    return _f16(b[:, :2]) * (_nibbles_32(b[:, 2:]) - 8)


def ref_q4_1(b):
    return _f16(b[:, :2]) * _nibbles_32(b[:, 4:]) + _f16(b[:, 2:4])


def ref_q5_0(b):
    return _f16(b[:, :2]) * ((_nibbles_32(b[:, 6:]) | (_high_bits_32(b[:, 2:6]) << 4)) - 16)


def ref_q5_1(b):
    return _f16(b[:, :2]) * (_nibbles_32(b[:, 8:]) | (_high_bits_32(b[:, 4:8]) << 4)) + _f16(b[:, 2:4])


def ref_q4_k(b):
    d, dmin, scales, qs = _f16(b[:, :2])[:, 0], _f16(b[:, 2:4])[:, 0], b[:, 4:16], b[:, 16:].astype(np.int64)
    y = np.zeros((len(b), QK_K))
    for chunk in range(4):  # 64 values: sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles)
        q = qs[:, 32 * chunk: 32 * chunk + 32]
        for half, vals in enumerate((q & 0xF, q >> 4)):
            sc, m = _scale_min_k4(2 * chunk + half, scales)
            y[:, 64 * chunk + 32 * half: 64 * chunk + 32 * half + 32] = (d * sc)[:, None] * vals - (dmin * m)[:, None]
    return y


def ref_q5_k(b):
    d, dmin, scales = _f16(b[:, :2])[:, 0], _f16(b[:, 2:4])[:, 0], b[:, 4:16]
    qh, qs = b[:, 16:48].astype(np.int64), b[:, 48:].astype(np.int64)
    y = np.zeros((len(b), QK_K))
    for chunk in range(4):
        q = qs[:, 32 * chunk: 32 * chunk + 32]
        for half, vals in enumerate((q & 0xF, q >> 4)):
            high = (qh >> (2 * chunk + half)) & 1
            sc, m = _scale_min_k4(2 * chunk + half, scales)
            y[:, 64 * chunk + 32 * half: 64 * chunk + 32 * half + 32] = \
                (d * sc)[:, None] * (vals + 16 * high) - (dmin * m)[:, None]
    return y


def ref_q6_k(b):
    ql, qh = b[:, :128].astype(np.int64), b[:, 128:192].astype(np.int64)
    sc, d = b[:, 192:208].view(np.int8).astype(np.float64), _f16(b[:, 208:210])[:, 0]
    y = np.zeros((len(b), QK_K))
    for n in range(2):  # two halves of 128 values
        l_, h, s, base = ql[:, 64 * n:64 * n + 64], qh[:, 32 * n:32 * n + 32], sc[:, 8 * n:8 * n + 8], 128 * n
        for l in range(32):
            i = l // 16
            q = [((l_[:, l] & 0xF) | (((h[:, l] >> 0) & 3) << 4)) - 32,
                 ((l_[:, l + 32] & 0xF) | (((h[:, l] >> 2) & 3) << 4)) - 32,
                 ((l_[:, l] >> 4) | (((h[:, l] >> 4) & 3) << 4)) - 32,
                 ((l_[:, l + 32] >> 4) | (((h[:, l] >> 6) & 3) << 4)) - 32]
            for k in range(4):
                y[:, base + l + 32 * k] = d * s[:, i + 2 * k] * q[k]
    return y


def ref_bf16(b):
    return (b.view("<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)


BLOCK_REFS = {"Q8_0": ref_q8_0, "Q4_0": ref_q4_0, "Q4_1": ref_q4_1, "Q5_0": ref_q5_0, "Q5_1": ref_q5_1,
              "Q4_K": ref_q4_k, "Q5_K": ref_q5_k, "Q6_K": ref_q6_k}
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# Where the fp16 super-block scales sit in a K-quant block (bytes), to keep them finite.
K_HALVES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def reference_decode(raw: np.ndarray, kind: str, shape) -> np.ndarray:
    if kind == "F32":
        return raw.astype(np.float64)
    if kind == "F16":
        return raw.astype(np.float64)
    if kind == "BF16":
        return ref_bf16(np.ascontiguousarray(raw).reshape(-1, 2)).reshape(shape)
    block, size = gguf.GGML_QUANT_SIZES[T[kind]]
    return BLOCK_REFS[kind](np.ascontiguousarray(raw).reshape(-1, size)).reshape(shape)


def _raw_k_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random K-quant blocks (every code and sub-scale bit pattern) with finite fp16 scales."""
    _, size = gguf.GGML_QUANT_SIZES[T[kind]]
    raw = rng.integers(0, 256, size=(rows * cols // QK_K, size), dtype=np.uint8)
    for at in K_HALVES[kind]:
        raw[:, at:at + 2] = rng.uniform(0.001, 0.05, size=(len(raw), 1)).astype("<f2").view(np.uint8)
    return raw.reshape(rows, cols // QK_K * size)


@pytest.fixture(scope="module")
def all_types_file(tmp_path_factory):
    """One GGUF holding a [4, 512] tensor of every supported type, plus its references."""
    rng = np.random.default_rng(0)
    rows, cols = 4, 512
    tensors, raw_types, refs, originals = {}, {}, {}, {}
    for kind in SUPPORTED_TYPES:
        if kind in K_QUANTS:
            raw = _raw_k_blocks(kind, rows, cols, rng)
        else:
            x = rng.standard_normal((rows, cols)).astype(np.float32)
            originals[kind] = x
            raw = gguf.quants.quantize(x, T[kind])
        name = f"t_{kind.lower()}"
        tensors[name] = raw
        if raw.dtype == np.uint8:
            raw_types[name] = T[kind]
        refs[name] = (kind, reference_decode(raw, kind, (rows, cols)))
    path = gguf_models.write(tmp_path_factory.mktemp("types") / "types.gguf", "llama", {}, tensors, raw_types)
    return path, refs, originals


@pytest.mark.parametrize("kind", SUPPORTED_TYPES)
def test_dequantize_equals_float64_reference(all_types_file, kind):
    path, refs, originals = all_types_file
    tensor = next(t for t in open_gguf(path).tensors if t.name == f"t_{kind.lower()}")
    assert tensor.tensor_type.name == kind
    got = dequantize(tensor, path)
    _, ref = refs[tensor.name]
    assert got.dtype == np.float32 and got.shape == ref.shape == (4, 512)
    # fp32 arithmetic on fp16 scales vs float64: agreement to a few fp32 ulps of the values.
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7 * np.abs(ref).max())
    if kind in originals:  # and the quantized tensor is the data it was made from, within the grid
        step = {"F32": 0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 0.03, "Q5_0": 0.12, "Q5_1": 0.12}.get(kind, 0.5)
        x = originals[kind]
        assert np.abs(got - x).max() <= step * np.abs(x).max() + 1e-12


def test_unsupported_type_names_tensor_and_type(tmp_path):
    rng = np.random.default_rng(0)
    _, size = gguf.GGML_QUANT_SIZES[T.Q2_K]
    raw = rng.integers(0, 256, size=(2, size), dtype=np.uint8)
    path = gguf_models.write(tmp_path / "q2k.gguf", "llama", {}, {"blk.0.ffn_up.weight": raw},
                             {"blk.0.ffn_up.weight": T.Q2_K})
    tensor = open_gguf(path).tensors[0]
    with pytest.raises(CheckpointError, match=r"q2k\.gguf.*blk\.0\.ffn_up\.weight.*Q2_K"):
        dequantize(tensor, path)


def test_unpermute_qk_hand_example_and_inverse():
    # One head of dim 4: HF rows (a0, a1 | b0, b1) are stored by llama.cpp as (a0, b0, a1, b1).
    hf = np.array([[0.0], [1.0], [2.0], [3.0]])
    stored = gguf_models.llama_cpp_permute(hf, 1)
    np.testing.assert_array_equal(stored[:, 0], [0.0, 2.0, 1.0, 3.0])
    np.testing.assert_array_equal(unpermute_qk(stored, 1), hf)
    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    np.testing.assert_array_equal(unpermute_qk(gguf_models.llama_cpp_permute(w, 3), 3), w)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
CASES = {
    "llama-gqa-untied": dict(kind="llama", num_heads=4, num_kv_heads=2, tie=False),
    "llama-mha-tied": dict(kind="llama", num_heads=4, num_kv_heads=4, tie=True),
    "llama3-rope-freqs": dict(kind="llama", num_heads=4, num_kv_heads=1, tie=False, rope_parameters=LLAMA3_ROPE),
    "qwen2-bias": dict(kind="qwen2", num_heads=4, num_kv_heads=2, tie=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_gguf_logits_match_transformers(case, tmp_path):
    spec = dict(CASES[case])
    hf = hf_models.build(spec.pop("kind"), **spec)
    freqs = None
    if "rope_parameters" in spec:
        r = LLAMA3_ROPE
        freqs = gguf_models.llama3_rope_factors(r["rope_theta"], 16, r["factor"], r["low_freq_factor"],
                                                r["high_freq_factor"], r["original_max_position_embeddings"])
    path = gguf_models.from_hf(hf, tmp_path / "tiny.gguf", rope_freqs=freqs)
    model, tokenizer = load_gguf(path)
    assert tokenizer is None  # the file carries no vocabulary
    cfg = model.config
    assert cfg.tie_word_embeddings == spec["tie"] and cfg.qkv_bias == (case == "qwen2-bias")
    if freqs is not None:
        assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    # A long-ish sequence: short prompts hide RoPE layout bugs.
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 64))
    ours, _ = model(tokens)
    np.testing.assert_allclose(np.asarray(ours), hf_models.hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_test_writer_agrees_with_transformers_gguf_reader(tmp_path):
    """The permutation in gguf_models is llama.cpp's: transformers' GGUF reader (which undoes
    llama.cpp's permutation) gives back the original HF weights from our test file."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf = hf_models.build("llama", num_heads=4, num_kv_heads=2)
    path = gguf_models.from_hf(hf, tmp_path / "tiny.gguf")
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf)["tensors"]
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(np.asarray(tensors[name]), hf.state_dict()[name].numpy())


def test_quantized_gguf_weights_equal_dequantized_file(tmp_path):
    """A Q8_0 model: our kernels are exactly the file's dequantized, unpermuted, transposed blocks."""
    hf = hf_models.build("llama", num_heads=4, num_kv_heads=2)
    path = gguf_models.from_hf(hf, tmp_path / "f32.gguf")
    reader = open_gguf(path)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    raw_types = {}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.1.ffn_gate.weight"):
        tensors[name] = gguf.quants.quantize(tensors[name], T.Q8_0)
        raw_types[name] = T.Q8_0
    meta = {k: v.contents() for k, v in reader.fields.items() if k.startswith("llama.")}
    meta = {k[len("llama"):]: v for k, v in meta.items()}
    meta[".rope.freq_base"] = float(meta[".rope.freq_base"])
    meta[".attention.layer_norm_rms_epsilon"] = float(meta[".attention.layer_norm_rms_epsilon"])
    path = gguf_models.write(tmp_path / "q8.gguf", "llama", meta, tensors, raw_types)
    model, _ = load_gguf(path)
    q = reference_decode(tensors["blk.0.attn_q.weight"], "Q8_0", (64, 64))
    k = reference_decode(tensors["blk.0.attn_k.weight"], "Q8_0", (32, 64))
    q_kernel = np.asarray(model.layers[0].self_attn.q_proj.kernel.get_value())
    k_kernel = np.asarray(model.layers[0].self_attn.k_proj.kernel.get_value())
    np.testing.assert_allclose(q_kernel, unpermute_qk(q, 4).T, rtol=2e-6, atol=0)
    np.testing.assert_allclose(k_kernel, unpermute_qk(k, 2).T, rtol=2e-6, atol=0)
    # Within Q8_0's grid of the original weights (max |w| / 127 per block of 32).
    w = hf.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.abs(q_kernel - w.T).max() <= np.abs(w).max() / 127


def test_linear_rope_scaling_and_refusals(tmp_path):
    hf = hf_models.build("llama", num_heads=4, num_kv_heads=2)
    base = gguf_models.from_hf(hf, tmp_path / "base.gguf")
    reader = open_gguf(base)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    meta = {k[len("llama"):]: v.contents() for k, v in reader.fields.items() if k.startswith("llama.")}
    for key in (".rope.freq_base", ".attention.layer_norm_rms_epsilon"):
        meta[key] = float(meta[key])

    linear = gguf_models.write(tmp_path / "linear.gguf", "llama",
                               {**meta, ".rope.scaling.type": "linear", ".rope.scaling.factor": 4.0}, tensors)
    assert load_gguf(linear)[0].config.rope_scaling == RopeScaling("linear", 4.0)
    yarn = gguf_models.write(tmp_path / "yarn.gguf", "llama",
                             {**meta, ".rope.scaling.type": "yarn", ".rope.scaling.factor": 4.0}, tensors)
    with pytest.raises(ConfigError, match=r"yarn\.gguf.*rope\.scaling\.type='yarn'"):
        load_gguf(yarn)
    partial = gguf_models.write(tmp_path / "partial.gguf", "llama", {**meta, ".rope.dimension_count": 8}, tensors)
    with pytest.raises(ConfigError, match=r"partial\.gguf.*partial RoPE"):
        load_gguf(partial)
    odd = gguf_models.llama3_rope_factors(10000.0, 16, 8.0, 1.0, 2.0, 64)  # not Llama-3's 1/4/8192
    freqs = gguf_models.write(tmp_path / "freqs.gguf", "llama", meta, {**tensors, "rope_freqs.weight": odd})
    with pytest.raises(ConfigError, match=r"freqs\.gguf.*rope_freqs"):
        load_gguf(freqs)


def _vocab_file(tmp_path) -> str:
    vocab = gguf_models.byte_level_vocab()
    hf = hf_models.build("llama", vocab_size=len(vocab["tokenizer.ggml.tokens"]))
    return gguf_models.from_hf(hf, tmp_path / "tiny.gguf", extra_meta=vocab)


def test_gguf_tokenizer_is_cached_and_the_cache_gives_the_same_tokenizer(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("JAXCOMPRESS_CACHE", str(tmp_path / "cache"))
    path = _vocab_file(tmp_path)
    meta = metadata(open_gguf(path))
    built = load_gguf_tokenizer(path, meta)  # from the GGUF's vocabulary and merges
    folder = _tokenizer_cache_folder(path)
    assert str(tmp_path / "cache" / "tokenizers") in folder and os.path.isfile(os.path.join(folder, "tokenizer.json"))
    assert os.listdir(os.path.dirname(folder)) == [os.path.basename(folder)]  # no temporary folder left

    cached = load_gguf_tokenizer(path, meta)
    texts = ["the the tether", " leading space\n\ttab ünï 日本 🙂", "<|im_start|>user\nhe<|im_end|>", ""]
    for text in texts:
        ids = built(text)["input_ids"]
        assert cached(text)["input_ids"] == ids and cached.decode(ids) == built.decode(ids)
    assert built(" the")["input_ids"] == [261]  # the merges apply: one token, "Ġthe"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert (cached.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == built.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert (cached.bos_token_id, cached.eos_token_id, cached.pad_token_id) == (1, 2, 0)

    # The second load read the cache: a damaged entry is noticed, rebuilt and replaced.
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write("{")
    with caplog.at_level(logging.WARNING, logger="jaxcompress.io.gguf"):
        again = load_gguf_tokenizer(path, meta)
    assert "ignoring the cached tokenizer" in caplog.text and again("the the")["input_ids"] == built("the the")["input_ids"]
    assert load_gguf_tokenizer(path, meta)("the")["input_ids"] == built("the")["input_ids"]

    # A changed file is another entry.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _tokenizer_cache_folder(path) != folder


def test_gguf_tokenizer_without_a_writable_cache(tmp_path, monkeypatch, caplog):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("JAXCOMPRESS_CACHE", str(tmp_path / "a_file" / "cache"))  # cannot become a folder
    path = _vocab_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="jaxcompress.io.gguf"):
        tokenizer = load_gguf_tokenizer(path, metadata(open_gguf(path)))
    assert tokenizer(" the")["input_ids"] == [261] and "not caching the tokenizer" in caplog.text
