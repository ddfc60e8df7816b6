"""The uniform quantization grid: scale and zero point per group, codes, fake quantization.

One definition shared by RTN, GPTQ and AWQ (GPTQ's reference `Quantizer`): for a group of
weights with range [xmin, xmax] widened to include 0,

    asymmetric: scale = (xmax - xmin) / maxq,  zero = round(-xmin / scale)
    symmetric:  xmax = max(|xmin|, xmax), xmin = -xmax, zero = 2**(bits - 1)
    code = clip(round(w / scale) + zero, 0, maxq),   w_hat = (code - zero) * scale

with maxq = 2**bits - 1. The scale is rounded to its storage dtype *before* the codes are
chosen, so `QArray.dequantize()` reproduces `fake_quantize` exactly. An all-zero group gets
the range [-1, 1] (as the reference does) so its scale is never 0.

Shapes: a weight is `[K, N]` (K input features, N output features). `grouped` weights are
`[G, g, N]`: G groups of g consecutive input rows (zero-padded at the end when g does not
divide K; zeros are exactly representable on every grid, so padding never changes a range
or an error). Parameters are `[G, N]`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """How one weight is put on its grid (hashable: a static jit argument)."""

    bits: int = 4
    symmetric: bool = False
    clip: str = "minmax"         # "minmax" or "mse" (search a shrunk range per group)
    mse_grid: int = 100          # shrink steps of 1 / mse_grid ...
    mse_max_shrink: float = 0.8  # ... down to (1 - mse_max_shrink) of the min-max range
    mse_norm: float = 2.4        # error norm of the search (GPTQ's reference value)
    scale_dtype: str = "float16"

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1


def group_rows(w: jax.Array, g: int) -> jax.Array:
    """[K, N] -> [ceil(K / g), g, N], zero-padded at the end."""
    k, n = w.shape
    groups = -(-k // g)
    w = jnp.pad(w, ((0, groups * g - k), (0, 0)))
    return w.reshape(groups, g, n)


def per_row(params: jax.Array, k: int, g: int) -> jax.Array:
    """Group parameters [G, N] (or [1, 1] / [1, N]) -> one row per input feature [K, N]."""
    if params.shape[0] == 1:
        return params
    return jnp.repeat(params, g, axis=0, total_repeat_length=params.shape[0] * g)[:k]


def exact_divide(a: jax.Array, b) -> jax.Array:
    """a / b correctly rounded, as torch and numpy divide. XLA rewrites a division by a constant
    or by a broadcast array into a multiplication by the rounded reciprocal, one ulp off for a
    quarter to two thirds of the elements. Where exact ties matter that changes results: a range
    [-m, m] puts the zero point at 7.5 -/+ 1 ulp, and a weight clipped to m at code 7.5 -/+ 1 ulp,
    which then round the other way than in the reference code (it flipped AWQ's clip choices).
    `0 * a` cannot be folded away (NaN, inf), so the divisor stays a full array."""
    return a / (b + 0.0 * a)


def _round_scale(scale: jax.Array, spec: GridSpec) -> jax.Array:
    dt = jnp.dtype(spec.scale_dtype)
    stored = scale.astype(dt)
    # A scale that underflows the storage dtype would turn codes into inf: keep the smallest normal.
    return jnp.maximum(stored, jnp.finfo(dt).tiny).astype(jnp.float32)


def range_params(xmin: jax.Array, xmax: jax.Array, spec: GridSpec) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point (fp32, zero integer-valued) for ranges [xmin, xmax] that contain 0."""
    if spec.symmetric:
        xmax = jnp.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(empty, -1.0, xmin)
    xmax = jnp.where(empty, 1.0, xmax)
    scale = _round_scale(exact_divide(xmax - xmin, spec.maxq), spec)
    if spec.symmetric:
        zero = jnp.full_like(scale, 2 ** (spec.bits - 1))
    else:
        zero = jnp.clip(jnp.round(exact_divide(-xmin, scale)), 0, spec.maxq)
    return scale, zero


def quantize(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
    """Integer codes (int32) of w on the grid; scale/zero broadcast against w."""
    return jnp.clip(jnp.round(exact_divide(w, scale)) + zero, 0, 2 ** bits - 1).astype(jnp.int32)


def dequantize(codes: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    return (codes.astype(jnp.float32) - zero) * scale


def fake_quantize(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
    return dequantize(quantize(w, scale, zero, bits), scale, zero)


def group_params(grouped: jax.Array, spec: GridSpec) -> tuple[jax.Array, jax.Array]:
    """Scale and zero [G, N] of grouped weights [G, g, N] (fp32), min-max or MSE-searched."""
    grouped = grouped.astype(jnp.float32)
    xmin = jnp.minimum(grouped.min(axis=1), 0.0)
    xmax = jnp.maximum(grouped.max(axis=1), 0.0)
    if spec.clip == "minmax":
        return range_params(xmin, xmax, spec)
    if spec.clip != "mse":
        raise ValueError(f"unknown clip {spec.clip!r}")
    if spec.symmetric:  # the search shrinks the symmetric range, as the reference does
        xmax = jnp.maximum(-xmin, xmax)
        xmin = -xmax

    def step(i, best):
        best_err, best_scale, best_zero = best
        p = 1.0 - i / spec.mse_grid
        scale, zero = range_params(p * xmin, p * xmax, spec)
        q = fake_quantize(grouped, scale[:, None], zero[:, None], spec.bits)
        err = jnp.sum(jnp.abs(q - grouped) ** spec.mse_norm, axis=1)
        better = err < best_err
        return (jnp.where(better, err, best_err), jnp.where(better, scale, best_scale),
                jnp.where(better, zero, best_zero))

    scale0, zero0 = range_params(xmin, xmax, spec)
    init = (jnp.full(scale0.shape, jnp.inf, jnp.float32), scale0, zero0)
    steps = int(spec.mse_max_shrink * spec.mse_grid)
    _, scale, zero = jax.lax.fori_loop(0, steps, step, init)
    return scale, zero


def weight_params(w: jax.Array, group_size: int, per_tensor: bool, spec: GridSpec):
    """Scale and zero for a whole weight [K, N]: [G, N] per group (group_size == K: per output
    channel, [1, N]), or [1, 1] per tensor."""
    if per_tensor:
        return group_params(w.reshape(1, -1, 1), spec)
    return group_params(group_rows(w, group_size), spec)
