"""KVQuant (Hooper et al., 2024): pre-RoPE per-channel keys, sensitivity-weighted non-uniform
datatypes, dense-and-sparse outliers and an exact attention sink.

* Keys are stored *before* RoPE (RoPE mixes channel pairs with position-dependent angles, which
  smears the per-channel outlier structure); the attention rotates them after dequantization.
  Each key channel is normalized by a range fitted offline on calibration keys,
  x_n = (x - mid_c) / half_c, so keys carry no per-token metadata.
* Values are normalized per token (mid and half of the inliers, fp16, computed online).
* The normalized values are rounded to a per-layer non-uniform datatype: 2**bits levels in
  [-1, 1] found by k-means on calibration activations weighted by their Fisher information
  (the squared gradient of the loss), separately for keys and values.
* Dense-and-sparse: entries outside the calibrated key range, and the largest-magnitude value
  entries, are kept exactly as sparse (channel, value) pairs. The sparse part has a fixed budget
  of N = ceil(outlier_fraction * head_dim) pairs per token and head, so it packs densely; the
  calibrated key thresholds leave about `outlier_fraction` of the entries outside, and a key
  vector with more than N is clipped past the N largest.
* The first `sink` tokens of each sequence (positions 0..sink-1) are kept in full precision.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.kv.base import PackedCodec, check_attention_mode, init_sink, write_sink
from jaxcompress.kv.calibration import KVCalibration, weighted_kmeans_1d
from jaxcompress.kv.store import (META_DTYPE, NO_OUTLIER, QTokens, capacity_for, check_bits,
                                  codes_per_word, nearest_codes, write_codes)

TINY_HALF = 6.1e-5  # smallest normal fp16: the half-range of a constant vector


def num_outliers(fraction: float, head_dim: int) -> int:
    return 0 if fraction <= 0 else math.ceil(fraction * head_dim)


@dataclasses.dataclass(frozen=True)
class KVQuantCodec(PackedCodec):
    key_bits: int = 3
    value_bits: int = 3
    outlier_fraction: float = 0.01
    sink: int = 1
    calibration: KVCalibration | None = None
    attention: str = "auto"

    pre_rope = True  # class attribute (not a field): keys reach the codec before RoPE

    def __post_init__(self):
        check_bits(self.key_bits, "key_bits")
        check_bits(self.value_bits, "value_bits")
        check_attention_mode(self.attention)
        if not 0 <= self.outlier_fraction < 0.5:
            raise ConfigError(f"outlier_fraction={self.outlier_fraction} must be in [0, 0.5)")
        if self.sink < 0:
            raise ConfigError(f"sink={self.sink} must be >= 0")

    @property
    def name(self) -> str:
        return f"kvquant-k{self.key_bits}v{self.value_bits}-o{self.outlier_fraction:g}-s{self.sink}"

    def _calibrated(self) -> KVCalibration:
        cal = self.calibration
        if cal is None:
            raise ConfigError("KVQuant needs calibration (per-channel key ranges and datatypes): build "
                              "the codec with jaxcompress.kv.calibrate_kvquant(...) or a kv_cache recipe")
        for name, bits in (("k_codebook", self.key_bits), ("v_codebook", self.value_bits)):
            levels = cal.arrays[name].shape[-1] if name in cal.arrays else None
            if levels != 2 ** bits:
                raise ConfigError(f"the KVQuant calibration has {levels} {name} levels, the codec asks "
                                  f"for {bits} bits ({2 ** bits}); calibrate again for these bits")
        return cal

    # ---------------------------------------------------------------- state
    def init(self, batch, max_len, kv_heads, head_dim, dtype):
        return self.init_layer(0, batch, max_len, kv_heads, head_dim, dtype)

    def init_layer(self, layer, batch, max_len, kv_heads, head_dim, dtype):
        if head_dim >= NO_OUTLIER:
            raise ConfigError(f"KVQuant outlier indices are uint8: head_dim={head_dim} must be < {NO_OUTLIER}")
        cal = self._calibrated()
        rows = self.rows
        cap = capacity_for(max_len, (self.key_bits, self.value_bits), rows)
        n = num_outliers(self.outlier_fraction, head_dim)

        def outliers():
            if n == 0:
                return None, None
            return (jnp.full((batch, kv_heads, cap, n), NO_OUTLIER, jnp.uint8),
                    jnp.zeros((batch, kv_heads, cap, n), dtype))

        def words(bits):
            return jnp.zeros((batch, kv_heads, cap // codes_per_word(bits), head_dim), jnp.int32)

        per_channel = lambda name: cal.layer(layer, name).reshape(1, kv_heads, 1, head_dim).astype(jnp.float32)  # noqa: E731
        k = QTokens(words(self.key_bits), per_channel("k_half"), per_channel("k_mid"),
                    cal.layer(layer, "k_codebook").astype(jnp.float32), *outliers(),
                    bits=self.key_bits, rows=rows, token_group=0, channel_group=1)
        meta = (batch, kv_heads, cap, 1)
        v = QTokens(words(self.value_bits), jnp.zeros(meta, META_DTYPE), jnp.zeros(meta, META_DTYPE),
                    cal.layer(layer, "v_codebook").astype(jnp.float32),
                    *outliers(), bits=self.value_bits, rows=rows, token_group=1, channel_group=head_dim)
        state = {"k": k, "v": v, "end": jnp.zeros((), jnp.int32)}
        if self.sink:
            state.update(init_sink(batch, self.sink, kv_heads, head_dim, dtype))
        return state

    def write(self, state, k, v, index, positions=None):
        b, t, kv_heads, d = k.shape
        kstore, vstore = state["k"], state["v"]
        n = kstore.num_outliers
        start = (0, 0, index, 0)
        new = dict(state)

        # Keys: static per-channel normalization; entries outside [-1, 1] are outliers.
        keys = k.transpose(0, 2, 1, 3)  # [B, K, T, D], cache dtype (outliers stored exactly)
        kn = (keys.astype(jnp.float32) - kstore.zero) / kstore.scale
        updates = {"codes": write_codes(kstore.codes, nearest_codes(jnp.clip(kn, -1, 1), kstore.codebook),
                                        index, kstore.bits, kstore.rows)}
        if n:
            mag, idx = jax.lax.top_k(jnp.abs(kn), n)
            idx = jnp.where(mag > 1, idx, NO_OUTLIER)
            updates.update(self._outlier_updates(kstore, keys, idx, start))
        new["k"] = dataclasses.replace(kstore, **updates)

        # Values: per-token normalization over the inliers (the n largest |v| are outliers).
        vals = v.transpose(0, 2, 1, 3)
        vf = vals.astype(jnp.float32)
        inlier = jnp.ones(vf.shape, bool)
        if n:
            _, vidx = jax.lax.top_k(jnp.abs(vf), n)
            inlier = ~jnp.any(jnp.arange(d) == vidx[..., None], axis=-2)
        lo = jnp.min(jnp.where(inlier, vf, jnp.inf), axis=-1, keepdims=True)
        hi = jnp.max(jnp.where(inlier, vf, -jnp.inf), axis=-1, keepdims=True)
        mid = ((hi + lo) / 2).astype(META_DTYPE)
        half = ((hi - lo) / 2).astype(META_DTYPE)
        half = jnp.where(half > 0, half, jnp.asarray(TINY_HALF, META_DTYPE))
        vn = (vf - mid.astype(jnp.float32)) / half.astype(jnp.float32)
        updates = {"codes": write_codes(vstore.codes, nearest_codes(jnp.clip(vn, -1, 1), vstore.codebook),
                                        index, vstore.bits, vstore.rows),
                   "scale": jax.lax.dynamic_update_slice(vstore.scale, half, start),
                   "zero": jax.lax.dynamic_update_slice(vstore.zero, mid, start)}
        if n:
            updates.update(self._outlier_updates(vstore, vals, vidx, start))
        new["v"] = dataclasses.replace(vstore, **updates)

        if self.sink:
            new.update(write_sink(state, k, v, index, positions, self.sink))
        new["end"] = jnp.asarray(index + t, jnp.int32)
        return new

    @staticmethod
    def _outlier_updates(store: QTokens, x, idx, start) -> dict:
        """Exact values of x [B, K, T, D] at channels idx [B, K, T, N] (NO_OUTLIER = none)."""
        value = jnp.take_along_axis(x, jnp.minimum(idx, x.shape[-1] - 1), axis=-1)
        value = jnp.where(idx < NO_OUTLIER, value, jnp.zeros_like(value)).astype(store.outlier_value.dtype)
        return {"outlier_index": jax.lax.dynamic_update_slice(store.outlier_index, idx.astype(jnp.uint8), start),
                "outlier_value": jax.lax.dynamic_update_slice(store.outlier_value, value, start)}

    def quantized_length(self, state):
        return state["end"]

    def exact_tokens(self, state):
        if not self.sink:
            return None
        return state["sink_k"], state["sink_v"], state["sink_slot"]

    # ---------------------------------------------------------------- accounting
    def bytes_per_token(self, kv_heads, head_dim, dtype=jnp.bfloat16):
        """Per token per layer: packed codes, the values' fp16 mid and half, and N (uint8
        channel, exact value) pairs per head for keys and values. The sink tokens and the
        calibrated per-channel ranges are fixed costs per layer (in `cache_nbytes`)."""
        n = num_outliers(self.outlier_fraction, head_dim)
        outlier = n * (1 + jnp.dtype(dtype).itemsize)
        keys = kv_heads * (head_dim * 4 / codes_per_word(self.key_bits) + outlier)
        values = kv_heads * (head_dim * 4 / codes_per_word(self.value_bits) + 4 + outlier)
        return keys + values


def fit_kvquant(layers: list[dict], key_bits: int, value_bits: int, outlier_fraction: float,
                kmeans_iters: int = 40, seed: int = 0, sink: int = 0) -> KVCalibration:
    """Per-layer KVQuant calibration from `collect_kv(..., pre_rope=True, fisher=True)`.

    Keys: per (head, channel) range [q(f/2), q(1 - f/2)] of the calibration keys (f the
    outlier fraction), and a datatype fitted on the in-range normalized keys weighted by their
    Fisher information. Values: normalized per token after removing the N largest-magnitude
    entries (as the codec does online), then the same weighted k-means.

    `sink`: calibration rows at window positions < sink (`layer["position"]`) are left out of
    every fit, as in the paper: the codec keeps those tokens exact, and the first token of a
    window (the attention sink) is atypical and can carry most of a layer's Fisher mass.
    """
    if sink < 0:
        raise ConfigError(f"sink={sink} must be >= 0")
    out = {name: [] for name in ("k_mid", "k_half", "k_codebook", "v_codebook")}
    for i, layer in enumerate(layers):
        if sink:
            if "position" not in layer:
                raise ConfigError("fit_kvquant(sink=...) needs each layer's `position` rows (collect_kv gives them)")
            keep = np.asarray(layer["position"]) >= sink
            if not keep.any():
                raise ConfigError(f"every calibration row is at a position < sink={sink}: nothing to fit on")
            layer = {name: np.asarray(x)[keep] for name, x in layer.items()}
        k, kf = layer["k"].astype(np.float64), layer["k_fisher"]
        frac = max(outlier_fraction, 1e-6)
        lo, hi = np.quantile(k, frac / 2, axis=0), np.quantile(k, 1 - frac / 2, axis=0)  # [K, D]
        mid, half = (hi + lo) / 2, np.maximum((hi - lo) / 2, TINY_HALF)
        kn = (k - mid) / half
        inside = np.abs(kn) <= 1
        out["k_mid"].append(mid.astype(np.float32))
        out["k_half"].append(half.astype(np.float32))
        out["k_codebook"].append(weighted_kmeans_1d(kn[inside], kf[inside], 2 ** key_bits,
                                                    kmeans_iters, seed=seed + i))

        v, vf = layer["v"].astype(np.float64), layer["v_fisher"]
        n = num_outliers(outlier_fraction, v.shape[-1])
        inlier = np.ones(v.shape, bool)
        if n:
            top = np.argsort(-np.abs(v), axis=-1)[..., :n]
            np.put_along_axis(inlier, top, False, axis=-1)
        vlo = np.where(inlier, v, np.inf).min(-1, keepdims=True)
        vhi = np.where(inlier, v, -np.inf).max(-1, keepdims=True)
        vmid = ((vhi + vlo) / 2).astype(np.float16).astype(np.float64)
        vhalf = np.maximum(((vhi - vlo) / 2).astype(np.float16).astype(np.float64), TINY_HALF)
        vn = (v - vmid) / vhalf
        out["v_codebook"].append(weighted_kmeans_1d(vn[inlier], vf[inlier], 2 ** value_bits,
                                                    kmeans_iters, seed=seed + 1000 + i))
    return KVCalibration({name: np.stack(arrs).astype(np.float32) for name, arrs in out.items()})
