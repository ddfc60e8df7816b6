"""Plain integer-grid KV caches: the baselines of the E4 grid.

Keys and values are rounded to a uniform b-bit grid (b in 2, 3, 4, 8; keys and values may
differ), symmetric or asymmetric, with one scale (and zero) per

* `head`: token and kv head (the D channels of one head vector),
* `token`: token (all heads' channels together),
* `tensor`: layer, fixed in advance from calibration activations (a dynamic per-tensor scale
  would have to re-quantize old tokens whenever a new one widens the range).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.kv.base import PackedCodec, check_attention_mode
from jaxcompress.kv.calibration import KVCalibration
from jaxcompress.kv.store import (META_DTYPE, QTokens, capacity_for, check_bits, codes_per_word,
                                  minmax_scale_zero, uniform_codes, write_codes)

GRANULARITIES = ("head", "token", "tensor")


@dataclasses.dataclass(frozen=True)
class UniformCodec(PackedCodec):
    key_bits: int = 8
    value_bits: int = 8
    symmetric: bool = False
    granularity: str = "head"
    calibration: KVCalibration | None = None  # granularity "tensor": fitted per-layer scales
    attention: str = "auto"

    def __post_init__(self):
        check_bits(self.key_bits, "key_bits")
        check_bits(self.value_bits, "value_bits")
        check_attention_mode(self.attention)
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity={self.granularity!r} is not supported; choose one of {GRANULARITIES}")

    @property
    def name(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"int-k{self.key_bits}v{self.value_bits}-{kind}-per-{self.granularity}"

    # ---------------------------------------------------------------- state
    def init(self, batch, max_len, kv_heads, head_dim, dtype):
        return self.init_layer(0, batch, max_len, kv_heads, head_dim, dtype)

    def init_layer(self, layer, batch, max_len, kv_heads, head_dim, dtype):
        cap = capacity_for(max_len, (self.key_bits, self.value_bits), self.rows)
        return {"k": self._empty(layer, "k", self.key_bits, batch, cap, kv_heads, head_dim),
                "v": self._empty(layer, "v", self.value_bits, batch, cap, kv_heads, head_dim),
                "end": jnp.zeros((), jnp.int32)}

    def _empty(self, layer, name, bits, batch, cap, kv_heads, head_dim) -> QTokens:
        words = jnp.zeros((batch, kv_heads, cap // codes_per_word(bits), head_dim), jnp.int32)
        if self.granularity == "tensor":
            if self.calibration is None:
                raise ConfigError("granularity 'tensor' needs calibrated scales: build the codec with "
                                  "jaxcompress.kv.calibrate_uniform(...) or through a kv_cache recipe")
            scale = self.calibration.layer(layer, f"{name}_scale").reshape(1, 1, 1, 1).astype(META_DTYPE)
            zero = (None if self.symmetric else
                    self.calibration.layer(layer, f"{name}_zero").reshape(1, 1, 1, 1).astype(META_DTYPE))
            return QTokens(words, scale, zero, bits=bits, rows=self.rows, token_group=0, channel_group=head_dim)
        shape = (batch, kv_heads if self.granularity == "head" else 1, cap, 1)
        scale = jnp.zeros(shape, META_DTYPE)
        zero = None if self.symmetric else jnp.zeros(shape, META_DTYPE)
        return QTokens(words, scale, zero, bits=bits, rows=self.rows, token_group=1, channel_group=head_dim)

    def write(self, state, k, v, index, positions=None):
        new = dict(state)
        for name, x in (("k", k), ("v", v)):
            store = state[name]
            xs = x.transpose(0, 2, 1, 3).astype(jnp.float32)  # [B, K, T, D]
            if self.granularity == "tensor":
                scale, zero = store.scale, store.zero
            else:
                axes = (3,) if self.granularity == "head" else (1, 3)
                scale, zero = minmax_scale_zero(xs, axes, store.bits, self.symmetric)
            updates = {"codes": write_codes(store.codes, uniform_codes(xs, scale, zero, store.bits), index,
                                            store.bits, store.rows)}
            if self.granularity != "tensor":
                start = (0, 0, index, 0)
                updates["scale"] = jax.lax.dynamic_update_slice(store.scale, scale, start)
                if zero is not None:
                    updates["zero"] = jax.lax.dynamic_update_slice(store.zero, zero, start)
            new[name] = dataclasses.replace(store, **updates)
        new["end"] = jnp.asarray(index + k.shape[1], jnp.int32)
        return new

    def quantized_length(self, state):
        return state["end"]

    # ---------------------------------------------------------------- accounting
    def bytes_per_token(self, kv_heads, head_dim, dtype=None):
        """Per token per layer, keys and values: packed codes plus fp16 scales (and zeros)."""
        meta = 0 if self.granularity == "tensor" else (2 if self.symmetric else 4)
        heads = kv_heads if self.granularity == "head" else 1
        total = 0.0
        for bits in (self.key_bits, self.value_bits):
            total += kv_heads * head_dim * 4 / codes_per_word(bits) + heads * meta
        return total


def fit_uniform_tensor(layers: list[dict], key_bits: int, value_bits: int, symmetric: bool) -> KVCalibration:
    """Per-layer static scales (and zeros) from calibration keys and values (`collect_kv`
    output, keys after RoPE): the min/max (absmax) grid over every calibration activation."""
    out = {name: [] for name in ("k_scale", "k_zero", "v_scale", "v_zero")}
    for layer in layers:
        for name, bits in (("k", key_bits), ("v", value_bits)):
            x = layer[name]
            if symmetric:
                scale, zero = np.abs(x).max() / (2 ** (bits - 1) - 1), 0.0
            else:
                lo, hi = float(x.min()), float(x.max())
                scale, zero = (hi - lo) / (2 ** bits - 1), lo
            out[f"{name}_scale"].append(max(scale, 1e-6))
            out[f"{name}_zero"].append(zero)
    return KVCalibration({k: np.asarray(v, np.float32) for k, v in out.items()})
