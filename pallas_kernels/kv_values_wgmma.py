"""The values pass of the two-pass KV decode body ("cw2") on Hopper tensor cores (Mosaic GPU).

cw2's values pass (`decode_attention._cw2_values_kernel`) sums p * value on the CUDA cores, three
f16x2 instructions for two cache elements plus each row's bookkeeping; ncu found it issue-bound
(kv_notes run 18). Here the same sum is a matrix product with the codes as the left operand, as
the weight codes are in `wgmma_matmul`:

    o^T [D, N] = (code - mid)^T [D, tokens] @ B [tokens, N],   B[t, (q, g)] = p_q[t] * scale[g, t]

so a thread's only work per pair of codes is its conversion (`wgmma_matmul._convert_lop3` with
`in_place`: one lop3, one sub), once
for all the query heads of a kv head, and wgmma does the multiply-adds in fp32. N = query heads x
value channel groups (KIVI: 4 groups of 32 channels), zero-filled to 8; each channel row keeps the
column of its own group (`finish_values`).

Measured on an H200 (KIVI-2 at 32k): with Llama-3-8B's 4 query heads a kv head, 13.4 us against the
f16x2 pass's 30.1 at batch 1 (kv_notes run 21) and 59.8 against 160.8 at batch 8 (run 22). With
Llama-2's one it first lost (run 21: 194.6 against 169.6 at batch 8): the conversion is most of either
pass's instructions, and both are issue-bound. The and-or as one PTX lop3 and 512-token steps (run 22)
made it 25.1 against 29.3 at batch 1 and 159.0 against 170.4 at batch 8, so
`decode_attention.values_pass_of` takes it wherever it runs, except with one query a kv head on a
small grid (batch 1 of Llama-2: a decode step measured 0.2 ms slower with it, kv_notes run 26).

**Layout.** The value store is read as it is (channel_words: channel rows of 32-bit words of 16
tokens each, the per-token scales, zero points and the keys pass's scores in *code order*). TMA
streams a step of 256 tokens: the codes [D, 128 int4], and the step's per-token meta and scores as
[16 slots, 16 word columns] tiles of the code order. A 2-bit UPCAST_4X register of thread q is
word q of each 4-word chunk of a channel row, and its converted pair c is slots (c, c + 8)
(`wgmma_matmul.crumb_permutation`), so wgmma reads token (word column j, slot i) as logical column
`b_column(i, j)` of the step; each thread writes B for two tokens there (`_write_b`), fp16, into a
128-byte-swizzled shared tile, and sums the zero-point terms p * (zero + mid * scale) and p itself
(the softmax denominator) in fp32 registers, reduced over threads after the kernel.

Only 2-bit values in channel_words stores with fp16 meta and head_dim a multiple of 64; the keys
pass and its scores are cw2's. The kernel runs on a Hopper GPU only (no Mosaic GPU interpreter on
the CPU): CPU tests check the index map with a plain-JAX model of the kernel (`emulate_values`)
and lower the kernel for CUDA.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError

STEP_TOKENS = 256  # tokens a pipeline step: 16 word columns of 2-bit codes (a 64-byte row)
STEP_COLUMNS = 16  # word columns a step
SLOTS = 16         # 2-bit codes a word
ROW_BLOCK = 64     # channel rows a wgmma block (wgmma's M)
MAX_PARTIAL_SUMS = 32  # fp32 registers a thread for its sums of p and the zero-point terms (4 query
                       # heads x 4 groups, 20 padded to 32, compiled and ran; more is untried)
LOG2E = math.log2(math.e)


def b_column(slot, column):
    """The logical K column of a step's B (and of the converted codes) that holds token (word
    column `column` of the step, slot `slot` of the word): chunk h = column // 4 of 64 columns,
    thread-word q = column % 4, pair c = slot % 8, half e = slot // 8 (`crumb_permutation`)."""
    return 64 * (column // 4) + 8 * (slot % 8) + 2 * (column % 4) + slot // 8


def supports(v, heads: int, pieces: int = 1, block: int | None = None) -> str | None:
    """Why the wgmma values pass cannot read this value store for `heads` query heads a program in
    steps of `pieces` x 256 tokens (and, given, the keys pass's blocks of `block` tokens), or None."""
    from jaxcompress.kv.store import CHANNEL_WORDS

    if v.layout != CHANNEL_WORDS or v.bits != 2:
        return f"values are {v.bits}-bit {v.layout}; the wgmma values pass reads 2-bit channel_words stores"
    if pieces not in (1, 2):
        return f"steps of {pieces} pieces of {STEP_TOKENS} tokens (1 or 2)"
    if block is not None and block % (STEP_TOKENS * pieces):
        return f"the keys pass's blocks of {block} tokens are not whole steps of {STEP_TOKENS * pieces}"
    if v.rows % (STEP_COLUMNS * pieces):
        return f"the store's tiles of {v.rows} word columns are not whole steps of {STEP_COLUMNS * pieces}"
    if v.head_dim % ROW_BLOCK:
        return f"head_dim {v.head_dim} is not a multiple of {ROW_BLOCK} (wgmma's rows)"
    if v.scale.dtype != jnp.float16 or (v.zero is not None and v.zero.dtype != jnp.float16):
        return "the value scales and zero points are not fp16"
    if v.token_group != 1 or v.head_dim % v.channel_group:
        return "the values are not quantized per token"
    if _columns(heads, v.head_dim // v.channel_group)[1] > MAX_PARTIAL_SUMS:
        return (f"{heads} query heads x {v.head_dim // v.channel_group} channel groups need more than "
                f"{MAX_PARTIAL_SUMS} fp32 sums a thread")
    return None


def slot_mids(balanced: bool = False) -> np.ndarray:
    """[16] the mid the conversion subtracts from the code in each slot of a word: 2 (the codes
    centred as 0..3 -> -2..1), or with `balanced` `f16x2.balanced_mids` of the slot's pair (slots c
    and c + 8 are pair c, at offset `h2_positions(2)[c]`): 1.5, but 2 and 1 for slots 0 and 8."""
    from pallas_kernels.f16x2 import balanced_mids, h2_positions

    if not balanced:
        return np.full(SLOTS, 2.0)
    pairs = [balanced_mids(2, o) for _, o in h2_positions(2)]
    mids = np.array([pairs[slot % 8][slot // 8] for slot in range(SLOTS)])
    assert len(set(mids[1:8])) == len(set(mids[9:])) == 1  # `_write_b` selects pair 0's or the rest's
    return mids


def _columns(heads: int, groups: int) -> tuple[int, int]:
    """(B's columns, zero-filled to a multiple of 8; fp32 partial sums a thread: heads
    denominators and heads x groups zero-point terms, padded to a power of 2)."""
    n = heads * groups
    return -(-n // 8) * 8, 1 << (heads + n - 1).bit_length()


def _code_order_view(x, rows: int):
    """A per-token array [..., S] in code order -> [..., S / (16 rows), 16 slots, rows columns]."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // (SLOTS * rows), SLOTS, rows)


def _write_b(ctx, s_ref, vs_ref, *rest, heads: int, groups: int, n_pad: int, with_zero: bool,
             pieces: int = 1, balanced: bool = False):
    """One step's B into the 128-byte-swizzled tile b_ref [n_pad, 256 pieces] (fp16), and the thread's
    fp32 partial sums: in each 256-token piece p thread t takes word column j = 16 p + t % 16 and slots
    c, c + 8 (c = t // 16), two tokens that are adjacent columns of B (`b_column`), so one 32-bit
    store a row."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, memref, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    del ctx
    if with_zero:
        vz_ref, b_ref, part, valid, *tops = rest
    else:
        vz_ref = None
        b_ref, part, valid, *tops = rest
    i32, f32, f16 = ir.IntegerType.get_signless(32), ir.F32Type.get(), ir.F16Type.get()
    index = ir.IndexType.get()
    ci = lambda v: arith.constant(i32, v)  # noqa: E731
    cf = lambda v: arith.constant(f32, v)  # noqa: E731
    ix = lambda v: arith.index_cast(index, v)  # noqa: E731
    mgpu_utils.warpgroup_barrier()  # the previous step's wgmma has read B in every warp
    t = arith.remui(mgpu_utils.thread_idx(), ci(128))
    j0 = arith.andi(t, ci(15))
    c = arith.shrui(t, ci(4))
    q2 = arith.shli(arith.andi(j0, ci(3)), ci(1))
    slots = (c, arith.addi(c, ci(8)))
    # the mid the slots' codes are centred on (`slot_mids`; only pair 0, slots 0 and 8, may differ)
    table = slot_mids(balanced)
    first_pair = arith.cmpi(arith.CmpIPredicate.eq, c, ci(0))
    mids = [arith.select(first_pair, cf(float(table[8 * e])), cf(float(table[8 * e + 1]))) for e in (0, 1)]
    ok = valid.registers.item()
    (regs,) = part.registers.flat
    sums = [vector.extract(regs, [], [n]) for n in range(ir.VectorType(regs.type).shape[0])]
    pair_ty = ir.VectorType.get((2,), f16)

    def load(ref, *idx):
        return memref.load(ref, [ix(i) if isinstance(i, ir.Value) else arith.constant(index, i) for i in idx])

    def exp2(x):
        return llvm.inline_asm(f32, [x], "ex2.approx.ftz.f32 $0, $1;", "=f,f")

    def store_pair(n: int, h, lo, hi):
        # (n, k) of the [n_pad, 256 pieces] tile tiled (8, 64), 128-byte swizzle: 16-byte chunk ^ (n % 8)
        pair = vector.from_elements(pair_ty, [lo, hi])
        col = arith.addi(arith.shli(arith.xori(c, ci(n % 8)), ci(3)), q2)
        vector.store(pair, b_ref, [arith.constant(index, n // 8), ix(h), arith.constant(index, n % 8), ix(col)])

    zero16 = arith.constant(f16, 0.0)
    for piece in range(pieces):
        j = arith.addi(j0, ci(STEP_COLUMNS * piece)) if piece else j0
        h = arith.shrui(j, ci(2))  # B's 64-column tile
        for qq in range(heads):
            top = tops[qq].registers.item()
            p = []
            for i in slots:
                s = load(s_ref, qq, i, j)
                p.append(arith.select(ok, exp2(arith.subf(s, top)), cf(0.0)))
            sums[qq] = arith.addf(sums[qq], arith.addf(p[0], p[1]))
            for g in range(groups):
                n = qq * groups + g
                ps, zsum = [], sums[heads + n]
                for e, i in enumerate(slots):
                    scale = arith.extf(f32, load(vs_ref, g, i, j))
                    ps.append(arith.truncf(f16, arith.mulf(p[e], scale)))
                    # value = (code - mid) * scale + offset: offset = zero + mid * scale (asymmetric),
                    # (mid - 2) * scale (symmetric: none unless balanced)
                    offset = None
                    if with_zero:
                        offset = arith.addf(arith.extf(f32, load(vz_ref, g, i, j)), arith.mulf(mids[e], scale))
                    elif balanced:
                        offset = arith.mulf(arith.subf(mids[e], cf(2.0)), scale)
                    if offset is not None:
                        zsum = arith.addf(zsum, arith.mulf(p[e], offset))
                sums[heads + n] = zsum
                store_pair(n, h, *ps)
        for n in range(heads * groups, n_pad):  # zero columns
            store_pair(n, h, zero16, zero16)
    mgpu_utils.commit_shared()  # fence for wgmma's (async proxy) reads, then the warpgroup barrier
    new = vector.from_elements(regs.type, sums)
    new_regs = np.empty_like(part.registers)
    new_regs.flat[0] = new
    return mgpu.FragmentedArray(_registers=new_regs, _layout=part.layout, _is_signed=None)


def _kernel(scores_g, top_g, len_g, codes_g, vs_g, *rest, heads: int, groups: int, rows: int,
            block: int, blocks_per_split: int, stages: int, with_zero: bool, head_dim: int, pieces: int,
            lop3: bool, balanced: bool = False):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.wgmma_matmul import _convert_lop3, _load

    vz_g = rest[0] if with_zero else None
    o_g, part_g, b_smem, o_smem, part_smem = rest[int(with_zero):]
    n_pad, n_part = _columns(heads, groups)
    bi, hh, si = (jax.lax.axis_index(a) for a in ("b", "h", "s"))
    step_tokens, step_columns = STEP_TOKENS * pieces, STEP_COLUMNS * pieces
    per_block = block // step_tokens
    used = jax.lax.div(len_g[0] + (block - 1), jnp.int32(block))
    lo = si * blocks_per_split
    valid_steps = jnp.maximum(jnp.minimum(lo + blocks_per_split, used) - lo, 0) * per_block
    first = si * (blocks_per_split * per_block)  # the split's first step
    tops = [top_g[bi, hh, si, qq] for qq in range(heads)]
    per_tile = rows // step_columns  # steps a code-order tile
    meta_index = lambda g: (0, (first + g) // per_tile, 0, (first + g) % per_tile)  # noqa: E731
    b_swizzle = plgpu.SwizzleTransform(128)
    b_transforms = (plgpu.TilingTransform((8, 64)), b_swizzle)
    write_b = plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(), plgpu.RefType(), *([plgpu.RefType()] if with_zero else []),
                   plgpu.RefType(b_transforms), plgpu.Layout.WG_STRIDED((128 * n_part,), vec_size=n_part),
                   plgpu.Layout.WG_SPLAT(()), *[plgpu.Layout.WG_SPLAT(())] * heads),
        return_type=plgpu.ShapeDtypeStruct((128 * n_part,), jnp.float32,
                                           layout=plgpu.Layout.WG_STRIDED((128 * n_part,), vec_size=n_part)),
    )(functools.partial(_write_b, heads=heads, groups=groups, n_pad=n_pad, with_zero=with_zero,
                        pieces=pieces, balanced=balanced))
    convert = plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA_UPCAST_4X,),
        return_type=plgpu.ShapeDtypeStruct((ROW_BLOCK, STEP_TOKENS), jnp.float16, layout=plgpu.Layout.WGMMA),
    )(functools.partial(_convert_lop3, dtype="float16", bits=2, in_place=True, lop3=lop3, balanced=balanced))
    blocks = head_dim // ROW_BLOCK

    def body(idx, s_smem, c_smem, vs_smem, *rest_):
        z_smem = rest_[0] if with_zero else None
        accs, part = rest_[-1]
        valid = idx[0] < valid_steps
        part = write_b(s_smem, vs_smem, *([z_smem] if with_zero else []), b_smem, part, valid, *tops)
        new = []
        for r in range(blocks):
            operands_ = [(convert(_load(codes, layout=plgpu.Layout.WGMMA_UPCAST_4X)), b) for codes, b in piece_refs(c_smem, r)]

            def mma(acc_ref, operands_=operands_):
                for a, b in operands_:
                    plgpu.wgmma(acc_ref, a, b.transpose((1, 0)))
            new.append(pl.run_state(mma)(plgpu.ACC.init(accs[r])))
        return tuple(new), part

    def piece_refs(c_smem, r):
        """[(codes [64, 128 int4], B [n_pad, 256])] of channel rows r * 64 .. a 256-token piece each (64-byte
        rows of codes, one conversion); one piece is the whole step's tiles."""
        rows_r = pl.ds(r * ROW_BLOCK, ROW_BLOCK)
        if pieces == 1:
            return [(c_smem.at[rows_r], b_smem)]
        return [(c_smem.at[rows_r, pl.ds(i * STEP_TOKENS // 2, STEP_TOKENS // 2)],
                 b_smem.at[:, pl.ds(i * STEP_TOKENS, STEP_TOKENS)]) for i in range(pieces)]

    c_transforms = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(64))  # 64-byte rows of int4
    in_specs = [plgpu.BlockSpec((heads, None, SLOTS, step_columns), meta_index),
                plgpu.BlockSpec((head_dim, step_tokens // 2), lambda g: (0, first + g), transforms=c_transforms),
                plgpu.BlockSpec((groups, None, SLOTS, step_columns), meta_index)]
    operands = [scores_g.at[bi, hh], codes_g.at[bi, hh],
                vs_g.at[bi if vs_g.shape[0] > 1 else 0, hh if vs_g.shape[1] > 1 else 0]]
    if with_zero:
        in_specs.append(plgpu.BlockSpec((groups, None, SLOTS, step_columns), meta_index))
        operands.append(vz_g.at[bi if vz_g.shape[0] > 1 else 0, hh if vz_g.shape[1] > 1 else 0])
    zeros = lambda: plgpu.layout_cast(jnp.zeros((ROW_BLOCK, n_pad), jnp.float32), plgpu.Layout.WGMMA)  # noqa: E731
    part0 = plgpu.layout_cast(jnp.zeros((128 * n_part,), jnp.float32),
                              plgpu.Layout.WG_STRIDED((128 * n_part,), vec_size=n_part))
    accs, part = plgpu.emit_pipeline(body, grid=(jnp.maximum(valid_steps, 1),), in_specs=in_specs,
                                     max_concurrent_steps=stages,
                                     init_carry=(tuple(zeros() for _ in range(blocks)), part0))(*operands)
    for r, acc in enumerate(accs):
        o_smem[pl.ds(r * ROW_BLOCK, ROW_BLOCK), :] = acc
    part_smem[...] = part
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_g.at[bi, hh, si])
    plgpu.copy_smem_to_gmem(part_smem, part_g.at[bi, hh, si])
    plgpu.wait_smem_to_gmem(0)


def values_pass(scores, top, length, v, *, heads: int, block: int, blocks_per_split: int,
                stages: int = 2, pieces: int = 2, lop3: bool = True, balanced: bool = True):
    """cw2's values pass on the tensor cores, one program a kv head and split. scores [B, K, heads, S]
    (log2 units, code order) and top [B, K, splits, heads], an upper bound of each split's scores (cw2's keys pass's
    maxima, or `decode_attention.values_top`'s for splits other than the keys pass's); splits of `blocks_per_split`
    blocks of `block` tokens. Returns (o [.., splits, heads, D], l, m) as
    `_cw2_values_kernel`'s outputs (m in natural-log units). stages: steps of TMA loads in flight;
    pieces: 256-token pieces a step (1 or 2: half the per-step barriers, pipeline and B bookkeeping a
    token; both pieces' converted codes are live at once, 64 more registers); lop3: the conversion's
    and-or as one PTX lop3 (`wgmma_matmul._word_pairs`); balanced: the codes centred on their middle
    (`slot_mids`), so that wgmma's sums carry no part that grows with the tokens (see `emulate_values`)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    problem = supports(v, heads, pieces, block)
    if problem:
        raise ConfigError(f"the wgmma values pass cannot read this store: {problem}")
    b, hc, _, s = scores.shape
    n_splits = top.shape[2]
    d, groups = v.head_dim, v.head_dim // v.channel_group
    n_pad, n_part = _columns(heads, groups)
    with_zero = v.zero is not None
    codes = jax.lax.bitcast_convert_type(v.codes, jnp.int4).reshape(*v.codes.shape[:3], -1)  # [B, K, D, S / 2]
    operands = [_code_order_view(scores, v.rows), top, jnp.reshape(jnp.asarray(length, jnp.int32), (1,)), codes,
                _code_order_view(v.scale, v.rows)]
    if with_zero:
        operands.append(_code_order_view(v.zero, v.rows))
    body = functools.partial(_kernel, heads=heads, groups=groups, rows=v.rows, block=block,
                             blocks_per_split=blocks_per_split, stages=stages, with_zero=with_zero, head_dim=d,
                             pieces=pieces, lop3=lop3, balanced=balanced)
    o_raw, part = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((b, hc, n_splits, d, n_pad), jnp.float32),
                  jax.ShapeDtypeStruct((b, hc, n_splits, 128 * n_part), jnp.float32)),
        grid=(b, hc, n_splits), grid_names=("b", "h", "s"),
        scratch_types=[plgpu.SMEM((n_pad, STEP_TOKENS * pieces), jnp.float16,
                                  transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))),
                       plgpu.SMEM((d, n_pad), jnp.float32), plgpu.SMEM((128 * n_part,), jnp.float32)],
    )(*operands)
    return finish_values(o_raw, part, top, heads=heads, groups=groups, channel_group=v.channel_group)


def finish_values(o_raw, part, top, *, heads: int, groups: int, channel_group: int):
    """The kernel's per-program outputs -> (o [.., heads, D], l [.., heads], m [.., heads]): each
    channel row's column of its own group, plus that group's zero-point sum; the threads' partial
    sums added."""
    sums = part.reshape(*part.shape[:-1], 128, -1).sum(-2)  # [.., n_part]
    l = sums[..., :heads]
    zterm = sums[..., heads:heads + heads * groups].reshape(*sums.shape[:-1], heads, groups)
    d = o_raw.shape[-2]
    cols = o_raw[..., :heads * groups].reshape(*o_raw.shape[:-1], heads, groups)  # [.., D, heads, groups]
    # Selects only, which XLA can fuse into the split merge that reads o. On an H200 (kv_notes run 26) a
    # dot with a one-hot matrix here was a TF32 GEMM kernel and a copy a layer (and rounded to TF32); a sum
    # over the groups, a reduction kernel of its own.
    group_of = (np.arange(d) // channel_group)[:, None]  # [D, 1]
    o = cols[..., 0]
    for g in range(1, groups):
        o = jnp.where(group_of == g, cols[..., g], o)
    return jnp.swapaxes(o, -1, -2) + jnp.repeat(zterm, channel_group, axis=-1), l, top / LOG2E


def emulate_values(scores, top, length, v, *, heads: int, block: int, blocks_per_split: int,
                   balanced: bool = True):
    """The kernel's arithmetic in plain JAX: each step's codes at the logical columns the hardware's
    fragment gives them (`crumb_permutation`, as the 2-bit weights of `wgmma_matmul`), B written at
    the columns `b_column` names (what `_write_b` does), fp16 products, fp32 sums. A wrong
    `b_column` pairs codes with other tokens' weights here as in the kernel. Returns what
    `values_pass` returns.

    balanced: the codes less `slot_mids(True)` (their middle) instead of 2, the zero-point term with
    the same mids. Exact arithmetic gives the same output either way; the GPU's does not: on an H200
    wgmma's sum of B x (code - 2) over a split, whose terms lean one way (the codes' mean is 1.5), came
    out about 2e-4 off relative to itself, and the zero-point term cancels most of that sum, so the
    output's error grew with the tokens a split (kv_notes run 24). Centred, it stays flat (run 25: 9.7e-4
    at one split of 32768 tokens against 8.6e-3), hence the default."""
    from pallas_kernels.wgmma_matmul import crumb_permutation

    b, hc, _, s = scores.shape
    assert hc == v.codes.shape[1], (scores.shape, v.codes.shape)
    n_splits = top.shape[2]
    d, groups = v.head_dim, v.head_dim // v.channel_group
    slot, column = np.meshgrid(np.arange(SLOTS), np.arange(STEP_COLUMNS), indexing="ij")
    order = np.empty(STEP_TOKENS, np.int64)  # B: order[k] = (slot, column) flat index written at column k
    order[b_column(slot, column).ravel()] = (slot * STEP_COLUMNS + column).ravel()
    steps = s // STEP_TOKENS
    # The codes' logical columns as the hardware gives them: physical column p of a 64-column chunk
    # (word p // 16 of the chunk, slot p % 16) converts to logical column crumb_permutation()[p].
    words = v.codes  # [B, K, D, S / 16]: one program head a kv head
    shifts = jnp.arange(SLOTS, dtype=jnp.int32) * 2
    physical = ((words[..., None] >> shifts) & 3).reshape(b, hc, d, steps, STEP_TOKENS)  # word-major, then slot
    logical_of = (np.arange(STEP_TOKENS) // 64) * 64 + crumb_permutation()[np.arange(STEP_TOKENS) % 64]
    mids = slot_mids(balanced)
    centred = physical.astype(jnp.float32) - jnp.asarray(np.tile(mids, STEP_TOKENS // SLOTS))  # physical p: slot p % 16
    codes = jnp.zeros_like(centred).at[..., logical_of].set(centred)

    def per_step(x):  # code-order [.., S] -> [.., steps, 256 logical]
        x = _code_order_view(x, v.rows)  # [.., tiles, 16, rows]
        x = x.reshape(*x.shape[:-1], v.rows // STEP_COLUMNS, STEP_COLUMNS)  # [.., tiles, 16, r16, 16]
        x = jnp.moveaxis(x, -2, -3).reshape(*x.shape[:-4], steps, STEP_TOKENS)  # [.., steps, 16 x 16]
        return x[..., order]

    def meta(x):  # [Bs, Ks, G, S] -> [B, HC, G, steps, 256]
        return per_step(jnp.broadcast_to(x, (b, hc) + x.shape[2:]))

    sc, vs = per_step(scores), meta(v.scale).astype(jnp.float32)  # [B, HC, heads, steps, 256], [B, HC, G, steps, 256]
    vz = meta(v.zero).astype(jnp.float32) if v.zero is not None else None
    per_block = block // STEP_TOKENS
    used = -(-jnp.asarray(length, jnp.int32) // block)
    step = jnp.arange(steps)
    split = step // (blocks_per_split * per_block)
    valid = step // per_block < used  # [steps]
    m = top[:, :, split]  # [B, HC, steps, heads]
    p = jnp.where(valid[:, None], jnp.exp2(sc - jnp.moveaxis(m, -1, -2)[..., None]), 0.0)  # [B, HC, heads, steps, 256]
    ps = (p[:, :, :, None] * vs[:, :, None]).astype(jnp.float16).astype(jnp.float32)  # [B, HC, heads, G, steps, 256]
    onehot = jax.nn.one_hot(split, n_splits, dtype=jnp.float32)  # [steps, splits]
    o_raw = jnp.einsum("bhdsk,bhqgsk,sx->bhxdqg", codes, ps, onehot)
    l = jnp.einsum("bhqsk,sx->bhxq", p, onehot)
    # value = (code - mid) * scale + offset: zero + mid * scale, or (mid - 2) * scale without zero points
    mid_k = jnp.asarray(mids[order // STEP_COLUMNS], jnp.float32)  # logical column k: slot order[k] // 16
    offset = vz + mid_k * vs if vz is not None else (mid_k - 2.0) * vs
    zterm = jnp.einsum("bhqsk,bhgsk,sx->bhxqg", p, offset, onehot)
    own = jax.nn.one_hot(jnp.arange(d) // v.channel_group, groups, dtype=jnp.float32)
    o = jnp.einsum("bhxdqg,dg->bhxqd", o_raw, own) + jnp.einsum("bhxqg,dg->bhxqd", zterm, own)
    return o, l, top / LOG2E
