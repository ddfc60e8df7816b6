"""SqueezeLLM (Kim et al., 2024): sensitivity-weighted non-uniform quantization.

For each output channel n of a kernel W [K, N], the 2**bits values of its codebook are the
centroids of a 1-D k-means over the channel's K weights, each weight counted with its
Fisher information F = sum_s (dL_s/dW)^2 (squared gradients of the LM loss on calibration
sequences, `calibrate.fisher_diagonal`): the centroids minimise sum_k F_k (w_k - c(w_k))^2,
a second-order estimate of the loss increase.

Dense-and-sparse: a fraction of the weights (largest |w|, `outlier_fraction`, and largest F,
`sensitive_fraction`) are kept exactly as sparse outliers; the k-means ignores them, and exact
zeros (as the reference does).

The k-means (`quant/kmeans.py`) is the reference's: weighted k-means++ initial centroids, then
Lloyd's algorithm (`kmeans_iters` iterations, as the reference's sklearn max_iter), every output
channel at once. `kmeans_init: quantile` gives the weighted-quantile start this module used
before (k-means++ reaches a 3.4x lower Fisher-weighted error on SmolLM2:
docs/results/quant_squeezellm_notes.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.errors import UserError
from jaxcompress.quant.config import LayerConfig
from jaxcompress.quant.kmeans import assign, weighted_kmeans_1d
from jaxcompress.quant.qarray import QArray
from jaxcompress.quant.tree import map_params


def _top_mask(score: jax.Array, count: int) -> jax.Array:
    """Boolean mask of the `count` largest entries of score."""
    mask = jnp.zeros(score.size, bool)
    if count == 0:
        return mask.reshape(score.shape)
    _, idx = jax.lax.top_k(score.reshape(-1), count)
    return mask.at[idx].set(True).reshape(score.shape)


@functools.partial(jax.jit, static_argnames=("bits", "iters", "init", "outliers", "sensitive", "codebook_dtype"))
def _squeeze(w, fisher, *, bits: int, iters: int, init: str, outliers: int, sensitive: int, codebook_dtype: str):
    """(codes [K, N], codebook [N, 2**bits], outlier mask [K, N]) of w [K, N]."""
    wf = w.astype(jnp.float32)
    mask = _top_mask(jnp.abs(wf), outliers) | _top_mask(fisher.astype(jnp.float32), sensitive)
    # Exact zeros get no weight either, as in the reference (nuq.py: sample_weight of w == 0 is 0);
    # they still take their nearest centroid.
    weight = jnp.where(mask | (wf == 0), 0.0, fisher.astype(jnp.float32))
    centroids, _ = weighted_kmeans_1d(wf.T, weight.T, 2 ** bits, iters, init=init)
    # The stored codebook is rounded to its dtype: choose codes against what is stored.
    codebook = jnp.sort(centroids.astype(codebook_dtype), axis=1)
    return assign(wf.T, codebook.astype(jnp.float32)).T, codebook, mask


def squeezellm_quantize(w: jax.Array, fisher: jax.Array, cfg: LayerConfig, where: str = "") -> QArray:
    """Fisher-weighted k-means codebooks per output channel for w [K, N] (+ exact outliers)."""
    k, n = w.shape
    cfg.group_for(k, where)  # validates bits
    if fisher.shape != w.shape:
        raise UserError(f"{where}: Fisher diagonal has shape {fisher.shape}, expected {w.shape}")
    opts = cfg.squeezellm
    codes, codebook, mask = _squeeze(w, fisher, bits=cfg.bits, iters=opts.kmeans_iters, init=opts.kmeans_init,
                                     outliers=round(opts.outlier_fraction * w.size),
                                     sensitive=round(opts.sensitive_fraction * w.size),
                                     codebook_dtype=cfg.scale_dtype)
    index = value = None
    if opts.outlier_fraction or opts.sensitive_fraction:
        flat = np.flatnonzero(np.asarray(mask))  # the two selections may overlap: a data-dependent size
        index = jnp.asarray(flat, jnp.int32)
        value = jnp.asarray(np.asarray(w).reshape(-1)[flat])  # exactly the original values and dtype
    return QArray.from_codes(codes, None, None, bits=cfg.bits, group_size=k, dtype=w.dtype, codebook=codebook,
                             outlier_index=index, outlier_value=value)


def squeezellm_params(state: nnx.State, fisher: dict[str, jax.Array], policy: dict[str, LayerConfig]) -> nnx.State:
    """The pure transform: every leaf in `policy` replaced by its SqueezeLLM QArray."""
    missing = [p for p in policy if p not in fisher]
    if missing:
        raise UserError(f"{missing[0]}: no Fisher diagonal for this weight")
    return map_params(state, {p: (lambda path, w, c=cfg: squeezellm_quantize(w, fisher[path], c, path))
                              for p, cfg in policy.items()})
