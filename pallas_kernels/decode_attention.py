"""Flash-decoding attention over a packed low-bit KV cache (Pallas, Triton back end), its bf16
twin as the baseline, and the pure-JAX references both are tested against.

Decode: one query token per row attends over S cache slots. The grid is (batch, kv head,
split). Each program walks its share of the slots block by block, unpacks keys and values from
the packed words in registers, dequantizes them there (scales, zero points, codebook, exact
outliers, RoPE for keys stored before rotation) and keeps flash-attention partials (o, l, m)
for the G query heads of its kv head: GQA heads share every load. Two kinds of body, one per
store layout: "mma" (token_rows stores: any codec, codebooks, outliers, pre-RoPE keys) pads the
heads to 16 rows for tensor-core dots; "cw" (channel_words stores: KIVI) reduces on the CUDA
cores in the words' own layout with the scales folded into q and p (see "CUDA-core body"), and
"cw16" does the same in paired fp16 arithmetic, two cache elements an instruction (see "packed
fp16 body"); "cw2" splits cw16's work into a keys pass and a values pass, neither of which
reduces across threads inside its loop (see "two-pass fp16 body"; the default at 2 and 4 bits).
Splitting the slots (flash-decoding) gives batch 1 at 32k enough programs to fill the GPU;
`combine` merges the splits with partials computed elsewhere (the full-precision residual
window, attention-sink tokens).

Shapes: q [B, K, G, D] (G query heads per kv head); packed stores `QTokens` [B, K, S, D] (the
packing invariant is in jaxcompress/kv/store.py); mask [B, S] (True: the slot may be attended);
length: scalar int, slots >= length are never read. Partials: o [B, K, G, D] (unnormalized),
l and m [B, K, G] (softmax sum and running max), fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxcompress.errors import ConfigError
from jaxcompress.kv.store import PASS_COLUMNS, QTokens, codes_per_word, to_code_order
from pallas_kernels.f16x2 import (H2_SHIFT, h2_code_fma, h2_fma, h2_join, h2_mul, h2_pack, h2_pair_constants,
                                  h2_positions, h2_unpack, h2_zeros)
from pallas_kernels.hints import hinted_load
from pallas_kernels.quant_matmul import MAGIC, inplace_positions

NEG_INF = -1e30          # finite: a fully masked tile must not produce NaN
MIN_DOT_ROWS = 16        # tensor-core dots need >= 16 rows: GQA query heads are padded to this
TARGET_PROGRAMS = 528    # ~4 programs per SM on an H100 (132 SMs): enough splits to fill it
VALUE_SLOTS = 264        # the tensor-core values pass's programs in one wave: 2 an SM (255 registers), 132 SMs
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
    """Merges partials over disjoint slot sets into the normalized output [B, K, G, D] (fp32).
    A part is one partial [B, K, G, ...] or a kernel's splits [B, K, splits, G, ...] (`merge=False`
    of the decode kernels): all merge in one step (at batch 1 each merge is a launch or two).
    Each part is reduced where it lies: no concatenation (XLA materialized one per array)."""
    split = [p if p.m.ndim == 4 else Partials(p.o[:, :, None], p.l[:, :, None], p.m[:, :, None]) for p in parts]
    top = functools.reduce(jnp.maximum, [jnp.max(p.m, axis=2) for p in split])[:, :, None]
    w = [jnp.exp(p.m - top) for p in split]
    l = functools.reduce(jnp.add, [jnp.sum(wi * p.l, axis=2) for wi, p in zip(w, split)])
    o = functools.reduce(jnp.add, [jnp.sum(wi[..., None] * p.o, axis=2) for wi, p in zip(w, split)])
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
    """Whether a kernel body handles these stores: "cw" (`cw_supports`), or "mma" for
    token_rows stores with channel tiles (head_dim, a value channel group, or head_dim / 2 for
    pre-RoPE keys) of a power of 2 >= 16."""
    if cw_supports(k, v, pre_rope):
        return True
    if k.channel_words or v.channel_words:
        return False
    try:
        _tile_width(k, pre_rope)
        _tile_width(v, False)
    except ConfigError:
        return False
    return k.rows == v.rows and k.rows >= MIN_DOT_ROWS


# ------------------------------------------------------------------------- kernel body
def _split_blocks(len_ref, block: int, blocks_per_split: int):
    """[lo, hi): the blocks of `block` slots this program's split reads (none past the length)."""
    used_blocks = lax.div(len_ref[0] + (block - 1), jnp.int32(block))
    lo = pl.program_id(2) * blocks_per_split
    return lo, jnp.minimum(lo + blocks_per_split, used_blocks)


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

    lo, hi = _split_blocks(len_ref, block, blocks_per_split)
    init = (jnp.full((hp,), NEG_INF, jnp.float32), jnp.zeros((hp,), jnp.float32),
            [jnp.zeros((hp, vop.width), jnp.float32) for _ in range(vop.groups)])
    m, l, o = lax.fori_loop(lo, hi, body, init)
    for g in range(vop.groups):
        o_ref[:, pl.ds(g * vop.width, vop.width)] = o[g]
    l_ref[:] = l
    m_ref[:] = m


# ------------------------------------------------------------------------- CUDA-core body
# For few query heads per kv head (Llama-2 has G = 1) a tensor-core dot does 1/16 useful work
# and forces every dequantized tile through shared memory into the MMA operand layout. The
# "cw" body reads "channel_words" stores (jaxcompress/kv/store.py): [D, rows] word tiles (rows =
# 32 word columns by default; with 4 warps a thread holds 8 channels x 4 columns), so the score's
# sum over channels is mostly inside the thread. Per slot j of a tile (one token a column):
#   * codes -> exact fp32 in two instructions: the code masked where it lies (offset o) and
#     OR-ed into the mantissa of 2**23 (one LOP3; the exponent word is an operand, so it stays
#     in a register), then f * 2**-o - 2**(23 - o) (one FMA); offsets are loop variables, so
#     the slot loop stays rolled (an unrolled block needs more than 255 registers);
#   * keys: a key group covers whole word columns, so the per-channel scales of a tile are one
#     [D, 32] load per block, folded into the query (q * scale); the zero-point term q . zero
#     of each group comes precomputed (one XLA einsum over the key zeros);
#   * values: per-token scales fold into the probabilities (p * scale), zero points add
#     p * zero to a [1, 32] sum per channel group; per-token meta is stored in code order,
#     so slot j's 32 values are one contiguous load;
#   * scores in log2 units (log2(e) folded into q): exp2 is one MUFU instruction; masked and
#     out-of-length slots come as an additive NEG_INF bias (also in code order): a split that
#     saw only masked slots ends with m = NEG_INF, so `merge_splits` / `combine` weight it by zero
#     (a row with no valid slot at all gets an undefined output, where the reference gives 0).
# Partial sums stay [D, 32] / [1, 32] until the end of the program.
CW_MAX_HEADS = 2  # query heads per program of the cw body (registers); more are split over the grid
LOG2E = 1.4426950408889634


def cw_supports(k: QTokens, v: QTokens, pre_rope: bool) -> bool:
    """Whether the "cw" body handles these stores (KIVI-style: per-channel keys over groups
    of whole word columns, per-token values over channel groups, both channel_words)."""
    if not (k.channel_words and v.channel_words) or k.bits != v.bits or pre_rope:
        return False
    if k.codebook is not None or v.codebook is not None or k.num_outliers or v.num_outliers:
        return False
    c = codes_per_word(k.bits)
    return (k.rows == v.rows and k.channel_group == 1 and k.token_group > 0 and k.token_group % c == 0
            and k.rows * c % k.token_group == 0
            and v.token_group == 1 and 1 < v.channel_group <= v.head_dim and v.head_dim % v.channel_group == 0)


