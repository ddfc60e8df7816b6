"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus). Pure functions of fp32
logits [B, V]."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_top_k(logits: jax.Array, k: int) -> jax.Array:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def filter_top_p(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest set of tokens whose probability mass reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    # The smallest kept logit is the threshold.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample(logits: jax.Array, rng: jax.Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """[B] int32 next tokens. temperature == 0 is greedy (argmax)."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    logits = filter_top_p(filter_top_k(logits, top_k), top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
