"""Flash-decoding attention over a packed low-bit KV cache (Pallas, Triton back end), its bf16
twin as the baseline, and the pure-JAX references both are tested against.

Decode: one query token per row attends over S cache slots. The grid is (batch, kv head,
split). Each program walks its share of the slots block by block, unpacks keys and values from
the packed words in registers, dequantizes them there (scales, zero points, codebook, exact
outliers, RoPE for keys stored before rotation) and keeps flash-attention partials (o, l, m)
for the G query heads of its kv head: GQA heads share every load and are padded to 16 rows for
the tensor-core dot. Splitting the slots (flash-decoding) gives batch 1 at 32k enough programs
to fill the GPU; `combine` merges the splits with partials computed elsewhere (the
full-precision residual window, attention-sink tokens).

Shapes: q [B, K, G, D] (G query heads per kv head); packed stores `QTokens` [B, K, S, D] (the
packing invariant is in jaxcompress/kv/store.py); mask [B, S] (True: the slot may be attended);
length: scalar int, slots >= length are never read. Partials: o [B, K, G, D] (unnormalized),
l and m [B, K, G] (softmax sum and running max), fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxcompress.errors import ConfigError
from jaxcompress.kv.store import QTokens, codes_per_word

NEG_INF = -1e30          # finite: a fully masked tile must not produce NaN
MIN_DOT_ROWS = 16        # tensor-core dots need >= 16 rows: GQA query heads are padded to this
TARGET_PROGRAMS = 528    # ~4 programs per SM on an H100 (132 SMs): enough splits to fill it
DENSE_ROWS = 64          # slots per step of the bf16 kernel


class Partials(NamedTuple):
    o: jax.Array  # [B, K, G, D] unnormalized output
    l: jax.Array  # [B, K, G] softmax denominator
    m: jax.Array  # [B, K, G] running max of the scores


# ------------------------------------------------------------------------- pure JAX
def dense_partials(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> Partials:
    """Partials of q [B, K, G, D] over dense k, v [B, F, K, D] with mask [B, F] (fp32)."""
    s = jnp.einsum("bkgd,bfkd->bkgf", q.astype(jnp.float32), k.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) * scale
    valid = mask[:, None, None, :]
    s = jnp.where(valid, s, NEG_INF)
    m = jnp.max(s, axis=-1)
    p = jnp.where(valid, jnp.exp(s - m[..., None]), 0.0)
    o = jnp.einsum("bkgf,bfkd->bkgd", p, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return Partials(o, p.sum(-1), m)


def combine(parts: Sequence[Partials]) -> jax.Array:
    """Merges partials over disjoint slot sets into the normalized output [B, K, G, D] (fp32)."""
    m = jnp.stack([p.m for p in parts])
    top = jnp.max(m, axis=0)
    w = jnp.exp(m - top)
    l = jnp.sum(w * jnp.stack([p.l for p in parts]), axis=0)
    o = jnp.sum(w[..., None] * jnp.stack([p.o for p in parts]), axis=0)
    return o / jnp.where(l > 0, l, 1.0)[..., None]


def rotate_halves(k: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE (rotate-half layout) of k [B, K, S, D] by per-slot tables cos, sin [B, S, D/2]."""
    h = k.shape[-1] // 2
    lo, hi = k[..., :h], k[..., h:]
    c, s = cos[:, None].astype(jnp.float32), sin[:, None].astype(jnp.float32)
    return jnp.concatenate([lo * c - hi * s, hi * c + lo * s], axis=-1)


def quantized_decode_reference(q: jax.Array, k: QTokens, v: QTokens, mask: jax.Array, length,
                               *, scale: float, rope=None) -> Partials:
    """Dequantize everything, then attend: the reference for `quantized_decode_partials`."""
    kd = k.dequantize()
    if rope is not None:
        kd = rotate_halves(kd, *rope)
    valid = mask & (jnp.arange(mask.shape[1]) < length)[None, :]
    return dense_partials(q, kd.transpose(0, 2, 1, 3), v.dequantize().transpose(0, 2, 1, 3), valid, scale)


