"""`linear()` for packed weights: the fused Pallas kernel on GPUs, the reference elsewhere.

Registered here for `QArray` (read as stored) and, by `pallas_kernels.layout`, for
`TiledQArray` (after `repack_for_gpu`). Per call the batch M = prod(x.shape[:-1]) is static,
so the choice is made at trace time:

1. `$JAXCOMPRESS_QUANT_KERNEL` = `reference` forces dequantize-then-matmul, `kernel` forces the
   kernel wherever it can run (errors otherwise), `interpret` runs the kernel in Pallas
   interpret mode on any device (debugging on a CPU), `auto` (default) decides as below;
2. the kernel needs an NVIDIA GPU of compute capability >= 8.0, bf16/fp16 activations and a
   layout it reads (`quant_matmul.layout_problem`);
3. the measured rule: the tuning table (`pallas_kernels/autotune.py`, measured by
   `scripts/bench_kernels.py`) holds, per problem and batch bucket, the fastest kernel config
   and the time of the XLA path beside it; the kernel runs only where it measured faster. A
   problem not in the table borrows the nearest K, N of its family; with
   `JAXCOMPRESS_AUTOTUNE=1` it is tuned on the spot (seconds) and cached; otherwise the
   kernel runs with its default blocks up to batch `UNMEASURED_MAX_M`.

`int8_linear` is the W8A8 / W4A8 entry point for a leaf that asks for int8 activations.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax

from jaxcompress.errors import ConfigError, UserError
from jaxcompress.ops.linear import dense_linear, register_linear
from jaxcompress.quant.qarray import QArray

# pallas_kernels imports jaxcompress.quant (QArray), so it is imported where first used, not here.

MODE_ENV = "JAXCOMPRESS_QUANT_KERNEL"
MODES = ("auto", "kernel", "reference", "interpret")
# Without a measurement the kernel is trusted only where decode is memory-bound.
UNMEASURED_MAX_M = 32

log = logging.getLogger(__name__)


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto")
    if value not in MODES:
        raise ConfigError(f"${MODE_ENV}={value!r} must be one of {MODES}")
    return value


@functools.cache
def compute_capability() -> float | None:
    """The default device's CUDA compute capability (9.0 on an H100), or None off NVIDIA GPUs."""
    if jax.default_backend() != "gpu":
        return None
    try:
        return float(getattr(jax.devices()[0], "compute_capability", None))
    except (TypeError, ValueError):
        return None


def gpu_can_run_kernels() -> bool:
    """An NVIDIA GPU with bf16 tensor cores (compute capability >= 8.0) is the default device."""
    cc = compute_capability()
    return cc is not None and cc >= 8.0


def batch_of(x: jax.Array) -> int:
    m = 1
    for d in x.shape[:-1]:
        m *= int(d)
    return m


def choose_config(x: jax.Array, w, *, kind: str = "a16"):
    """The kernel's TileConfig for this call, or None for the reference path."""
    from pallas_kernels import autotune
    from pallas_kernels.int8_matmul import int8_layout, int8_problem
    from pallas_kernels.layout import kernel_layout
    from pallas_kernels.quant_matmul import ACTIVATION_DTYPES, layout_problem

    how = mode()
    if how == "reference":
        return None
    problem = int8_problem(w) if kind == "a8" else layout_problem(w)
    if problem is None and x.dtype not in ACTIVATION_DTYPES:
        problem = f"activations are {x.dtype}, the kernel takes bfloat16 or float16"
    if problem is None and how != "interpret" and not gpu_can_run_kernels():
        problem = "no NVIDIA GPU with compute capability >= 8.0 is the default device"
    if problem is not None:
        if how == "kernel":
            raise UserError(f"${MODE_ENV}=kernel but weight {w.shape} cannot use it: {problem}")
        return None
    m = batch_of(x)
    lay = int8_layout(w) if kind == "a8" else kernel_layout(w)
    if how == "interpret":
        return _default(lay, m, kind)
    entry = autotune.table().lookup(autotune.problem_of(w, m, kind, lay), lay, m, int8=kind == "a8")
    if entry is None and autotune.autotune_enabled():
        entry = autotune.tune_and_record(w, m, x.dtype, kind=kind)
    if entry is not None and (entry.use_kernel or how == "kernel") and entry.config is not None:
        return _fit_rows(entry.config, m)
    if entry is None and (m <= UNMEASURED_MAX_M or how == "kernel"):
        if m > 1 and kind == "a16":
            _hint_wgmma_repack(w, m)
        return _default(lay, m, kind)
    return None


@functools.cache
def _hint_wgmma_repack_once(shape: tuple, bits: int, m: int) -> None:
    log.warning("linear(): %d-bit weight %s at batch %d has no measured kernel config; the default one ran "
                "0.22-0.53x XLA's bf16 dot at batch 8 for 8-, 3- and 2-bit weights on an H200 (kernel_notes runs "
                "21-22). On Hopper, jaxcompress.models.repack.repack_for_wgmma(model) runs it on the wgmma kernel "
                "(1.3-2.3x bf16 there)", bits, shape, m)


def _hint_wgmma_repack(w, m: int) -> None:
    """Once a shape and batch: on a Hopper GPU, point an unmeasured batched QArray at the wgmma repack."""
    from pallas_kernels.wgmma_matmul import hopper_is_default_device, repack_problem

    if isinstance(w, QArray) and hopper_is_default_device() and repack_problem(w) is None:
        _hint_wgmma_repack_once(tuple(w.shape), w.bits, m)


def _default(lay, m: int, kind: str):
    from pallas_kernels.autotune import num_sms
    from pallas_kernels.int8_matmul import default_int8_config
    from pallas_kernels.quant_matmul import default_config

    if kind == "a8":
        return default_int8_config(lay, m)
    return default_config(lay, m, num_sms())


def _fit_rows(cfg, m: int):
    """GEMV configs tuned for a bucket run any batch in it: one accumulator per row, up to 8."""
    return cfg if cfg.use_dot else dataclasses.replace(cfg, block_m=min(m, 8))


@register_linear(QArray)
def quantized_linear(x: jax.Array, w) -> jax.Array:
    """linear() for QArray and TiledQArray (pallas_kernels.layout registers the latter)."""
    from pallas_kernels.quant_matmul import quant_matmul

    cfg = choose_config(x, w)
    if cfg is None:
        return dense_linear(x, w.dequantize())
    return quant_matmul(x, w, config=cfg, interpret=mode() == "interpret")


def int8_linear(x: jax.Array, w) -> jax.Array:
    """y ~= x @ W with x quantized to int8 per token (W8A8 / W4A8) where the kernel runs; the
    same function through XLA elsewhere."""
    from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_reference

    cfg = choose_config(x, w, kind="a8")
    if cfg is None:
        return int8_matmul_reference(x, w)
    return int8_matmul(x, w, config=cfg, interpret=mode() == "interpret")
