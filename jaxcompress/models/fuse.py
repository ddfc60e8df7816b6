"""Fusing the projections that read the same input into one matmul each.

q | k | v become `self_attn.qkv_proj` and gate | up become `mlp.gate_up_proj`: their weights
are concatenated along the output axis, and the layer splits the fused output again. At decode
every matmul is a weight-bandwidth-bound GEMV with its own launch and ramp-up, so 7 matmuls a
layer become 4 and the small ones (k/v with GQA) stop running far below the bandwidth roofline.
vLLM and TensorRT-LLM serve Llama the same way.

It is a deployment step: the fused model computes the same function (each output column is
the same dot product over the same weights) but its parameter tree differs, so calibrate,
quantize, train and save the unfused model, and fuse the one you serve. Dense weights and
quantized leaves (`QArray`, `TiledQArray`) fuse; other leaves (LoRA, sparse, factorized) and
quantized weights of different layouts do not, which `strict=False` reports instead of raising.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress.errors import ConfigError
from jaxcompress.models.llama import Linear
from jaxcompress.quant.qarray import concat_columns

GROUPS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
          ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


@dataclasses.dataclass
class FusionReport:
    fused: list[str] = dataclasses.field(default_factory=list)  # "layers.3.self_attn.qkv_proj"
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why

    def summary(self) -> str:
        text = f"fused {len(self.fused)} projection groups"
        if self.skipped:
            first = next(iter(self.skipped.items()))
            text += f"; left {len(self.skipped)} unfused (e.g. {first[0]}: {first[1]})"
        return text


def concat_weights(kernels, where: str):
    """The [in, sum(out)] weight of several [in, out_i] weights (dense arrays or quantized leaves)."""
    if all(isinstance(w, jax.Array) for w in kernels):
        if len({w.dtype for w in kernels}) > 1 or len({w.shape[0] for w in kernels}) > 1:
            raise ConfigError(f"{where}: cannot fuse dense weights of shapes/dtypes "
                              f"{[(tuple(w.shape), w.dtype.name) for w in kernels]}")
        return jnp.concatenate(kernels, axis=1)
    if all(hasattr(w, "codes") and hasattr(w, "group_size") for w in kernels):
        return concat_columns(kernels, where)
    kinds = ", ".join(sorted({type(w).__name__ for w in kernels}))
    raise ConfigError(f"{where}: cannot fuse weights of type {kinds}; only dense arrays and quantized "
                      f"(QArray) weights concatenate. Merge adapters first, or pass strict=False")


def _fuse_group(parent, parts: tuple[str, ...], where: str) -> Linear:
    linears = [getattr(parent, name) for name in parts]
    kernel = concat_weights([lin.kernel.get_value() for lin in linears], where)
    biases = [lin.bias for lin in linears]
    bias = None
    if any(b is not None for b in biases):
        if any(b is None for b in biases):
            raise ConfigError(f"{where}: some of {parts} have a bias and some do not")
        bias = jnp.concatenate([b.get_value() for b in biases])
    return Linear(kernel, bias)


def fuse_projections(model, *, strict: bool = True):
    """(fused model, FusionReport). `model` is left as it was; the fused model shares its other
    arrays. With strict=False a group that cannot fuse stays as three (two) matmuls."""
    done = [f"layers.{i}.{parent}.{fused}" for i, layer in enumerate(model.layers)
            for parent, fused, _ in GROUPS if getattr(getattr(layer, parent), fused) is not None]
    if done:
        raise ConfigError(f"{done[0]} is already fused; fuse_projections takes the unfused model")
    model = nnx.clone(model)
    report = FusionReport()
    for i, layer in enumerate(model.layers):
        for parent_name, fused_name, parts in GROUPS:
            parent = getattr(layer, parent_name)
            where = f"layers.{i}.{parent_name}.{fused_name}"
            try:
                fused = _fuse_group(parent, parts, where)
            except ConfigError as e:
                if strict:
                    raise
                report.skipped[where] = str(e)
                continue
            setattr(parent, fused_name, fused)
            for name in parts:
                setattr(parent, name, None)
            report.fused.append(where)
    return model, report