def _cw_kernel(q_ref, bias_ref, len_ref, magic_ref, kw_ref, ks_ref, cz_ref, vw_ref, vs_ref, *rest,
               bits: int, cols: int, token_group: int, vwidth: int, voff: float, blocks_per_split: int, heads: int):
    vz_ref = rest[0] if len(rest) == 4 else None
    o_ref, l_ref, m_ref = rest[-3:]
    c = codes_per_word(bits)
    block = cols * c
    d = kw_ref.shape[0]
    vgroups = d // vwidth
    magic = magic_ref[pl.ds(0, 1), pl.ds(0, 1)]
    shift, positions = inplace_positions(bits, top_aligned=True)
    direct = sum(1 for from_shifted, _ in positions if not from_shifted)  # slots masked in place
    channel = lax.broadcasted_iota(jnp.int32, (d, 1), 0)

    def codes(words, o):
        """Exact fp32 codes of the slot at bit offset o (a loop variable) of `words`."""
        mask = jnp.uint32((1 << bits) - 1) << o.astype(jnp.uint32)
        f = lax.bitcast_convert_type((words & mask) | magic, jnp.float32)  # 2**23 + code * 2**o
        inv = lax.bitcast_convert_type((127 - o) << 23, jnp.float32)       # 2**-o
        off = lax.bitcast_convert_type((150 - o) << 23, jnp.float32)       # 2**(23 - o)
        return f * inv - off

    def body(blk, carry):
        col0 = blk * cols
        group = blk * (block // token_group) + lax.broadcasted_iota(jnp.int32, (1, cols), 1) // (token_group // c)
        kscale = ks_ref[channel, group].astype(jnp.float32)  # [D, cols]: each column's key group
        qk = [q_ref[h] * kscale for h in range(heads)]       # q [D, cols] (broadcast) * scale
        cz = [cz_ref[jnp.full((1, 1), h, jnp.int32), group] for h in range(heads)]  # [1, cols]
        kwords = kw_ref[:, pl.ds(col0, cols)]
        vwords = [vw_ref[pl.ds(g * vwidth, vwidth), pl.ds(col0, cols)] for g in range(vgroups)]

        def slots(first, last, kw, vw, o_shift, carry):
            def slot(j, carry):
                m, l, acc, accz = carry
                t0 = blk * block + j * cols  # code order: slot j of the tile is contiguous
                o = j * bits - o_shift
                kx = codes(kw, o)
                bias = bias_ref[pl.ds(0, 1), pl.ds(t0, cols)]
                vs = [vs_ref[pl.ds(g, 1), pl.ds(t0, cols)].astype(jnp.float32) for g in range(vgroups)]
                vz = None if vz_ref is None else [vz_ref[pl.ds(g, 1), pl.ds(t0, cols)].astype(jnp.float32)
                                                  for g in range(vgroups)]
                vx = [codes(w, o) for w in vw]
                scores = [jnp.sum(kx * qk[h], axis=0, keepdims=True) + (cz[h] + bias) for h in range(heads)]
                m_new = [jnp.maximum(m[h], jnp.max(scores[h])) for h in range(heads)]

                def rescale(state):  # a new running max: scale the partial sums down (rare after a few slots)
                    l, acc, accz = state
                    corr = [jnp.exp2(m[h] - m_new[h]) for h in range(heads)]
                    return ([l[h] * corr[h] for h in range(heads)], [[a * corr[h] for a in acc[h]] for h in range(heads)],
                            [[z * corr[h] for z in accz[h]] for h in range(heads)])

                grew = functools.reduce(jnp.logical_or, [m_new[h] > m[h] for h in range(heads)])
                l, acc, accz = lax.cond(grew, rescale, lambda state: state, (l, acc, accz))
                new_l, new_acc, new_accz = [], [], []
                for h in range(heads):
                    p = jnp.exp2(scores[h] - m_new[h])
                    new_l.append(l[h] + p)
                    new_acc.append([acc[h][g] + vx[g] * (p * vs[g]) for g in range(vgroups)])
                    new_accz.append([accz[h][g] + (p * vz[g] if vz is not None else p * vs[g] * -voff)
                                     for g in range(vgroups)])
                return m_new, new_l, new_acc, new_accz

            return lax.fori_loop(first, last, slot, carry)

        carry = slots(0, direct, kwords, vwords, 0, carry)
        if direct < c:  # the top slots, read from the words shifted once
            sh = jnp.uint32(shift)
            carry = slots(direct, c, kwords >> sh, [w >> sh for w in vwords], shift, carry)
        return carry

    lo, hi = _split_blocks(len_ref, block, blocks_per_split)
    init = ([jnp.float32(NEG_INF)] * heads, [jnp.zeros((1, cols), jnp.float32)] * heads,
            [[jnp.zeros((vwidth, cols), jnp.float32)] * vgroups] * heads,
            [[jnp.zeros((1, cols), jnp.float32)] * vgroups] * heads)
    m, l, acc, accz = lax.fori_loop(lo, hi, body, init)
    for h in range(heads):
        for g in range(vgroups):
            o_ref[pl.ds(h, 1), pl.ds(g * vwidth, vwidth)] = (jnp.sum(acc[h][g], axis=1) + jnp.sum(accz[h][g]))[None, :]
        l_ref[pl.ds(h, 1)] = jnp.reshape(jnp.sum(l[h]), (1,))
        m_ref[pl.ds(h, 1)] = jnp.reshape(m[h] / LOG2E, (1,))  # back to natural-log units


def _cw_heads(g: int) -> int:
    """Query heads per program of the CUDA-core bodies (a divisor of G, at most CW_MAX_HEADS)."""
    return max(n for n in range(1, CW_MAX_HEADS + 1) if g % n == 0)


def _cw_inputs(q, k: QTokens, mask, length, scale: float, centred: bool, mid_in_kernel: bool = False,
               einsum: bool = True):
    """(q in log2 units [B, K, G, D], the zero-point term of every key group [B, K, G, T],
    the mask as an additive bias in code order [B, S]) for the CUDA-core bodies.

    The zero-point term is q . a(0) of each key group. The f16x2 bodies (`centred`) multiply
    centred codes: a(code) = (code - mid) * scale + (zero + mid * scale), and a symmetric grid
    is (code - mid) * scale (no term); the fp32 body multiplies the codes themselves. With
    `mid_in_kernel` the term leaves out q . (mid * scale), which the kernel sums itself (cw2:
    it has q * scale at hand), so that XLA reads the zero points only. einsum False: no term
    (None; the kernel sums it all)."""
    b, kv_heads, g, _ = q.shape
    qs = q.astype(jnp.float32) * (scale * LOG2E)  # scores in log2 units
    mid_scale = 2.0 ** (k.bits - 1) * k.meta_rows(k.scale).astype(jnp.float32)  # [Bs, Ks, Ts, D]
    if k.zero is None:
        kzero = None if centred else -mid_scale
    else:
        kzero = k.meta_rows(k.zero).astype(jnp.float32) + (mid_scale if centred and not mid_in_kernel else 0.0)
    if not einsum:
        cz = None
    elif kzero is None:
        cz = jnp.zeros((b, kv_heads, g, k.meta_rows(k.scale).shape[2]), jnp.float32)
    else:
        cz = jnp.einsum("bkgd,bktd->bkgt", qs, jnp.broadcast_to(kzero, (b, kv_heads) + kzero.shape[2:]))
    valid = mask & (jnp.arange(k.capacity) < length)[None, :]
    bias = jnp.where(valid, 0.0, NEG_INF).astype(jnp.float32)
    return qs, cz, to_code_order(bias, k.bits, k.rows)


def _cw_meta_spec(x, head_of):
    """BlockSpec of a per-(row, kv head) scale or zero [Bs, Ks, ...] (Bs, Ks: 1 when shared) on a
    (batch, program head hh, split) grid; head_of(hh) is the kv head."""
    return pl.BlockSpec((None, None) + x.shape[2:], lambda i, hh, j: (0 if x.shape[0] == 1 else i,
                                                                      0 if x.shape[1] == 1 else head_of(hh), 0, 0))


def _cw_head_spec(x, head_of):
    """BlockSpec of a store's words [B, K, ...] on the same grid."""
    return pl.BlockSpec((None, None) + x.shape[2:], lambda i, hh, j: (i, head_of(hh)) + (0,) * (x.ndim - 2))


def _cw_call(q, k: QTokens, v: QTokens, mask, length, *, scale: float, num_splits, interpret: bool,
             num_warps: int, num_stages: int, packed: bool = False) -> Partials:
    """The cw body (fp32), or with `packed` the cw16 body (f16x2, below)."""
    b, kv_heads, g, d = q.shape
    s = k.capacity
    c = codes_per_word(k.bits)
    cols = k.rows  # word columns of a tile
    block = cols * c
    chunk = _cw_heads(g)  # query heads per program
    chunks = g // chunk
    # programs of fewer warps: proportionally more of them
    n_splits, per_split = _splits(b, kv_heads * chunks, s // block, num_splits, TARGET_PROGRAMS * 4 // num_warps)
    qs, cz, bias = _cw_inputs(q, k, mask, length, scale, centred=packed)
    q_cols = jnp.broadcast_to(qs[..., None], (b, kv_heads, g, d, cols))

    kv_of = lambda hh: hh // chunks  # noqa: E731  the kv head of program head hh

    word = jnp.int32 if packed else jnp.uint32  # cw16: signless words for the inline assembly
    kwords, vwords = (lax.bitcast_convert_type(x.codes, word) for x in (k, v))
    inputs = [q_cols, bias[:, None, :], jnp.reshape(jnp.asarray(length, jnp.int32), (1,))]
    specs = [pl.BlockSpec((None, None, chunk, d, cols), lambda i, hh, j: (i, kv_of(hh), hh % chunks, 0, 0)),
             pl.BlockSpec((None, 1, s), lambda i, hh, j: (i, 0, 0)), pl.BlockSpec((1,), lambda i, hh, j: (0,))]
    if not packed:  # the fp32 exponent word, kept in a register
        inputs.append(jnp.full((1, 1), MAGIC, jnp.uint32))
        specs.append(pl.BlockSpec((1, 1), lambda i, hh, j: (0, 0)))
    inputs += [kwords, k.scale, cz, vwords, v.scale]
    specs += [_cw_head_spec(kwords, kv_of), _cw_meta_spec(k.scale, kv_of),
              pl.BlockSpec((None, None, chunk, cz.shape[-1]), lambda i, hh, j: (i, kv_of(hh), hh % chunks, 0)),
              _cw_head_spec(vwords, kv_of), _cw_meta_spec(v.scale, kv_of)]
    if v.zero is not None:
        inputs.append(v.zero)
        specs.append(_cw_meta_spec(v.zero, kv_of))
    vwidth = v.channel_group
    common = dict(bits=k.bits, cols=cols, token_group=k.token_group, vwidth=vwidth, blocks_per_split=per_split,
                  heads=chunk)
    if packed:
        _check_fp16_meta(k, v, "cw16")
        kernel = functools.partial(_cw16_kernel, **common, rows=h2_slice_rows(d, cols, num_warps, vwidth),
                                   asm=not interpret)
    else:
        kernel = functools.partial(_cw_kernel, **common, voff=0.0 if v.zero is not None else 2.0 ** (v.bits - 1))
    out = lambda i, hh, j: (i, hh, j, 0)  # noqa: E731
    o, l, m = pl.pallas_call(
        kernel,
        grid=(b, kv_heads * chunks, n_splits),
        in_specs=specs,
        out_specs=[pl.BlockSpec((None, None, None, chunk, d), lambda i, hh, j: (i, hh, j, 0, 0)),
                   pl.BlockSpec((None, None, None, chunk), out), pl.BlockSpec((None, None, None, chunk), out)],
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads * chunks, n_splits, chunk, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads * chunks, n_splits, chunk), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads * chunks, n_splits, chunk), jnp.float32)],
        compiler_params=None if interpret else _compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"kv_decode_k{k.bits}v{v.bits}_{'cw16' if packed else 'cw'}",
    )(*inputs)

    return _split_partials(*(_heads_last(x, b, kv_heads, chunks, n_splits, chunk) for x in (o, l, m)), g)


