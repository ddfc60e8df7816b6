"""Tiny random Hugging Face models for parity tests, built with transformers and saved to disk."""

import torch
import transformers

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            max_position_embeddings=256, rms_norm_eps=1e-6)


def build(kind: str, *, num_heads=4, num_kv_heads=2, tie=False, seed=0, **extra):
    torch.manual_seed(seed)
    common = dict(TINY, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  tie_word_embeddings=tie, **extra)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common)
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    # HF initialises biases and norms to 0/1; randomise them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


def save(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()
