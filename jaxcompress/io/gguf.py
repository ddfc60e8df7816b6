"""GGUF files (llama.cpp's format): config, dequantized weights and tokenizer.

A GGUF file holds metadata (`llama.block_count`, `tokenizer.ggml.tokens`, ...) and tensors named
llama.cpp's way (`blk.3.attn_q.weight`). Each tensor is dequantized to fp32 on the host with the
`gguf` package and streamed into the model one at a time (`model_from_tensors`), so the host
never holds more than one dense tensor.

Layout notes:
* A GGUF tensor lists its dimensions innermost first (`[in, out]` for a projection); the
  `gguf` reader reverses them, so its arrays are `[out, in]` like a PyTorch weight. Projections
  are transposed to our `[in, out]` kernels; the embedding `[vocab, hidden]` is used as is.
* llama.cpp's converter permutes the rows of the q and k projections of `llama` models (it
  applies RoPE to interleaved pairs, HF to the two halves of each head). `unpermute_qk` undoes
  it so our rotate-half RoPE sees HF's layout. `qwen2` models are stored unpermuted.
* Mistral models are stored as `llama` without a sliding window, as llama.cpp runs them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np

from jaxcompress.cache import cache_root, file_fingerprint
from jaxcompress.errors import CheckpointError, ConfigError, UserError
from jaxcompress.models.build import Path, model_from_tensors
from jaxcompress.models.config import ModelConfig, RopeScaling

log = logging.getLogger(__name__)

GGUF_INSTALL = "pip install gguf (on the GPU machine: source scripts/gpu_prelude.sh)"

# Tensor types we dequantize (all tested against a float64 decoder written from the format).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF architecture -> (our model_type, whether q/k rows are permuted for interleaved RoPE).
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}

# GGUF tensor name -> (our path, whether to transpose). `blk.N.` prefixes the per-layer names.
_GLOBAL_NAMES = {
    "token_embd.weight": (("embed_tokens", "embedding"), False),
    "output_norm.weight": (("norm", "scale"), False),
    "output.weight": (("lm_head", "kernel"), True),
}
_LAYER_NAMES = {
    "attn_norm.weight": (("input_layernorm", "scale"), False),
    "attn_q.weight": (("self_attn", "q_proj", "kernel"), True),
    "attn_k.weight": (("self_attn", "k_proj", "kernel"), True),
    "attn_v.weight": (("self_attn", "v_proj", "kernel"), True),
    "attn_output.weight": (("self_attn", "o_proj", "kernel"), True),
    "attn_q.bias": (("self_attn", "q_proj", "bias"), False),
    "attn_k.bias": (("self_attn", "k_proj", "bias"), False),
    "attn_v.bias": (("self_attn", "v_proj", "bias"), False),
    "ffn_norm.weight": (("post_attention_layernorm", "scale"), False),
    "ffn_gate.weight": (("mlp", "gate_proj", "kernel"), True),
    "ffn_up.weight": (("mlp", "up_proj", "kernel"), True),
    "ffn_down.weight": (("mlp", "down_proj", "kernel"), True),
}
# Per-frequency RoPE factors (Llama 3.x); read into the config, not a parameter.
ROPE_FREQS = "rope_freqs.weight"
# Llama 3.x RoPE scaling: llama.cpp stores only the resulting factors; these are the parameters
# every Llama 3.1/3.2/3.3 release uses (the factor itself is read from the stored factors).
_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError(f"reading GGUF files needs the package gguf; install it with: {GGUF_INSTALL}") from None
    return gguf


def gguf_name_to_path(name: str) -> tuple[Path, bool]:
    """GGUF tensor name -> (our parameter path, whether to transpose); KeyError if unknown."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        path, transpose = _LAYER_NAMES[parts[2]]
        return ("layers", int(parts[1])) + path, transpose
    raise KeyError(name)


def open_gguf(path: str):
    """A `gguf.GGUFReader` over the file (memory-mapped); CheckpointError if it is damaged."""
    gguf = _gguf()
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises many types (ValueError, IndexError, ...) for a damaged file
        raise CheckpointError(f"{path}: not a readable GGUF file, corrupt or truncated "
                              f"({type(e).__name__}: {e}); download it again") from None
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: GGUF written for the opposite byte order; not supported")
    return reader


