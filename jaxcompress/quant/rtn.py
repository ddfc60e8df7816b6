"""Round-to-nearest (RTN): each weight on its own grid, no calibration data.

The baseline every calibrated method must beat. The grid is min-max or, with `clip: mse`,
the per-group range that minimises |w - q|^2.4 (GPTQ's reference `Quantizer(mse=True)`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress.quant.config import LayerConfig
from jaxcompress.quant.grid import GridSpec, per_row, quantize, weight_params
from jaxcompress.quant.qarray import QArray
from jaxcompress.quant.tree import map_params


def uniform_qarray(codes: jax.Array, scale: jax.Array, zero: jax.Array, cfg: LayerConfig, group_size: int,
                   dtype, perm: jax.Array | None = None) -> QArray:
    """A QArray from codes [K, N] and fp32 grid parameters; symmetric grids store no zero."""
    scale, zero = _stored(scale, zero, cfg.scale_dtype, cfg.symmetric)
    return QArray.from_codes(codes, scale, zero, bits=cfg.bits, group_size=group_size, dtype=dtype, perm=perm)


@functools.partial(jax.jit, static_argnames=("dtype", "symmetric"))
def _stored(scale, zero, dtype: str, symmetric: bool):
    return scale.astype(dtype), None if symmetric else zero.astype(dtype)


@functools.partial(jax.jit, static_argnames=("group_size", "per_tensor", "spec"))
def rtn_codes(w: jax.Array, group_size: int, per_tensor: bool, spec: GridSpec):
    """(codes [K, N] int32, scale, zero) of a dense weight [K, N] on its grid (fp32 params)."""
    w = w.astype(jnp.float32)
    scale, zero = weight_params(w, group_size, per_tensor, spec)
    k = w.shape[0]
    codes = quantize(w, per_row(scale, k, group_size), per_row(zero, k, group_size), spec.bits)
    return codes, scale, zero


def rtn_quantize(w: jax.Array, cfg: LayerConfig, where: str = "") -> QArray:
    """RTN-quantizes a dense weight [K, N]; `where` names the layer in errors."""
    g = cfg.group_for(w.shape[0], where)
    codes, scale, zero = rtn_codes(w, g, cfg.per_tensor, cfg.grid())
    return uniform_qarray(codes, scale, zero, cfg, g, w.dtype)


def rtn_params(state: nnx.State, policy: dict[str, LayerConfig]) -> nnx.State:
    """The pure transform: every leaf named in `policy` replaced by its RTN QArray."""
    return map_params(state, {path: (lambda p, w, c=cfg: rtn_quantize(w, c, p)) for path, cfg in policy.items()})
