"""Small GGUF files for tests, written with `gguf.GGUFWriter` the way llama.cpp's
`convert_hf_to_gguf.py` writes them (metadata keys, tensor names, q/k row permutation)."""

import math

import gguf
import numpy as np

# HF tensor name (inside a layer) -> GGUF name.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: per head, rows [half0 | half1] become
    interleaved pairs (row i of half 0, row i of half 1, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float, old_len: int):
    """The `rope_freqs` tensor convert_hf_to_gguf.py writes for Llama 3.x RoPE scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write(path, arch: str, meta: dict, tensors: dict, raw_types: dict | None = None) -> str:
    """Writes a GGUF file: `meta` maps keys (without the arch prefix when they start with '.')
    to values; `tensors` maps names to numpy arrays (float) or uint8 raw blocks whose type is
    in `raw_types`."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        key = arch + key if key.startswith(".") else key
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, array in tensors.items():
        raw = (raw_types or {}).get(name)
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def byte_level_vocab() -> dict:
    """The tokenizer metadata of a tiny byte-level BPE vocabulary (llama.cpp's `gpt2` model, as
    SmolLM2's file has): GPT-2's 256 byte symbols, three merges ("Ġ t", "h e", "Ġt he") and
    ChatML's control tokens, with a chat template. 262 tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
            "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.chat_template": template}


def from_hf(hf_model, path, dtype=np.float32, rope_freqs=None, extra_meta: dict | None = None) -> str:
    """A GGUF file of a transformers Llama/Mistral/Qwen2 model, as llama.cpp would convert it
    (plus `extra_meta`, e.g. `byte_level_vocab()`)."""
    cfg = hf_model.config
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    rope = cfg.rope_parameters if hasattr(cfg, "rope_parameters") else {"rope_theta": cfg.rope_theta}
    meta = {".block_count": cfg.num_hidden_layers, ".context_length": cfg.max_position_embeddings,
            ".embedding_length": cfg.hidden_size, ".feed_forward_length": cfg.intermediate_size,
            ".attention.head_count": heads, ".attention.head_count_kv": kv_heads,
            ".rope.freq_base": float(rope["rope_theta"]), ".rope.dimension_count": head_dim,
            ".attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps), ".vocab_size": cfg.vocab_size}
    tensors = {}
    for name, value in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = value.detach().numpy().astype(dtype)
        if name in GLOBAL_NAMES:
            tensors[GLOBAL_NAMES[name]] = array
            continue
        _, _, layer, rest = name.split(".", 3)
        if arch == "llama" and rest == "self_attn.q_proj.weight":
            array = llama_cpp_permute(array, heads)
        elif arch == "llama" and rest == "self_attn.k_proj.weight":
            array = llama_cpp_permute(array, kv_heads)
        # llama.cpp keeps norms and biases in F32 whatever the file type.
        if array.ndim == 1:
            array = array.astype(np.float32)
        tensors[f"blk.{layer}.{LAYER_NAMES[rest]}"] = array
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = rope_freqs
    return write(path, arch, {**meta, **(extra_meta or {})}, tensors)
