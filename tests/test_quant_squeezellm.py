"""SqueezeLLM: weighted k-means against float64 numpy Lloyd and sklearn, exact outliers, and the
Fisher diagonal against per-sequence squared gradients from transformers' PyTorch model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from jaxcompress.calibrate import fisher_diagonal
from jaxcompress.io.hf import load_hf_folder
from jaxcompress.quant.config import LayerConfig, SqueezeLLMOptions
from jaxcompress.quant.rtn import rtn_quantize
from jaxcompress.quant.kmeans import kmeanspp_init, quantile_init, weighted_kmeans_1d
from jaxcompress.quant.squeezellm import squeezellm_quantize


def reference_lloyd(values, weights, centroids, iters):
    """Weighted Lloyd iterations in float64, one row at a time (nearest centroid, weighted means)."""
    values, weights, c = (np.asarray(a, np.float64) for a in (values, weights, centroids))
    c = c.copy()
    for r in range(values.shape[0]):
        w = weights[r] / weights[r].max()
        for _ in range(iters):
            code = np.argmin(np.abs(values[r][:, None] - c[r][None, :]), axis=1)
            for j in range(c.shape[1]):
                sel = code == j
                if w[sel].sum() > 0:
                    c[r, j] = np.sum(w[sel] * values[r][sel]) / w[sel].sum()
            c[r] = np.sort(c[r])
    return c


def test_weighted_kmeans_matches_reference_lloyd():
    values = jax.random.normal(jax.random.key(0), (6, 200))
    weights = jax.random.uniform(jax.random.key(1), (6, 200), minval=0.2, maxval=2.0)
    init = quantile_init(values, weights / weights.max(1, keepdims=True), 8)
    # Distinct initial centroids: with equal ones, "nearest" is a tie that implementations
    # break differently (argmin takes the first; the midpoint search splits the points).
    assert np.all(np.diff(np.asarray(init), axis=1) > 0)
    centroids, codes = weighted_kmeans_1d(values, weights, 8, 30, init="quantile")
    ref = reference_lloyd(values, weights, init, 30)
    np.testing.assert_allclose(np.asarray(centroids), ref, rtol=1e-5, atol=1e-6)
    nearest = np.argmin(np.abs(np.asarray(values)[:, :, None] - ref[:, None, :]), axis=2)
    np.testing.assert_array_equal(np.asarray(codes), nearest)


def test_kmeanspp_then_lloyd_matches_reference_lloyd_from_the_same_start():
    values = jax.random.normal(jax.random.key(5), (4, 300))
    weights = jnp.exp(2 * jax.random.normal(jax.random.key(6), (4, 300)))
    wn = weights / weights.max(1, keepdims=True)
    init = kmeanspp_init(jax.random.key(7), values, wn, 8)
    assert np.all(np.diff(np.asarray(init), axis=1) > 0)
    centroids, _ = weighted_kmeans_1d(values, weights, 8, 25, init="kmeans++", seed=7)
    np.testing.assert_allclose(np.asarray(centroids), reference_lloyd(values, weights, init, 25), rtol=1e-5, atol=1e-6)


def test_kmeanspp_init_hand_checked():
    # Three distinct values: once a value is a centre its points have D = 0 and are never drawn
    # again, so three centres are the three values, whatever the draws.
    values = jnp.array([[5.0, 0.0, 1.0, 0.0, 5.0, 1.0]])
    weights = jnp.array([[1.0, 3.0, 0.5, 1.0, 2.0, 1.0]])
    np.testing.assert_array_equal(np.asarray(kmeanspp_init(jax.random.key(0), values, weights, 3)), [[0.0, 1.0, 5.0]])


def test_weighted_kmeans_reaches_sklearn_objective():
    """The reference code's call, sklearn KMeans(k-means++, max_iter=50) with sample weights, on
    rows whose weights are as concentrated as a Fisher diagonal: ours reaches the same weighted
    error on average; the weighted-quantile start stays far above it."""
    kmeans = pytest.importorskip("sklearn.cluster").KMeans
    rng = np.random.default_rng(0)
    values = (0.02 * rng.standard_normal((24, 576))).astype(np.float32)
    weights = np.exp(3 * rng.standard_normal((24, 576))).astype(np.float32)

    def error(c):
        c = np.sort(np.asarray(c, np.float64), axis=1)
        nearest = np.take_along_axis(c, np.argmin(np.abs(values[:, :, None] - c[:, None, :]), axis=2), axis=1)
        return (weights * (values - nearest) ** 2).sum(axis=1)

    ref = error(np.stack([kmeans(16, random_state=0, n_init="auto", max_iter=50).fit(
        v[:, None], sample_weight=w).cluster_centers_[:, 0] for v, w in zip(values, weights)]))
    ours = error(weighted_kmeans_1d(jnp.asarray(values), jnp.asarray(weights), 16, 50)[0])
    quantile = error(weighted_kmeans_1d(jnp.asarray(values), jnp.asarray(weights), 16, 50, init="quantile")[0])
    assert np.mean(ours / ref) < 1.05
    assert np.mean(quantile / ref) > 2.0


def test_weighted_kmeans_hand_checked():
    # Two clusters far apart; each centroid is its cluster's weighted mean.
    values = jnp.array([[0.0, 1.0, 2.0, 10.0, 12.0]])
    weights = jnp.array([[1.0, 1.0, 2.0, 3.0, 1.0]])
    centroids, codes = weighted_kmeans_1d(values, weights, 2, 10)
    np.testing.assert_allclose(np.asarray(centroids[0]), [(0 + 1 + 4) / 4, (30 + 12) / 4], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(codes[0]), [0, 0, 0, 1, 1])


def test_outliers_kept_exactly_and_weighted_error_below_rtn():
    w = jax.random.normal(jax.random.key(2), (128, 16)).at[3, 4].set(25.0)
    fisher = jnp.exp(3 * jax.random.normal(jax.random.key(3), (128, 16)))
    cfg = LayerConfig(method="squeezellm", bits=3, group_size="channel",
                      squeezellm=SqueezeLLMOptions(outlier_fraction=0.01, sensitive_fraction=0.005))
    q = squeezellm_quantize(w, fisher, cfg, "w")
    d = q.dequantize()
    assert q.outlier_index.shape == (round(0.01 * w.size) + round(0.005 * w.size),)  # disjoint here
    idx = np.asarray(q.outlier_index)
    np.testing.assert_array_equal(np.asarray(d).reshape(-1)[idx], np.asarray(w).reshape(-1)[idx])
    assert 3 * 16 + 4 in idx and float(d[3, 4]) == 25.0
    assert q.codebook.shape == (16, 8) and q.scale is None
    dense = LayerConfig(method="squeezellm", bits=3, group_size="channel")
    weighted = lambda v: float(jnp.sum(fisher * (v - w) ** 2))  # noqa: E731
    assert weighted(squeezellm_quantize(w, fisher, dense).dequantize()) < weighted(
        rtn_quantize(w, LayerConfig(bits=3, group_size="channel")).dequantize())


def test_exact_zeros_get_no_weight_as_in_the_reference():
    """Four distinct non-zero values and many exact zeros with a huge Fisher, 2 bits: the
    reference gives the zeros no k-means weight, so the 4 centroids are the 4 values (k-means++
    picks distinct points, then Lloyd stays); the zeros take their nearest centroid."""
    values = np.array([-0.9, -0.3, 0.4, 1.1], np.float32)
    column = np.concatenate([np.repeat(values, 5), np.zeros(12, np.float32)])  # K = 32
    w = jnp.asarray(np.stack([column, column[::-1]], axis=1))  # two output channels
    fisher = jnp.where(w == 0, 1e6, 1.0)
    q = squeezellm_quantize(w, fisher, LayerConfig(method="squeezellm", bits=2, group_size="channel",
                                                   scale_dtype="float32"), "layer")
    np.testing.assert_allclose(np.asarray(q.codebook), np.stack([values, values]), rtol=1e-6)
    deq = np.asarray(q.dequantize())
    np.testing.assert_allclose(deq[np.asarray(w) != 0], np.asarray(w)[np.asarray(w) != 0], rtol=1e-6)
    np.testing.assert_allclose(deq[np.asarray(w) == 0], -0.3, rtol=1e-6)  # nearest of the four to 0


def test_fisher_diagonal_matches_torch_per_sequence_gradients(tmp_path):
    hf = hf_models.build("llama", num_hidden_layers=1)
    model, _ = load_hf_folder(hf_models.save(hf, tmp_path), param_dtype=jnp.float32)
    tokens = np.array(jax.random.randint(jax.random.key(4), (3, 16), 0, hf.config.vocab_size))
    paths = ["layers.0.self_attn.q_proj.kernel", "layers.0.mlp.down_proj.kernel"]
    ours = fisher_diagonal(model, tokens, paths)
    expect = {p: 0 for p in paths}
    for seq in tokens:
        hf.zero_grad()
        t = torch.as_tensor(seq[None])
        hf(t[:, :-1], labels=None).logits.log_softmax(-1).gather(-1, t[:, 1:, None]).mean().neg().backward()
        expect[paths[0]] += hf.model.layers[0].self_attn.q_proj.weight.grad.double() ** 2
        expect[paths[1]] += hf.model.layers[0].mlp.down_proj.weight.grad.double() ** 2
    for p in paths:
        np.testing.assert_allclose(np.asarray(ours[p], np.float64), expect[p].T.numpy(), rtol=2e-3, atol=1e-12)
