"""Architectures at real shapes for `random:<preset>` models (performance work without weights)."""

from jaxcompress.errors import UserError
from jaxcompress.models.config import ModelConfig, RopeScaling

PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                             max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                             eos_token_id=2),
    "llama2-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                              num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                              max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                              eos_token_id=2),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                             max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                             bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                              max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
                              model_type="mistral", bos_token_id=1, eos_token_id=2),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                        rope_scaling=RopeScaling(), bos_token_id=1, eos_token_id=2),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown random preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
