"""What every packed KV codec shares: the attention paths and the exact-token overlay.

A packed codec keeps a layer's keys and values in two `QTokens` stores (slots [0, n_q)) plus,
optionally, some tokens in full precision (KIVI's residual window, KVQuant's attention sink),
which it reports through `exact_tokens(state) -> (k, v, slots)`. Attention then is

* reference (any number of queries): dequantize every slot, overlay the exact tokens at their
  slots, rotate pre-RoPE keys, and run `reference_attention`;
* decode (one query, on the GPU or in interpret mode): the Pallas flash-decoding kernel over the
  packed stores (slots [0, n_q) that are not exact), plus a dense partial over the exact
  tokens, merged by log-sum-exp.

Subclasses (frozen dataclasses, hashable: the codec is static in the cache) implement `init`,
`write`, `quantized_length`, `exact_tokens` and the byte accounting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress.errors import ConfigError
from jaxcompress.models.cache import ATTENTION_MODES, KVCodec, check_attention_mode  # noqa: F401 (re-exported)
from jaxcompress.ops.attention import reference_attention

PACK_ROWS = 32  # tokens per unpacked tile (the kernel's step); packing blocks are c * PACK_ROWS


def scatter_slots(dense: jax.Array, values: jax.Array, slots: jax.Array) -> jax.Array:
    """dense [B, S, K, D] with values [B, F, K, D] written at slots [B, F] (-1: skipped)."""
    b, s = dense.shape[:2]
    target = jnp.where(slots >= 0, slots, s)  # out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], slots.shape)
    return dense.at[rows, target].set(values.astype(dense.dtype), mode="drop")


def gather_slots(x: jax.Array, slots: jax.Array) -> jax.Array:
    """x [B, S, ...] at slots [B, F] (clipped; callers mask slots < 0)."""
    idx = jnp.clip(slots, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def init_sink(batch: int, sink: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """State of an exact attention sink: the first `sink` positions' keys, values and slots."""
    return {"sink_k": jnp.zeros((batch, sink, kv_heads, head_dim), dtype),
            "sink_v": jnp.zeros((batch, sink, kv_heads, head_dim), dtype),
            "sink_slot": jnp.full((batch, sink), -1, jnp.int32)}


def write_sink(state: dict, k, v, index, positions, sink: int) -> dict:
    """The sink entries after writing k, v [B, T, K, D] at slots index.. (positions [B, T] or
    None: position = slot): tokens at positions 0..sink-1 are copied, the rest dropped."""
    b, t = k.shape[:2]
    pos = positions if positions is not None else index + jnp.broadcast_to(jnp.arange(t), (b, t))
    target = jnp.where((pos >= 0) & (pos < sink), pos, sink)  # out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    slots = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    return {"sink_k": state["sink_k"].at[rows, target].set(k.astype(state["sink_k"].dtype), mode="drop"),
            "sink_v": state["sink_v"].at[rows, target].set(v.astype(state["sink_v"].dtype), mode="drop"),
            "sink_slot": state["sink_slot"].at[rows, target].set(slots, mode="drop")}


EXACT_ROWS = 32  # slots a step of the dense kernel over the exact tokens (a KIVI ring: R + G slots)


def exact_partials(q, k, v, mask, scale: float, dot_dtype, interpret: bool):
    """Partials of q [B, K, G, D] over the exact tokens k, v [B, F, K, D] (mask [B, F]), per
    split ([B, K, splits, G, ...], for `combine`): the dense Pallas decode kernel, in one launch
    (XLA split these small dots into a few fusions, one of them a per-element loop over the
    tokens: 25 us a layer on an H100, run 9)."""
    from pallas_kernels.decode_attention import dense_decode_partials

    pad = -k.shape[1] % EXACT_ROWS
    if pad:
        k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    # Default splits: a program per EXACT_ROWS tokens at batch 1 (one program per head took 8 us
    # a layer for a 160-slot ring on an H100, run 9); at batch 8, a program per block took 12.3
    # against 11.5 us (run 14).
    return dense_decode_partials(q, k.astype(q.dtype), v.astype(q.dtype), mask, k.shape[1], scale=scale,
                                 dot_dtype=dot_dtype, interpret=interpret, rows=EXACT_ROWS, merge=False)