# ------------------------------------------------------------------------- kernel plan
@dataclasses.dataclass(frozen=True)
class _Operand:
    """Static description of one packed store, as the kernel reads it."""
    bits: int
    rows: int
    token_group: int
    channel_group: int
    head_dim: int
    width: int            # channels per dequantized tile
    has_zero: bool
    has_codebook: bool
    num_outliers: int
    shared_batch: bool    # scale/zero [1, ...]: shared by all rows
    shared_head: bool     # scale/zero [.., 1, ...]: shared by all kv heads

    @classmethod
    def of(cls, x: QTokens, width: int) -> "_Operand":
        return cls(bits=x.bits, rows=x.rows, token_group=x.token_group, channel_group=x.channel_group,
                   head_dim=x.head_dim, width=width, has_zero=x.zero is not None,
                   has_codebook=x.codebook is not None, num_outliers=x.num_outliers,
                   shared_batch=x.scale.shape[0] == 1, shared_head=x.scale.shape[1] == 1)

    @property
    def groups(self) -> int:
        return self.head_dim // self.width

    def arrays(self, x: QTokens) -> list:
        out = [x.codes, x.scale]
        if self.has_zero:
            out.append(x.zero)
        if self.has_codebook:
            out.append(x.codebook.astype(jnp.float32))
        if self.num_outliers:
            out += [x.outlier_index, x.outlier_value]
        return out

    def specs(self, x: QTokens) -> list:
        def meta(b, h, s):
            return (0 if self.shared_batch else b, 0 if self.shared_head else h, 0, 0)

        per_slot = lambda b, h, s: (b, h, 0, 0)  # noqa: E731
        specs = [pl.BlockSpec((None, None) + x.codes.shape[2:], per_slot),
                 pl.BlockSpec((None, None) + x.scale.shape[2:], meta)]
        if self.has_zero:
            specs.append(pl.BlockSpec((None, None) + x.zero.shape[2:], meta))
        if self.has_codebook:
            specs.append(pl.BlockSpec(x.codebook.shape, lambda b, h, s: (0,)))
        if self.num_outliers:
            specs += [pl.BlockSpec((None, None) + x.outlier_index.shape[2:], per_slot)] * 2
        return specs

    def take_refs(self, it) -> dict:
        refs = {"codes": next(it), "scale": next(it)}
        if self.has_zero:
            refs["zero"] = next(it)
        if self.has_codebook:
            refs["codebook"] = next(it)
        if self.num_outliers:
            refs["outlier_index"], refs["outlier_value"] = next(it), next(it)
        return refs


def _tile_width(x: QTokens, halves: bool) -> int:
    d, g = x.head_dim, x.channel_group
    width = g if 1 < g < d else d
    if halves:
        if 1 < g < d and g != d // 2:
            raise ConfigError(f"pre-RoPE keys need a channel group of 1, {d // 2} or {d}, got {g}")
        width = d // 2
    if width < MIN_DOT_ROWS or width & (width - 1):
        raise ConfigError(f"the decode kernel needs channel tiles of a power of 2 >= {MIN_DOT_ROWS}, "
                          f"got {width} (head_dim {d}, channel group {g})")
    return width


def supports(k: QTokens, v: QTokens, pre_rope: bool) -> bool:
    """Whether the kernel handles these stores: channel tiles (head_dim, a value channel group,
    or head_dim / 2 for pre-RoPE keys) of a power of 2 >= 16."""
    try:
        _tile_width(k, pre_rope)
        _tile_width(v, False)
    except ConfigError:
        return False
    return k.rows == v.rows and k.rows >= MIN_DOT_ROWS


# ------------------------------------------------------------------------- kernel body
def _meta_tile(ref, op: _Operand, t0, g: int):
    """The scale (or zero) tile that broadcasts over the [rows, width] tile at slot t0."""
    if op.token_group == 1:
        ti = pl.ds(t0, op.rows)
    elif op.token_group == 0:
        ti = pl.ds(0, 1)
    else:
        ti = pl.ds(lax.div(t0, jnp.int32(op.token_group)), 1)
    if op.channel_group == 1:
        ci = pl.ds(g * op.width, op.width)
    elif op.channel_group >= op.head_dim:
        ci = pl.ds(0, 1)
    else:
        ci = pl.ds(g, 1)
    return ref[ti, ci].astype(jnp.float32)


def _grid_values(refs: dict, op: _Operand, code):
    """a(code) in fp32 (a select chain over the codebook: Triton has no gather)."""
    if op.has_codebook:
        cb = refs["codebook"]
        x = jnp.zeros(code.shape, jnp.float32) + cb[0]
        for i in range(1, 2 ** op.bits):
            x = jnp.where(code == i, cb[i], x)
        return x
    if op.has_zero:
        return code.astype(jnp.float32)
    return (code - 2 ** (op.bits - 1)).astype(jnp.float32)


