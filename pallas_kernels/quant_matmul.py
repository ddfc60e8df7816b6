"""Fused dequantize + matmul for packed low-bit weights: y[M, N] = x[M, K] @ W[K, N].

The kernel reads the packed codes of a `QArray` (as stored) or a `TiledQArray` (after
`repack_for_gpu`) directly, never materializing the bf16 weight: at decode the matmul is
bound by the bytes of W, so reading 4.25 instead of 16 bits per weight is the whole speedup.

Each program owns `block_n` output columns and `block_m` rows of x, and walks its share of K
(all of it, or 1/split_k) tile by tile (see `layout.py`). Per tile it loads `words` uint32
blocks of `[rows, block_n]` (coalesced along N) and, for each of the `period` code positions,
extracts a `[rows, block_n]` slab of codes with a shift and a mask, turns it into exact
fp32 values `code - zero` (or codebook entries), and multiplies it with the matching
`[block_m, rows]` slice of x:

* GEMV path (`use_dot=False`, batch 1-8): fp32 FMAs on the CUDA cores, one `[rows, block_n]`
  accumulator per row of x, reduced once per group;
* GEMM path (`use_dot=True`): `dot` on the tensor cores in x's dtype with fp32 accumulation
  (the code values are exact in bf16/fp16), one dot per slab (K = rows), or with `tile_dot`
  the slabs re-interleaved into input-row order in registers and one dot per tile (K = tile).

GEMV options (the autotuner picks): `dequant="inplace"` masks each code where it lies in its
word, for codes inside the fp32 mantissa, instead of shifting it down (see `inplace_positions`;
integer ops issue at half the FP32 rate on Hopper), and `acc2d` keeps `[rows, block_n]`
accumulators, reduced across rows once at the end instead of once per group. `dequant="fma"`
goes further: the masked code is OR-ed with an exponent word held in a register (one LOP3, no
constant to materialize) and one FMA by 2**-offset turns it into the exact `code - 2**(bits-1)`
(symmetric) or `code` (zero points: `sum x (code - z) = sum x code - z sum x`, the sums of x
taken per row as x is loaded, the zero term subtracted once per group), so that a weight costs
LOP3 + FMA + the product's FMA. The tensor-core path takes `dequant="fma"` too (with the zero row
in the FMA's addend), then rounds to x's dtype for the dot. K splits need not divide K evenly:
the last split may walk fewer steps.

`dequant="h2"` (GEMV path, 2/4/8-bit codes, one group per tile) works on code *pairs* in paired
fp16 arithmetic (`f16x2.py`): a word keeps codes 0..p/2-1 in its low half-word and p/2..p-1 in
the high one, so pair j = (slot j, slot j + p/2) is one LOP3 + one f16x2 subtraction away from
the exact centred codes, and one f16x2 FMA multiplies both by their x and adds: 1.5 instructions
a weight for the code and the product (fma: 3). x enters as f16x2 pairs, scaled per program by a
power of two (exact) so that a tile's fp16 sums stay far below 65504 whatever the activations'
range: the program reads its share of x once for the maximum before its loop and multiplies its
fp32 result back. Each tile's f16x2 sums (p/2 terms a half) join fp32 accumulators with the group
scale, so fp16 never adds more than p/2 terms.

The group scale multiplies the fp32 partial sum once per group, not every weight. An int to
float conversion costs a quarter-rate instruction on the GPU, so codes become floats by the
exponent trick: `bitcast(code | 0x4B000000)` is the float `2**23 + code`, and subtracting
`2**23 + zero` leaves `code - zero` exactly.

`quant_matmul_reference` (dequantize, then a bf16 matmul with fp32 accumulation) is the
function every variant must equal.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxcompress.errors import ConfigError, UserError
from jaxcompress.ops.linear import dense_linear
from jaxcompress.quant.qarray import QArray
from pallas_kernels.f16x2 import (H2_SHIFT, h2_codes, h2_fma, h2_pack, h2_pair_constants, h2_positions,
                                  h2_sum_halves, h2_zeros)
from pallas_kernels.hints import NO_HINTS, LoadHints, hinted_load
from pallas_kernels.layout import CodeLayout, TiledQArray, grid_values_at, kernel_layout

ACTIVATION_DTYPES = (jnp.bfloat16, jnp.float16)
MAGIC = 0x4B000000  # float32 bits of 2**23: OR-ing a code < 2**23 into the mantissa gives 2**23 + code
_TWO23 = 8388608.0
_MANTISSA_BITS = 23
DEQUANT_MODES = ("shift", "inplace", "fma", "h2")
# dequant="h2": a tile's f16x2 sums hold p/2 terms |x * (code - mid)| per half; x is scaled so that
# its largest magnitude in the program lies in [2**(X_EXP - 1), 2**X_EXP), X_EXP per bit width such
# that p/2 * 2**(bits - 1) * 2**X_EXP = 2**14 (the sum of both halves stays below 2**15 < 65504).
H2_SUM_BOUND_EXP = 14


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch parameters of one kernel instance (what the autotuner picks)."""

    block_n: int = 64
    block_m: int = 1  # GEMV path: any 1..8 (each row its own accumulator); GEMM: power of two >= 16
    use_dot: bool = False
    split_k: int = 1
    tiles_per_step: int = 1  # tiles loaded before any is used, for more bytes in flight
    tile_dot: bool = False  # tensor-core path: one dot per tile (slabs re-interleaved) instead of per slab
    # dequant="inplace" (GEMV path only): codes masked where they lie in the word (one LOP3 a
    # weight, one shift a word) instead of shift + mask + or; "fma" (both paths): the same mask,
    # then one FMA to the code's value (see the module docstring); acc2d (GEMV path only):
    # [rows, block_n] accumulators reduced over rows once at the end instead of once per group;
    # "h2" (GEMV path, with acc2d): code pairs in paired fp16 arithmetic (module docstring).
    dequant: str = "shift"
    acc2d: bool = False
    # GEMV path: a step's loads (codes, and x for "h2") go out one step ahead, before the
    # arithmetic of the step before: the loads of a program overlap its own arithmetic.
    prefetch: bool = False
    num_warps: int = 4
    num_stages: int = 1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TileConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"TileConfig: unknown keys {sorted(unknown)}")
        return cls(**d)

    def __str__(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))


