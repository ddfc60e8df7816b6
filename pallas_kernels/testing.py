"""Random packed weights of every kind the kernels take, for the tests and the benchmark.

Codes, scales, zero points, codebooks, act-order permutations and outliers are drawn fresh
from a seed on the host (numpy: no compilation, identical on every machine); magnitudes are those of a trained Llama projection (|w| ~ 0.02) so that bf16
rounding behaves as it would on real weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.quant.qarray import QArray, num_words
from pallas_kernels.layout import TiledQArray, period_of, repack_for_gpu


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kind of packed weight: bit width, grouping, grid and layout."""

    bits: int
    group_size: int  # 0: one group (per output channel)
    grid: str = "sym"  # "sym", "asym", "lut" (per-column codebook), "lut_scaled" (codebook x group scale)
    tiled_rows: int = 0  # 0: the QArray as stored; else repack_for_gpu(q, rows=tiled_rows)
    act_order: bool = False
    outliers: int = 0

    @property
    def name(self) -> str:
        g = "ch" if self.group_size == 0 else f"g{self.group_size}"
        parts = [f"w{self.bits}", g, self.grid]
        parts += [f"tiled{self.tiled_rows}"] if self.tiled_rows else []
        parts += ["actorder"] if self.act_order else []
        parts += [f"outliers{self.outliers}"] if self.outliers else []
        return "_".join(parts)


def pack_codes_np(codes: np.ndarray, bits: int) -> np.ndarray:
    """numpy twin of `qarray.pack_codes` (host-side, no compilation): [K, N] -> uint32 streams."""
    k, n = codes.shape
    p = period_of(bits)
    kp = -(-k // p) * p
    c = np.zeros((kp, n), np.uint64)
    c[:k] = codes
    c = c.reshape(kp // p, p, n)
    words = np.zeros((kp // p, bits * p // 32, n), np.uint64)
    for j in range(p):
        w, off = divmod(j * bits, 32)
        words[:, w] |= (c[:, j] << np.uint64(off)) & np.uint64(0xFFFFFFFF)
        if off + bits > 32:
            words[:, w + 1] |= c[:, j] >> np.uint64(32 - off)
    return words.reshape(-1, n)[: num_words(k, bits)].astype(np.uint32)


def random_qarray(seed: int, k: int, n: int, v: Variant, scale_dtype=jnp.float16) -> QArray:
    """A QArray of variant `v` with random contents drawn on the host from `seed`."""
    rng = np.random.default_rng(seed)
    bits = v.bits
    group = v.group_size or k
    groups = -(-k // group)
    codes = rng.integers(0, 2 ** bits, (k, n))
    scale = zero = codebook = perm = oi = ov = None
    if v.grid in ("sym", "asym", "lut_scaled"):
        scale = jnp.asarray(0.04 / 2 ** bits * rng.uniform(0.5, 1.5, (groups, n)), scale_dtype)
    if v.grid == "asym":
        zero = jnp.asarray(rng.integers(0, 2 ** bits, (groups, n)), scale_dtype)
    if v.grid.startswith("lut"):
        entries = np.sort(rng.standard_normal((n, 2 ** bits)), axis=1)
        codebook = jnp.asarray(entries * (1.0 if v.grid == "lut_scaled" else 0.02), scale_dtype)
    if v.act_order:
        perm = jnp.asarray(rng.permutation(k), jnp.int32)
    if v.outliers:  # one outlier in each stretch of k * n / outliers flat positions
        stride = k * n // v.outliers
        oi = jnp.asarray(np.arange(v.outliers) * stride + rng.integers(0, stride, v.outliers), jnp.int32)
        ov = jnp.asarray(0.1 * rng.standard_normal(v.outliers), scale_dtype)
    return QArray(jnp.asarray(pack_codes_np(codes, bits)), scale, zero, perm=perm, codebook=codebook,
                  outlier_index=oi, outlier_value=ov, bits=bits, group_size=group,
                  shape=(k, n), dtype="bfloat16")


def abstract_weight(k: int, n: int, v: Variant) -> QArray | TiledQArray:
    """The weight's structure with ShapeDtypeStruct leaves (nothing allocated): for planning."""
    def build():
        group = v.group_size or k
        groups = -(-k // group)
        grid = jnp.zeros((groups, n), jnp.float16)
        q = QArray(jnp.zeros((num_words(k, v.bits), n), jnp.uint32),
                   None if v.grid == "lut" else grid, grid if v.grid == "asym" else None,
                   perm=jnp.zeros((k,), jnp.int32) if v.act_order else None,
                   codebook=jnp.zeros((n, 2 ** v.bits), jnp.float16) if v.grid.startswith("lut") else None,
                   outlier_index=jnp.zeros((v.outliers,), jnp.int32) if v.outliers else None,
                   outlier_value=jnp.zeros((v.outliers,), jnp.float16) if v.outliers else None,
                   bits=v.bits, group_size=group, shape=(k, n), dtype="bfloat16")
        return repack_for_gpu(q, rows=v.tiled_rows) if v.tiled_rows else q

    return jax.eval_shape(build)


def random_weight(seed: int, k: int, n: int, v: Variant) -> QArray | TiledQArray:
    q = random_qarray(seed, k, n, v)
    return repack_for_gpu(q, rows=v.tiled_rows) if v.tiled_rows else q


def random_activations(seed: int, shape: tuple, dtype=jnp.bfloat16) -> jax.Array:
    """Standard-normal activations drawn on the host."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def relative_error(y, ref) -> float:
    """||y - ref|| / ||ref|| in float64 (NaN anywhere gives NaN)."""
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def float64_reference(x: jax.Array, w) -> np.ndarray:
    """x @ W in float64 on the host, W the exact fp32 dequantized weight (no bf16 rounding)."""
    qa = w.to_qarray() if isinstance(w, TiledQArray) else w
    wf = np.asarray(jax.jit(QArray.dequantize_storage_order)(qa), np.float64)
    xf = np.asarray(jnp.asarray(x, jnp.float32), np.float64).reshape(-1, qa.shape[0])
    if qa.perm is not None:
        xf = xf[:, np.asarray(qa.perm)]
    return (xf @ wf).reshape(*x.shape[:-1], qa.shape[1])