def _check_fp16_meta(k: QTokens, v: QTokens, path: str) -> None:
    meta = {"key scale": k.scale, "value scale": v.scale, "value zero": v.zero}
    odd = {n: str(x.dtype) for n, x in meta.items() if x is not None and x.dtype != jnp.float16}
    if odd:
        raise ConfigError(f"the {path} decode body reads fp16 scales and zero points (store META_DTYPE); "
                          f"got {odd}: use path='cw'")


def _heads_last(x, b: int, kv_heads: int, chunks: int, n_splits: int, chunk: int):
    """[B, K * chunks, splits, chunk, ...] -> [B, K, splits, G, ...] (G = chunks * chunk)."""
    x = x.reshape(b, kv_heads, chunks, n_splits, chunk, *x.shape[4:])
    return jnp.moveaxis(x, 2, 3).reshape(b, kv_heads, n_splits, chunks * chunk, *x.shape[5:])


# ------------------------------------------------------------------------- packed fp16 body
# "cw16" is the cw body in paired fp16 arithmetic: one 32-bit register holds two fp16 values
# (f16x2), and one instruction works on both. A channel_words word keeps its first c/2 codes in
# the low half-word and the rest in the high one, so code pair j = (slot j, slot j + c/2) of a
# word column lands one code in each half:
#   * (word & mask_j) | magic_j puts both codes in the mantissas of 2**(10 - o) (o: their offset
#     in the half, with o + bits <= 10; the top pairs are read from word >> 8), one f16x2
#     subtraction of 2**(10 - o) + 2**(bits - 1) leaves the exact centred codes (small partial
#     sums; the centre joins the zero-point terms), one f16x2 FMA multiplies and adds: three
#     instructions for two cache elements, keys and values alike (cw: three for one);
#   * keys: the channel sum runs over [rows, 32] slices of the [D, 32] tile in f16x2 (D / rows
#     terms, 8 for Llama-2), then in fp32 over the slice's rows. fp16 rounds by 2**-11 and holds
#     |q * scale * log2(e) / sqrt(D) * key scale| * 2**(bits-1) * D / rows below 65504: true of
#     real activations by orders of magnitude; the exact "cw" is there for anything else;
#   * values: a tile's pairs accumulate p * scale * code in f16x2 (one term a slot per half), then
#     the tile's sums join the fp32 sums, so fp16 never adds more than c/2 terms.
# Everything else (folded scales, zero terms, code-order meta, exp2, lazy rescale) is cw's.
# Interpret mode runs the same arithmetic through jnp on fp16 (no inline assembly on the CPU).
def h2_slice_rows(d: int, cols: int, num_warps: int, vwidth: int) -> int:
    """Channels a slice of the cw16 body: the rows one layout tile of the warps covers with four
    words a thread, so every slice has the same per-thread layout; a slice stays in one value
    channel group."""
    rows = max(1, min(d, num_warps * 32 * 4 // cols))
    return math.gcd(math.gcd(rows, vwidth), d)


def _cw16_kernel(q_ref, bias_ref, len_ref, kw_ref, ks_ref, cz_ref, vw_ref, vs_ref, *rest,
                 bits: int, cols: int, token_group: int, vwidth: int, blocks_per_split: int,
                 heads: int, rows: int, asm: bool):
    vz_ref = rest[0] if len(rest) == 4 else None
    o_ref, l_ref, m_ref = rest[-3:]
    c = codes_per_word(bits)
    pairs = c // 2
    block = cols * c
    d = kw_ref.shape[0]
    slices = d // rows
    group_of = [(r * rows) // vwidth for r in range(slices)]  # each slice's value channel group
    vgroups = d // vwidth
    vmid2 = jnp.int32(((15 + bits - 1) << 10) * 0x10001)  # f16x2 (mid, mid): mid = 2**(bits - 1)
    positions = h2_positions(bits)
    direct = sum(1 for shifted, _ in positions if not shifted)
    row = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)

    def flush(acc2):  # a tile's f16x2 value sums [rows, cols] -> fp32 [rows, 1] (fewer registers)
        return jnp.sum(sum(h2_unpack(acc2, asm)), axis=1, keepdims=True)

    def body(blk, carry):
        m, l, acc, accz = carry
        col0 = blk * cols
        group = blk * (block // token_group) + lax.broadcasted_iota(jnp.int32, (1, cols), 1) // (token_group // c)
        kscale = [ks_ref[r * rows + row, group].astype(jnp.float32) for r in range(slices)]  # [rows, cols]
        qk = [[h2_pack(*(2 * [q_ref[h, pl.ds(r * rows, rows), :] * kscale[r]]), asm) for r in range(slices)]
              for h in range(heads)]
        cz = [cz_ref[jnp.full((1, 1), h, jnp.int32), group] for h in range(heads)]  # [1, cols]
        kwords = [kw_ref[pl.ds(r * rows, rows), pl.ds(col0, cols)] for r in range(slices)]
        vwords = [vw_ref[pl.ds(r * rows, rows), pl.ds(col0, cols)] for r in range(slices)]
        zero2 = h2_zeros((rows, cols), asm)
        zero_cols2 = h2_zeros((1, cols), asm)

        def pairs_from(first, last, kw, vw, o_shift, carry):
            def pair(j, carry):
                m, l, acc, acc2, accz, accz2 = carry
                mask, magic, center = h2_pair_constants(bits, j * bits - o_shift)
                t = [blk * block + (j + i * pairs) * cols for i in (0, 1)]  # code order: the slots' tokens
                bias = [bias_ref[pl.ds(0, 1), pl.ds(t[i], cols)] for i in (0, 1)]

                def meta2(ref):  # [1, cols] f16x2: (slot j, slot j + c/2) of each value group
                    return [h2_join(*(ref[pl.ds(g, 1), pl.ds(t[i], cols)] for i in (0, 1)), asm) for g in range(vgroups)]

                vs2 = meta2(vs_ref)
                vz2 = None if vz_ref is None else meta2(vz_ref)
                scores = []
                for h in range(heads):
                    s2 = zero2
                    for r in range(slices):
                        s2 = h2_code_fma(kw[r], mask, magic, center, qk[h][r], s2, asm)
                    halves = h2_unpack(s2, asm)
                    scores.append([jnp.sum(halves[i], axis=0, keepdims=True) + (cz[h] + bias[i]) for i in (0, 1)])
                m_new = [jnp.maximum(m[h], jnp.maximum(jnp.max(scores[h][0]), jnp.max(scores[h][1])))
                         for h in range(heads)]

                def rescale(state):  # a new running max: fold the tile's f16x2 sums in, scale down
                    l, acc, acc2, accz, accz2 = state
                    corr = [jnp.exp2(m[h] - m_new[h]) for h in range(heads)]
                    acc = [[(a + flush(a2)) * corr[h] for a, a2 in zip(acc[h], acc2[h])] for h in range(heads)]
                    accz = [[(z + sum(h2_unpack(z2, asm))) * corr[h] for z, z2 in zip(accz[h], accz2[h])]
                            for h in range(heads)]
                    return ([l[h] * corr[h] for h in range(heads)], acc, [[zero2] * slices] * heads, accz,
                            [[zero_cols2] * vgroups] * heads)

                grew = functools.reduce(jnp.logical_or, [m_new[h] > m[h] for h in range(heads)])
                l, acc, acc2, accz, accz2 = lax.cond(grew, rescale, lambda state: state, (l, acc, acc2, accz, accz2))
                new_l, new_acc2, new_accz2 = [], [], []
                for h in range(heads):
                    p = [jnp.exp2(scores[h][i] - m_new[h]) for i in (0, 1)]
                    new_l.append(l[h] + p[0] + p[1])
                    p2 = h2_pack(p[0], p[1], asm)
                    pv = [h2_mul(p2, vs2[g], asm) for g in range(vgroups)]
                    new_acc2.append([h2_code_fma(vw[r], mask, magic, center, pv[group_of[r]], acc2[h][r], asm)
                                     for r in range(slices)])
                    if vz2 is None:  # symmetric: (code - mid) * scale is the value itself
                        new_accz2.append(accz2[h])
                    else:  # value = (code - mid) * scale + (zero + mid * scale)
                        new_accz2.append([h2_fma(pv[g], vmid2, h2_fma(p2, vz2[g], accz2[h][g], asm), asm)
                                          for g in range(vgroups)])
                return m_new, new_l, acc, new_acc2, accz, new_accz2

            return lax.fori_loop(first, last, pair, carry)

        carry = (m, l, acc, [[zero2] * slices] * heads, accz, [[zero_cols2] * vgroups] * heads)
        carry = pairs_from(0, direct, kwords, vwords, 0, carry)
        if direct < pairs:  # the top pairs, read from the words shifted once
            shifted = [[lax.shift_right_logical(w, jnp.int32(H2_SHIFT)) for w in ws] for ws in (kwords, vwords)]
            carry = pairs_from(direct, pairs, *shifted, H2_SHIFT, carry)
        m, l, acc, acc2, accz, accz2 = carry
        acc = [[a + flush(a2) for a, a2 in zip(acc[h], acc2[h])] for h in range(heads)]
        accz = [[z + sum(h2_unpack(z2, asm)) for z, z2 in zip(accz[h], accz2[h])] for h in range(heads)]
        return m, l, acc, accz

    lo, hi = _split_blocks(len_ref, block, blocks_per_split)
    init = ([jnp.float32(NEG_INF)] * heads, [jnp.zeros((1, cols), jnp.float32)] * heads,
            [[jnp.zeros((rows, 1), jnp.float32)] * slices] * heads,
            [[jnp.zeros((1, cols), jnp.float32)] * vgroups] * heads)
    m, l, acc, accz = lax.fori_loop(lo, hi, body, init)
    for h in range(heads):
        for r in range(slices):
            o_ref[pl.ds(h, 1), pl.ds(r * rows, rows)] = (acc[h][r][:, 0] + jnp.sum(accz[h][group_of[r]]))[None, :]
        l_ref[pl.ds(h, 1)] = jnp.reshape(jnp.sum(l[h]), (1,))
        m_ref[pl.ds(h, 1)] = jnp.reshape(m[h] / LOG2E, (1,))


# ------------------------------------------------------------------------- two-pass fp16 body
# "cw2" splits cw16's work into two kernels, so that neither reduces across threads in its loop
# (cw16 spends most of its instructions on the per-pair softmax: cross-warp sums and maxima):
#   1. keys: each lane owns a word column (c slots) and walks the D channel rows, KEY_ROWS_F16 at
#      a time, the next rows' loads issued before this step's arithmetic. The channel sum is a
#      chain of f16x2 FMAs in the lane's registers, flushed to fp32 every KEY_ROWS_F16 rows (the
#      same fp16 bound as cw16's slices). Scores (log2 units, zero-point term and mask bias
#      added) go to an fp32 buffer [.., G, S] in code order, with each split's maximum.
#   2. values: each lane owns a word column again, computes its c p = 2**(score - the split's
#      maximum) once a block (folded with the value scales into c/2 f16x2 factors) and walks
#      VALUE_CHANNELS channel rows, one fp32 sum a row and lane, reduced across lanes once at the
#      end: no running maximum, no rescaling branch. D / VALUE_CHANNELS programs share a head.
# The scores cost 4 bytes a slot and head to write and 4 to read per value program (mostly from
# L2), against 32 bytes of 2-bit codes a slot and head of 128 channels.
KEY_ROWS_F16 = 8       # channel rows summed in f16x2 before the fp32 sums (cw16: D / rows = 8)
KEY_COLUMNS = PASS_COLUMNS  # word columns of a keys-pass tile: one a thread with 4 warps
DEFAULT_KEY_PREFETCH = 2  # steps of keys-pass loads in flight (`Cw2Config.key_prefetch`)


def _cw2_keys_kernel(q_ref, bias_ref, len_ref, kw_ref, ks_ref, zero_ref, s_ref, m_ref, *, bits: int,
                     cols: int, rows: int, token_group: int, blocks_per_split: int, heads: int, mid_term: bool,
                     zero_rows: bool, q_scale: float, evict: str | None, asm: bool, prefetch: int):
    """Keys pass. zero_ref: with `zero_rows` the key zero points [D, T] (the term q . zero summed
    here, row by row with the scales), else XLA's q . zero of each group [heads, T]. prefetch: steps
    of loads in flight ahead of the arithmetic (`Cw2Config.key_prefetch`)."""
    c = codes_per_word(bits)
    pairs = c // 2
    block = cols * c
    d = kw_ref.shape[0]
    steps = d // KEY_ROWS_F16
    positions = h2_positions(bits)
    consts = [h2_pair_constants(bits, o) for _, o in positions]
    lane = lax.iota(jnp.int32, cols)

    def body(blk, top):
        col = blk * cols + lane                  # word column of each lane
        group = col // (token_group // c)        # its key group
        zero2 = h2_zeros((cols,), asm)

        def load(ci):  # words, key scales (and zero points) of channel rows [ci * 8, ci * 8 + 8) (ci clamped)
            r0 = jnp.minimum(ci, steps - 1) * KEY_ROWS_F16
            rows_ = range(KEY_ROWS_F16)
            return ([hinted_load(kw_ref.at[r0 + rr, pl.ds(blk * cols, cols)], evict) for rr in rows_],
                    [ks_ref[r0 + rr, group] for rr in rows_],
                    [zero_ref[r0 + rr, group] for rr in rows_] if zero_rows else [])

        def channel_rows(ci, sums, qsum, qzero, loaded):
            words, kscales, kzeros = loaded
            qsum, qzero = list(qsum), list(qzero)
            ahead = load(ci + prefetch)  # later rows' loads go out before this step's arithmetic
            s2 = [[zero2] * pairs for _ in range(heads)]
            for rr in range(KEY_ROWS_F16):
                w = words[rr]
                shifted = lax.shift_right_logical(w, jnp.int32(H2_SHIFT))
                kscale = kscales[rr].astype(jnp.float32)
                for h in range(heads):
                    qf = q_ref[h, ci * KEY_ROWS_F16 + rr].astype(jnp.float32) * q_scale
                    qk = qf * kscale
                    if mid_term:  # q . scale of the column's group, for the zero-point term
                        qsum[h] = qsum[h] + qk
                    if zero_rows:  # q . zero of the column's group
                        qzero[h] = qzero[h] + qf * kzeros[rr].astype(jnp.float32)
                    qk2 = h2_pack(qk, qk, asm)
                    s2[h] = [h2_code_fma(shifted if sh else w, *consts[j], qk2, s2[h][j], asm)
                             for j, (sh, _) in enumerate(positions)]
            new = []
            for h in range(heads):
                halves = [h2_unpack(x, asm) for x in s2[h]]
                new.append([sums[h][j] + halves[j % pairs][j // pairs] for j in range(c)])
            return new, qsum, qzero, ahead

        def prefetch_rounds(i, carry):
            """`prefetch` steps; step j reads slot j and refills it `prefetch` steps ahead (no
            register moves between slots)."""
            sums, qsum, qzero, slots = carry
            slots = list(slots)
            for j in range(prefetch):
                sums, qsum, qzero, slots[j] = channel_rows(i * prefetch + j, sums, qsum, qzero, slots[j])
            return sums, qsum, qzero, tuple(slots)

        zero = jnp.zeros((cols,), jnp.float32)
        sums, qsum, qzero, _ = lax.fori_loop(0, steps // prefetch, prefetch_rounds,
                                             ([[zero] * c] * heads, [zero] * heads, [zero] * heads,
                                              tuple(load(i) for i in range(prefetch))))
        # code order: slot j of word column `col` sits at (col // rows) * rows * c + j * rows + col % rows
        base = (col // rows) * (rows * c) + col % rows
        new_top = []
        for h in range(heads):
            cz = qzero[h] if zero_rows else zero_ref[h, group]
            if mid_term:
                cz = cz + float(1 << (bits - 1)) * qsum[h]
            t = top[h]
            for j in range(c):
                pos = base + j * rows
                score = sums[h][j] + cz + bias_ref[0, pos]
                s_ref[h, pos] = score
                t = jnp.maximum(t, score)
            new_top.append(t)
        return new_top

    lo, hi = _split_blocks(len_ref, block, blocks_per_split)
    top = lax.fori_loop(lo, hi, body, [jnp.full((cols,), NEG_INF, jnp.float32)] * heads)
    for h in range(heads):
        m_ref[pl.ds(h, 1)] = jnp.reshape(jnp.max(top[h]), (1,))


def _cw2_values_kernel(s_ref, ms_ref, len_ref, vw_ref, vs_ref, *rest, bits: int, cols: int, rows: int,
                       vwidth: int, channels: int, parts: int, blocks_per_split: int, heads: int,
                       evict: str | None, asm: bool):
    """Values pass: each lane owns a word column (c slots) and walks `channels` channel rows of
    the value store, part `program_id(1) % parts` of D; fp32 sums per row and lane, reduced over
    the lanes once at the end."""
    vz_ref = rest[0] if len(rest) == 4 else None
    o_ref, l_ref, m_ref = rest[-3:]
    c = codes_per_word(bits)
    pairs = c // 2
    block = cols * c
    positions = h2_positions(bits)
    consts = [h2_pair_constants(bits, o) for _, o in positions]
    mid = float(1 << (bits - 1))
    ch0 = (pl.program_id(1) % parts) * channels
    lane = lax.iota(jnp.int32, cols)
    top = [ms_ref[pl.ds(h, 1)] for h in range(heads)]  # [1]: the split's maximum score
    n_groups = max(1, channels // vwidth)  # value channel groups among this program's rows

    def body(blk, carry):
        l, acc, az = carry
        col = blk * cols + lane
        base = (col // rows) * (rows * c) + col % rows
        pos = [base + j * rows for j in range(c)]
        gidx = [ch0 // vwidth + i for i in range(n_groups)]
        vs = [[vs_ref[g, pos[j]].astype(jnp.float32) for j in range(c)] for g in gidx]
        vz = None if vz_ref is None else [[vz_ref[g, pos[j]].astype(jnp.float32) for j in range(c)] for g in gidx]
        new_l, new_az, pv2 = [], [], []
        for h in range(heads):
            p = [jnp.exp2(s_ref[h, pos[j]] - top[h]) for j in range(c)]
            new_l.append(l[h] + functools.reduce(jnp.add, p))
            pv2.append([[h2_pack(p[j] * vs[g][j], p[j + pairs] * vs[g][j + pairs], asm) for j in range(pairs)]
                        for g in range(n_groups)])
            if vz is None:  # symmetric: (code - mid) * scale is the value itself
                new_az.append(az[h])
            else:  # value = (code - mid) * scale + (zero + mid * scale)
                new_az.append([az[h][g] + functools.reduce(jnp.add, [p[j] * (vz[g][j] + mid * vs[g][j]) for j in range(c)])
                               for g in range(n_groups)])
        zero2 = h2_zeros((cols,), asm)
        new_acc = [list(a) for a in acc]
        for r in range(channels):
            words = hinted_load(vw_ref.at[ch0 + r, pl.ds(blk * cols, cols)], evict)
            shifted = lax.shift_right_logical(words, jnp.int32(H2_SHIFT))
            g = min(r // vwidth, n_groups - 1)
            for h in range(heads):
                a2 = zero2
                for j, (sh, _) in enumerate(positions):
                    a2 = h2_code_fma(shifted if sh else words, *consts[j], pv2[h][g][j], a2, asm)
                lo_, hi_ = h2_unpack(a2, asm)
                new_acc[h][r] = new_acc[h][r] + (lo_ + hi_)
        return new_l, new_acc, new_az

    lo, hi = _split_blocks(len_ref, block, blocks_per_split)
    zeros = jnp.zeros((cols,), jnp.float32)
    init = ([zeros] * heads, [[zeros] * channels for _ in range(heads)], [[zeros] * n_groups for _ in range(heads)])
    l, acc, az = lax.fori_loop(lo, hi, body, init)
    for h in range(heads):
        zterm = [jnp.sum(a) for a in az[h]]
        for r in range(channels):  # one store a row: Triton stacks only pairs of scalars
            o_ref[pl.ds(h, 1), pl.ds(r, 1)] = jnp.reshape(jnp.sum(acc[h][r]) + zterm[min(r // vwidth, n_groups - 1)], (1, 1))
        l_ref[pl.ds(h, 1)] = jnp.reshape(jnp.sum(l[h]), (1,))
        m_ref[pl.ds(h, 1)] = top[h] / LOG2E  # back to natural-log units


VALUE_CHANNELS = 32    # channel rows a values-pass program sums (fp32 registers a lane and head;
                       # H100, KIVI-2 32k: 32 / 64 / 128 took 36 / 43 / 67 us at batch 1)
INTERPRET_VALUE_CHANNELS = 16


# Channel rows a values-pass program sums when the grid is small (batch x kv heads <= SMALL_GRID_HEADS,
# e.g. Llama-2 at batch 1): more, shorter programs. H100, KIVI-2 at 32k: batch 1 79 against 83 us
# of kernels with 32 rows; batch 8 425 against 419 (kv_notes run 14).
SMALL_GRID_VALUE_CHANNELS = 16
SMALL_GRID_HEADS = 32


VALUES_PASSES = ("auto", "cuda", "wgmma")
KEYS_PASSES = ("cuda", "int8")


@dataclasses.dataclass(frozen=True)
class Cw2Config:
    """Tuning of the two-pass body (a static, hashable option of `quantized_decode_partials`).

    value_channels: channel rows a values-pass program sums. None: $JAXCOMPRESS_KV_VALUE_CHANNELS,
    else VALUE_CHANNELS, or SMALL_GRID_VALUE_CHANNELS when batch x kv heads is at most
    SMALL_GRID_HEADS (more, shorter programs); interpret mode INTERPRET_VALUE_CHANNELS.
    keys_zero: the keys pass sums the zero-point term q . zero itself, from the zero points it
    loads beside the scales, instead of an XLA einsum before it. None: on small grids only (H100,
    KIVI-2 at 32k, kv_notes run 15: batch 1 71.2 against 72.8 us of kernels and one launch fewer;
    batch 8 415.2 against 409.8: the keys pass reads the zero points less well than the einsum).
    columns: word columns of a tile, both passes. key_warps / value_warps: warps a program of each
    pass (None: columns / 32, one column a lane; fewer give each lane several adjacent columns,
    read as one wider load).
    key_prefetch: steps of the keys pass's loads (8 channel rows each) issued ahead of its
    arithmetic, in register slots refilled in turn. ncu on an H200 at batch 8: its warps stall mostly
    on those loads, and the grid, not the registers, limits its occupancy. None: 2 where it divides
    the pass's steps, else 1 (H200, KIVI-2 at 32k, kv_notes run 18: keys pass 163.3 against 167.6 us
    at batch 8, 28.6 against 28.9 at batch 1; 4 steps, at 150 registers, lost: 188.2 and 38.1).
    values: "cuda" (the f16x2 values pass above), "wgmma" (the values pass on Hopper's tensor cores,
    `kv_values_wgmma`: 2-bit values only, one program a kv head for all its query heads; in interpret
    mode its plain-JAX model `emulate_values`, since Mosaic GPU has no CPU interpreter) or "auto"
    (`values_pass_of`: wgmma wherever it runs, a Hopper GPU and a store it reads, except with one query a
    kv head on a small grid, where a decode step measured slower with it). H200, KIVI-2 at 32k,
    kv_notes run 22, values pass us against the f16x2 pass: Llama-2-7B (one query a kv head) 25.1
    against 29.3 at batch 1 and 159.0 against 170.4 at batch 8; Llama-3-8B (4 query heads a kv head)
    59.8 against 160.8 at batch 8 (run 21: 13.4 against 30.1 at batch 1). values_stages: its steps of
    loads in flight; values_pieces: 256-token pieces a step (2 halves the per-step overhead a token);
    values_lop3: its conversion's and-or as one PTX lop3 (run 21's SASS: two LOP3 a pair from arith).
    Run 22, Llama-2 at batch 8: 191.7 us with neither, 166.6 with lop3, 159.0 with both (2 stages).
    values_balanced: its codes centred on their middle, 1.5 (`kv_values_wgmma.slot_mids`), not 2. On an
    H200 the pass's error grew with the tokens a split (kv_notes run 24, random layers at 32k: 2.0e-3
    at 2048 tokens, 8.6e-3 at 32768; the f16x2 pass 5.5e-4 at both): wgmma's sum of B x (code - 2)
    leans one way and came out about 2e-4 off relative to itself, and the zero-point term cancels most
    of it. Centred codes leave a sum about 10x smaller, and on the GPU (run 25, batch 1) the error
    stays flat: 9.7e-4 with one split of 32768 tokens, 4.8e-4 with splits of 2048, in the same time.
    So it is the default; False keeps run 24's codes less 2 for comparison.
    values_splits: the tensor-core values pass's splits, which need not be the keys pass's: a values
    split's maximum is the largest of the keys splits it overlaps (`values_top`). None: `num_splits`
    where the caller names it, else the blocks spread evenly over one wave of VALUE_SLOTS programs
    (`_value_blocks`; the keys pass wants more, shorter programs). Run 25, 32k: the values pass 22.4
    against 24.9 us at batch 1 with 8 splits instead of 16, 142.8 against 157.4 at batch 8 with 1
    instead of 3; all kernels 3.54x XLA's bf16 attention at batch 8, 2.53x at batch 1 (with this pass).
    keys: "cuda" (the f16x2 keys pass above) or "int8" (`kv_keys_int8.keys_pass`: the codes times
    int8 q x key scale on Hopper's tensor cores, after a Triton prepass. It takes 2-bit keys, head_dim
    128 and at most 2 query heads a kv head, one program a kv head for all of them; in interpret mode,
    its plain-JAX model). H200, KIVI-2 at 32k, Llama-2-7B heads, kv_notes run 25: 328.0 against 344.0 us
    of kernels at batch 8, 68.7 against 66.3 at batch 1. int8 rounds q x scale to 8 bits a key group:
    attention error 5.5e-3 against 1.9e-3 on random layers. So it is an option, not the default.
    keys_stages: its steps of loads in flight.
    """

    value_channels: int | None = None
    keys_zero: bool | None = None
    columns: int = KEY_COLUMNS
    key_warps: int | None = None
    value_warps: int | None = None
    key_prefetch: int | None = None
    values: str = "auto"
    values_stages: int = 2
    values_pieces: int = 2
    values_lop3: bool = True
    values_balanced: bool = True
    values_splits: int | None = None
    keys: str = "cuda"
    keys_stages: int = 2

    def __post_init__(self):
        for name in ("value_channels", "columns", "key_warps", "value_warps"):
            x = getattr(self, name)
            if x is not None and (x < 1 or x & (x - 1)):
                raise ConfigError(f"Cw2Config.{name}={x} must be a power of two")
        if self.values_pieces not in (1, 2):
            raise ConfigError(f"Cw2Config.values_pieces={self.values_pieces} must be 1 or 2 (256-token pieces a step)")
        if self.values not in VALUES_PASSES:
            raise ConfigError(f"Cw2Config.values={self.values!r} must be one of {VALUES_PASSES}")
        if self.keys not in KEYS_PASSES:
            raise ConfigError(f"Cw2Config.keys={self.keys!r} must be one of {KEYS_PASSES}")
        if self.values_splits is not None and self.values_splits < 1:
            raise ConfigError(f"Cw2Config.values_splits={self.values_splits} must be a positive number of splits "
                              "(None: one wave of the values pass's programs)")
        if self.key_prefetch not in (None, 1, 2, 4):
            raise ConfigError(f"Cw2Config.key_prefetch={self.key_prefetch} must be 1, 2 or 4 (steps of loads in "
                              "flight; the head dimension's steps of 8 channel rows split evenly)")


def values_pass_of(config: Cw2Config, v: QTokens, g: int, interpret: bool, block: int,
                   small_grid: bool = False) -> str:
    """The values pass `config.values` resolves to: "auto" takes the tensor-core pass where it runs
    (a Hopper GPU, not interpret mode, a store it reads in the config's steps, keys-pass blocks of
    whole steps) and pays, else the f16x2 pass. It does not pay with one query a kv head on a small grid
    (batch x kv heads at most SMALL_GRID_HEADS, `_cw2_call`'s small_grid): H200, Llama-2-7B at 32k, batch 1, kv_notes
    run 26: its kernel is 5 us a layer faster, yet a decode step took 7.17 ms against the f16x2 pass's
    6.97-7.15 (three processes), and 5.86 against 5.39 with W4 weights."""
    if config.values != "auto":
        return config.values
    from pallas_kernels import kv_values_wgmma as kvw
    from pallas_kernels.wgmma_matmul import hopper_is_default_device

    if g == 1 and small_grid:
        return "cuda"
    wgmma = not interpret and kvw.supports(v, g, config.values_pieces, block) is None and hopper_is_default_device()
    return "wgmma" if wgmma else "cuda"


def key_prefetch_of(config: Cw2Config, head_dim: int) -> int:
    """The keys pass's steps of loads in flight: `config.key_prefetch`, or DEFAULT_KEY_PREFETCH where
    it divides the pass's head_dim / KEY_ROWS_F16 steps, else 1."""
    steps = head_dim // KEY_ROWS_F16
    prefetch = config.key_prefetch or (DEFAULT_KEY_PREFETCH if steps % DEFAULT_KEY_PREFETCH == 0 else 1)
    if steps % prefetch:
        raise ConfigError(f"Cw2Config.key_prefetch={prefetch} must divide the keys pass's "
                          f"{steps} steps of {KEY_ROWS_F16} channel rows (head_dim {head_dim})")
    return prefetch


def _env_int(name: str, default: int) -> int:
    """A positive integer tuning knob from the environment (read when a kernel is traced)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"${name}={raw!r} must be a positive integer (unset it for the default {default})")
    return int(raw)


def _key_columns(k: QTokens, columns: int = KEY_COLUMNS) -> int:
    """Word columns of a tile: `columns`, or fewer whole store tiles when the capacity's tiles
    do not divide into it."""
    tiles = k.capacity // (k.rows * codes_per_word(k.bits))
    per = max(1, columns // k.rows)
    while tiles % per:
        per //= 2
    return per * k.rows


def _cw2_call(q, k: QTokens, v: QTokens, mask, length, *, scale: float, num_splits, interpret: bool,
              num_warps: int, num_stages: int, eviction: str | None, config: Cw2Config) -> Partials:
    """The two-pass f16x2 body (see "two-pass fp16 body"). Both passes read tiles of
    `_key_columns(k, config.columns)` word columns; num_warps is not used (each pass's warps are
    config.key_warps / value_warps, by default one column a lane)."""
    b, kv_heads, g, d = q.shape
    s = k.capacity
    c = codes_per_word(k.bits)
    chunk = _cw_heads(g)
    chunks = g // chunk
    kcols = _key_columns(k, config.columns)
    lane_warps = max(1, kcols // 32)  # one word column a lane
    vwidth = v.channel_group
    # Interpret mode unrolls fewer rows a program: the CPU compiles the unrolled body op by op.
    small_grid = b * kv_heads * chunks <= SMALL_GRID_HEADS
    want = config.value_channels or (INTERPRET_VALUE_CHANNELS if interpret else _env_int(
        "JAXCOMPRESS_KV_VALUE_CHANNELS", SMALL_GRID_VALUE_CHANNELS if small_grid else VALUE_CHANNELS))
    channels = max(8, min(d, want // chunk))
    channels = math.gcd(channels, d)
    if channels < vwidth and vwidth % channels:
        channels = math.gcd(channels, vwidth)
    parts = d // channels
    n_blocks = s // (kcols * c)
    n_splits, key_blocks = _splits(b, kv_heads * chunks, n_blocks, num_splits, TARGET_PROGRAMS)
    _check_fp16_meta(k, v, "cw2")
    prefetch = key_prefetch_of(config, d)
    # The zero-point term q . zero: summed by the keys pass on small grids, an XLA einsum on large
    # ones, where the keys pass reads the zero points more slowly than the einsum (`Cw2Config.keys_zero`).
    zero_rows = (small_grid if config.keys_zero is None else config.keys_zero) and k.zero is not None
    # the int8 keys pass takes the whole term in its prepass's offset
    einsum = config.keys == "cuda" and not zero_rows
    _, cz, bias = _cw_inputs(q, k, mask, length, scale, centred=True, mid_in_kernel=True, einsum=einsum)
    length1 = jnp.reshape(jnp.asarray(length, jnp.int32), (1,))
    kwords, vwords = (lax.bitcast_convert_type(x.codes, jnp.int32) for x in (k, v))

    kv_of = lambda hh: hh // chunks  # noqa: E731  keys grid: K * chunks
    params = lambda warps: None if interpret else _compiler_params(warps or lane_warps, num_stages)  # noqa: E731
    heads_spec = lambda *tail: pl.BlockSpec((None, None, chunk) + tail,  # noqa: E731
                                            lambda i, hh, j: (i, kv_of(hh), hh % chunks) + (0,) * len(tail))
    split_spec = pl.BlockSpec((None, None, None, chunk), lambda i, hh, j: (i, hh, j, 0))
    split_shape = lambda n: jax.ShapeDtypeStruct((b, n, n_splits, chunk), jnp.float32)  # noqa: E731
    if config.keys == "int8":
        scores, top = _int8_keys(q, k, bias, length, scale=scale, block=kcols * c, blocks_per_split=key_blocks,
                                 n_splits=n_splits, chunks=chunks, interpret=interpret, stages=config.keys_stages)
    else:
        # q as given (the kernel scales it into log2 units): no XLA op materializes the scaled q
        key_inputs = [q, bias[:, None, :], length1, kwords, k.scale, k.zero if zero_rows else cz]
        key_specs = [heads_spec(d), pl.BlockSpec((None, 1, s), lambda i, hh, j: (i, 0, 0)),
                     pl.BlockSpec((1,), lambda i, hh, j: (0,)), _cw_head_spec(kwords, kv_of),
                     _cw_meta_spec(k.scale, kv_of),
                     _cw_meta_spec(k.zero, kv_of) if zero_rows else heads_spec(cz.shape[-1])]
        scores, top = pl.pallas_call(
            functools.partial(_cw2_keys_kernel, bits=k.bits, cols=kcols, rows=k.rows, token_group=k.token_group,
                              blocks_per_split=key_blocks, heads=chunk, mid_term=k.zero is not None,
                              zero_rows=zero_rows, q_scale=scale * LOG2E, evict=eviction, asm=not interpret,
                              prefetch=prefetch),
            grid=(b, kv_heads * chunks, n_splits),
            in_specs=key_specs,
            out_specs=[pl.BlockSpec((None, None, chunk, s), lambda i, hh, j: (i, hh, 0, 0)), split_spec],
            out_shape=[jax.ShapeDtypeStruct((b, kv_heads * chunks, chunk, s), jnp.float32), split_shape(kv_heads * chunks)],
            compiler_params=params(config.key_warps),
            interpret=interpret,
            name=f"kv_decode_k{k.bits}_scores",
        )(*key_inputs)

    if values_pass_of(config, v, g, interpret, kcols * c, small_grid) == "wgmma":  # one program a kv head and split: all its g queries
        from pallas_kernels import kv_values_wgmma as kvw

        problem = kvw.supports(v, g, config.values_pieces)
        if problem:
            raise ConfigError(f"Cw2Config(values='wgmma') cannot read these values: {problem}; use values='cuda'")
        scores = scores.reshape(b, kv_heads, g, s)  # program heads kv * chunks + j hold queries j * chunk ..
        top = jnp.moveaxis(top.reshape(b, kv_heads, chunks, n_splits, chunk), 3, 2).reshape(b, kv_heads, n_splits, g)
        value_blocks = _value_blocks(b * kv_heads, n_blocks, config.values_splits or num_splits)
        top = values_top(top, n_blocks, key_blocks, value_blocks)
        run = kvw.emulate_values if interpret else kvw.values_pass
        o, l, m = run(scores, top, length, v, heads=g, block=kcols * c, blocks_per_split=value_blocks,
                      balanced=config.values_balanced,
                      **({} if interpret else dict(stages=config.values_stages, pieces=config.values_pieces,
                                                   lop3=config.values_lop3)))
        return _split_partials(o, l, m, g)

    # values grid: (K * chunks) * parts, part = hh % parts
    hc_of = lambda hh: hh // parts  # noqa: E731
    value_kv_of = lambda hh: hh // (parts * chunks)  # noqa: E731
    inputs = [scores, top, length1, vwords, v.scale]
    specs = [pl.BlockSpec((None, None, chunk, s), lambda i, hh, j: (i, hc_of(hh), 0, 0)),
             pl.BlockSpec((None, None, None, chunk), lambda i, hh, j: (i, hc_of(hh), j, 0)),
             pl.BlockSpec((1,), lambda i, hh, j: (0,)), _cw_head_spec(vwords, value_kv_of),
             _cw_meta_spec(v.scale, value_kv_of)]
    if v.zero is not None:
        inputs.append(v.zero)
        specs.append(_cw_meta_spec(v.zero, value_kv_of))
    # Each part writes its channels of o in place; all parts write the same l and m.
    per_split = lambda i, hh, j: (i, hc_of(hh), j, 0)  # noqa: E731
    o, l, m = pl.pallas_call(
        functools.partial(_cw2_values_kernel, bits=v.bits, cols=kcols, rows=v.rows, vwidth=vwidth,
                          channels=channels, parts=parts, blocks_per_split=key_blocks, heads=chunk,
                          evict=eviction, asm=not interpret),
        grid=(b, kv_heads * chunks * parts, n_splits),
        in_specs=specs,
        out_specs=[pl.BlockSpec((None, None, None, chunk, channels), lambda i, hh, j: (i, hc_of(hh), j, 0, hh % parts)),
                   pl.BlockSpec((None, None, None, chunk), per_split), pl.BlockSpec((None, None, None, chunk), per_split)],
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads * chunks, n_splits, chunk, d), jnp.float32),
                   split_shape(kv_heads * chunks), split_shape(kv_heads * chunks)],
        compiler_params=params(config.value_warps),
        interpret=interpret,
        name=f"kv_decode_v{v.bits}_values",
    )(*inputs)
    return _split_partials(*(_heads_last(x, b, kv_heads, chunks, n_splits, chunk) for x in (o, l, m)), g)


def _value_blocks(programs: int, n_blocks: int, num_splits: int | None) -> int:
    """Blocks a split of the tensor-core values pass: `num_splits` splits where named, else the
    `programs` heads' blocks spread evenly over one wave of VALUE_SLOTS programs, rounded (H200, kv_notes
    run 25, batch 1: 16 blocks in 8 splits of 2, 22.4 against 24.9 us in 16 of 1; 17 blocks in 9 splits
    of 2, 24.9 us, against 30.0 in 6 of 3 and 26.5 in 17 of 1; batch 8: 1 split)."""
    if num_splits:
        return _splits(1, 1, n_blocks, num_splits)[1]
    return max(1, min(n_blocks, int(n_blocks * programs / VALUE_SLOTS + 0.5)))


def values_top(top, n_blocks: int, key_blocks: int, value_blocks: int):
    """The keys pass's split maxima top [B, K, splits, G] (`n_blocks` blocks in splits of `key_blocks`)
    -> the maxima of splits of `value_blocks` blocks: each the largest of the keys splits it overlaps. Any bound
    between a split's own maximum and the global one gives the same softmax once the splits are merged
    (exp2(score - bound) <= 1, and what underflows lies 126 below the global maximum)."""
    if value_blocks == key_blocks:
        return top
    key_lo = np.arange(top.shape[2]) * key_blocks
    value_lo = np.arange(-(-n_blocks // value_blocks)) * value_blocks
    overlap = (key_lo[None] < value_lo[:, None] + value_blocks) & (key_lo[None] + key_blocks > value_lo[:, None])
    return jnp.max(jnp.where(overlap[:, :, None], top[:, :, None], NEG_INF), axis=3)


def _int8_keys(q, k: QTokens, bias, length, *, scale: float, block: int, blocks_per_split: int, n_splits: int,
               chunks: int, interpret: bool, stages: int):
    """`Cw2Config(keys="int8")`: `kv_keys_int8.keys_pass` (its plain-JAX model in interpret mode), its
    outputs in the f16x2 keys pass's program order (program kv * chunks + j: queries j * chunk ..)."""
    from pallas_kernels import kv_keys_int8 as kk

    b, kv_heads, g, _ = q.shape
    problem = kk.kernel_problem(k, g, block)
    if problem:
        raise ConfigError(f"Cw2Config(keys='int8') cannot read these keys: {problem}; use keys='cuda'")
    kwargs = dict(scale=scale, block=block, blocks_per_split=blocks_per_split, n_splits=n_splits)
    if interpret:
        scores, top = kk.emulate_scores(q, k, bias, length, **kwargs)
    else:
        scores, top = kk.keys_pass(q, k, bias, length, stages=stages, **kwargs)
    chunk = g // chunks
    top = jnp.moveaxis(top.reshape(b, kv_heads, n_splits, chunks, chunk), 3, 2)
    return (scores.reshape(b, kv_heads * chunks, chunk, k.capacity),
            top.reshape(b, kv_heads * chunks, n_splits, chunk))


def _compiler_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu

    params = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return params(num_warps=num_warps, num_stages=num_stages)


def _splits(batch: int, kv_heads: int, n_blocks: int, num_splits: int | None,
            target: int = TARGET_PROGRAMS) -> tuple[int, int]:
    """(splits, blocks per split): enough programs to fill the GPU, whole blocks per split."""
    want = num_splits or -(-target // (batch * kv_heads))
    want = max(1, min(want, n_blocks))
    per_split = -(-n_blocks // want)
    return -(-n_blocks // per_split), per_split


def _pad_queries(q: jax.Array, min_rows: int = MIN_DOT_ROWS) -> jax.Array:
    g = q.shape[2]
    hp = max(min_rows, 1 << (g - 1).bit_length())
    return jnp.pad(q, ((0, 0), (0, 0), (0, hp - g), (0, 0)))


def _split_partials(o, l, m, g: int) -> Partials:
    """A kernel's output [B, K, splits, hp, ...] -> partials with a split axis [B, K, splits, G, ...]."""
    return Partials(o[:, :, :, :g], l[:, :, :, :g], m[:, :, :, :g])


def merge_splits(part: Partials) -> Partials:
    """Partials with a split axis [B, K, splits, G, ...] -> one partial [B, K, G, ...]."""
    top = jnp.max(part.m, axis=2)
    w = jnp.exp(part.m - top[:, :, None])
    return Partials(jnp.sum(w[..., None] * part.o, axis=2), jnp.sum(w * part.l, axis=2), top)


KERNEL_PATHS = ("auto", "mma", "cw", "cw16", "cw2")


def kernel_path(path: str, k: QTokens, v: QTokens, pre_rope: bool, exact: bool = False) -> str:
    """The kernel body `path` resolves to. "auto": for stores the CUDA-core bodies handle
    (`cw_supports`: KIVI in the channel_words layout) the two-pass packed fp16 "cw2" at 2 and 4
    bits (H100, run 10, KIVI-2 at 32k: 1.5x / 1.9x less device time than the one-pass "cw16" at
    batch 1 / 8; cw16 was 1.2-1.3x faster than "cw" at batch 8), the fp32 "cw" at 8 bits (whose
    codes reach +-128: fp16 partial sums would lose more than the grid's own precision) and
    whenever `exact` arithmetic is asked for (fp32 models); else the tensor-core "mma"."""
    if path not in KERNEL_PATHS:
        raise ConfigError(f"decode kernel path {path!r} is not one of {KERNEL_PATHS}")
    cw = cw_supports(k, v, pre_rope)
    if path == "auto":
        if not cw:
            return "mma"
        if exact or k.bits > 4:
            return "cw"
        return "cw2" if k.head_dim % KEY_ROWS_F16 == 0 else "cw16"
    if (path in ("cw", "cw16", "cw2")) != cw:
        layouts = f"keys {k.layout} {k.bits}-bit, values {v.layout} {v.bits}-bit"
        raise ConfigError(f"decode kernel path {path!r} does not read these stores ({layouts}"
                          f"{', pre-RoPE keys' if pre_rope else ''}): use path='auto'")
    if path == "cw2" and k.head_dim % KEY_ROWS_F16:
        raise ConfigError(f"decode kernel path 'cw2' sums keys {KEY_ROWS_F16} channels at a time; head_dim "
                          f"{k.head_dim} is not a multiple: use path='cw16' or 'auto'")
    return path


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "dot_dtype", "interpret",
                                              "num_warps", "num_stages", "path", "eviction", "cw2",
                                              "merge"))
def quantized_decode_partials(q: jax.Array, k: QTokens, v: QTokens, mask: jax.Array, length,
                              *, scale: float, rope=None, num_splits: int | None = None,
                              dot_dtype=jnp.bfloat16, interpret: bool = False, num_warps: int | None = None,
                              num_stages: int = 2, path: str = "auto",
                              eviction: str | None = "evict_first", cw2: Cw2Config = Cw2Config(),
                              merge: bool = True) -> Partials:
    """Flash-decoding partials of q [B, K, G, D] over packed keys and values.

    rope: None, or (cos, sin) [B, S, D/2] per-slot tables when keys are stored before RoPE.
    dot_dtype: operands of the two matmuls of the "mma" path (bf16 on the tensor cores; fp32
    for exact tests); the CUDA-core "cw" path computes in fp32, "cw16" and "cw2" in f16x2 with fp32
    sums; with fp32, "auto" picks the exact "cw" over them (fp32 models get exact arithmetic).
    num_splits: slot splits per (row, kv head); default: enough programs to fill an H100 (cw2's
    tensor-core values pass picks its own unless named: `Cw2Config.values_splits`).
    path: "mma" (tensor-core dots, token_rows stores), "cw" / "cw16" / "cw2" (CUDA-core, channel_words
    stores, fp32 / f16x2 arithmetic, see above) or "auto" (`kernel_path`). num_warps None: $JAXCOMPRESS_KV_NUM_WARPS, else 4
    (read when the function is traced: the benchmark's choice for later model runs); cw2 takes its
    warps from its tile and its value rows a program from $JAXCOMPRESS_KV_VALUE_CHANNELS (default
    VALUE_CHANNELS, or SMALL_GRID_VALUE_CHANNELS on small grids; `cw2` overrides). eviction: the cache policy of cw2's code-word loads (read
    once a step; `pallas_kernels.hints`), None for plain loads. cw2: the two-pass body's tuning
    (`Cw2Config`). merge: False returns the splits' partials [B, K, splits, G, ...] for `combine`
    to merge with other parts in one step.
    """
    num_warps = num_warps or _env_int("JAXCOMPRESS_KV_NUM_WARPS", 4)
    b, kv_heads, g, d = q.shape
    if (k.layout != v.layout or k.rows != v.rows or k.capacity != v.capacity
            or k.head_dim != d or v.head_dim != d):
        raise ConfigError(f"keys and values must share layout, rows, capacity and head_dim: keys "
                          f"{k.layout}/{k.rows}/{k.capacity}/{k.head_dim}, values "
                          f"{v.layout}/{v.rows}/{v.capacity}/{v.head_dim}, queries head_dim {d}")
    s = k.capacity
    block = math.lcm(k.block, v.block)
    if s % block:
        raise ConfigError(f"capacity {s} must be a multiple of the kernel block {block}")
    if mask.shape != (b, s):
        raise ConfigError(f"mask shape {mask.shape} must be (batch, capacity) = {(b, s)}")
    path = kernel_path(path, k, v, rope is not None, exact=dot_dtype == jnp.float32)
    finish = merge_splits if merge else (lambda part: part)
    if path == "cw2":
        return finish(_cw2_call(q, k, v, mask, length, scale=scale, num_splits=num_splits, interpret=interpret,
                                num_warps=num_warps, num_stages=num_stages, eviction=eviction, config=cw2))
    if path in ("cw", "cw16"):
        return finish(_cw_call(q, k, v, mask, length, scale=scale, num_splits=num_splits, interpret=interpret,
                               num_warps=num_warps, num_stages=num_stages, packed=path == "cw16"))
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
        name=f"kv_decode_k{k.bits}v{v.bits}_{path}",
    )(*inputs)
    return finish(_split_partials(o, l, m, g))


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

    lo, hi = _split_blocks(len_ref, rows, blocks_per_split)
    init = (jnp.full((hp,), NEG_INF, jnp.float32), jnp.zeros((hp,), jnp.float32),
            [jnp.zeros((hp, d), jnp.float32)])
    m, l, o = lax.fori_loop(lo, hi, body, init)
    o_ref[...] = o[0]
    l_ref[:] = l
    m_ref[:] = m


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "dot_dtype", "interpret",
                                              "num_warps", "num_stages", "rows", "merge"))
def dense_decode_partials(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, length,
                          *, scale: float, num_splits: int | None = None, dot_dtype=jnp.bfloat16,
                          interpret: bool = False, num_warps: int = 4, num_stages: int = 2,
                          rows: int = DENSE_ROWS, merge: bool = True) -> Partials:
    """The bf16 baseline: flash-decoding partials over a dense cache k, v [B, S, K, D] (the
    identity codec's layout, read in place), `rows` slots a step. Also the packed codecs'
    exact tokens (a residual window, a sink): one kernel instead of XLA's small fusions.
    merge: as `quantized_decode_partials`'s."""
    b, kv_heads, g, d = q.shape
    s = k.shape[1]
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
    part = _split_partials(o, l, m, g)
    return merge_splits(part) if merge else part


def dense_decode_reference(q, k, v, mask, length, *, scale: float) -> Partials:
    """Reference for `dense_decode_partials`."""
    valid = mask & (jnp.arange(mask.shape[1]) < length)[None, :]
    return dense_partials(q, k, v, valid, scale)
