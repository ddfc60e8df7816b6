"""Quantization-aware training: fake quantization with a straight-through estimator.

The grid is the one every quantizer shares (`jaxcompress.quant.grid`, the invariant of
`QArray`): per group of `group_size` input rows and per output column,

    code = clip(round(w / scale) + zero, 0, 2**bits - 1),    w_hat = (code - zero) * scale.

Here the rounding passes gradients straight through (clipped entries get none), and a learned
scale gets the LSQ gradient that falls out of the same formula by autodiff. Scales are rounded
to their storage dtype in the forward pass too, so the fake-quantized weight is bit-for-bit
what the exported `QArray` dequantizes to.

A `FakeQuant` leaf holds the fp32 master weight. Its scales are one of (`SCALE_MODES`)
  minmax   recomputed (min-max) from the current weight in every forward pass (no gradient);
  fixed    frozen at their start value: the grid of the start weight (min-max or MSE clip), or a
           recipe's own scales when the kernel was already a QArray (GPTQ/AWQ clipping is kept);
  learned  start as `fixed`, then trained (LSQ); the integer zero point stays fixed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.errors import ConfigError
from jaxcompress.ops.linear import dense_linear, register_linear
from jaxcompress.quant.config import LayerConfig
from jaxcompress.quant.grid import per_row, quantize, weight_params
from jaxcompress.quant.qarray import QArray
from jaxcompress.quant.rtn import rtn_quantize, uniform_qarray

Tree = Any
SCALE_MODES = ("minmax", "fixed", "learned")


def _round_ste(x: jax.Array) -> jax.Array:
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fake_quantize_ste(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: int, group_size: int) -> jax.Array:
    """w_hat [K, N] (fp32) on the grid with scale/zero [G, N] (or [1, 1]); differentiable."""
    k = w.shape[0]
    s, z = per_row(scale.astype(jnp.float32), k, group_size), per_row(zero.astype(jnp.float32), k, group_size)
    raw = _round_ste(w.astype(jnp.float32) / s) + z
    # Not jnp.clip: its gradient halves at the bounds, and the bounds are valid codes.
    maxq = 2 ** bits - 1
    code = jnp.where(raw < 0, 0.0, jnp.where(raw > maxq, float(maxq), raw))
    return (code - z) * s


def _layer(bits: int, group_size: int | str, symmetric: bool, scale_dtype: str, clip: str = "minmax") -> LayerConfig:
    return LayerConfig(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric, clip=clip,
                       scale_dtype=scale_dtype)


def grid_of(q: QArray) -> LayerConfig:
    """The grid of an existing QArray (refuses grids that re-quantization cannot reproduce)."""
    if q.codebook is not None or q.perm is not None or q.outlier_index is not None or q.scale is None:
        raise ConfigError("this weight's grid has a codebook, an act-order permutation or outliers; "
                          "QAT and re-quantization support plain uniform grids (merge to dense instead)")
    per_tensor = tuple(q.scale.shape) == (1, 1) and q.shape[1] > 1
    return _layer(q.bits, "tensor" if per_tensor else q.group_size, q.symmetric, q.scale.dtype.name)


def _qarray(w: jax.Array, scale, zero, layer: LayerConfig, group_size: int, dtype) -> QArray:
    k = w.shape[0]
    codes = quantize(w.astype(jnp.float32), per_row(scale, k, group_size), per_row(zero, k, group_size), layer.bits)
    return uniform_qarray(codes, scale, zero, layer, group_size, dtype)


def requantize_like(w: jax.Array, base: QArray) -> QArray:
    """w [K, N] (e.g. a merged LoRA weight) round-to-nearest on the grid kind of `base`, with
    fresh min-max scales, stored in `base`'s dtype."""
    layer = grid_of(base)
    g = layer.group_for(w.shape[0])
    scale, zero = weight_params(w.astype(jnp.float32), g, layer.per_tensor, layer.grid())
    return _qarray(w, scale, zero, layer, g, base.dtype)