def _unpack(op: _Operand, words, slot):
    return (words >> (op.bits * slot)) & ((1 << op.bits) - 1)


def _dequant_tile(refs: dict, op: _Operand, words, slot, t0, g: int):
    """fp32 [rows, width] values of tokens [t0, t0 + rows) (packing slot `slot` of `words`),
    channels of tile g."""
    x = _grid_values(refs, op, _unpack(op, words, slot)) * _meta_tile(refs["scale"], op, t0, g)
    if op.has_zero:
        x = x + _meta_tile(refs["zero"], op, t0, g)
    if op.num_outliers:
        channel = lax.broadcasted_iota(jnp.int32, (1, op.width), 1) + g * op.width
        for n in range(op.num_outliers):
            idx = refs["outlier_index"][pl.ds(t0, op.rows), pl.ds(n, 1)].astype(jnp.int32)
            val = refs["outlier_value"][pl.ds(t0, op.rows), pl.ds(n, 1)].astype(jnp.float32)
            x = jnp.where(channel == idx, val, x)
    return x


def _dot(a, b, dot_dtype, transpose_b: bool):
    precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(a.astype(dot_dtype), b.astype(dot_dtype), dims,
                           preferred_element_type=jnp.float32, precision=precision)


def _softmax_step(carry, s, valid, values_fn):
    """One online-softmax update with scores s [hp, rows]; values_fn(p) -> per-tile p @ v."""
    m, l, o = carry
    s = jnp.where(valid[None, :], s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
    l = l * corr + jnp.sum(p, axis=1)
    o = [o_g * corr[:, None] + pv for o_g, pv in zip(o, values_fn(p))]
    return m_new, l, o


def _quantized_kernel(*refs, kop: _Operand, vop: _Operand, rope: bool, block: int,
                      blocks_per_split: int, scale: float, dot_dtype):
    it = iter(refs)
    q_ref, mask_ref, len_ref = next(it), next(it), next(it)
    krefs, vrefs = kop.take_refs(it), vop.take_refs(it)
    cos_ref, sin_ref = (next(it), next(it)) if rope else (None, None)
    o_ref, l_ref, m_ref = next(it), next(it), next(it)
    hp = q_ref.shape[0]
    rows = kop.rows
    q = [q_ref[:, pl.ds(g * kop.width, kop.width)] for g in range(kop.groups)]

    def words_at(refs, op: _Operand, row0, g: int):
        return refs["codes"][pl.ds(row0, rows), pl.ds(g * op.width, op.width)]

    def body(blk, carry):
        # An operand packed in blocks as large as the kernel block has one word row per slot
        # row: load its words once per block and unpack one slot per step.
        hoisted = {name: [words_at(refs, op, blk * rows, g) for g in range(op.groups)]
                   for name, refs, op in (("k", krefs, kop), ("v", vrefs, vop))
                   if codes_per_word(op.bits) * rows == block}

        def tile(name, refs, op, j, t0, g):
            c = codes_per_word(op.bits)
            if name in hoisted:
                words = hoisted[name][g]
            else:  # a smaller packing block: pick its word rows for this step
                words = words_at(refs, op, blk * (block // c) + lax.div(j, jnp.int32(c)) * rows, g)
            return _dequant_tile(refs, op, words, lax.rem(j, jnp.int32(c)), t0, g)

        def step(j, carry):
            t0 = blk * block + j * rows
            ktiles = [tile("k", krefs, kop, j, t0, g) for g in range(kop.groups)]
            if rope:  # keys were stored before RoPE: rotate the two halves now
                cos = cos_ref[pl.ds(t0, rows), :].astype(jnp.float32)
                sin = sin_ref[pl.ds(t0, rows), :].astype(jnp.float32)
                lo, hi = ktiles
                ktiles = [lo * cos - hi * sin, hi * cos + lo * sin]
            s = _dot(q[0], ktiles[0], dot_dtype, True)
            for g in range(1, kop.groups):
                s = s + _dot(q[g], ktiles[g], dot_dtype, True)
            valid = mask_ref[pl.ds(t0, rows)] != 0

            def values(p):
                return [_dot(p, tile("v", vrefs, vop, j, t0, g), dot_dtype, False) for g in range(vop.groups)]

            return _softmax_step(carry, s * scale, valid, values)

        return lax.fori_loop(0, block // rows, step, carry)

    split = pl.program_id(2)
    used_blocks = lax.div(len_ref[0] + (block - 1), jnp.int32(block))
    lo = split * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, used_blocks)
    init = (jnp.full((hp,), NEG_INF, jnp.float32), jnp.zeros((hp,), jnp.float32),
            [jnp.zeros((hp, vop.width), jnp.float32) for _ in range(vop.groups)])
    m, l, o = lax.fori_loop(lo, hi, body, init)
    for g in range(vop.groups):
        o_ref[:, pl.ds(g * vop.width, vop.width)] = o[g]
    l_ref[:] = l
    m_ref[:] = m


def _compiler_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu

    params = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return params(num_warps=num_warps, num_stages=num_stages)


def _splits(batch: int, kv_heads: int, n_blocks: int, num_splits: int | None) -> tuple[int, int]:
    """(splits, blocks per split): enough programs to fill the GPU, whole blocks per split."""
    want = num_splits or -(-TARGET_PROGRAMS // (batch * kv_heads))
    want = max(1, min(want, n_blocks))
    per_split = -(-n_blocks // want)
    return -(-n_blocks // per_split), per_split


def _pad_queries(q: jax.Array) -> jax.Array:
    g = q.shape[2]
    hp = max(MIN_DOT_ROWS, 1 << (g - 1).bit_length())
    return jnp.pad(q, ((0, 0), (0, 0), (0, hp - g), (0, 0)))


def _finish(o, l, m, g: int) -> Partials:
    """Merges the splits of a kernel's output ([B, K, splits, hp, ...]) into one partial."""
    o, l, m = o[:, :, :, :g], l[:, :, :, :g], m[:, :, :, :g]
    top = jnp.max(m, axis=2)
    w = jnp.exp(m - top[:, :, None])
    return Partials(jnp.sum(w[..., None] * o, axis=2), jnp.sum(w * l, axis=2), top)


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "dot_dtype", "interpret",
                                              "num_warps", "num_stages"))
def quantized_decode_partials(q: jax.Array, k: QTokens, v: QTokens, mask: jax.Array, length,
                              *, scale: float, rope=None, num_splits: int | None = None,
                              dot_dtype=jnp.bfloat16, interpret: bool = False, num_warps: int = 4,
                              num_stages: int = 2) -> Partials:
    """Flash-decoding partials of q [B, K, G, D] over packed keys and values.

    rope: None, or (cos, sin) [B, S, D/2] per-slot tables when keys are stored before RoPE.
    dot_dtype: operands of the two matmuls (bf16 on the tensor cores; fp32 for exact tests).
    num_splits: slot splits per (row, kv head); default: enough programs to fill an H100.
    """
    b, kv_heads, g, d = q.shape
    if k.rows != v.rows or k.capacity != v.capacity or k.head_dim != d or v.head_dim != d:
        raise ConfigError(f"keys and values must share rows, capacity and head_dim: keys "
                          f"{k.rows}/{k.capacity}/{k.head_dim}, values {v.rows}/{v.capacity}/{v.head_dim}, "
                          f"queries head_dim {d}")
    s = k.capacity
    block = math.lcm(k.block, v.block)
    if s % block:
        raise ConfigError(f"capacity {s} must be a multiple of the kernel block {block}")
    if mask.shape != (b, s):
        raise ConfigError(f"mask shape {mask.shape} must be (batch, capacity) = {(b, s)}")
    kop = _Operand.of(k, _tile_width(k, rope is not None))
    vop = _Operand.of(v, _tile_width(v, False))
    n_splits, per_split = _splits(b, kv_heads, s // block, num_splits)
    qp = _pad_queries(q)
    hp = qp.shape[2]

    mask = mask & (jnp.arange(s) < length)[None, :]  # whole blocks are read: mask their tail
    inputs = [qp, mask.astype(jnp.int8), jnp.reshape(jnp.asarray(length, jnp.int32), (1,))]
    specs = [pl.BlockSpec((None, None, hp, d), lambda i, h, j: (i, h, 0, 0)),
             pl.BlockSpec((None, s), lambda i, h, j: (i, 0)),
             pl.BlockSpec((1,), lambda i, h, j: (0,))]
    inputs += kop.arrays(k) + vop.arrays(v)
    specs += kop.specs(k) + vop.specs(v)
    if rope is not None:
        for table in rope:
            inputs.append(table.astype(jnp.float32))
            specs.append(pl.BlockSpec((None, s, d // 2), lambda i, h, j: (i, 0, 0)))
    kernel = functools.partial(_quantized_kernel, kop=kop, vop=vop, rope=rope is not None, block=block,
                               blocks_per_split=per_split, scale=scale, dot_dtype=dot_dtype)
    o, l, m = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, n_splits),
        in_specs=specs,
        out_specs=[pl.BlockSpec((None, None, None, hp, d), lambda i, h, j: (i, h, j, 0, 0)),
                   pl.BlockSpec((None, None, None, hp), lambda i, h, j: (i, h, j, 0)),
                   pl.BlockSpec((None, None, None, hp), lambda i, h, j: (i, h, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, n_splits, hp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, n_splits, hp), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, n_splits, hp), jnp.float32)],
        compiler_params=None if interpret else _compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"kv_decode_k{k.bits}v{v.bits}",
    )(*inputs)
    return _finish(o, l, m, g)


# ------------------------------------------------------------------------- bf16 baseline
def _dense_kernel(q_ref, mask_ref, len_ref, k_ref, v_ref, o_ref, l_ref, m_ref, *, rows: int,
                  blocks_per_split: int, scale: float, dot_dtype):
    hp, d = q_ref.shape
    q = q_ref[...]

    def body(blk, carry):
        t0 = blk * rows
        k = k_ref[pl.ds(t0, rows), :]
        s = _dot(q, k, dot_dtype, True) * scale
        valid = mask_ref[pl.ds(t0, rows)] != 0
        return _softmax_step(carry, s, valid,
                             lambda p: [_dot(p, v_ref[pl.ds(t0, rows), :], dot_dtype, False)])

    split = pl.program_id(2)
    used_blocks = lax.div(len_ref[0] + (rows - 1), jnp.int32(rows))
    lo = split * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, used_blocks)
    init = (jnp.full((hp,), NEG_INF, jnp.float32), jnp.zeros((hp,), jnp.float32),
            [jnp.zeros((hp, d), jnp.float32)])
    m, l, o = lax.fori_loop(lo, hi, body, init)
    o_ref[...] = o[0]
    l_ref[:] = l
    m_ref[:] = m


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "dot_dtype", "interpret",
                                              "num_warps", "num_stages"))
def dense_decode_partials(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, length,
                          *, scale: float, num_splits: int | None = None, dot_dtype=jnp.bfloat16,
                          interpret: bool = False, num_warps: int = 4, num_stages: int = 2) -> Partials:
    """The bf16 baseline: flash-decoding partials over a dense cache k, v [B, S, K, D] (the
    identity codec's layout, read in place)."""
    b, kv_heads, g, d = q.shape
    s = k.shape[1]
    rows = DENSE_ROWS
    if s % rows:
        raise ConfigError(f"cache length {s} must be a multiple of {rows} for the dense decode kernel")
    n_splits, per_split = _splits(b, kv_heads, s // rows, num_splits)
    qp = _pad_queries(q)
    hp = qp.shape[2]
    kernel = functools.partial(_dense_kernel, rows=rows, blocks_per_split=per_split, scale=scale,
                               dot_dtype=dot_dtype)
    kv_spec = pl.BlockSpec((None, s, None, d), lambda i, h, j: (i, 0, h, 0))
    o, l, m = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, n_splits),
        in_specs=[pl.BlockSpec((None, None, hp, d), lambda i, h, j: (i, h, 0, 0)),
                  pl.BlockSpec((None, s), lambda i, h, j: (i, 0)),
                  pl.BlockSpec((1,), lambda i, h, j: (0,)),
                  kv_spec, kv_spec],
        out_specs=[pl.BlockSpec((None, None, None, hp, d), lambda i, h, j: (i, h, j, 0, 0)),
                   pl.BlockSpec((None, None, None, hp), lambda i, h, j: (i, h, j, 0)),
                   pl.BlockSpec((None, None, None, hp), lambda i, h, j: (i, h, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, n_splits, hp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, n_splits, hp), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, n_splits, hp), jnp.float32)],
        compiler_params=None if interpret else _compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="kv_decode_dense",
    )(qp, (mask & (jnp.arange(s) < length)[None, :]).astype(jnp.int8),
      jnp.reshape(jnp.asarray(length, jnp.int32), (1,)), k, v)
    return _finish(o, l, m, g)


def dense_decode_reference(q, k, v, mask, length, *, scale: float) -> Partials:
    """Reference for `dense_decode_partials`."""
    valid = mask & (jnp.arange(mask.shape[1]) < length)[None, :]
    return dense_partials(q, k, v, valid, scale)
