"""Flash-decoding attention over a packed low-bit KV cache (Pallas, Triton back end), its bf16
twin as the baseline, and the pure-JAX references both are tested against.

Decode: one query token per row attends over S cache slots. The grid is (batch, kv head,
split). Each program walks its share of the slots block by block, unpacks keys and values from
the packed words in registers, dequantizes them there (scales, zero points, codebook, exact
outliers, RoPE for keys stored before rotation) and keeps flash-attention partials (o, l, m)
for the G query heads of its kv head: GQA heads share every load. Two kinds of body: for many
query heads per kv head ("mma") the heads are padded to 16 rows for tensor-core dots; for few
(G <= CC_MAX_HEADS, e.g. Llama-2's G = 1) the CUDA-core bodies ("cc", "cc_block") reduce in
the words' own layout with the scales folded into q and p (see "CUDA-core body"). Splitting the slots (flash-decoding) gives batch 1 at 32k enough programs
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
import os
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


# ------------------------------------------------------------------------- CUDA-core body
# For few query heads per kv head (G <= CC_MAX_HEADS; Llama-2 has G = 1) a tensor-core dot does
# 1/16 useful work and forces every dequantized tile through a layout conversion into the MMA
# operand layout. The CUDA-core paths instead compute scores as a broadcast multiply and a row
# reduction in the loaded words' own layout, and p @ V as a column reduction. Scales constant
# along a tile's tokens (KIVI keys) are folded into the query, scales constant along its
# channels (per-token values) into the probabilities: one FMA per element, no dequantize.
#   "cc"        a fori_loop over the packing slots of a block; online softmax per slot.
#   "cc_block"  each block unrolled: all scores first, one softmax update per block, p @ V kept
#               as [rows, width] partial sums reduced once per program (no per-slot reduction
#               across warps for the values).
# convert "magic" (cc_block only): codes -> fp32 as bitcast((word & mask) | 0x4B000000) - 2**23,
# i.e. code * 2**(bits * j) exactly, its power of 2 folded with the scale: no shift and no int ->
# float conversion (a quarter-rate instruction) per element. The upper half of a word's slots is
# read from the word shifted once per block.
CC_MAX_HEADS = 4
MAGIC = 0x4B000000  # fp32 bits of 2**23
CC_PATHS = ("cc", "cc_block")


def _fold_keys(op: _Operand, rope: bool) -> bool:
    """Key scale/zero constant along a tile's tokens: fold them into the query."""
    return not rope and not op.num_outliers and (op.token_group == 0 or op.token_group % op.rows == 0)


def _fold_values(op: _Operand) -> bool:
    """Value scale/zero constant along a tile's channels: fold them into the probabilities."""
    return not op.num_outliers and op.channel_group != 1


def _offset(op: _Operand) -> float:
    return 0.0 if (op.has_codebook or op.has_zero) else float(2 ** (op.bits - 1))


