"""The Llama-family decoder in Flax NNX (Llama-2/3, Mistral, Qwen2, SmolLM2).

Module and parameter names mirror Hugging Face's (`layers.3.self_attn.q_proj.kernel` is HF's
`model.layers.3.self_attn.q_proj.weight`, transposed), so a path reads the same in both worlds.
Weights are `nnx.Param`s holding either a dense `[in, out]` array or a compressed leaf;
every projection calls `linear()`, which dispatches on the leaf type.

Shapes: B batch, T new tokens, S cache slots, D hidden, H/K query/kv heads, Dh head dim.
Norms, RoPE and softmax run in fp32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress.models.cache import KVCache
from jaxcompress.models.config import ModelConfig
from jaxcompress.models.rope import apply_rope, rope_cos_sin
from jaxcompress.ops.attention import attention_mask, reference_attention
from jaxcompress.ops.linear import dense_weight, linear

INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape, dtype):
    return (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); `kernel` a dense [in, out] array or any compressed leaf."""

    def __init__(self, kernel, bias=None):
        self.kernel = nnx.Param(kernel)
        self.bias = None if bias is None else nnx.Param(bias)

    @classmethod
    def random(cls, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs) -> "Linear":
        return cls(_normal(rngs, (d_in, d_out), dtype), jnp.zeros((d_out,), dtype) if bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = linear(x, self.kernel.get_value())
        if self.bias is not None:
            y = y + self.bias.get_value().astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale.get_value().astype(jnp.float32).astype(x.dtype) * xf.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear.random(d, h * dh, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear.random(d, k * dh, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear.random(d, k * dh, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear.random(h * dh, d, bias=False, dtype=dtype, rngs=rngs)
        self.qkv_proj = nnx.data(None)  # set (and q/k/v_proj cleared) by models.fuse.fuse_projections

    def project_qkv(self, x):
        """q, k, v [B, T, out]: three matmuls, or one over the fused [in, q + k + v] weight."""
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        cfg = self.cfg
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return jnp.split(self.qkv_proj(x), [q_width, q_width + kv_width], axis=-1)

    def __call__(self, x, positions, cos_sin, cache_layer=None, cache: KVCache | None = None):
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = cos_sin
        q = apply_rope(q, cos, sin)
        scale = cfg.head_dim ** -0.5
        if cache is None:
            k = apply_rope(k, cos, sin)
            mask = attention_mask(positions, positions, cfg.sliding_window)
            out = reference_attention(q, k, v, mask, scale)
            new_layer = None
        else:
            codec = cache.codec
            rotate_keys = None
            if codec.pre_rope:
                rotate_keys = _slot_rotation(cfg, cache, positions)
            else:
                k = apply_rope(k, cos, sin)
            new_layer = codec.write(cache_layer, k, v, cache.index, positions)
            mask = cache.mask(positions, positions, cfg.sliding_window)
            out = codec.attend(new_layer, q, mask, scale, rotate_keys=rotate_keys)
        return self.o_proj(out.reshape(b, t, -1)), new_layer


def _slot_rotation(cfg: ModelConfig, cache: KVCache, positions):
    """For pre-RoPE codecs: rotates decoded keys by the positions of their slots. The tables
    ride along as `rotate.cos_sin` ([B, S, Dh] each) for kernels that rotate in place."""
    slot_pos = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, cache.index))
    cos, sin = rope_cos_sin(cfg, jnp.maximum(slot_pos, 0))

    def rotate(k):
        return apply_rope(k, cos, sin)

    rotate.cos_sin = (cos, sin)
    return rotate


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear.random(d, f, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear.random(d, f, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear.random(f, d, bias=False, dtype=dtype, rngs=rngs)
        self.gate_up_proj = nnx.data(None)  # set (and gate/up_proj cleared) by models.fuse.fuse_projections

    def __call__(self, x):
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, positions, cos_sin, cache_layer=None, cache=None):
        h, new_layer = self.self_attn(self.input_layernorm(x), positions, cos_sin, cache_layer, cache)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_layer


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (vocab, dim), dtype))

    def __call__(self, tokens):
        return jnp.take(dense_weight(self.embedding.get_value()), tokens, axis=0)

    def attend(self, x):
        """Tied output head: logits = x @ embedding^T."""
        table = dense_weight(self.embedding.get_value())
        return jnp.einsum("...d,vd->...v", x, table.astype(x.dtype), preferred_element_type=jnp.float32)


class LlamaModel(nnx.Module):
    """Decoder-only LM. `param_dtype` is the storage dtype; `dtype` the compute dtype."""

    def __init__(self, cfg: ModelConfig, *, param_dtype=jnp.float32, dtype=None,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.dtype = dtype or param_dtype
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, param_dtype, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, param_dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear.random(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=param_dtype, rngs=rngs))

    def hidden_states(self, tokens, positions=None, cache: KVCache | None = None):
        """Final-norm hidden states [B, T, D] and the updated cache (None without one).

        tokens [B, T] int; positions [B, T] int (default 0..T-1; -1 marks padding, which is
        never attended to). With a cache, the tokens are written at `cache.index`.
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if cache is not None:
            cache.check_room(tokens.shape[1])  # a clear error instead of clamped writes (eager only)
            cache = cache.prepared(tokens.shape[1])
        x = self.embed_tokens(tokens).astype(self.dtype)
        cos_sin = rope_cos_sin(self.config, jnp.maximum(positions, 0))
        new_layers = []
        for i, layer in enumerate(self.layers):
            cache_layer = None if cache is None else cache.layers[i]
            x, new_layer = layer(x, positions, cos_sin, cache_layer, cache)
            new_layers.append(new_layer)
        x = self.norm(x)
        if cache is not None:
            cache = KVCache(layers=tuple(new_layers), positions=cache.positions, index=cache.index,
                            codec=cache.codec).advance(positions)
        return x, cache

    def logits(self, h):
        """fp32 logits [..., V] from hidden states."""
        if self.lm_head is None:
            return self.embed_tokens.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def __call__(self, tokens, positions=None, cache: KVCache | None = None):
        h, cache = self.hidden_states(tokens, positions, cache)
        return self.logits(h), cache
