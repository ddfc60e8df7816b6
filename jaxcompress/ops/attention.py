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
    # Queries as [B, K, G, T, D], and the output in that order until the end: both products then
    # run as plain batched matmuls. With [B, T, K, G, D] operands XLA's CPU dots took twice as long
    # at 2048 tokens (0.85 against 0.38 s a SmolLM2 layer, same bits). k and v keep their layout:
    # transposing them would copy a decode step's whole cache.
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgtd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)