def _cc_kernel(*refs, kop: _Operand, vop: _Operand, rope: bool, block: int, blocks_per_split: int,
               scale: float, heads: int, path: str, convert: str):
    it = iter(refs)
    q_ref, mask_ref, len_ref = next(it), next(it), next(it)
    krefs, vrefs = kop.take_refs(it), vop.take_refs(it)
    cos_ref, sin_ref = (next(it), next(it)) if rope else (None, None)
    o_ref, l_ref, m_ref = next(it), next(it), next(it)
    rows = kop.rows
    fold_k, fold_v = _fold_keys(kop, rope), _fold_values(vop)
    # q * softmax scale, per head and key channel tile: [1, width]
    q = [[q_ref[pl.ds(h, 1), pl.ds(g * kop.width, kop.width)].astype(jnp.float32) * scale
          for g in range(kop.groups)] for h in range(heads)]

    def grid(op, refs, words, slot):
        """(x, factor): a(code) = x * factor - offset for a packing slot of `words`."""
        if op.has_codebook:
            w = words[0] if isinstance(words, tuple) else words
            return _grid_values(refs, op, _unpack(op, w, slot)), 1.0
        if convert == "magic" and isinstance(slot, int):
            half = codes_per_word(op.bits) // 2
            w, j = (words[0], slot) if slot < half else (words[1], slot - half)
            bits = (w & (((1 << op.bits) - 1) << (op.bits * j))) | MAGIC
            return lax.bitcast_convert_type(bits, jnp.float32) - 8388608.0, 2.0 ** (-op.bits * j)
        w = words[0] if isinstance(words, tuple) else words
        return _unpack(op, w, slot).astype(jnp.float32), 1.0

    def scores(kw, slot, t0):
        """Per head: s [rows, 1] (scaled) of tokens [t0, t0 + rows)."""
        if fold_k:
            xs = [grid(kop, krefs, kw[g], slot) for g in range(kop.groups)]
            ks = [_meta_tile(krefs["scale"], kop, t0, g) for g in range(kop.groups)]  # [1, width | 1]
            kz = [_meta_tile(krefs["zero"], kop, t0, g) for g in range(kop.groups)] if kop.has_zero else None
            out = []
            for h in range(heads):
                s = None
                for g, (x, f) in enumerate(xs):
                    qs = q[h][g] * ks[g]
                    part = jnp.sum(x * (qs * f), axis=1, keepdims=True)
                    if kop.has_zero:
                        part = part + jnp.sum(q[h][g] * kz[g])
                    if _offset(kop):
                        part = part - _offset(kop) * jnp.sum(qs)
                    s = part if s is None else s + part
                out.append(s)
            return out
        tiles = []
        for g in range(kop.groups):
            w = kw[g][0] if isinstance(kw[g], tuple) else kw[g]
            tiles.append(_dequant_tile(krefs, kop, w, slot, t0, g))
        if rope:
            cos = cos_ref[pl.ds(t0, rows), :].astype(jnp.float32)
            sin = sin_ref[pl.ds(t0, rows), :].astype(jnp.float32)
            lo, hi = tiles
            tiles = [lo * cos - hi * sin, hi * cos + lo * sin]
        out = []
        for h in range(heads):
            s = None
            for g in range(kop.groups):
                part = jnp.sum(tiles[g] * q[h][g], axis=1, keepdims=True)
                s = part if s is None else s + part
            out.append(s)
        return out

    def value_terms(vw, slot, t0, g, p):
        """(tile, const): p @ v for channel tile g = sum over rows of `tile` and of `const`
        ([rows, 1], added to every channel; None: nothing)."""
        if fold_v:
            x, f = grid(vop, vrefs, vw[g], slot)
            vs = _meta_tile(vrefs["scale"], vop, t0, g)  # [rows, 1] or [1, 1]
            ps = p * vs
            const = None
            if vop.has_zero:
                const = p * _meta_tile(vrefs["zero"], vop, t0, g)
            if _offset(vop):
                const = (-_offset(vop)) * ps if const is None else const - _offset(vop) * ps
            return (ps * f) * x, const
        w = vw[g][0] if isinstance(vw[g], tuple) else vw[g]
        return p * _dequant_tile(vrefs, vop, w, slot, t0, g), None

    def load_words(refs, op, row0, g):
        w = refs["codes"][pl.ds(row0, rows), pl.ds(g * op.width, op.width)]
        if convert == "magic" and path == "cc_block" and not op.has_codebook:
            return (w, w >> (op.bits * (codes_per_word(op.bits) // 2)))
        return w

    def words_for(cache, name, refs, op, blk, j):
        """Word tiles of operand `op` holding block-step j (static), loaded once per block."""
        c = codes_per_word(op.bits)
        key = (name, j // c)
        if key not in cache:
            row0 = blk * (block // c) + (j // c) * rows
            cache[key] = [load_words(refs, op, row0, g) for g in range(op.groups)]
        return cache[key], j % c

    split = pl.program_id(2)
    used_blocks = lax.div(len_ref[0] + (block - 1), jnp.int32(block))
    lo = split * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, used_blocks)
    steps = block // rows

    if path == "cc":
        def body(blk, carry):
            ck, cv = codes_per_word(kop.bits), codes_per_word(vop.bits)

            def words(refs, op, c, j):  # loaded once per block when one word row spans it
                row0 = blk * (block // c) + (0 if c * rows == block else lax.div(j, jnp.int32(c)) * rows)
                return [refs["codes"][pl.ds(row0, rows), pl.ds(g * op.width, op.width)] for g in range(op.groups)]

            hoisted = {name: words(refs, op, c, 0) for name, refs, op, c in
                       (("k", krefs, kop, ck), ("v", vrefs, vop, cv)) if c * rows == block}

            def step(j, carry):
                t0 = blk * block + j * rows
                kw = hoisted["k"] if "k" in hoisted else words(krefs, kop, ck, j)
                vw = hoisted["v"] if "v" in hoisted else words(vrefs, vop, cv, j)
                kslot, vslot = lax.rem(j, jnp.int32(ck)), lax.rem(j, jnp.int32(cv))
                valid = (mask_ref[pl.ds(t0, rows)] != 0)[:, None]
                new = []
                for h, s in enumerate(scores(kw, kslot, t0)):
                    m, l, o = carry[h]
                    s = jnp.where(valid, s, NEG_INF)
                    m_new = jnp.maximum(m, jnp.max(s))
                    corr = jnp.exp(m - m_new)
                    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
                    l = l * corr + jnp.sum(p)
                    o_new = []
                    for g in range(vop.groups):
                        tile, const = value_terms(vw, vslot, t0, g, p)
                        pv = jnp.sum(tile, axis=0, keepdims=True)
                        if const is not None:
                            pv = pv + jnp.sum(const)
                        o_new.append(o[g] * corr + pv)
                    new.append((m_new, l, o_new))
                return tuple(new)

            return lax.fori_loop(0, steps, step, carry)

        init = tuple((jnp.float32(NEG_INF), jnp.float32(0.0),
                      [jnp.zeros((1, vop.width), jnp.float32) for _ in range(vop.groups)]) for _ in range(heads))
        final = lax.fori_loop(lo, hi, body, init)
        outs = [(m, l, o) for m, l, o in final]
    else:
        def body(blk, carry):
            cache = {}
            per_step = []
            for j in range(steps):
                t0 = blk * block + j * rows
                kw, kslot = words_for(cache, "k", krefs, kop, blk, j)
                valid = (mask_ref[pl.ds(t0, rows)] != 0)[:, None]
                per_step.append((valid, [jnp.where(valid, s, NEG_INF) for s in scores(kw, kslot, t0)]))
            # Elementwise across the block's slots, one cross-thread reduction per block: the
            # running max; the softmax sum and the zero-point terms stay [rows, 1] partial sums.
            new = []
            for h in range(heads):
                m, l, acc, const = carry[h]
                top = per_step[0][1][h]
                for _, ss in per_step[1:]:
                    top = jnp.maximum(top, ss[h])
                m_new = jnp.maximum(m, jnp.max(top))
                corr = jnp.exp(m - m_new)
                acc = [a * corr for a in acc]
                const = [c * corr for c in const]
                l = l * corr
                for j, (valid, ss) in enumerate(per_step):
                    t0 = blk * block + j * rows
                    p = jnp.where(valid, jnp.exp(ss[h] - m_new), 0.0)
                    l = l + p
                    vw, vslot = words_for(cache, "v", vrefs, vop, blk, j)
                    for g in range(vop.groups):
                        tile, c = value_terms(vw, vslot, t0, g, p)
                        acc[g] = acc[g] + tile
                        if c is not None:
                            const[g] = const[g] + c
                new.append((m_new, l, acc, const))
            return tuple(new)

        init = tuple((jnp.float32(NEG_INF), jnp.zeros((rows, 1), jnp.float32),
                      [jnp.zeros((rows, vop.width), jnp.float32) for _ in range(vop.groups)],
                      [jnp.zeros((rows, 1), jnp.float32) for _ in range(vop.groups)]) for _ in range(heads))
        final = lax.fori_loop(lo, hi, body, init)
        outs = [(m, jnp.sum(l), [jnp.sum(a, axis=0, keepdims=True) + jnp.sum(c) for a, c in zip(acc, const)])
                for m, l, acc, const in final]
    for h, (m, l, o) in enumerate(outs):
        for g in range(vop.groups):
            o_ref[pl.ds(h, 1), pl.ds(g * vop.width, vop.width)] = o[g]
        l_ref[pl.ds(h, 1)] = jnp.reshape(l, (1,))
        m_ref[pl.ds(h, 1)] = jnp.reshape(m, (1,))


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


def _pad_queries(q: jax.Array, min_rows: int = MIN_DOT_ROWS) -> jax.Array:
    g = q.shape[2]
    hp = max(min_rows, 1 << (g - 1).bit_length())
    return jnp.pad(q, ((0, 0), (0, 0), (0, hp - g), (0, 0)))


def _finish(o, l, m, g: int) -> Partials:
    """Merges the splits of a kernel's output ([B, K, splits, hp, ...]) into one partial."""
    o, l, m = o[:, :, :, :g], l[:, :, :, :g], m[:, :, :, :g]
    top = jnp.max(m, axis=2)
    w = jnp.exp(m - top[:, :, None])
    return Partials(jnp.sum(w[..., None] * o, axis=2), jnp.sum(w * l, axis=2), top)


KERNEL_PATHS = ("auto", "mma") + CC_PATHS
CONVERTS = ("shift", "magic")


def kernel_path(path: str, query_heads: int, interpret: bool = False) -> str:
    """The kernel body `path` resolves to. "auto": for few query heads per kv head
    (<= CC_MAX_HEADS) $JAXCOMPRESS_KV_CC_PATH names the body, by default the stepwise CUDA-core
    "cc" in interpret mode (its trace is 1/16 of cc_block's: CPU tests stay fast) and the
    tensor-core "mma" on the GPU, the fastest body measured there (kv_notes.md, run 4 on an H100:
    mma 405 us, cc 778 us, cc_block 11.4 ms at batch 1, 32k tokens). More query heads per kv
    head: "mma"."""
    if path not in KERNEL_PATHS:
        raise ConfigError(f"decode kernel path {path!r} is not one of {KERNEL_PATHS}")
    if path == "auto":
        if query_heads > CC_MAX_HEADS:
            return "mma"
        path = os.environ.get("JAXCOMPRESS_KV_CC_PATH", "cc" if interpret else "mma")
        if path not in KERNEL_PATHS[1:]:
            raise ConfigError(f"JAXCOMPRESS_KV_CC_PATH={path!r} is not one of {KERNEL_PATHS[1:]}")
    return path


def default_convert() -> str:
    """$JAXCOMPRESS_KV_CONVERT (the benchmark's choice), else "shift"."""
    convert = os.environ.get("JAXCOMPRESS_KV_CONVERT", "shift")
    if convert not in CONVERTS:
        raise ConfigError(f"JAXCOMPRESS_KV_CONVERT={convert!r} is not one of {CONVERTS}")
    return convert


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "dot_dtype", "interpret",
                                              "num_warps", "num_stages", "path", "convert"))
def quantized_decode_partials(q: jax.Array, k: QTokens, v: QTokens, mask: jax.Array, length,
                              *, scale: float, rope=None, num_splits: int | None = None,
                              dot_dtype=jnp.bfloat16, interpret: bool = False, num_warps: int | None = None,
                              num_stages: int = 2, path: str = "auto", convert: str | None = None) -> Partials:
    """Flash-decoding partials of q [B, K, G, D] over packed keys and values.

    rope: None, or (cos, sin) [B, S, D/2] per-slot tables when keys are stored before RoPE.
    dot_dtype: operands of the two matmuls of the "mma" path (bf16 on the tensor cores; fp32
    for exact tests); the CUDA-core paths compute in fp32.
    num_splits: slot splits per (row, kv head); default: enough programs to fill an H100.
    path: "mma" (tensor-core dots), "cc" / "cc_block" (CUDA-core, see above) or "auto".
    convert: "shift" or "magic" (code -> fp32 conversion of the "cc_block" path); None:
    `default_convert()`. num_warps None: $JAXCOMPRESS_KV_NUM_WARPS, else 4. (The environment
    is read when the function is traced: the benchmark's choice for later model runs.)
    """
    convert = convert or default_convert()
    num_warps = num_warps or int(os.environ.get("JAXCOMPRESS_KV_NUM_WARPS", "4"))
    if convert not in CONVERTS:
        raise ConfigError(f"convert={convert!r} is not one of {CONVERTS}")
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
    path = kernel_path(path, g, interpret)
    n_splits, per_split = _splits(b, kv_heads, s // block, num_splits)
    qp = _pad_queries(q, 1 if path in CC_PATHS else MIN_DOT_ROWS)
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
    if path in CC_PATHS:
        kernel = functools.partial(_cc_kernel, kop=kop, vop=vop, rope=rope is not None, block=block,
                                   blocks_per_split=per_split, scale=scale, heads=g, path=path, convert=convert)
    else:
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
