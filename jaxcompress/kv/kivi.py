"""KIVI (Liu et al., 2024): asymmetric 2-4-bit KV cache with a full-precision residual window.

* Keys are quantized per channel: each channel's scale and zero (fp16) cover a group of G
  consecutive tokens (outlier channels in keys make per-token grids poor).
* Values are quantized per token: scale and zero per group of G channels of one head vector.
* The most recent tokens stay in full precision. Our rule, one for keys and values:
  slots [0, n_q) are quantized with n_q = floor(max(end - R, 0) / G) * G, so between R and
  R + G - 1 of the newest tokens (all of them while end < R) are exact, and tokens leave the
  window a whole group at a time. The paper flushes keys R at a time (0 to R - 1 exact keys)
  and values one at a time (R exact): ours keeps at least as many exact tokens as the paper
  for both, at the cost of G extra residual slots (the ring below; counted in the memory figures).

Keys are quantized after RoPE, as in the paper. The window is a ring of W = R + G slots: the
token at position p sits at ring slot p % W, so a decode step writes one slot in place and a
flush reads one group from the ring; nothing slides. Prefill writes many tokens at once (the
ring unrolled, extended, flushed, rolled back); decode writes one (`_append`). Both store the
same cache.

A decode step flushes the same group in every layer (all layers share the index), and a
conditional on the GPU costs a round trip to the host: `prepare` (called by the model once a
step) flushes every layer's due group under one conditional, and marks the states so that
`_append` skips its own (`flush_per_step=False`: one conditional a layer, as before).

`sink` (default 0, the published KIVI): the first `sink` positions are also kept exact once they
leave the window, as KVQuant keeps its attention sink, and are left out of their key group's
per-channel range: the sink token's keys are atypical, and every later query attends to it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcompress.errors import ConfigError
from jaxcompress.kv.base import PackedCodec, check_attention_mode, init_sink, write_sink
from jaxcompress.kv.store import (CHANNEL_WORDS, META_DTYPE, PASS_COLUMNS, TOKEN_ROWS, WORD_COLUMNS, QTokens,
                                  capacity_for, channel_words_supported, check_bits, codes_per_word, minmax_scale_zero,
                                  uniform_codes)


FLUSHED = "flushed_by_prepare"  # state key: this step's flush is done (static: the key's presence)


@dataclasses.dataclass(frozen=True)
class KIVICodec(PackedCodec):
    key_bits: int = 2
    value_bits: int = 2
    group_size: int = 32
    residual: int = 128
    attention: str = "auto"
    sink: int = 0
    layout: str = "auto"  # the stores' layout: auto | channel_words | token_rows (see store_layout)
    columns: int = WORD_COLUMNS  # channel_words: word columns of a decode-kernel tile (a tuning knob)
    flush_per_step: bool = True  # decode: one conditional flushes all layers (see `prepare`)
    values_pass: str = "auto"  # channel_words decode: auto | wgmma | cuda (`Cw2Config.values`)

    def __post_init__(self):
        from pallas_kernels.decode_attention import VALUES_PASSES

        check_bits(self.key_bits, "key_bits")
        check_bits(self.value_bits, "value_bits")
        check_attention_mode(self.attention)
        if self.values_pass not in VALUES_PASSES:
            raise ConfigError(f"KIVI values_pass={self.values_pass!r} must be one of {VALUES_PASSES} (the decode "
                              "kernel's values pass: Hopper's tensor cores, the CUDA cores, or auto)")
        if self.layout not in ("auto", CHANNEL_WORDS, TOKEN_ROWS):
            raise ConfigError(f"KIVI layout={self.layout!r} must be auto, {CHANNEL_WORDS} or {TOKEN_ROWS}")
        g = self.group_size
        if not isinstance(g, int) or g < 16 or g % 16:
            raise ConfigError(f"KIVI group_size={g!r} must be a multiple of 16 (the decode kernel's tile)")
        if not isinstance(self.sink, int) or not 0 <= self.sink < g:
            raise ConfigError(f"KIVI sink={self.sink!r} must be an integer in [0, group_size={g}): "
                              f"the sink tokens leave the window with the first key group")
        if self.residual < g:
            raise ConfigError(f"KIVI residual={self.residual} must be at least group_size={g}: "
                              f"the window has to hold a whole group before it is flushed")
        if self.columns not in (4, 8, 16, 32, 64):
            raise ConfigError(f"KIVI columns={self.columns!r} must be 4, 8, 16, 32 or 64 (word columns a tile)")
        if self.layout == CHANNEL_WORDS and not self._channel_words_fit():
            raise ConfigError(f"KIVI layout={CHANNEL_WORDS} needs key_bits == value_bits in (2, 4, 8), group_size a "
                              f"multiple of the codes per word and tiles of columns={self.columns} words holding whole "
                              f"groups; got k{self.key_bits}v{self.value_bits} g{self.group_size}: use layout=auto")

    def decode_kernel_options(self) -> dict:
        """`values_pass` as the cw2 body's `Cw2Config(values=...)` (only where it is not auto)."""
        from pallas_kernels.decode_attention import Cw2Config

        return {} if self.values_pass == "auto" else {"cw2": Cw2Config(values=self.values_pass)}

    @property
    def name(self) -> str:
        sink = f"-s{self.sink}" if self.sink else ""
        return f"kivi-k{self.key_bits}v{self.value_bits}-g{self.group_size}-r{self.residual}{sink}"

    @property
    def rows(self) -> int:
        """token_rows: words a slot tile; channel_words: word columns a tile."""
        if self.store_layout == CHANNEL_WORDS:
            return self.columns
        return 32 if self.group_size % 32 == 0 else 16

    def _channel_words_fit(self) -> bool:
        tile = self.columns * codes_per_word(self.key_bits)  # tokens a kernel tile
        return (self.key_bits == self.value_bits and channel_words_supported(self.key_bits, self.group_size)
                and tile % self.group_size == 0)

    @property
    def store_layout(self) -> str:
        """"auto": channel_words (the CUDA-core decode body's layout) where it applies (the
        same width for keys and values, 2, 4 or 8 bits, key groups of whole words and whole
        groups a tile), else token_rows (the tensor-core body's); or the layout asked for."""
        if self.layout != "auto":
            return self.layout
        return CHANNEL_WORDS if self._channel_words_fit() else TOKEN_ROWS

    def check_head_dim(self, head_dim: int) -> None:
        g = self.group_size
        if head_dim % g:
            raise ConfigError(f"KIVI group_size={g} does not divide head_dim={head_dim}: values are "
                              f"quantized in groups of channels; pick a divisor of {head_dim}")
        if g & (g - 1):
            raise ConfigError(f"KIVI group_size={g} must be a power of 2 (value channel tiles)")

    def flushed(self, end):
        """n_q: slots [0, n_q) are quantized once `end` tokens are written."""
        g = self.group_size
        return jnp.maximum(end - self.residual, 0) // g * g

    # ---------------------------------------------------------------- state
    def window(self, max_len: int) -> int:
        """Ring slots: R + G (the most tokens the window holds, R + G - 1, plus the slot a flush
        frees), or max_len when shorter (then nothing is ever flushed)."""
        return min(self.residual + self.group_size, max_len)

    def init(self, batch, max_len, kv_heads, head_dim, dtype):
        self.check_head_dim(head_dim)
        g, rows, layout = self.group_size, self.rows, self.store_layout
        cw = layout == CHANNEL_WORDS
        tile = PASS_COLUMNS * codes_per_word(self.key_bits) if cw else None  # cw: keys and values share a width
        cap = capacity_for(max_len, (self.key_bits, self.value_bits), rows, multiple_of=g, pass_tile=tile)

        def meta(rows_, cols_):  # token_rows [.., Ts, Cs]; channel_words [.., Cs, Ts]
            return jnp.zeros((batch, kv_heads) + ((cols_, rows_) if cw else (rows_, cols_)), META_DTYPE)

        def words(bits):
            n = cap // codes_per_word(bits)
            return jnp.zeros((batch, kv_heads) + ((head_dim, n) if cw else (n, head_dim)), jnp.int32)

        k = QTokens(words(self.key_bits), meta(cap // g, head_dim), meta(cap // g, head_dim), bits=self.key_bits,
                    rows=rows, token_group=g, channel_group=1, layout=layout)
        v = QTokens(words(self.value_bits), meta(cap, head_dim // g), meta(cap, head_dim // g),
                    bits=self.value_bits, rows=rows, token_group=1, channel_group=g, layout=layout)
        window = (batch, self.window(max_len), kv_heads, head_dim)
        state = {"k": k, "v": v, "res_k": jnp.zeros(window, dtype), "res_v": jnp.zeros(window, dtype),
                 "end": jnp.zeros((), jnp.int32)}
        if self.sink:
            state.update(init_sink(batch, self.sink, kv_heads, head_dim, dtype))
        return state

    def write(self, state, k, v, index, positions=None):
        if k.shape[1] == 1:
            return self._append(state, k, v, index, positions)
        b, t, kv_heads, d = k.shape
        g = self.group_size
        res_k, res_v = state["res_k"], state["res_v"]
        win = res_k.shape[1]
        cap = state["k"].capacity
        n_old, n_new = self.flushed(index), self.flushed(index + t)
        count = index - n_old  # tokens in the window before this write

        def extend(ring, x):  # the window unrolled (token n_old first) + new tokens (+ room to slide)
            ext = jnp.zeros((b, 2 * win + t, kv_heads, d), ring.dtype)
            ext = jax.lax.dynamic_update_slice(ext, jnp.roll(ring, -(n_old % win), axis=1), (0, 0, 0, 0))
            return jax.lax.dynamic_update_slice(ext, x.astype(ring.dtype), (0, count, 0, 0))

        ext_k, ext_v = extend(res_k, k), extend(res_v, v)
        sink = write_sink(state, k, v, index, positions, self.sink) if self.sink else {}
        # At most ceil(t / g) groups leave the window; quantize that many from slot n_old (the
        # slots past n_new get provisional codes, overwritten when they are really flushed).
        flush = min(g * -(-t // g), cap // g * g, (2 * win + t) // g * g)
        kstore, vstore = state["k"], state["v"]
        if flush > 0:
            kstore, vstore = jax.lax.cond(
                n_new > n_old,
                lambda: self._flush(kstore, vstore, ext_k[:, :flush], ext_v[:, :flush], n_old,
                                    sink.get("sink_slot")),
                lambda: (kstore, vstore))

        def ring(ext):  # tokens n_new.. back at their ring slots
            window = jax.lax.dynamic_slice(ext, (0, n_new - n_old, 0, 0), (b, win, kv_heads, d))
            return jnp.roll(window, n_new % win, axis=1)

        return {"k": kstore, "v": vstore, "res_k": ring(ext_k), "res_v": ring(ext_v),
                "end": jnp.asarray(index + t, jnp.int32), **sink}

    def prepare(self, layers, index, new_tokens):
        """Decode (one token): when the step flushes a group, every layer's is flushed here under
        one conditional (the group is old tokens, never the slot this step writes), and each state
        is marked so that `_append` does not flush again."""
        if new_tokens != 1 or not self.flush_per_step or not all(self._flushes(l) for l in layers):
            return layers
        n_old = self.flushed(index)
        stores = jax.lax.cond(self._flush_due(index),
                              lambda: tuple(self._flush_ring(l, n_old) for l in layers),
                              lambda: tuple((l["k"], l["v"]) for l in layers))
        return tuple({**l, "k": k, "v": v, FLUSHED: jnp.zeros((), jnp.bool_)} for l, (k, v) in zip(layers, stores))

    def _flush_due(self, index):
        """Whether writing one token at `index` moves a group out of the window."""
        return self.flushed(index + 1) > self.flushed(index)

    def _flushes(self, state) -> bool:
        """Whether this state's ring ever flushes (a ring shorter than R + G, max_len < R + G, does not)."""
        return state["res_k"].shape[1] == self.residual + self.group_size

    def _flush_ring(self, state, n_old):
        """(keys, values) stores with the ring's oldest group (tokens n_old..n_old + G - 1) flushed."""
        win = state["res_k"].shape[1]
        group = (n_old + jnp.arange(self.group_size, dtype=jnp.int32)) % win
        return self._flush(state["k"], state["v"], jnp.take(state["res_k"], group, axis=1),
                           jnp.take(state["res_v"], group, axis=1), n_old, state.get("sink_slot"))

    def _append(self, state, k, v, index, positions=None):
        """One decode step: the token goes to its ring slot in place; every G steps the oldest
        group (never that slot: the window holds at most R + G - 1 tokens) is flushed, here or,
        when `prepare` marked the state, already."""
        res_k, res_v = state["res_k"], state["res_v"]
        win = res_k.shape[1]
        n_old = self.flushed(index)
        kstore, vstore = state["k"], state["v"]
        if FLUSHED not in state and self._flushes(state):
            # everything inside the branch: nothing of it runs on the other G - 1 steps
            kstore, vstore = jax.lax.cond(self._flush_due(index), lambda: self._flush_ring(state, n_old),
                                          lambda: (kstore, vstore))
        at = (0, index % win, 0, 0)
        res_k = jax.lax.dynamic_update_slice(res_k, k.astype(res_k.dtype), at)
        res_v = jax.lax.dynamic_update_slice(res_v, v.astype(res_v.dtype), at)
        sink = write_sink(state, k, v, index, positions, self.sink) if self.sink else {}
        return {"k": kstore, "v": vstore, "res_k": res_k, "res_v": res_v,
                "end": jnp.asarray(index + 1, jnp.int32), **sink}

    def _flush(self, kstore: QTokens, vstore: QTokens, xk, xv, start, sink_slot=None):
        """Quantizes xk, xv [B, L, K, D] (L a multiple of G) into slots [start, start + L).
        Slots in `sink_slot` [B, S] (kept exact elsewhere) do not widen their key group's range."""
        b, n, kv_heads, d = xk.shape
        g = self.group_size
        keys = xk.transpose(0, 2, 1, 3).astype(jnp.float32).reshape(b, kv_heads, n // g, g, d)
        if sink_slot is not None:
            slots = start + jnp.arange(n, dtype=jnp.int32)
            is_sink = jnp.any(slots[None, :, None] == sink_slot[:, None, :], axis=-1)  # [B, L]
            is_sink = is_sink.reshape(b, 1, n // g, g, 1)
            # Any in-range value leaves min and max alone: the group's smallest non-sink key.
            fill = jnp.min(jnp.where(is_sink, jnp.inf, keys), axis=3, keepdims=True)
            keys = jnp.where(is_sink, fill, keys)
        ks, kz = minmax_scale_zero(keys, (3,), self.key_bits, False)  # per channel, per token group
        kcodes = uniform_codes(keys, ks, kz, self.key_bits).reshape(b, kv_heads, n, d)
        vals = xv.transpose(0, 2, 1, 3).astype(jnp.float32).reshape(b, kv_heads, n, d // g, g)
        vs, vz = minmax_scale_zero(vals, (4,), self.value_bits, False)  # per token, per channel group
        vcodes = uniform_codes(vals, vs, vz, self.value_bits).reshape(b, kv_heads, n, d)
        kstore = kstore.with_codes(kcodes, start).with_meta(start // g, scale=ks[:, :, :, 0], zero=kz[:, :, :, 0])
        vstore = vstore.with_codes(vcodes, start).with_meta(start, scale=vs[..., 0], zero=vz[..., 0])
        return kstore, vstore

    def quantized_length(self, state):
        return self.flushed(state["end"])

    def exact_below_quantized_length(self) -> bool:
        return bool(self.sink)  # the window is slots [n_q, end); only a flushed sink is below

    def exact_tokens(self, state):
        end = state["end"]
        n_q = self.flushed(end)
        b, win = state["res_k"].shape[:2]
        slot = n_q + (jnp.arange(win, dtype=jnp.int32) - n_q) % win  # the token at each ring slot
        slots = jnp.broadcast_to(jnp.where(slot < end, slot, -1), (b, win))
        if not self.sink:
            return state["res_k"], state["res_v"], slots
        # A sink token still in the window is listed there; once flushed, from the sink.
        sink_slots = jnp.where((state["sink_slot"] >= 0) & (state["sink_slot"] < n_q), state["sink_slot"], -1)
        return (jnp.concatenate([state["res_k"], state["sink_k"]], axis=1),
                jnp.concatenate([state["res_v"], state["sink_v"]], axis=1),
                jnp.concatenate([slots, sink_slots], axis=1))

    # ---------------------------------------------------------------- accounting
    def bytes_per_token(self, kv_heads, head_dim, dtype=None):
        """Per token per layer once the context is long: packed codes plus fp16 scales and
        zeros (keys: per channel per G tokens; values: per G channels per token). The residual
        window is a fixed cost per layer, in `cache_nbytes`."""
        g = self.group_size
        keys = kv_heads * head_dim * (4 / codes_per_word(self.key_bits) + 4 / g)
        values = kv_heads * head_dim * 4 / codes_per_word(self.value_bits) + kv_heads * (head_dim // g) * 4
        return keys + values