DENSE_DECODE_ROWS = (64, 32, 16)  # slots a step of the dense decode kernel, largest dividing the cache


def dense_decode_rows(slots: int) -> int | None:
    return next((r for r in DENSE_DECODE_ROWS if slots % r == 0), None)


def written_length(mask: jax.Array) -> jax.Array:
    """1 + the last slot any row may attend (mask [B, S]): the kernel reads no slot beyond."""
    seen = jnp.any(mask, axis=0)
    return jnp.where(jnp.any(seen), mask.shape[-1] - jnp.argmax(seen[::-1]), 0).astype(jnp.int32)


def dense_decode_attention(q, k, v, mask, scale: float, *, rows: int | None, interpret: bool):
    """Decode attention (q [B, 1, H, D]) over a dense cache k, v [B, S, K, D] with mask
    [B, 1, S], through the bf16 flash-decoding kernel: [B, 1, H, D] in q's dtype."""
    from pallas_kernels.decode_attention import combine, dense_decode_partials

    b, _, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if rows is None:
        raise ConfigError(f"the dense decode kernel needs a cache length divisible by one of {DENSE_DECODE_ROWS}; "
                          f"this cache has {s} slots (create it with a max_len rounded up, or attention=reference)")
    allowed = mask[:, 0, :]
    qg = q[:, 0].reshape(b, kv_heads, h // kv_heads, d)
    dot_dtype = q.dtype  # the cache's own precision (fp16 keeps its 10-bit mantissa)
    part = dense_decode_partials(qg, k.astype(q.dtype), v.astype(q.dtype), allowed, written_length(allowed),
                                 scale=scale, dot_dtype=dot_dtype, interpret=interpret, rows=rows, merge=False)
    return combine([part]).reshape(b, 1, h, d).astype(q.dtype)


class PackedCodec(KVCodec):
    """Base of the packed codecs. Subclasses define the dataclass fields `key_bits`,
    `value_bits` and `attention` (one of ATTENTION_MODES)."""

    rows: int = PACK_ROWS

    # ---------------------------------------------------------------- subclass interface
    def quantized_length(self, state) -> jax.Array:
        """Slots [0, n_q) are read from the packed stores."""
        raise NotImplementedError

    def exact_tokens(self, state):
        """(k, v [B, F, K, D], slots [B, F] with -1 = none) kept in full precision, or None."""
        return None

    def exact_below_quantized_length(self) -> bool:
        """Whether an exact token can sit at a slot < quantized_length (a sink): the decode
        kernel must then mask it out of the store. False spares that per-step scatter."""
        return True

    # ---------------------------------------------------------------- reading
    def dense(self, state, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """Every slot decoded: keys and values [B, capacity, K, D] (keys before RoPE when
        `pre_rope`)."""
        k = state["k"].dequantize().transpose(0, 2, 1, 3).astype(dtype)
        v = state["v"].dequantize().transpose(0, 2, 1, 3).astype(dtype)
        exact = self.exact_tokens(state)
        if exact is not None:
            ke, ve, slots = exact
            k, v = scatter_slots(k, ke, slots), scatter_slots(v, ve, slots)
        return k, v

    def read(self, state):
        """All slots in fp32: [B, capacity, K, D], capacity >= the cache's max_len (the tail is
        packing padding, never written)."""
        return self.dense(state)

    # ---------------------------------------------------------------- attention
    def use_kernel(self) -> bool:
        if self.attention == "reference":
            return False
        if self.attention in ("pallas", "interpret"):
            return True
        return jax.default_backend() == "gpu"

    def attend(self, state, q, mask, scale, rotate_keys=None):
        if q.shape[1] == 1 and self.use_kernel():
            from pallas_kernels.decode_attention import supports

            # "auto" falls back to the reference for shapes the kernel does not tile (tiny
            # heads); an explicit "pallas" / "interpret" lets the kernel raise its error.
            if self.attention != "auto" or supports(state["k"], state["v"], self.pre_rope):
                return self.attend_decode(state, q, mask, scale, rotate_keys)
        s = mask.shape[-1]
        k, v = self.dense(state, q.dtype)
        k, v = k[:, :s], v[:, :s]
        if rotate_keys is not None:
            k = rotate_keys(k)
        return reference_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale)

    def decode_kernel_options(self) -> dict:
        """The codec's own options for `quantized_decode_partials` (none here; KIVI's values pass)."""
        return {}

    def attend_decode(self, state, q, mask, scale, rotate_keys=None, **kernel_options):
        """One query per row (q [B, 1, H, D]) through the Pallas kernel; `kernel_options` go
        to `quantized_decode_partials` (num_warps, num_stages, num_splits, path, cw2), over the
        codec's own (`decode_kernel_options`)."""
        from jaxcompress.models.rope import apply_rope
        from pallas_kernels.decode_attention import combine, quantized_decode_partials

        kernel_options = {**self.decode_kernel_options(), **kernel_options}

        b, _, h, d = q.shape
        kstore, vstore = state["k"], state["v"]
        kv_heads, capacity = kstore.codes.shape[1], kstore.capacity
        qg = q[:, 0].reshape(b, kv_heads, h // kv_heads, d)
        allowed = jnp.pad(mask[:, 0, :], ((0, 0), (0, capacity - mask.shape[-1])))  # [B, capacity]
        n_q = self.quantized_length(state)
        exact = self.exact_tokens(state)
        quant_mask = allowed
        if exact is not None and self.exact_below_quantized_length():
            # exact tokens are attended in full precision, not from the store
            hit = jnp.zeros_like(allowed).at[jnp.arange(b)[:, None], jnp.where(exact[2] >= 0, exact[2], capacity)
                                             ].set(True, mode="drop")
            quant_mask = allowed & ~hit
        rope = None
        if self.pre_rope:
            cos, sin = rotate_keys.cos_sin  # [B, S, D] per-slot tables from the model
            pad = ((0, 0), (0, capacity - cos.shape[1]), (0, 0))
            cos, sin = jnp.pad(cos, pad), jnp.pad(sin, pad)
            rope = (cos[..., : d // 2], sin[..., : d // 2])
        # fp32 models get fp32 dots (exact); bf16/fp16 ones the tensor cores' bf16 operands.
        dot_dtype = jnp.float32 if q.dtype == jnp.float32 else jnp.bfloat16
        interpret = self.attention == "interpret" or jax.default_backend() != "gpu"
        # the splits of both kernels merge in one step (`combine`)
        parts = [quantized_decode_partials(qg, kstore, vstore, quant_mask, n_q, scale=scale, rope=rope,
                                           dot_dtype=dot_dtype, interpret=interpret, merge=False,
                                           **kernel_options)]
        if exact is not None:
            ke, ve, slots = exact
            if rope is not None:
                ke = apply_rope(ke, gather_slots(cos, slots), gather_slots(sin, slots))
            emask = (slots >= 0) & gather_slots(allowed, slots)
            parts.append(exact_partials(qg, ke, ve, emask, scale, dot_dtype, interpret))
        return combine(parts).reshape(b, 1, h, d).astype(q.dtype)

    # ---------------------------------------------------------------- accounting
    def cache_nbytes(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, layer: int = 0) -> int:
        """Exact bytes of one layer's state (every array the codec allocates)."""
        state = jax.eval_shape(lambda: self.init_layer(layer, batch, max_len, kv_heads, head_dim, dtype))
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
