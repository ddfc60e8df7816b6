"""KV-cache memory: exact bytes of any codec's cache, per token, and what fits a device.

Exact means the bytes of every array `KVCache.create` allocates (found with `jax.eval_shape`,
no memory touched): packed codes, scales, zeros, outliers, residual windows, sinks, calibrated
per-channel ranges, the slot positions and the index. Per-token figures divide by the context,
so fixed costs (a residual window, a sink) are amortized over it; `bytes_per_token` of the
codec itself is the long-context slope.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress.models.cache import IdentityCodec, KVCodec

DEFAULT_CONTEXTS = (8192, 16384, 32768)


def layer_nbytes(cfg, codec: KVCodec | None, batch: int, max_len: int, dtype=jnp.bfloat16, layer: int = 0) -> int:
    codec = codec or IdentityCodec()
    state = jax.eval_shape(lambda: codec.init_layer(layer, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype))
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(state))


def cache_nbytes(cfg, codec: KVCodec | None, batch: int, max_len: int, dtype=jnp.bfloat16) -> int:
    """Bytes of `KVCache.create(cfg, batch, max_len, dtype, codec)` (every layer has the same
    shapes), positions and index included."""
    return cfg.num_layers * layer_nbytes(cfg, codec, batch, max_len, dtype) + batch * max_len * 4 + 4


def bytes_per_token(cfg, codec: KVCodec | None, context: int, dtype=jnp.bfloat16) -> float:
    """All layers, batch 1, fixed costs amortized over `context` tokens."""
    return cache_nbytes(cfg, codec, 1, context, dtype) / context


def compression_ratio(cfg, codec: KVCodec | None, context: int, dtype=jnp.bfloat16) -> float:
    """bf16 (identity) cache bytes over this codec's, at the same context."""
    return cache_nbytes(cfg, None, 1, context, jnp.bfloat16) / cache_nbytes(cfg, codec, 1, context, dtype)


def max_batch(cfg, codec: KVCodec | None, context: int, memory_bytes: int, weight_bytes: int,
              dtype=jnp.bfloat16, reserve: float = 0.1) -> int:
    """Largest batch whose weights and cache of `context` tokens fit `memory_bytes`, keeping
    `reserve` of the memory for activations and workspace."""
    fixed = cache_nbytes(cfg, codec, 0, context, dtype)
    per_row = cache_nbytes(cfg, codec, 1, context, dtype) - fixed
    budget = memory_bytes * (1 - reserve) - weight_bytes - fixed
    return max(0, int(budget // per_row))


def max_context(cfg, codec: KVCodec | None, batch: int, memory_bytes: int, weight_bytes: int,
                dtype=jnp.bfloat16, reserve: float = 0.1, step: int = 256) -> int:
    """Longest context (a multiple of `step`) for which `batch` rows fit."""
    budget = memory_bytes * (1 - reserve) - weight_bytes
    lo, hi = 0, step
    while cache_nbytes(cfg, codec, batch, hi, dtype) <= budget and hi < 1 << 24:
        lo, hi = hi, hi * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if cache_nbytes(cfg, codec, batch, mid, dtype) <= budget else (lo, mid)
    return lo


def device_memory_bytes() -> int | None:
    """The first device's memory limit, when the backend reports it (GPUs do)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    return stats.get("bytes_limit")


def codec_name(codec: KVCodec | None) -> str:
    return "uncompressed" if codec is None else getattr(codec, "name", type(codec).__name__)


def cache_summary(cfg, codec: KVCodec | None, context: int, dtype=jnp.bfloat16) -> dict:
    """What results record as `kv_cache.*` (bytes at batch 1 and `context` tokens)."""
    per_token = bytes_per_token(cfg, codec, context, dtype)
    return {"context": context, "bytes_per_token": per_token,
            "bytes_per_token_per_layer": per_token / cfg.num_layers,
            "compression_ratio": compression_ratio(cfg, codec, context, dtype),
            "cache_bytes": cache_nbytes(cfg, codec, 1, context, dtype)}


def info_lines(cfg, codec: KVCodec | None, weight_bytes: int, memory_bytes: int | None = None,
               contexts=DEFAULT_CONTEXTS, dtype=jnp.bfloat16) -> list[str]:
    """The lines `jaxcompress info` prints about the KV cache."""
    name = codec_name(codec) + ("" if codec is not None else f" {jnp.dtype(dtype).name}")
    lines = []
    for n in contexts:
        s = cache_summary(cfg, codec, n, dtype)
        lines.append(f"kv cache     {name} at {n} tokens: {s['bytes_per_token']:,.0f} bytes/token "
                     f"({s['bytes_per_token_per_layer']:,.1f} per layer), {s['compression_ratio']:.2f}x "
                     f"smaller than bf16")
    if memory_bytes:
        fits = " / ".join(f"{max_batch(cfg, codec, n, memory_bytes, weight_bytes, dtype)}" for n in contexts)
        base = " / ".join(f"{max_batch(cfg, None, n, memory_bytes, weight_bytes)}" for n in contexts)
        lines.append(f"  largest batch at {' / '.join(map(str, contexts))} tokens in "
                     f"{memory_bytes / 2**30:.1f} GiB (10% kept free): {fits} (bf16 cache: {base})")
        lines.append(f"  longest context at batch 1: "
                     f"{max_context(cfg, codec, 1, memory_bytes, weight_bytes, dtype):,} tokens "
                     f"(bf16 cache: {max_context(cfg, None, 1, memory_bytes, weight_bytes):,})")
    return lines
