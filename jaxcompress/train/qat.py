"""Quantization-aware training: fake quantization with a straight-through estimator.

The grid is the one `QArray` stores (see its docstring): per group of `group_size` input rows
(the last group narrower when it does not divide K) and per output column,

    code = clip(round(w / scale) + zero, 0, 2**bits - 1),    w_hat = (code - zero) * scale,

with `zero = 2**(bits-1)` implied for symmetric grids. Scales are min-max (GPTQ's quantizer:
asymmetric ranges include 0; symmetric scale = 2 max|w| / (2**bits - 1)), rounded to the
storage dtype, so that the fake-quantized forward pass is bit-for-bit what the exported
`QArray` dequantizes to.

A `FakeQuant` leaf holds the fp32 master weight. Its scales are one of (`SCALE_MODES`)
  minmax   recomputed from the current weight in every forward pass (no gradient);
  fixed    frozen at their start value: min-max of the start weight, or a recipe's own scales
           when the kernel was already a QArray (GPTQ/AWQ clipping is kept);
  learned  start as `fixed`, then trained (LSQ); the integer zero point stays fixed.
Rounding passes gradients straight through; clipped entries get none.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.errors import ConfigError
from jaxcompress.ops.linear import dense_linear, register_linear
from jaxcompress.quant.qarray import QArray, check_quant_args, group_index, pack_codes

Tree = Any


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """A uniform weight grid: bits, group size along the input dim (-1 = per output channel)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    scale_dtype: str = "float16"

    def group_for(self, k: int, where: str = "") -> int:
        gs = k if self.group_size == -1 else self.group_size
        check_quant_args(self.bits, gs, k, where)
        return gs


def _maxq(bits: int) -> int:
    return 2 ** bits - 1


def _groups(w: jax.Array, group_size: int):
    k = w.shape[0]
    gidx = jnp.asarray(group_index(k, group_size))
    return gidx, -(-k // group_size)


def minmax_grid(w: jax.Array, bits: int, group_size: int, symmetric: bool,
                scale_dtype="float16") -> tuple[jax.Array, jax.Array | None]:
    """Min-max scale [G, N] (and integer zero [G, N] for asymmetric grids) of w [K, N]."""
    w = w.astype(jnp.float32)
    gidx, g = _groups(w, group_size)
    hi = jax.ops.segment_max(w, gidx, num_segments=g)
    lo = jax.ops.segment_min(w, gidx, num_segments=g)
    maxq = _maxq(bits)
    if symmetric:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        scale = 2.0 * amax / maxq
    else:
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
        scale = (hi - lo) / maxq
    scale = jnp.where(scale > 0, scale, 1.0).astype(scale_dtype).astype(jnp.float32)
    if symmetric:
        return scale, None
    zero = jnp.clip(jnp.round(-lo / scale), 0, maxq).astype(scale_dtype).astype(jnp.float32)
    return scale, zero


def _round_ste(x: jax.Array) -> jax.Array:
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fake_quantize(w: jax.Array, scale: jax.Array, zero: jax.Array | None, bits: int,
                  group_size: int) -> jax.Array:
    """w_hat [K, N] on the grid (fp32), differentiable: straight-through rounding, LSQ scale grads."""
    gidx, _ = _groups(w, group_size)
    s = scale.astype(jnp.float32)[gidx]
    z = (zero.astype(jnp.float32)[gidx] if zero is not None else jnp.float32(2 ** (bits - 1)))
    code = jnp.clip(_round_ste(w.astype(jnp.float32) / s) + z, 0, _maxq(bits))
    return (code - z) * s


def quantize(w: jax.Array, spec: QuantSpec, dtype="bfloat16", where: str = "",
             scale: jax.Array | None = None, zero: jax.Array | None = None) -> QArray:
    """Round-to-nearest `QArray` of w [K, N] on `spec`'s grid (min-max unless scale is given)."""
    k, n = w.shape
    gs = spec.group_for(k, where)
    if scale is None:
        scale, zero = minmax_grid(w, spec.bits, gs, spec.symmetric, spec.scale_dtype)
    gidx, _ = _groups(w, gs)
    z = zero[gidx] if zero is not None else jnp.float32(2 ** (spec.bits - 1))
    codes = jnp.clip(jnp.round(w.astype(jnp.float32) / scale.astype(jnp.float32)[gidx]) + z, 0, _maxq(spec.bits))
    return QArray(codes=pack_codes(codes.astype(jnp.int32), spec.bits), scale=scale.astype(spec.scale_dtype),
                  zero=None if zero is None else zero.astype(spec.scale_dtype), bits=spec.bits,
                  group_size=gs, shape=(k, n), dtype=jnp.dtype(dtype).name)


def spec_of(q: QArray) -> QuantSpec:
    """The grid of an existing QArray (refuses grids this module cannot reproduce)."""
    if q.codebook is not None or q.perm is not None or q.outlier_index is not None:
        raise ConfigError("re-quantization supports plain uniform grids only (no codebook, act-order "
                          "permutation or outliers); merge to dense instead")
    dtype = q.scale.dtype.name if q.scale is not None else "float16"
    return QuantSpec(bits=q.bits, group_size=q.group_size, symmetric=q.symmetric, scale_dtype=dtype)


def requantize_like(w: jax.Array, base: QArray) -> QArray:
    """w [K, N] quantized (round-to-nearest, fresh min-max scales) on the grid of `base`."""
    return quantize(w, spec_of(base), dtype=base.dtype)


# ------------------------------------------------------------------------------ the leaf
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FakeQuant:
    """A weight trained through fake quantization. Invariant: `dequantize()` is the grid value
    (and equals `to_qarray().dequantize()`); `w` is the fp32 master weight behind it."""

    w: jax.Array
    scale: jax.Array | None = None      # [G, N] fixed or learned; None = min-max of w in each forward
    zero: jax.Array | None = None       # [G, N] integer zero of a stored asymmetric grid
    bits: int = dataclasses.field(default=4, metadata=dict(static=True))
    group_size: int = dataclasses.field(default=128, metadata=dict(static=True))
    symmetric: bool = dataclasses.field(default=False, metadata=dict(static=True))
    scale_dtype: str = dataclasses.field(default="float16", metadata=dict(static=True))
    dtype: str = dataclasses.field(default="bfloat16", metadata=dict(static=True))
    learn_scale: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self):
        return self.w.shape

    @property
    def ndim(self) -> int:
        return 2

    def grid(self) -> tuple[jax.Array, jax.Array | None]:
        """fp32 scale and zero as stored: a learned scale is rounded to `scale_dtype` (straight
        through), so the forward pass sees exactly what `to_qarray` will store."""
        if self.scale is not None:
            s = self.scale.astype(jnp.float32)
            s = s + jax.lax.stop_gradient(s.astype(self.scale_dtype).astype(jnp.float32) - s)
            return s, self.zero
        scale, zero = minmax_grid(jax.lax.stop_gradient(self.w), self.bits, self.group_size,
                                  self.symmetric, self.scale_dtype)
        return scale, zero

    def dequantize(self) -> jax.Array:
        scale, zero = self.grid()
        return fake_quantize(self.w, scale, zero, self.bits, self.group_size).astype(self.w.dtype)

    def to_qarray(self) -> QArray:
        scale, zero = self.grid()
        spec = QuantSpec(self.bits, self.group_size, self.symmetric, self.scale_dtype)
        return quantize(self.w, spec, self.dtype, scale=scale, zero=zero)


