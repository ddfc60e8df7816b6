"""Attention: masks and the reference grouped-query attention.

Shapes: q [B, T, H, D]; k, v [B, S, K, D] with H = K * G (GQA; MHA has G = 1, MQA K = 1).
Positions are absolute token positions; a key slot with position < 0 is empty (padding or
not yet written).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so that a fully masked row gives a uniform softmax and no NaN


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """[B, T, S] boolean: causal, key slot written, and within the sliding window."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if sliding_window is not None:
        # HF/Mistral convention: a query attends to the last `sliding_window` keys, itself included.
        mask &= q - k < sliding_window
    return mask


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                        scale: float) -> jax.Array:
    """Softmax attention in fp32; returns [B, T, H, D] in q's dtype."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)
