"""Rotary position embeddings (HF's rotate-half layout) with default, linear, dynamic and
llama3 frequency scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.models.config import ModelConfig


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def _llama3_inv_freq(inv_freq: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    s = cfg.rope_scaling
    old_len = s.original_max_position_embeddings
    low_wavelen = old_len / s.low_freq_factor
    high_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)


def inv_frequencies(cfg: ModelConfig, positions: jax.Array | None = None) -> jax.Array:
    """[head_dim // 2] inverse frequencies, fp32. `dynamic` scaling depends on the longest
    position seen (HF's dynamic NTK), so it needs `positions`."""
    dim = cfg.head_dim
    kind = cfg.rope_scaling.rope_type
    if kind == "dynamic":
        max_len = cfg.rope_scaling.original_max_position_embeddings or cfg.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_len).astype(jnp.float32)
        factor = cfg.rope_scaling.factor
        base = cfg.rope_theta * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    inv = _base_inv_freq(cfg.rope_theta, dim)
    if kind == "linear":
        inv = inv / cfg.rope_scaling.factor
    elif kind == "llama3":
        inv = _llama3_inv_freq(inv, cfg)
    return jnp.asarray(inv, dtype=jnp.float32)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, head_dim] (fp32) for integer positions [B, T]."""
    inv = inv_frequencies(cfg, positions)
    angles = positions.astype(jnp.float32)[..., None] * inv
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, D] rotated in fp32 (rotate-half layout), returned in x's dtype."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