@register_linear(FakeQuant)
def fake_quant_linear(x: jax.Array, w: FakeQuant) -> jax.Array:
    return dense_linear(x, w.dequantize())


def _register():
    from jaxcompress.io.checkpoint import register_leaf_type

    register_leaf_type(FakeQuant)


_register()


SCALE_MODES = ("minmax", "fixed", "learned")


def add_fake_quant(tree: Tree, targets: str | list[str], spec: QuantSpec, scales: str = "minmax") -> Tree:
    """Wraps every kernel matching `targets` in a `FakeQuant` (fp32 master weight).

    A kernel that is already a `QArray` (the output of any weight recipe: RTN, GPTQ, AWQ)
    starts from its exact dequantized value on its own grid; `spec` applies to dense kernels.
    """
    from jaxcompress.train.lora import map_weights, select

    if scales not in SCALE_MODES:
        raise ConfigError(f"qat.scales={scales!r}: choose one of {', '.join(SCALE_MODES)}")
    hits = set(select(targets, tree, "qat.targets"))
    learn = scales == "learned"

    def wrap(name, w):
        if name not in hits:
            return w
        if isinstance(w, QArray):
            grid = spec_of(w)
            master = w.dequantize_storage_order()  # fp32, exact (spec_of refuses permutations)
            scale = zero = None
            if scales != "minmax":
                scale = w.scale.astype(jnp.float32)
                zero = w.zero.astype(jnp.float32) if w.zero is not None else None
            return FakeQuant(master, scale, zero, grid.bits, w.group_size, grid.symmetric, grid.scale_dtype,
                             w.dtype, learn)
        if hasattr(w, "dequantize"):
            raise ConfigError(f"{name}: QAT wraps dense or QArray weights, not {type(w).__name__}")
        gs = spec.group_for(w.shape[0], name)
        master = w.astype(jnp.float32)
        scale = zero = None
        if scales != "minmax":
            scale, zero = minmax_grid(master, spec.bits, gs, spec.symmetric, spec.scale_dtype)
        return FakeQuant(master, scale, zero, spec.bits, gs, spec.symmetric, spec.scale_dtype,
                         jnp.dtype(w.dtype).name, learn)

    return map_weights(wrap, tree)


def finalize_qat(tree: Tree) -> Tree:
    """Replaces every `FakeQuant` by the `QArray` it stands for (the real quantized model)."""
    from jaxcompress.train.lora import map_weights

    return map_weights(lambda _, w: w.to_qarray() if isinstance(w, FakeQuant) else w, tree)


def quantize_weights(tree: Tree, targets: str | list[str], spec: QuantSpec) -> Tree:
    """Round-to-nearest quantization of the matching dense kernels (the QLoRA base when no
    weight recipe is given)."""
    from jaxcompress.train.lora import map_weights, select

    hits = set(select(targets, tree, "quant.targets"))

    def q(name, w):
        if name not in hits or hasattr(w, "dequantize"):
            return w
        return quantize(w.astype(jnp.float32), spec, dtype=jnp.dtype(w.dtype).name, where=name)

    return map_weights(q, tree)
