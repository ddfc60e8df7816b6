"""The KV cache: a pytree whose per-layer storage is owned by a codec.

`KVCache` keeps what every codec shares: the absolute position of the token in each slot
(-1 = empty or padding) and the next slot to write. What the keys and values are stored as
(bf16 arrays, packed 2-bit codes with scales, ...) is the codec's business: the attention layer
only calls `codec.write` and `codec.attend`. KV-cache compression plugs in by providing a codec.

Shapes: per layer, keys and values arrive as [B, T, K, D] (K kv heads, D head dim); the cache
holds `max_len` slots per row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.errors import ConfigError, UserError
from jaxcompress.ops.attention import attention_mask, reference_attention


ATTENTION_MODES = ("auto", "pallas", "interpret", "reference")


def check_attention_mode(mode: str) -> None:
    if mode not in ATTENTION_MODES:
        raise ConfigError(f"attention={mode!r} is not a KV attention mode; choose one of {ATTENTION_MODES}")


class KVCodec:
    """How one layer's keys and values are stored. Subclasses override the storage methods.

    `pre_rope = True` asks the attention layer for keys *before* rotation (KVQuant quantizes
    them there); `attend` then gets a `rotate_keys(k) -> k` function to apply after decoding.
    """

    pre_rope: bool = False

    def init(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> Any:
        raise NotImplementedError

    def init_layer(self, layer: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> Any:
        """The state of decoder layer `layer`; codecs calibrated per layer override this."""
        return self.init(batch, max_len, kv_heads, head_dim, dtype)

    def write(self, state: Any, k: jax.Array, v: jax.Array, index: jax.Array,
              positions: jax.Array | None = None) -> Any:
        """Stores k, v [B, T, K, D] in slots [index, index + T); positions [B, T] are the
        tokens' absolute positions (-1 = padding), for codecs that treat some tokens apart."""
        raise NotImplementedError

    def prepare(self, layers: tuple, index: jax.Array, new_tokens: int) -> tuple:
        """The layers' states before `new_tokens` tokens are written at slot `index`, with any
        work that falls due at this step already done for all layers together (KIVI: a window
        flush, under one conditional a step instead of one a layer). The model calls it once a
        step, before the layers' `write`; callers that skip it get the same cache."""
        return layers

    def read(self, state: Any) -> tuple[jax.Array, jax.Array]:
        """All slots decoded to dense [B, S, K, D] keys and values (the reference)."""
        raise NotImplementedError

    def attend(self, state: Any, q: jax.Array, mask: jax.Array, scale: float,
               rotate_keys=None) -> jax.Array:
        """Attention of q [B, T, H, D] over the stored slots; mask [B, T, S]."""
        k, v = self.read(state)
        if rotate_keys is not None:
            k = rotate_keys(k)
        return reference_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale)

    def bytes_per_token(self, kv_heads: int, head_dim: int, dtype) -> float:
        """Storage bytes per token per layer, keys and values together, metadata included."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class IdentityCodec(KVCodec):
    """Keys and values stored as they come, in the cache dtype.

    Decode attention (one query a row) runs the bf16 flash-decoding kernel on GPUs
    (`attention="auto"`), which reads only the slots written so far; XLA's dot-softmax-dot over
    every slot took 13 us a layer at context 512 on an H100 (run 9 of issue 5). "reference"
    keeps XLA's, "pallas" / "interpret" force the kernel (as the packed codecs' option).
    """

    attention: str = "auto"

    def __post_init__(self):
        check_attention_mode(self.attention)

    def attend(self, state, q, mask, scale, rotate_keys=None):
        if q.shape[1] == 1 and rotate_keys is None:
            from jaxcompress.kv.base import dense_decode_attention, dense_decode_rows

            rows = dense_decode_rows(state["k"].shape[1])
            use = self.attention in ("pallas", "interpret") or (
                self.attention == "auto" and jax.default_backend() == "gpu" and rows is not None
                and q.dtype in (jnp.bfloat16, jnp.float16))
            if use:
                return dense_decode_attention(q, state["k"], state["v"], mask, scale, rows=rows,
                                              interpret=self.attention == "interpret" or jax.default_backend() != "gpu")
        return super().attend(state, q, mask, scale, rotate_keys)

    def init(self, batch, max_len, kv_heads, head_dim, dtype):
        shape = (batch, max_len, kv_heads, head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def write(self, state, k, v, index, positions=None):
        start = (0, index, 0, 0)
        return {
            "k": jax.lax.dynamic_update_slice(state["k"], k.astype(state["k"].dtype), start),
            "v": jax.lax.dynamic_update_slice(state["v"], v.astype(state["v"].dtype), start),
        }

    def read(self, state):
        return state["k"], state["v"]

    def bytes_per_token(self, kv_heads, head_dim, dtype):
        return 2 * kv_heads * head_dim * jnp.dtype(dtype).itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """layers: one codec state per decoder layer; positions [B, S] int32 (-1 = empty);
    index: scalar int32, the next slot to write (shared by the batch: rows are left-padded)."""

    layers: tuple
    positions: jax.Array
    index: jax.Array
    codec: KVCodec = dataclasses.field(metadata=dict(static=True), default=IdentityCodec())

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]

    @classmethod
    def create(cls, cfg, batch: int, max_len: int, dtype=jnp.bfloat16,
               codec: KVCodec | None = None) -> "KVCache":
        codec = codec or IdentityCodec()
        layers = tuple(codec.init_layer(i, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)
                       for i in range(cfg.num_layers))
        return cls(layers=layers, positions=jnp.full((batch, max_len), -1, jnp.int32),
                   index=jnp.zeros((), jnp.int32), codec=codec)

    def check_room(self, new_tokens: int) -> None:
        """Raises if `new_tokens` more tokens cannot fit (only when index is concrete)."""
        try:
            used = int(self.index)
        except jax.errors.ConcretizationTypeError:
            return
        if used + new_tokens > self.max_len:
            raise UserError(
                f"context of {used + new_tokens} tokens is longer than the KV cache "
                f"({self.max_len} slots); create the cache with a larger max_len"
            )

    def prepared(self, new_tokens: int) -> "KVCache":
        """This cache with the codec's per-step work for `new_tokens` tokens done (`KVCodec.prepare`)."""
        return dataclasses.replace(self, layers=tuple(self.codec.prepare(self.layers, self.index, new_tokens)))

    def advance(self, positions: jax.Array) -> "KVCache":
        """Records the positions [B, T] of the tokens just written and moves the index."""
        t = positions.shape[1]
        new_pos = jax.lax.dynamic_update_slice(self.positions, positions.astype(jnp.int32), (0, self.index))
        return dataclasses.replace(self, positions=new_pos, index=self.index + t)

    def mask(self, q_pos: jax.Array, new_positions: jax.Array, sliding_window) -> jax.Array:
        """[B, T, S] mask of the queries over the cache after writing the new tokens."""
        k_pos = jax.lax.dynamic_update_slice(self.positions, new_positions.astype(jnp.int32), (0, self.index))
        return attention_mask(q_pos, k_pos, sliding_window)

    def bytes_per_token(self, cfg, dtype=jnp.bfloat16) -> float:
        """Cache bytes per token for the whole model (all layers)."""
        return cfg.num_layers * self.codec.bytes_per_token(cfg.num_kv_heads, cfg.head_dim, dtype)
