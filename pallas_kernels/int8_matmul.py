"""W8A8 / W4A8: int8 activations (quantized per token on the fly) x packed integer weights.

x [M, K] is quantized per row (token) to int8 with a symmetric absmax scale `xs [M]`; the
weight's codes become signed int8 `code - 2**(bits-1)`; int8 x int8 dots accumulate in int32
on the tensor cores (twice the bf16 rate), and per group the int32 sum turns into fp32:

    y[m, n] = xs[m] * sum_g scale[g, n] * (sum_{k in g} xq[m, k] * (code[k, n] - 2**(b-1))
                                          - (zero[g, n] - 2**(b-1)) * sum_{k in g} xq[m, k])

(the second term only for asymmetric grids). The int8 dot needs slabs of at least 32 rows:
an 8-bit per-channel QArray has them as stored; 4-bit groups need `repack_for_gpu(q, rows=32)`.
`int8_matmul_reference` computes the same function in fp32 from the dequantized weight.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxcompress.errors import UserError
from jaxcompress.quant.qarray import QArray
from pallas_kernels.layout import CodeLayout, TiledQArray, native_layout
from pallas_kernels.quant_matmul import (TileConfig, check_activations, config_problem,
                                         drop_poisoned_input, extract_codes, jit_kernel_call,
                                         load_group_row)

MIN_INT8_DOT_K = 32


def quantize_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (int8 codes [M, K], fp32 scales [M]) with x ~= codes * scale[:, None]."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    xq = jnp.clip(jnp.round(xf / scale[:, None]), -127, 127).astype(jnp.int8)
    return xq, scale


def int8_layout(w: QArray | TiledQArray) -> CodeLayout:
    return w.layout if isinstance(w, TiledQArray) else native_layout(w, max_rows=MIN_INT8_DOT_K)


def int8_problem(w) -> str | None:
    """Why the int8 kernel cannot take weight `w`, or None."""
    if not isinstance(w, (QArray, TiledQArray)):
        return f"{type(w).__name__} is not a QArray or TiledQArray"
    if w.codebook is not None:
        return "codebook (non-uniform) grids have no integer form"
    if w.scale is None:
        return "a uniform grid needs a scale"
    if w.outlier_index is not None:
        return "dense-and-sparse outliers are not supported with int8 activations"
    lay = int8_layout(w)
    if lay.rows < MIN_INT8_DOT_K:
        return (f"int8 dots need slabs of {MIN_INT8_DOT_K} rows, this layout has rows={lay.rows}; "
                f"use repack_for_gpu(q, rows={MIN_INT8_DOT_K})")
    return lay.problem()


def default_int8_config(lay: CodeLayout, m: int) -> TileConfig:
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64 if m <= 64 else 128
    while lay.n % bn:
        bn //= 2
    return TileConfig(block_n=bn, block_m=bm, use_dot=True, num_warps=4, num_stages=2)


def _kernel(x_ref, xs_ref, codes_ref, scale_ref, *rest, lay: CodeLayout, cfg: TileConfig,
            m: int, has_zero: bool):
    zero_ref, o_ref = rest if has_zero else (None, rest[0])
    bm, bn, rows, bits = cfg.block_m, cfg.block_n, lay.rows, lay.bits
    offset = 2 ** (bits - 1)
    n0 = pl.program_id(1) * bn
    cols = pl.ds(n0, bn)
    row_ids = jnp.minimum(pl.program_id(0) * bm + lax.iota(jnp.int32, bm), m - 1)
    one_group = lay.num_groups == 1

    def load_x(t, j):
        start, stride = lay.x_cols(t, j)
        if lay.k_padded == lay.k:
            return x_ref[row_ids, pl.ds(start, rows, stride=stride)]
        ids = start + lax.iota(jnp.int32, rows) * stride
        xs = x_ref[row_ids[:, None], jnp.minimum(ids, lay.k - 1)[None, :]]
        return jnp.where((ids < lay.k)[None, :], xs, jnp.zeros_like(xs))

    def zero_shift(g):  # (zero - offset) as int32 [1, bn]
        return load_group_row(zero_ref, g, cols).astype(jnp.int32) - offset

    fixed_zs = zero_shift(0) if (has_zero and one_group) else None

    def tile_step(t, acc):
        words = []
        for w in range(lay.words):
            start, stride = lay.word_rows(t, w)
            words.append(codes_ref[pl.ds(start, rows, stride=stride), cols])
        part = None
        for j in range(lay.period):
            if j % lay.slabs_per_group == 0:
                start, _ = lay.x_cols(t, j)
                first_row = t * lay.tile if lay.interleaved else start
                g = jnp.minimum(first_row // lay.group_size, lay.num_groups - 1)
                zs = (fixed_zs if one_group else zero_shift(g)) if has_zero else None
                part = None
            wq = (extract_codes(words, j, bits).astype(jnp.int32) - offset).astype(jnp.int8)
            xq = load_x(t, j)
            d = jnp.dot(xq, wq, preferred_element_type=jnp.int32)
            if has_zero:
                d = d - jnp.sum(xq.astype(jnp.int32), axis=1, keepdims=True) * zs
            part = d if part is None else part + d
            if (j + 1) % lay.slabs_per_group == 0:
                v = part.astype(jnp.float32)
                acc = acc + (v if one_group else v * load_group_row(scale_ref, g, cols))
        return acc

    first_tile = pl.program_id(2) * (lay.num_tiles // cfg.split_k)

    def body(step, acc):
        for u in range(cfg.tiles_per_step):
            acc = tile_step(first_tile + step * cfg.tiles_per_step + u, acc)
        return acc

    steps = lay.num_tiles // cfg.split_k // cfg.tiles_per_step
    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    if one_group:
        acc = acc * load_group_row(scale_ref, 0, cols)
    acc = acc * xs_ref[row_ids][:, None]
    if cfg.split_k == 1:
        o_ref[row_ids, cols] = acc.astype(o_ref.dtype)
    else:
        o_ref[pl.program_id(2), row_ids, cols] = acc


def int8_matmul(x: jax.Array, w: QArray | TiledQArray, *, config: TileConfig | None = None,
                interpret: bool = False, poison: float | None = None) -> jax.Array:
    """y [..., N] ~= x @ w.dequantize() with x quantized to int8 per token (W8A8 / W4A8).

    `config`, `interpret` and `poison` as in `quant_matmul`.
    """
    problem = int8_problem(w)
    if problem:
        raise UserError(f"int8_matmul: weight {w.shape} cannot use the int8 kernel: {problem}")
    lay = int8_layout(w)
    check_activations(x, lay.k, "int8_matmul")
    x2 = x.reshape(-1, lay.k)
    m = x2.shape[0]
    cfg = config or default_int8_config(lay, m)
    problem = config_problem(cfg, lay, m, min_dot_k=MIN_INT8_DOT_K, even_split=True)
    if problem is None and not cfg.use_dot:
        problem = "the int8 kernel has only the tensor-core path (use_dot=True)"
    if problem:
        raise UserError(f"int8_matmul: weight {w.shape}, batch M={m}: {problem}")
    y = _fused(x2, w, jnp.float32(0.0 if poison is None else poison), lay=lay, cfg=cfg,
               interpret=interpret, poisoned=poison is not None)
    return y.reshape(*x.shape[:-1], lay.n)


@jit_kernel_call
def _fused(x2: jax.Array, w, fill: jax.Array, *, lay: CodeLayout, cfg: TileConfig, interpret: bool,
           poisoned: bool) -> jax.Array:
    m = x2.shape[0]
    if w.perm is not None:  # storage row i holds input feature perm[i]
        x2 = jnp.take(x2, w.perm, axis=1)
    xq, xs = quantize_per_token(x2)
    has_zero = w.zero is not None
    operands = [xq, xs, w.codes, w.scale] + ([w.zero] if has_zero else [])
    if cfg.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((m, lay.n), x2.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((cfg.split_k, m, lay.n), jnp.float32)
    body = functools.partial(_kernel, lay=lay, cfg=cfg, m=m, has_zero=has_zero)
    aliases = {}
    if poisoned:
        operands.append(jnp.full(out_shape.shape, fill, out_shape.dtype))
        aliases = {len(operands) - 1: 0}
        body = functools.partial(drop_poisoned_input, body)
    y = pl.pallas_call(
        body,
        out_shape=out_shape,
        input_output_aliases=aliases,
        grid=(-(-m // cfg.block_m), lay.n // cfg.block_n, cfg.split_k),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"int8_matmul_w{lay.bits}a8",
    )(*operands)
    if cfg.split_k > 1:
        y = y.sum(axis=0).astype(x2.dtype)
    return y


def int8_matmul_reference(x: jax.Array, w: QArray | TiledQArray) -> jax.Array:
    """Same function in fp32: per-token quantized x times the dequantized weight."""
    k = w.shape[0]
    x2 = x.reshape(-1, k)  # per-row scales do not depend on the act-order permutation
    xq, xs = quantize_per_token(x2)
    xd = xq.astype(jnp.float32) * xs[:, None]
    y = jnp.dot(xd, w.dequantize().astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype).reshape(*x.shape[:-1], w.shape[1])