def config_problem(cfg: TileConfig, lay: CodeLayout, m: int, *, min_dot_k: int = 16,
                   even_split: bool = False) -> str | None:
    """Why `cfg` cannot run on this layout and batch, or None when it can."""
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0  # noqa: E731
    if not pow2(cfg.block_n) or cfg.block_n < 16:
        return f"block_n={cfg.block_n} must be a power of two >= 16"
    if lay.n % cfg.block_n:
        return f"N={lay.n} must be a multiple of block_n={cfg.block_n}"
    if cfg.use_dot:
        if not pow2(cfg.block_m) or cfg.block_m < 16:
            return f"block_m={cfg.block_m} must be a power of two >= 16 on the tensor-core path"
        if lay.rows < min_dot_k:
            return (f"the tensor-core path needs slabs of >= {min_dot_k} rows, the layout has "
                    f"rows={lay.rows}; use the GEMV path or repack_for_gpu")
    elif not 1 <= cfg.block_m <= 8:
        return f"block_m={cfg.block_m} must be in 1..8 on the GEMV path"
    if cfg.tile_dot and not cfg.use_dot:
        return "tile_dot needs the tensor-core path (use_dot=True)"
    if cfg.prefetch and cfg.use_dot:
        return "prefetch is a GEMV-path option (use_dot=False)"
    if cfg.dequant not in DEQUANT_MODES:
        return f"dequant={cfg.dequant!r} must be one of {DEQUANT_MODES}"
    if (cfg.dequant == "inplace" or cfg.acc2d) and cfg.use_dot:
        return f"dequant={cfg.dequant!r} / acc2d={cfg.acc2d} are GEMV-path options (use_dot=False)"
    if cfg.dequant == "h2":
        if cfg.use_dot or not cfg.acc2d:
            return "dequant='h2' is a GEMV-path option with 2-D accumulators (use_dot=False, acc2d=True)"
        if lay.slabs_per_group != lay.period:
            return (f"dequant='h2' pairs slabs j and j + {lay.period // 2} of a tile, which must share one "
                    f"group; group_size={lay.group_size} is smaller than the tile of {lay.tile} rows")
    if cfg.dequant in ("inplace", "fma", "h2") and lay.codebook:
        return f"dequant={cfg.dequant!r} turns codes into uniform-grid values; this weight has a codebook"
    if cfg.dequant in ("inplace", "fma", "h2") and (lay.words != 1 or lay.bits > 8):
        return (f"dequant={cfg.dequant!r} needs codes that never straddle a word (bits 2, 4 or 8); "
                f"bits={lay.bits}")
    if cfg.tile_dot and lay.slabs_per_group != lay.period:
        return (f"tile_dot needs one group per tile of {lay.tile} rows; group_size={lay.group_size} "
                f"is smaller")
    if cfg.split_k < 1:
        return f"split_k={cfg.split_k} must be >= 1"
    if even_split:
        per_split, rem = divmod(lay.num_tiles, cfg.split_k)
        if rem:
            return (f"K={lay.k_padded} ({lay.num_tiles} tiles of {lay.tile} rows) must split evenly "
                    f"into split_k={cfg.split_k}")
        if cfg.tiles_per_step < 1 or per_split % cfg.tiles_per_step:
            return (f"the {per_split} tiles of each K split must be a multiple of "
                    f"tiles_per_step={cfg.tiles_per_step}")
    else:  # K splits of whole steps; the last split may hold fewer (K = 11008 is 86 = 2 x 43 tiles)
        steps, rem = divmod(lay.num_tiles, max(cfg.tiles_per_step, 1))
        if cfg.tiles_per_step < 1 or rem:
            return (f"K={lay.k_padded} ({lay.num_tiles} tiles of {lay.tile} rows) must be a multiple "
                    f"of tiles_per_step={cfg.tiles_per_step} tiles")
        if (cfg.split_k - 1) * -(-steps // cfg.split_k) >= steps:
            return (f"split_k={cfg.split_k} leaves a K split without tiles (K={lay.k_padded}: "
                    f"{steps} steps of tiles_per_step={cfg.tiles_per_step} x {lay.tile} rows)")
    if m < 1:
        return f"M={m} must be >= 1"
    return None


def default_config(lay: CodeLayout, m: int, num_sms: int = 132) -> TileConfig:
    """A reasonable config without measurements (the autotuner and the tuned table do better)."""
    # What won most often on an H200 (docs/results/kernel_notes.md): wide column blocks, K split
    # until there are ~4 programs per multiprocessor (GEMV) or ~2 (tensor cores).
    dequant = "fma" if lay.in_place else "shift"
    if m <= 8 or lay.rows < 16:
        cfg = TileConfig(block_n=64, block_m=min(m, 8), use_dot=False, dequant=dequant,
                         acc2d=lay.in_place and m <= 2)
        target = 4 * num_sms
    else:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        cfg = TileConfig(block_n=128, block_m=bm, use_dot=True, num_warps=4, num_stages=2, dequant=dequant)
        target = 2 * num_sms
    bn = cfg.block_n
    while lay.n % bn and bn > 16:
        bn //= 2
    programs = -(-m // cfg.block_m) * (lay.n // bn)
    split = 1
    while programs * split < target and lay.num_tiles % (split * 2) == 0 and split < 16:
        split *= 2
    per_split = lay.num_tiles // split
    step = 2 if per_split % 2 == 0 else 1
    if programs * split < target:  # even splits stop short (K = 11008: 86 = 2 x 43 tiles)
        step = 2 if lay.num_tiles % 2 == 0 else 1
        steps = lay.num_tiles // step
        split = max(1, min(16, -(-target // programs), steps))
        while split > 1 and (split - 1) * -(-steps // split) >= steps:
            split -= 1
    return dataclasses.replace(cfg, block_n=bn, split_k=split, tiles_per_step=step)


# --------------------------------------------------------------------------------------------
# Kernel body (touches only refs and values; everything static comes through functools.partial)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Operands:
    has_scale: bool
    has_zero: bool
    has_codebook: bool
    has_magic: bool = False  # dequant="fma": the 2**23 exponent word, an operand so it stays in a register


def extract_codes(words: list, j: int, bits: int) -> jax.Array:
    """Codes of position j of a period from its `words` uint32 blocks (bit stream, low bits first)."""
    w, off = divmod(j * bits, 32)
    q = words[w] >> off if off else words[w]
    if off + bits > 32:  # straddles into the next word
        q = q | (words[w + 1] << (32 - off))
    if off + bits != 32:  # unless the code fills the word's top bits exactly
        q = q & ((1 << bits) - 1)
    return q


def inplace_positions(bits: int, top_aligned: bool = False) -> tuple[int, list[tuple[bool, int]]]:
    """(shift, [(read from word >> shift?, bit offset) of code j]) for the in-place dequantizations.

    Code j of a word sits at bits [j * bits, (j + 1) * bits). Those wholly inside the fp32
    mantissa (bits 0-22) are masked where they lie; the rest are read from `word >> shift` (one
    shift a word). `shift` is the offset of the first code that does not fit, or, with
    `top_aligned`, 9: the word's top code then ends at the mantissa's top bit and no shifted code
    lands at offset 0 (which the compiler turns into a bit-field extract, two instructions)."""
    period = 32 // bits
    offs = [j * bits for j in range(period)]
    first = next((o for o in offs if o + bits > _MANTISSA_BITS), 32)
    shift = min(first, 32 - _MANTISSA_BITS) if top_aligned else first
    return shift, [(False, o) if o < first else (True, o - shift) for o in offs]


def codes_to_float(q: jax.Array, zero_plus_2_23) -> jax.Array:
    """Exact fp32 `code - zero` with no int->float conversion (see the module docstring)."""
    return lax.bitcast_convert_type(q | MAGIC, jnp.float32) - zero_plus_2_23


def interleave_slabs(slabs: list, interleaved: bool) -> jax.Array:
    """The `period` slabs [rows, bn] of a tile as one [period * rows, bn] block in input-row
    order: row `r * period + j` (interleaved layout) or `j * rows + r` (tiled) is slab j, row r.
    Pairs are joined along a new minor axis (bit 0 of j first), then one transpose orders them."""
    level, depth = list(slabs), 0
    while len(level) > 1:
        level = [jnp.stack([level[i], level[i + 1]], axis=-1) for i in range(0, len(level), 2)]
        depth += 1
    t = level[0]  # [rows, bn, b0, b1, ..., b_{depth-1}] with j = sum(b_l << l)
    j_major_first = tuple(range(depth + 1, 1, -1))
    perm = (0, *j_major_first, 1) if interleaved else (*j_major_first, 0, 1)
    rows, bn = slabs[0].shape
    return jnp.transpose(t, perm).reshape(rows * len(slabs), bn)


def load_group_row(ref, g, cols, policy: str | None = None):
    """fp32 [1, block_n] (or [1, 1] per-tensor) row of a per-group tensor for group g."""
    if ref.shape == (1, 1):
        return ref[pl.ds(0, 1), pl.ds(0, 1)].astype(jnp.float32)
    return hinted_load(ref.at[pl.ds(0 if ref.shape[0] == 1 else g, 1), cols], policy).astype(jnp.float32)


def pow2_scale(amax: jax.Array, exp: int) -> tuple[jax.Array, jax.Array]:
    """(s, 1 / s), powers of two with |x * s| < 2**exp for every |x| <= amax (exact scalings).
    From the exponent bits of amax (fp32, >= 0): amax < 2**(e - 126) for its biased exponent e.
    amax = 0 (or subnormal) gives the largest s; inf or NaN passes through to the result."""
    e = lax.shift_right_logical(lax.bitcast_convert_type(amax, jnp.int32), 23) & 0xFF
    biased = jnp.clip(253 + exp - e, 1, 253)  # s = 2**(biased - 127), its inverse 2**(127 - biased)
    as_float = lambda b: lax.bitcast_convert_type(lax.shift_left(b, 23), jnp.float32)  # noqa: E731
    return as_float(biased), as_float(254 - biased)


def h2_x_exponent(bits: int) -> int:
    """X_EXP of dequant="h2" (see H2_SUM_BOUND_EXP) for `bits`-bit codes."""
    pairs = 16 // bits
    return H2_SUM_BOUND_EXP - (pairs.bit_length() - 1) - (bits - 1)


def _kernel(*refs, lay: CodeLayout, cfg: TileConfig, m: int, ops: _Operands, hints: LoadHints,
            asm: bool = True):
    it = iter(refs)
    x_ref, codes_ref = next(it), next(it)
    scale_ref = next(it) if ops.has_scale else None
    zero_ref = next(it) if ops.has_zero else None
    cb_ref = next(it) if ops.has_codebook else None
    magic_ref = next(it) if ops.has_magic else None
    o_ref = next(it)

    bm, bn, rows, bits = cfg.block_m, cfg.block_n, lay.rows, lay.bits
    n0 = pl.program_id(1) * bn
    cols = pl.ds(n0, bn)
    m0 = pl.program_id(0) * bm
    # Rows past M are clamped onto row M-1: they recompute and rewrite row M-1's exact values.
    row_ids = jnp.minimum(m0 + lax.iota(jnp.int32, bm), m - 1)
    row_list = [jnp.minimum(m0 + i, m - 1) for i in range(bm)]
    # K split k_id walks steps [k_id * per_split, ...) of tiles_per_step tiles; when split_k does
    # not divide the steps, the last split stops early (a loop bound known only at run time).
    steps_total = lay.num_tiles // cfg.tiles_per_step
    per_split = -(-steps_total // cfg.split_k)
    first_step = pl.program_id(2) * per_split
    n_steps = per_split if per_split * cfg.split_k == steps_total else \
        jnp.minimum(per_split, steps_total - first_step)
    one_group = lay.num_groups == 1
    in_dtype = x_ref.dtype

    def group_row(ref, g):
        return load_group_row(ref, g, cols, hints.groups)

    def zero_plus_2_23(g):
        if ops.has_codebook:
            return None
        if ops.has_zero:
            return group_row(zero_ref, g) + _TWO23
        return jnp.float32(_TWO23 + 2 ** (bits - 1))

    def slab_weights(words, j, zc):
        q = extract_codes(words, j, bits)
        if ops.has_codebook:
            n_ids = jnp.zeros((rows, bn), jnp.int32) if cb_ref.shape[0] == 1 else (
                n0 + lax.broadcasted_iota(jnp.int32, (rows, bn), 1))
            return cb_ref[n_ids, q.astype(jnp.int32)].astype(jnp.float32)
        return codes_to_float(q, zc)

    def x_cols(t, j):
        start, stride = lay.x_cols(t, j)
        if lay.k_padded == lay.k:
            return pl.ds(start, rows, stride=stride), None
        ids = start + lax.iota(jnp.int32, rows) * stride  # padded tail: clamp, then zero
        return jnp.minimum(ids, lay.k - 1), ids < lay.k

    def load_x_rows(t, j):  # [bm, rows] for the tensor cores
        idx, valid = x_cols(t, j)
        if valid is None:
            xs = x_ref[row_ids, idx]
        else:
            xs = x_ref[row_ids[:, None], idx[None, :]]
            xs = jnp.where(valid[None, :], xs, jnp.zeros_like(xs))
        return xs

    def load_x_raw(t, j, i):  # [rows, 1] in x's dtype, row i of the block (padded K zeroed)
        idx, valid = x_cols(t, j)
        xs = hinted_load(x_ref.at[row_list[i], idx], hints.x)
        if valid is not None:
            xs = jnp.where(valid, xs, jnp.zeros_like(xs))
        return xs[:, None]

    def load_x_col(t, j, i, factor=None):  # [rows, 1] fp32, row i of the block (times factor)
        xs = load_x_raw(t, j, i).astype(jnp.float32)
        return xs if factor is None else xs * factor

    def group_of(t, j):
        start, _ = lay.x_cols(t, j)
        first_row = start if not lay.interleaved else t * lay.tile
        return jnp.minimum(first_row // lay.group_size, lay.num_groups - 1)

    fixed_zc = zero_plus_2_23(0) if one_group else None

    def load_x_tile(t):  # [bm, tile] in input-row order
        start = t * lay.tile
        if lay.k_padded == lay.k:
            return x_ref[row_ids, pl.ds(start, lay.tile)]
        ids = start + lax.iota(jnp.int32, lay.tile)
        xs = x_ref[row_ids[:, None], jnp.minimum(ids, lay.k - 1)[None, :]]
        return jnp.where((ids < lay.k)[None, :], xs, jnp.zeros_like(xs))

    def dot_slabs(words, js, g):
        """fp32 `code - zero` of slabs js (one group g) for the tensor-core paths."""
        if fma:
            shifted = words[0] >> shift if shift < 32 else None
            zrow = group_row(zero_ref, g) if ops.has_zero else None
            return [fma_weights(words, shifted, j, zrow) for j in js]
        zc = fixed_zc if one_group else zero_plus_2_23(g)
        return [slab_weights(words, j, zc) for j in js]

    def whole_tile_step(t, acc, words):
        g = group_of(t, 0)
        slabs = [w.astype(in_dtype) for w in dot_slabs(words, range(lay.period), g)]
        part = jnp.dot(load_x_tile(t), interleave_slabs(slabs, lay.interleaved),
                       preferred_element_type=jnp.float32)
        if one_group or scale_ref is None:
            return acc + part
        return acc + part * group_row(scale_ref, g)

    inplace, fma = cfg.dequant == "inplace", cfg.dequant == "fma"
    if inplace or fma:
        shift, positions = inplace_positions(bits, top_aligned=fma)

    def in_place_float(words, shifted, j, exponent):
        """(o, the float 2**23 + code * 2**o) of slab j: the code masked where it lies at offset
        o of its source word and OR-ed with the exponent word of 2**23."""
        from_shifted, o = positions[j]
        src = shifted if from_shifted else words[0]
        return o, lax.bitcast_convert_type((src & jnp.uint32(((1 << bits) - 1) << o)) | exponent, jnp.float32)

    def inplace_weights(words, shifted, j, zrow):
        """Exact fp32 (code - zero) * 2**o of slab j, o its offset in the source word (the
        caller scales x by 2**-o)."""
        o, f = in_place_float(words, shifted, j, MAGIC)
        if zrow is None:
            return f - jnp.float32(_TWO23 + 2 ** (bits - 1) * 2 ** o)
        return f - (zrow * jnp.float32(2 ** o) + _TWO23)

    if fma:
        magic = magic_ref[pl.ds(0, 1), pl.ds(0, 1)]
        z_sym = 0.0 if ops.has_zero else 2.0 ** (bits - 1)  # zero points: subtracted per segment

    def fma_weights(words, shifted, j, zrow=None):
        """Exact fp32 `code - z` of slab j in two instructions, z = z_sym or the zero row [1, bn].
        The code, masked where it lies at offset o and OR-ed into the mantissa of 2**23 (one
        LOP3: the exponent word comes from an operand, so it stays in a register), is the float
        2**23 + code * 2**o; scaling by 2**-o and subtracting 2**(23 - o) + z is one FMA (exact
        for z_sym: the result is a small integer; with a zero row, one rounding as before)."""
        o, f = in_place_float(words, shifted, j, magic)
        offset = jnp.float32(2.0 ** (_MANTISSA_BITS - o))
        return f * jnp.float32(2.0 ** -o) - (offset + z_sym if zrow is None else zrow + offset)

    def fma_tile_step(t, acc, words):
        """GEMV step of dequant="fma". With zero points, sum_k x_k (code_k - z) = sum_k x_k code_k
        - z sum_k x_k: the x of each segment (the slabs of one group in this tile) are summed per
        row as they are loaded and the zero-point term is subtracted once per segment."""
        shifted = words[0] >> shift if shift < 32 else None
        part = xsum = None
        for j in range(lay.period):
            if j % lay.slabs_per_group == 0:
                g, part, xsum = group_of(t, j), None, None
            wts = fma_weights(words, shifted, j)
            xs = [load_x_col(t, j, i) for i in range(bm)]
            prods = [x * wts for x in xs]
            part = prods if part is None else [p + d for p, d in zip(part, prods)]
            if ops.has_zero:
                xsum = xs if xsum is None else [a + x for a, x in zip(xsum, xs)]
            if (j + 1) % lay.slabs_per_group == 0:
                if ops.has_zero:
                    z = group_row(zero_ref, g)
                    part = [p - x * z for p, x in zip(part, xsum)]
                s = None if (one_group or scale_ref is None) else group_row(scale_ref, g)
                if not cfg.acc2d:
                    part = [jnp.sum(p, axis=0, keepdims=True) for p in part]
                acc = tuple(a + (v if s is None else v * s) for a, v in zip(acc, part))
        return acc

    def probe_tile_step(t, acc, words):  # timing probe: the loads, one FMA a word, wrong values
        w32 = lax.bitcast_convert_type(words[0] & jnp.uint32(0x3F7FFFFF), jnp.float32)
        part = [load_x_col(t, 0, i) * w32 for i in range(bm)]
        if not cfg.acc2d:
            part = [jnp.sum(p, axis=0, keepdims=True) for p in part]
        return tuple(a + v for a, v in zip(acc, part))

    def gemv_tile_step(t, acc, words):
        if cfg.dequant == "probe":
            return probe_tile_step(t, acc, words)
        shifted = words[0] >> shift if inplace and shift < 32 else None
        part = zrow = None
        for j in range(lay.period):
            if j % lay.slabs_per_group == 0:
                g = group_of(t, j)
                if inplace:
                    zrow = group_row(zero_ref, g) if ops.has_zero else None
                else:
                    zc = fixed_zc if one_group else zero_plus_2_23(g)
                part = None
            if inplace:
                wts = inplace_weights(words, shifted, j, zrow)
                factor = jnp.float32(2.0 ** -positions[j][1]) if positions[j][1] else None
            else:
                wts, factor = slab_weights(words, j, zc), None
            prods = [load_x_col(t, j, i, factor) * wts for i in range(bm)]
            part = prods if part is None else [p + d for p, d in zip(part, prods)]
            if (j + 1) % lay.slabs_per_group == 0:
                s = None if (one_group or scale_ref is None) else group_row(scale_ref, g)
                if not cfg.acc2d:
                    part = [jnp.sum(p, axis=0, keepdims=True) for p in part]
                acc = tuple(a + (v if s is None else v * s) for a, v in zip(acc, part))
        return acc

    h2 = cfg.dequant == "h2"
    if h2:
        h2_pairs = [(j, sh, h2_pair_constants(bits, o)) for j, (sh, o) in enumerate(h2_positions(bits))]
        half = lay.period // 2
        zero_mid = 2.0 ** (bits - 1)

    def h2_x_raw(t):
        """x of a tile as loaded ([rows, 1] per slab and row of x): the loads can go out a step
        ahead (prefetch); scaling and packing wait for the arithmetic."""
        return [[load_x_raw(t, j, i) for i in range(bm)] for j in range(lay.period)]

    def h2_tile_step(t, acc, words, xraw, x_scale):
        """GEMV step of dequant="h2": per pair, the centred codes (shared by the rows of x) and
        one f16x2 FMA a row; the tile's sums join the fp32 accumulators with the group scale. With
        zero points, code - z = (code - mid) - (z - mid): the x of the tile are summed (fp32) as
        they are scaled and (z - mid) times that sum is subtracted once per tile."""
        w = lax.bitcast_convert_type(words[0], jnp.int32)
        shifted = lax.shift_right_logical(w, jnp.int32(H2_SHIFT)) if any(sh for _, sh, _ in h2_pairs) else None
        sums = [h2_zeros((rows, bn), asm) for _ in range(bm)]
        xsum = [None] * bm
        for j, sh, consts in h2_pairs:
            codes = h2_codes(shifted if sh else w, *consts, asm)
            for i in range(bm):
                lo, hi = (xraw[jj][i].astype(jnp.float32) * x_scale[i] for jj in (j, j + half))
                sums[i] = h2_fma(h2_pack(lo, hi, asm), codes, sums[i], asm)
                if ops.has_zero:
                    xsum[i] = lo + hi if xsum[i] is None else xsum[i] + lo + hi
        g = group_of(t, 0)
        s = None if (one_group or scale_ref is None) else group_row(scale_ref, g)
        zm = group_row(zero_ref, g) - zero_mid if ops.has_zero else None
        new = []
        for i in range(bm):
            v = h2_sum_halves(sums[i], asm)
            if zm is not None:
                v = v - xsum[i] * zm
            new.append(acc[i] + (v if s is None else v * s))
        return tuple(new)

    def x_scales():
        """Per row of x: (s, 1/s) for this program's K range (see pow2_scale). Every x value the
        program reads lies in its steps' tiles; the loads are issued together, clamped to K."""
        span = per_split * cfg.tiles_per_step * lay.tile
        start = first_step * cfg.tiles_per_step * lay.tile
        chunk = min(1 << (span.bit_length() - 1), 1024)  # Triton arrays: a power of two long
        out = []
        for i in range(bm):
            top = None
            for c0 in range(0, span, chunk):  # a last chunk past the span reads x the program
                # does not use (or x[K - 1]): a larger maximum only makes s more conservative
                ids = jnp.minimum(start + c0 + lax.iota(jnp.int32, chunk), lay.k - 1)
                a = jnp.abs(x_ref[row_list[i], ids].astype(jnp.float32))
                top = a if top is None else jnp.maximum(top, a)
            out.append(pow2_scale(jnp.max(top), h2_x_exponent(bits)))
        return out

    def load_words(t):
        words = []
        for w in range(lay.words):
            start, stride = lay.word_rows(t, w)
            words.append(hinted_load(codes_ref.at[pl.ds(start, rows, stride=stride), cols], hints.codes))
        return words

    def tile_step(t, acc, loaded):
        words, xraw = loaded
        if h2:
            return h2_tile_step(t, acc, words, xraw, [sc for sc, _ in scales])
        if cfg.tile_dot:
            return whole_tile_step(t, acc, words)
        if not cfg.use_dot:
            return fma_tile_step(t, acc, words) if fma else gemv_tile_step(t, acc, words)
        spg = lay.slabs_per_group
        for j0 in range(0, lay.period, spg):  # one group at a time
            g = group_of(t, j0)
            part = None
            for j, wts in zip(range(j0, j0 + spg), dot_slabs(words, range(j0, j0 + spg), g)):
                d = jnp.dot(load_x_rows(t, j), wts.astype(in_dtype), preferred_element_type=jnp.float32)
                part = d if part is None else part + d
            s = None if (one_group or scale_ref is None) else group_row(scale_ref, g)
            acc = acc + (part if s is None else part * s)
        return acc

    def step_tiles(step):
        return [(first_step + step) * cfg.tiles_per_step + u for u in range(cfg.tiles_per_step)]

    def load_step(step):
        # All the step's code tiles are loaded before any is used: more bytes in flight.
        return [(load_words(t), h2_x_raw(t) if h2 else None) for t in step_tiles(step)]

    def run_step(step, acc, loaded):
        for t, tile_loads in zip(step_tiles(step), loaded):
            acc = tile_step(t, acc, tile_loads)
        return acc

    if cfg.prefetch:  # the next step's loads go out before this step's arithmetic (the last is reloaded)
        def body(step, carry):
            acc, loaded = carry
            ahead = load_step(jnp.minimum(step + 1, n_steps - 1))
            return run_step(step, acc, loaded), ahead
    else:
        def body(step, acc):
            return run_step(step, acc, load_step(step))

    if cfg.use_dot:
        acc0 = jnp.zeros((bm, bn), jnp.float32)
    else:
        acc0 = tuple(jnp.zeros((rows if cfg.acc2d else 1, bn), jnp.float32) for _ in range(bm))
    if cfg.prefetch:
        # The first step's loads go out before the maximum of x is taken (h2), so the two
        # memory latencies overlap instead of adding up (a program may walk a single step).
        first = load_step(0)
        scales = x_scales() if h2 else None
        acc, _ = lax.fori_loop(0, n_steps, body, (acc0, first))
    else:
        scales = x_scales() if h2 else None
        acc = lax.fori_loop(0, n_steps, body, acc0)
    if cfg.acc2d:
        acc = tuple(jnp.sum(a, axis=0, keepdims=True) for a in acc)
    if h2:  # back from the scaled x (exact)
        acc = tuple(a * inv for a, (_, inv) in zip(acc, scales))

    if one_group and scale_ref is not None:
        s = group_row(scale_ref, 0)
        acc = acc * s if cfg.use_dot else tuple(a * s for a in acc)
    out_dtype = o_ref.dtype
    if cfg.split_k == 1:
        if cfg.use_dot:
            o_ref[row_ids, cols] = acc.astype(out_dtype)
        else:
            for i in range(bm):
                o_ref[pl.ds(row_list[i], 1), cols] = acc[i].astype(out_dtype)
    else:
        k_id = pl.program_id(2)
        if cfg.use_dot:
            o_ref[k_id, row_ids, cols] = acc
        else:
            for i in range(bm):
                o_ref[k_id, pl.ds(row_list[i], 1), cols] = acc[i]


# --------------------------------------------------------------------------------------------
# Public wrapper
# --------------------------------------------------------------------------------------------


def check_activations(x: jax.Array, k: int, where: str = "quant_matmul") -> None:
    if x.ndim < 1 or x.shape[-1] != k:
        raise UserError(f"{where}: x has shape {x.shape}; its last dimension must be the weight's "
                        f"input dimension K={k}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise UserError(f"{where}: x dtype {x.dtype} is not supported; the kernel takes bfloat16 or "
                        f"float16 activations (cast x, or use quant_matmul_reference)")


def layout_problem(w) -> str | None:
    """Why the kernels cannot read weight `w` at all, or None."""
    if not isinstance(w, (QArray, TiledQArray)):
        return f"{type(w).__name__} is not a QArray or TiledQArray"
    if w.codebook is None and w.scale is None:
        return "a uniform grid needs a scale"
    if w.codebook is not None and w.codebook.shape[-1] != 2 ** w.bits:
        return f"codebook has {w.codebook.shape[-1]} entries, bits={w.bits} needs {2 ** w.bits}"
    if w.codebook is None and w.bits > 8:
        return f"bits={w.bits} > 8 is not supported"
    return kernel_layout(w).problem()


def quant_matmul(x: jax.Array, w: QArray | TiledQArray, *, config: TileConfig | None = None,
                 interpret: bool = False, poison: float | None = None,
                 hints: LoadHints | None = None) -> jax.Array:
    """y [..., N] = x [..., K] @ w.dequantize() with the fused kernel (bf16/fp16 x, fp32 accumulation).

    `config` picks the block sizes (default: `default_config`); `interpret=True` runs the
    kernel in Pallas interpret mode (CPU tests); `poison` pre-fills the kernel's output buffer
    with that value (tests: NaN left anywhere means an element was never written); `hints`
    overrides the loads' eviction policies (default: `LoadHints()` where one block of rows reads
    the codes, none where several do; interpret mode has no caches and always loads plainly).
    """
    problem = layout_problem(w)
    if problem:
        raise UserError(f"quant_matmul: weight {w.shape} cannot use the kernel: {problem}")
    lay = kernel_layout(w)
    check_activations(x, lay.k)
    x2 = x.reshape(-1, lay.k)
    m = x2.shape[0]
    cfg = config or default_config(lay, m)
    problem = config_problem(cfg, lay, m)
    if problem:
        raise UserError(f"quant_matmul: weight {w.shape}, batch M={m}: {problem}")
    y = _fused(x2, w, jnp.float32(0.0 if poison is None else poison), lay=lay, cfg=cfg,
               interpret=interpret, poisoned=poison is not None, hints=hints)
    return y.reshape(*x.shape[:-1], lay.n)


# Interpret mode compiles a large program (the kernel with its refs discharged) for the CPU,
# where LLVM's optimizations cost more time than they save.
INTERPRET_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_kernel_call(fn):
    """jit for `fn(x2, w, fill, *, lay, cfg, interpret, poisoned)`: every projection with the same
    shapes and config shares one lowering; interpret mode compiles without LLVM optimizations."""
    params = inspect.signature(fn).parameters
    static = tuple(n for n in ("lay", "cfg", "interpret", "poisoned", "hints") if n in params)
    compiled = jax.jit(fn, static_argnames=static)
    interpreted = jax.jit(fn, static_argnames=static, compiler_options=INTERPRET_COMPILER_OPTIONS)

    @functools.wraps(fn)
    def call(*args, interpret: bool, **kwargs):
        # Compiler options apply to top-level jits only; inside another trace use the plain one.
        nested = any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(args))
        return (interpreted if interpret and not nested else compiled)(*args, interpret=interpret, **kwargs)

    return call


@jit_kernel_call
def _fused(x2: jax.Array, w, fill: jax.Array, *, lay: CodeLayout, cfg: TileConfig, interpret: bool,
           poisoned: bool, hints: LoadHints | None = None) -> jax.Array:
    if w.perm is not None:  # storage row i holds input feature perm[i]
        x2 = jnp.take(x2, w.perm, axis=1)
    y = _pallas_matmul(x2, w, fill, lay, cfg, interpret, poisoned, hints)
    return y if w.outlier_index is None else _add_outliers(y, x2, w)


def _pallas_matmul(x2, w, fill, lay: CodeLayout, cfg: TileConfig, interpret: bool, poisoned: bool,
                   hints: LoadHints | None = None):
    m = x2.shape[0]
    if interpret:  # no caches to hint, and interpret mode cannot discharge a hinted strided load
        hints = NO_HINTS
    elif hints is None:  # codes read by one row block only are read once: hint them so
        hints = LoadHints() if -(-m // cfg.block_m) == 1 else NO_HINTS
    ops = _Operands(w.scale is not None, w.zero is not None and w.codebook is None,
                    w.codebook is not None, has_magic=cfg.dequant == "fma")
    operands = [x2, w.codes]
    operands += [w.scale] if ops.has_scale else []
    operands += [w.zero] if ops.has_zero else []
    operands += [w.codebook] if ops.has_codebook else []
    operands += [jnp.full((1, 1), MAGIC, jnp.uint32)] if ops.has_magic else []
    if cfg.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((m, lay.n), x2.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((cfg.split_k, m, lay.n), jnp.float32)
    path = "gemm" if cfg.use_dot else "gemv"
    body = functools.partial(_kernel, lay=lay, cfg=cfg, m=m, ops=ops, hints=hints, asm=not interpret)
    aliases = {}
    if poisoned:  # the kernel writes into a buffer pre-filled with `fill` (last operand, aliased)
        operands.append(jnp.full(out_shape.shape, fill, out_shape.dtype))
        aliases = {len(operands) - 1: 0}
        body = functools.partial(drop_poisoned_input, body)
    out = pl.pallas_call(
        body,
        out_shape=out_shape,
        input_output_aliases=aliases,
        grid=(-(-m // cfg.block_m), lay.n // cfg.block_n, cfg.split_k),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"quant_matmul_w{lay.bits}_{path}",
    )(*operands)
    if cfg.split_k > 1:
        out = out.sum(axis=0).astype(x2.dtype)
    return out


def drop_poisoned_input(body, *refs):
    """Kernel wrapper for `poison`: the pre-filled buffer arrives as an (aliased) input ref too."""
    *ins, _poisoned_in, out = refs
    return body(*ins, out)


def probe_matmul(x2: jax.Array, w, config: TileConfig, *, interpret: bool = False) -> jax.Array:
    """TIMING PROBE, WRONG RESULTS ON PURPOSE: the GEMV kernel of `config` (same grid, same code
    loads, same split-K pass) with the dequantization replaced by one FMA per code word. Its
    time is what this grid costs when the loads are all that is left (benchmark diagnostics)."""
    lay = kernel_layout(w)
    cfg = dataclasses.replace(config, dequant="shift")
    problem = config_problem(cfg, lay, x2.shape[0]) or (
        "the probe needs the GEMV path" if cfg.use_dot else None)
    if problem:
        raise UserError(f"probe_matmul: {problem}")
    return _fused(x2, w, jnp.float32(0.0), lay=lay, cfg=dataclasses.replace(config, dequant="probe"),
                  interpret=interpret, poisoned=False)


def _add_outliers(y: jax.Array, x2: jax.Array, w) -> jax.Array:
    """Dense-and-sparse: adds x[:, row] * (outlier - grid value) for each outlier (row, col)."""
    n = w.shape[1]
    idx = w.outlier_index
    delta = w.outlier_value.astype(jnp.float32) - grid_values_at(w, idx)
    contrib = x2[:, idx // n].astype(jnp.float32) * delta[None, :]
    return y.astype(jnp.float32).at[:, idx % n].add(contrib).astype(y.dtype)


def quant_matmul_reference(x: jax.Array, w: QArray | TiledQArray) -> jax.Array:
    """The reference: dequantize to the weight dtype, then x @ W with fp32 accumulation."""
    return dense_linear(x, w.dequantize())