# ------------------------------------------------------------------------------ the leaf
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FakeQuant:
    """A weight trained through fake quantization. Invariant: `dequantize()` is the weight on
    its grid and equals `to_qarray().dequantize()` (in fp32); `w` is the fp32 master behind it."""

    w: jax.Array
    scale: jax.Array | None = None      # [G, N] fixed or learned; None: min-max in each forward
    zero: jax.Array | None = None       # [G, N] integer zero point (with `scale`)
    bits: int = dataclasses.field(default=4, metadata=dict(static=True))
    group_size: int = dataclasses.field(default=128, metadata=dict(static=True))  # rows per group
    symmetric: bool = dataclasses.field(default=False, metadata=dict(static=True))
    scale_dtype: str = dataclasses.field(default="float16", metadata=dict(static=True))
    dtype: str = dataclasses.field(default="bfloat16", metadata=dict(static=True))  # of the export
    learn_scale: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self):
        return self.w.shape

    @property
    def ndim(self) -> int:
        return 2

    def _layer(self) -> LayerConfig:
        return _layer(self.bits, self.group_size, self.symmetric, self.scale_dtype)

    def grid(self) -> tuple[jax.Array, jax.Array]:
        """fp32 scale and zero as they will be stored (a learned scale rounded to `scale_dtype`
        straight through; a dynamic one computed from the weight without gradient)."""
        if self.scale is None:
            return weight_params(jax.lax.stop_gradient(self.w).astype(jnp.float32), self.group_size, False,
                                 self._layer().grid())
        s = self.scale.astype(jnp.float32)
        s = s + jax.lax.stop_gradient(s.astype(self.scale_dtype).astype(jnp.float32) - s)
        return s, self.zero

    def dequantize(self) -> jax.Array:
        scale, zero = self.grid()
        return fake_quantize_ste(self.w, scale, zero, self.bits, self.group_size)

    def to_qarray(self) -> QArray:
        scale, zero = jax.lax.stop_gradient(self.grid())
        return _qarray(self.w, scale, zero, self._layer(), self.group_size, self.dtype)


@register_linear(FakeQuant)
def fake_quant_linear(x: jax.Array, w: FakeQuant) -> jax.Array:
    return dense_linear(x, w.dequantize())


def _register():
    from jaxcompress.io.checkpoint import register_leaf_type

    register_leaf_type(FakeQuant)


_register()


# ------------------------------------------------------------------------------ transforms
def add_fake_quant(tree: Tree, targets: str | list[str], layer: LayerConfig, scales: str = "minmax") -> Tree:
    """Wraps every kernel matching `targets` in a `FakeQuant` with an fp32 master weight.

    A kernel that is already a `QArray` (the output of any weight recipe: RTN, GPTQ, AWQ)
    starts from its exact dequantized value on its own grid; `layer` (bits, group size,
    symmetric, clip, scale dtype) is the grid of dense kernels.
    """
    from jaxcompress.train.lora import map_weights, select

    if scales not in SCALE_MODES:
        raise ConfigError(f"qat.scales={scales!r}: choose one of {', '.join(SCALE_MODES)}")
    if scales == "minmax" and layer.per_tensor:
        raise ConfigError("qat: per-tensor grids need qat.scales fixed or learned")
    hits = set(select(targets, tree, "quant.targets"))
    learn = scales == "learned"

    def wrap(name, w):
        if name not in hits:
            return w
        if isinstance(w, QArray):
            grid = grid_of(w)
            if scales == "minmax" and grid.per_tensor:
                raise ConfigError(f"{name}: per-tensor grid; use qat.scales fixed or learned")
            master = w.dequantize_storage_order()  # fp32 and exact (grid_of refuses permutations)
            scale = zero = None
            if scales != "minmax":
                scale = w.scale.astype(jnp.float32)
                zero = (w.zero.astype(jnp.float32) if w.zero is not None
                        else jnp.full_like(scale, 2 ** (w.bits - 1)))
            return FakeQuant(master, scale, zero, w.bits, w.group_size, w.symmetric, grid.scale_dtype, w.dtype, learn)
        if hasattr(w, "dequantize"):
            raise ConfigError(f"{name}: QAT wraps dense or QArray weights, not {type(w).__name__}")
        g = layer.group_for(w.shape[0], name)
        master = w.astype(jnp.float32)
        scale = zero = None
        if scales != "minmax":
            scale, zero = weight_params(master, g, layer.per_tensor, layer.grid())
        return FakeQuant(master, scale, zero, layer.bits, g, layer.symmetric, layer.scale_dtype,
                         jnp.dtype(w.dtype).name, learn)

    return map_weights(wrap, tree)


def finalize_qat(tree: Tree) -> Tree:
    """Replaces every `FakeQuant` by the `QArray` it stands for (the real quantized model)."""
    from jaxcompress.train.lora import map_weights

    return map_weights(lambda _, w: _to_qarray(w) if isinstance(w, FakeQuant) else w, tree)


_to_qarray = jax.jit(lambda w: w.to_qarray())


def quantize_weights(tree: Tree, targets: str | list[str], layer: LayerConfig) -> Tree:
    """Round-to-nearest `QArray`s of the matching dense kernels (the QLoRA base when the run
    names no weight recipe); kernels that are already compressed stay as they are."""
    from jaxcompress.train.lora import map_weights, select

    hits = set(select(targets, tree, "quant.targets"))

    def q(name, w):
        if name not in hits or hasattr(w, "dequantize"):
            return w
        return rtn_quantize(w, layer, name)

    return map_weights(q, tree)
