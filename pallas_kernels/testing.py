"""Random packed weights of every kind the kernels take, for the tests and the benchmark.

Codes, scales, zero points, codebooks, act-order permutations and outliers are drawn fresh
from a seed; magnitudes are those of a trained Llama projection (|w| ~ 0.02) so that bf16
rounding behaves as it would on real weights.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.quant.qarray import QArray, pack_codes
from pallas_kernels.layout import TiledQArray, repack_for_gpu


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


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def random_qarray(key: jax.Array, k: int, n: int, v: Variant, scale_dtype=jnp.float16) -> QArray:
    kc, ks, kz, kb, kp, ko, kv = jax.random.split(key, 7)
    bits = v.bits
    group = v.group_size or k
    groups = -(-k // group)
    codes = jax.random.randint(kc, (k, n), 0, 2 ** bits, jnp.int32)
    scale = zero = codebook = perm = oi = ov = None
    if v.grid in ("sym", "asym", "lut_scaled"):
        step = 0.04 / 2 ** bits
        scale = (step * jax.random.uniform(ks, (groups, n), jnp.float32, 0.5, 1.5)).astype(scale_dtype)
    if v.grid == "asym":
        zero = jax.random.randint(kz, (groups, n), 0, 2 ** bits).astype(scale_dtype)
    if v.grid.startswith("lut"):
        entries = jnp.sort(jax.random.normal(kb, (n, 2 ** bits), jnp.float32), axis=1)
        codebook = (entries * (1.0 if v.grid == "lut_scaled" else 0.02)).astype(scale_dtype)
    if v.act_order:
        perm = jax.random.permutation(kp, k).astype(jnp.int32)
    if v.outliers:
        oi = jnp.sort(jax.random.choice(ko, k * n, (v.outliers,), replace=False)).astype(jnp.int32)
        ov = (0.1 * jax.random.normal(kv, (v.outliers,), jnp.float32)).astype(scale_dtype)
    return QArray(pack_codes(codes, bits), scale, zero, perm=perm, codebook=codebook,
                  outlier_index=oi, outlier_value=ov, bits=bits, group_size=group,
                  shape=(k, n), dtype="bfloat16")


def random_weight(key: jax.Array, k: int, n: int, v: Variant) -> QArray | TiledQArray:
    q = random_qarray(key, k, n, v)
    return repack_for_gpu(q, rows=v.tiled_rows) if v.tiled_rows else q


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
