"""Weighted 1-D k-means, row by row: the non-uniform datatypes of SqueezeLLM (one codebook per
output channel) and KVQuant (one per layer for keys and for values).

Each row's centroids minimise sum_k w_k (x_k - c(x_k))^2. Initial centroids come from greedy
k-means++ with sample weights (what sklearn's `KMeans(init="k-means++")` does, which the
SqueezeLLM and KVQuant reference code call): each new centre is the best, by the weighted
potential, of 2 + ln(C) candidates drawn with probability proportional to w * D^2. Then
Lloyd's algorithm. In one dimension the nearest centroid is found by comparing with the
midpoints of the sorted centroids, so all rows are clustered at once, with O(R * K) memory.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

INITS = ("kmeans++", "quantile")


def assign(values: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the nearest centroid, values [R, K], sorted centroids [R, C] -> codes [R, K]."""
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return jax.vmap(lambda m, v: jnp.searchsorted(m, v, side="left"))(mids, values).astype(jnp.int32)


def quantile_init(values: jax.Array, weights: jax.Array, clusters: int) -> jax.Array:
    """Initial centroids [R, C]: the weighted (j + 1/2) / C quantiles of each row."""
    order = jnp.argsort(values, axis=1)
    v = jnp.take_along_axis(values, order, axis=1)
    cw = jnp.cumsum(jnp.take_along_axis(weights, order, axis=1), axis=1)
    cw = cw / cw[:, -1:]
    targets = (jnp.arange(clusters, dtype=jnp.float32) + 0.5) / clusters
    idx = jax.vmap(lambda c: jnp.searchsorted(c, targets, side="left"))(cw)
    return jnp.take_along_axis(v, jnp.minimum(idx, values.shape[1] - 1), axis=1)


def kmeanspp_init(key: jax.Array, values: jax.Array, weights: jax.Array, clusters: int) -> jax.Array:
    """Initial centroids [R, C] (sorted) by greedy weighted k-means++, one key per row.

    A quantile init puts several centroids on the few weights that hold most of a row's weight
    (SqueezeLLM's Fisher is that concentrated) and Lloyd cannot separate them again; k-means++
    gives such weights centres of their own."""
    trials = 2 + int(math.log(clusters))
    k = values.shape[1]

    def row(key, v, w):
        key, first_key = jax.random.split(key)
        first = jax.random.choice(first_key, k, p=w / w.sum())
        d2 = (v - v[first]) ** 2
        centers = jnp.zeros(clusters, v.dtype).at[0].set(v[first])

        def add_center(i, carry):
            key, centers, d2 = carry
            key, draw = jax.random.split(key)
            p = w * d2
            total = p.sum()  # 0 once every point sits on a centre: repeat one (Lloyd keeps it)
            p = jnp.where(total > 0, p / jnp.where(total > 0, total, 1.0), w / w.sum())
            cand = jax.random.choice(draw, k, shape=(trials,), p=p)
            new_d2 = jnp.minimum(d2[None, :], (v[None, :] - v[cand][:, None]) ** 2)
            best = jnp.argmin((w[None, :] * new_d2).sum(axis=1))
            return key, centers.at[i].set(v[cand[best]]), new_d2[best]

        _, centers, _ = jax.lax.fori_loop(1, clusters, add_center, (key, centers, d2))
        return jnp.sort(centers)

    return jax.vmap(row)(jax.random.split(key, values.shape[0]), values, weights)


@functools.partial(jax.jit, static_argnames=("clusters", "iters", "init"))
def weighted_kmeans_1d(values: jax.Array, weights: jax.Array, clusters: int, iters: int,
                       init: str = "kmeans++", seed: int = 0):
    """Weighted 1-D k-means of each row: values, weights [R, K] -> (centroids [R, C] sorted, codes [R, K]).

    A row whose weights are all zero is clustered with equal weights; a cluster that loses
    all its points keeps its centroid. `init`: "kmeans++" (the reference's) or "quantile"."""
    if init not in INITS:
        raise ValueError(f"init={init!r}: choose one of {INITS}")
    values = values.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    weights = weights / jnp.maximum(weights.max(axis=1, keepdims=True), 1e-38)  # scale-free, no underflow
    weights = jnp.where(weights.sum(axis=1, keepdims=True) > 0, weights, 1.0)
    r = values.shape[0]
    segments = jnp.arange(r, dtype=jnp.int32)[:, None] * clusters

    def step(_, c):
        codes = assign(values, c) + segments
        total = jax.ops.segment_sum(weights.reshape(-1), codes.reshape(-1), r * clusters).reshape(r, clusters)
        moment = jax.ops.segment_sum((weights * values).reshape(-1), codes.reshape(-1),
                                     r * clusters).reshape(r, clusters)
        c = jnp.where(total > 0, moment / jnp.where(total > 0, total, 1.0), c)
        return jnp.sort(c, axis=1)

    start = (kmeanspp_init(jax.random.key(seed), values, weights, clusters) if init == "kmeans++"
             else quantile_init(values, weights, clusters))
    c = jax.lax.fori_loop(0, iters, step, start)
    return c, assign(values, c)
