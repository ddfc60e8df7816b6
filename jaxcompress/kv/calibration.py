"""Calibration of KV codecs: activations (and their sensitivities) collected by running the
model, and the hashable container that carries fitted per-layer arrays inside a codec.

Keys and values are collected through a tap codec: it stores what the attention layer writes
(keys before RoPE when asked) plus an additive zero perturbation, so one backward pass gives
dLoss/dk and dLoss/dv at every cached activation: their squares are the diagonal Fisher
information KVQuant weights its non-uniform datatypes with.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.errors import ConfigError, UserError
from jaxcompress.models.cache import KVCache, KVCodec
from jaxcompress.quant.kmeans import weighted_kmeans_1d as kmeans_rows


@dataclasses.dataclass(frozen=True, eq=False)
class KVCalibration:
    """Fitted arrays, each [num_layers, ...], named; equal and hashed by content, so a codec
    holding one can be static under `jax.jit`."""

    arrays: Mapping[str, np.ndarray]
    digest: str = dataclasses.field(init=False, default="")

    def __post_init__(self):
        arrays = {k: np.ascontiguousarray(v) for k, v in sorted(self.arrays.items())}
        object.__setattr__(self, "arrays", arrays)
        h = hashlib.sha256()
        for name, a in arrays.items():
            h.update(f"{name}:{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
        object.__setattr__(self, "digest", h.hexdigest()[:16])

    def __hash__(self):
        return hash(self.digest)

    def __eq__(self, other):
        return isinstance(other, KVCalibration) and other.digest == self.digest

    def __repr__(self):
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self.arrays.items())
        return f"KVCalibration({shapes}, digest={self.digest})"

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.arrays.values())))

    def layer(self, i: int, name: str) -> jax.Array:
        if name not in self.arrays:
            raise ConfigError(f"KV calibration has no array {name!r} (it holds {sorted(self.arrays)}); "
                              f"it was fitted for another codec")
        if not 0 <= i < self.num_layers:
            raise ConfigError(f"KV calibration covers {self.num_layers} layers, the model asked for layer {i}")
        return jnp.asarray(self.arrays[name][i])

    def save(self, path: str) -> None:
        np.savez(path, **self.arrays)

    @classmethod
    def load(cls, path: str) -> "KVCalibration":
        with np.load(path) as f:
            return cls({k: f[k] for k in f.files})


@dataclasses.dataclass(frozen=True)
class _TapCodec(KVCodec):
    """Stores k + dk and v + dv in fp32; dk, dv are zeros the caller differentiates against."""

    pre_rope: bool = False

    def init(self, batch, max_len, kv_heads, head_dim, dtype):
        z = jnp.zeros((batch, max_len, kv_heads, head_dim), jnp.float32)
        return {"k": z, "v": z, "dk": z, "dv": z}

    def write(self, state, k, v, index, positions=None):
        start = (0, index, 0, 0)
        dk = jax.lax.dynamic_slice(state["dk"], start, k.shape)
        dv = jax.lax.dynamic_slice(state["dv"], start, v.shape)
        return {"k": jax.lax.dynamic_update_slice(state["k"], k.astype(jnp.float32) + dk, start),
                "v": jax.lax.dynamic_update_slice(state["v"], v.astype(jnp.float32) + dv, start),
                "dk": state["dk"], "dv": state["dv"]}

    def read(self, state):
        return state["k"], state["v"]


def calibration_tokens(loaded, num_samples: int, seqlen: int, data_dir: str | None = None,
                       seed: int = 0) -> np.ndarray:
    """[num_samples, seqlen] windows drawn (seeded) from the WikiText-2 training subset."""
    from jaxcompress.eval.perplexity import tokenize, wikitext2_text

    tokens = tokenize(loaded.tokenizer, wikitext2_text("train", data_dir))
    if len(tokens) < seqlen + 1:
        raise UserError(f"calibration text has {len(tokens)} tokens, fewer than seqlen={seqlen}")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seqlen, size=num_samples)
    return np.stack([tokens[s:s + seqlen] for s in starts]).astype(np.int32)


def collect_kv(model, tokens: np.ndarray, *, pre_rope: bool, fisher: bool = True) -> list[dict]:
    """Per layer: keys and values [N, K, D] (N = every calibration token) as the cache would
    receive them (keys before RoPE when `pre_rope`), `position` [N] (int32: each row's position
    in its window, so a fit can skip tokens a codec keeps exact) and with `fisher` their squared
    loss gradients `k_fisher`, `v_fisher` (same shapes as the keys), all numpy."""
    cfg = model.config
    tap = _TapCodec(pre_rope=pre_rope)
    graphdef, state = nnx.split(model)
    b, t = tokens.shape

    def loss(deltas, state, toks):
        m = nnx.merge(graphdef, state)
        cache = KVCache.create(cfg, b, t, jnp.float32, tap)
        layers = tuple({**layer, "dk": dk, "dv": dv} for layer, (dk, dv) in zip(cache.layers, deltas))
        cache = dataclasses.replace(cache, layers=layers)
        logits, cache = m(toks, None, cache)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))
        return nll, tuple((layer["k"], layer["v"]) for layer in cache.layers)

    zeros = tuple((jnp.zeros((b, t, cfg.num_kv_heads, cfg.head_dim), jnp.float32),) * 2
                  for _ in range(cfg.num_layers))
    if fisher:
        grads, kv = jax.jit(jax.grad(loss, has_aux=True))(zeros, state, jnp.asarray(tokens))
    else:
        _, kv = jax.jit(loss)(zeros, state, jnp.asarray(tokens))
        grads = None
    out = []
    for i, (k, v) in enumerate(kv):
        flat = lambda x: np.asarray(x, np.float32).reshape(b * t, cfg.num_kv_heads, cfg.head_dim)  # noqa: E731
        layer = {"k": flat(k), "v": flat(v), "position": np.tile(np.arange(t, dtype=np.int32), b)}
        if fisher:
            layer["k_fisher"] = flat(grads[i][0]) ** 2
            layer["v_fisher"] = flat(grads[i][1]) ** 2
        out.append(layer)
    return out


def weighted_kmeans_1d(x: np.ndarray, w: np.ndarray, levels: int, iters: int = 40,
                       max_points: int = 400_000, seed: int = 0) -> np.ndarray:
    """Sorted centroids [levels] minimizing sum w * (x - c(x))^2 over all points of x: the shared
    weighted k-means (`quant.kmeans`: k-means++ start, then Lloyd) on at most `max_points` of
    them, drawn with `seed`."""
    x = np.asarray(x, np.float64).ravel()
    w = np.asarray(w, np.float64).ravel()
    if x.size > max_points:
        pick = np.random.default_rng(seed).choice(x.size, max_points, replace=False)
        x, w = x[pick], w[pick]
    w = w + 1e-12 * (w.mean() + 1e-30)  # zero-gradient points still count a little
    centroids, _ = kmeans_rows(jnp.asarray(x[None], jnp.float32), jnp.asarray(w[None] / w.max(), jnp.float32),
                               levels, iters, seed=seed)
    return np.sort(np.asarray(centroids[0], np.float64))