def reader_arch(reader) -> str:
    return reader.fields["general.architecture"].contents()


def metadata(reader) -> dict[str, Any]:
    """{key: value} of the file's metadata (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _rope_from_gguf(meta: dict, arch: str, head_dim: int, theta: float, rope_freqs, path: str) -> RopeScaling:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if rope_freqs is not None:
        if kind != "none":
            raise ConfigError(f"{path}: both {ROPE_FREQS} and rope scaling type {kind!r}; not implemented")
        return _llama3_scaling(np.asarray(rope_freqs, np.float64), head_dim, theta, path)
    if kind == "none":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling("linear", factor=_f32(meta[f"{arch}.rope.scaling.factor"]))
    raise ConfigError(f"{path}: metadata {arch}.rope.scaling.type={kind!r} is not implemented "
                      f"(supported: none, linear, Llama-3 {ROPE_FREQS})")


def _llama3_scaling(factors: np.ndarray, head_dim: int, theta: float, path: str) -> RopeScaling:
    """Recovers Llama-3 RoPE scaling from llama.cpp's per-frequency factors, and checks it."""
    from jaxcompress.models.rope import inv_frequencies

    if factors.shape != (head_dim // 2,):
        raise CheckpointError(f"{path}: {ROPE_FREQS} has shape {factors.shape}, expected ({head_dim // 2},)")
    scaling = RopeScaling("llama3", factor=_f32(factors.max()), **_LLAMA3_ROPE)
    probe = ModelConfig(vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1, num_heads=1,
                        num_kv_heads=1, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if not np.allclose(np.asarray(inv_frequencies(probe), np.float64), base / factors, rtol=1e-5, atol=0):
        raise ConfigError(f"{path}: {ROPE_FREQS} holds RoPE factors that are not Llama-3 scaling with "
                          f"{_LLAMA3_ROPE}; not implemented")
    return scaling


def config_from_gguf(meta: dict, tensor_shapes: dict[str, tuple], path: str, rope_freqs=None) -> ModelConfig:
    """ModelConfig from the metadata and the tensor names/shapes (numpy order) of a GGUF file."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path}: unknown architecture general.architecture={arch!r}; "
                          f"jaxcompress reads GGUF models of: {', '.join(ARCHITECTURES)}")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: metadata {arch}.{key} is missing")
        return value

    if get("expert_count", 0):
        raise ConfigError(f"{path}: mixture-of-experts models ({arch}.expert_count) are not implemented")
    hidden, num_heads = int(get("embedding_length")), int(get("attention.head_count"))
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
        if len(set(num_kv_heads)) != 1:
            raise ConfigError(f"{path}: per-layer {arch}.attention.head_count_kv is not implemented")
        num_kv_heads = num_kv_heads[0]
    head_dim = int(get("attention.key_length", hidden // num_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{path}: {arch}.attention.value_length != key_length is not implemented")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ConfigError(f"{path}: partial RoPE ({arch}.rope.dimension_count="
                          f"{get('rope.dimension_count')} < head_dim={head_dim}) is not implemented")
    theta = _f32(get("rope.freq_base", 10000.0))
    embed = tensor_shapes.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{path}: tensor token_embd.weight is missing")
    vocab = int(meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ()) or embed[0])
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 4096)),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rope_scaling=_rope_from_gguf(meta, arch, head_dim, theta, rope_freqs, path),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
        model_type=ARCHITECTURES[arch][0],
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def dequantize(tensor, path: str = "") -> np.ndarray:
    """fp32 array in numpy (`[out, in]`) order of a `gguf.ReaderTensor`."""
    gguf = _gguf()
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"{path}: tensor {tensor.name} has type {kind}, which jaxcompress does not "
                              f"dequantize (supported: {', '.join(SUPPORTED_TYPES)}); re-quantize the "
                              f"model to one of those with llama.cpp's llama-quantize")
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a q or k weight `[heads * head_dim, in]`.

    llama.cpp stores, for each head, rows (0, D/2, 1, D/2+1, ...): the two halves that HF's
    rotate-half RoPE pairs up are interleaved. Reading rows as [head, D/2, 2] and swapping the
    last two axes gives back [head, 2, D/2], HF's order. (`num_heads` is the kv head count for k.)
    """
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_tensors(reader, cfg: ModelConfig, path: str) -> Iterator[tuple[Path, np.ndarray, str]]:
    """Streams (our path, fp32 array, source) one tensor at a time, dequantized and unpermuted."""
    permuted = ARCHITECTURES[reader_arch(reader)][1]
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue
        source = f"{path}: {tensor.name}"
        try:
            our_path, transpose = gguf_name_to_path(tensor.name)
        except KeyError:
            raise CheckpointError(f"{source}: unknown tensor name; it has no place in a "
                                  f"{cfg.model_type} model") from None
        array = dequantize(tensor, path)
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        if permuted and kind in heads:
            array = unpermute_qk(array, heads[kind])
        yield our_path, (array.T if transpose else array), source


def load_gguf_tokenizer(path: str, meta: dict):
    """The tokenizer stored in the file (chat template, bos/eos kept), or None when it has none.

    transformers builds it from the GGUF's vocabulary and merges, which reads the whole file again
    and takes about 15 s for SmolLM2's 49k tokens on a CPU. The result is saved once under
    `<cache root>/tokenizers/` (see jaxcompress.cache), keyed by the file (path, size, mtime) and
    the transformers and tokenizers versions, and later loads read that instead (half a second once
    transformers is imported)."""
    if "tokenizer.ggml.tokens" not in meta:
        return None
    from transformers import AutoTokenizer

    cached = _tokenizer_cache_folder(path)
    if os.path.isdir(cached):
        try:
            return AutoTokenizer.from_pretrained(cached)
        except Exception as e:  # a damaged entry (tokenizers raises plain Exceptions): rebuild it below
            log.warning("%s: ignoring the cached tokenizer %s (%s: %s); rebuilding it", path, cached,
                        type(e).__name__, e)
            shutil.rmtree(cached, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                  gguf_file=os.path.basename(path))
    except (ValueError, KeyError, NotImplementedError) as e:
        model = meta.get("tokenizer.ggml.model")
        raise CheckpointError(f"{path}: cannot build the tokenizer (tokenizer.ggml.model={model!r}) with "
                              f"transformers' GGUF support ({type(e).__name__}: {e})") from None
    _save_tokenizer(tokenizer, cached)
    return tokenizer


def _tokenizer_cache_folder(path: str) -> str:
    import tokenizers
    import transformers

    key = f"{file_fingerprint(path)}:{transformers.__version__}:{tokenizers.__version__}"
    name = f"{os.path.basename(path)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return os.path.join(cache_root(), "tokenizers", name)


def _save_tokenizer(tokenizer, folder: str) -> None:
    """Saves into a temporary folder, then renames it into place: a reader never sees half an
    entry, and of two processes saving at once one wins. A cache that cannot be written (a
    read-only home) only costs the next load its 15 s."""
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    except OSError as e:
        log.warning("not caching the tokenizer in %s: %s", parent, e)
        return
    try:
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, folder)
    except Exception as e:  # another process saved it first, or saving failed: the cache is best effort
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(folder):
            log.warning("not caching the tokenizer in %s: %s", folder, e)


def load_gguf(path: str, param_dtype=None, dtype=None, sharding=None):
    """(LlamaModel, tokenizer or None) from a GGUF file, weights dequantized to `param_dtype`
    (default fp32). Raises UserError/CheckpointError/ConfigError naming the file and what is wrong."""
    import jax.numpy as jnp

    reader = open_gguf(path)
    meta = metadata(reader)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    rope_freqs = next((dequantize(t, path) for t in reader.tensors if t.name == ROPE_FREQS), None)
    cfg = config_from_gguf(meta, shapes, path, rope_freqs)
    try:
        model = model_from_tensors(cfg, iter_gguf_tensors(reader, cfg, path), param_dtype or jnp.float32,
                                   dtype, sharding)
    except CheckpointError as e:
        if path in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from None  # e.g. missing tensors: name the file
    return model, load_gguf_tokenizer(path, meta)
