"""cw2's keys pass on int8 tensor cores: the prepass, the register map and a plain-JAX model.

The keys pass of the two-pass body (`decode_attention`, path "cw2") is issue-bound at about three
instructions a 2-bit code (kv_notes runs 18-22): each pair is converted to fp16 and multiplied by
q * scale on the CUDA cores. Hopper's wgmma takes an s8 A operand from registers (s32 sums), and a
2-bit code becomes an s8 byte in about half an instruction, so the multiply-adds can move to the
tensor cores (design and cost: kv_notes run 22, "Next"):

    score[t, q] = alpha[g, q] * sum_d code[t, d] * B[(g, q), d] + offset[g, q]      (g: t's key group)
    B[(g, q), d] = round(v[g, q, d] / alpha[g, q]),  v = (q * scale * log2 e)[d] * key_scale[g, d]
    alpha[g, q] = max_d |v[g, q, d]| / 127
    offset[g, q] = sum_d q[d] zero[g, d] + 1.5 * (sum_d v - alpha * sum_d B)

with the store's keys k = code * scale + zero (symmetric grids: (code - 2) * scale, offset less
2 sum_d v). `offset`'s last term takes B's rounding error about the
codes' mean (1.5) out exactly, so what is left is sum_d e_d (code_d - 1.5), |e_d| <= alpha / 2: an
rms logit error of about alpha sqrt(d * 1.25 / 12), a sixth or less of KIVI-2's own (kv_notes run 22).

This module holds the kernel (`keys_pass`, Mosaic GPU, a Hopper GPU only) and what it is checked
against on the CPU:
- `prepare`: the XLA prepass (B in int8, alpha, offset a step and key group), B in the [N, 128]
  tile a 512-token step feeds wgmma (N = the step's key groups x query heads, zero-filled to 8);
- `gather_registers`: the register map, in numpy: eight prmt byte gathers (PRMT_PAIRS, PRMT_QUADS)
  turn four channel_words words (channels c..c+3, 16 tokens each) into R_b, and
  (R_b >> 2s) & 0x03030303 is the s8 register of token 4b + s, channels c..c+3 (the four K
  positions a thread holds in `WGMMA_LAYOUT_8BIT`);
- `emulate_scores`: the kernel's arithmetic in plain JAX (exact s32 sums, fp32 epilogue), with cw2's
  keys-pass outputs (scores in log2 units and code order, each split's maximum).
Only 2-bit channel_words keys with fp16 meta, head_dim 128 and key groups that divide a step.

**The kernel** (`keys_pass`), one program a kv head and split, a step of 512 tokens at a time (TMA
streams the step's words [128 channels, 32 word columns], B, alpha and offset, and the mask's bias):
- Thread t = 32 w + l owns word column j = 8 w + l // 4 of the step and, in `WGMMA_LAYOUT_8BIT`, K
  positions 4 (l % 4) .. + 3 of each 16-column block; its rows in each 64-row tile tau are tokens
  (column j, slots 2 tau and 2 tau + 1). It loads the 32 words of its K positions (each word: 16 tokens
  of one channel) and builds its s8 registers with `gather_registers`' prmt map. Row R of the step's
  A [512, 128] is token (slot R // 64 * 2 + (R // 8) % 2, column j of R's thread).
- K position k reads smem channel row `CHANNEL_ROWS[k]`, not k: with the words' 128-byte swizzle that
  puts a warp's 32 loads in 32 banks; B's columns are permuted alike.
- wgmma sums A (two [256, 128] halves, tiles 0-3 and 4-7) times B^T into s32 [256, N]; each row
  takes its key group's column (one thread of the row's quad holds it: `_score_rows`), scales it by
  alpha, adds the offset and the mask's bias, and writes the score at (slot, column) of the step's
  code-order tile, so the output is cw2's code order with no permutation after the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError
from pallas_kernels.decode_attention import LOG2E, NEG_INF

STEP_TOKENS = 512   # tokens a step: 32 word columns of 16 tokens, one column a thread quad
SLOTS = 16          # 2-bit codes a 32-bit word
HEAD_DIM = 128      # K of one 128-byte B row (one 128-byte swizzle)
B_MAX = 127
CODE_MEAN = 1.5     # B's rounding error is taken about the codes' mean (the offset holds the rest exactly)
PRMT_PAIRS = (0x5140, 0x7362)  # prmt(W0, W1, sel): [W0.b0, W1.b0, W0.b1, W1.b1], then bytes 2 and 3
PRMT_QUADS = (0x5410, 0x7632)  # prmt(X01, X23, sel): [X01.b0, X01.b1, X23.b0, X23.b1], then bytes 2 and 3
CRUMBS = 0x03030303
STEP_COLUMNS = STEP_TOKENS // SLOTS  # 32 word columns a step
HALF_ROWS = 256                      # A rows a wgmma call (4 tiles of 64): two calls a step


def channel_row(k):
    """The smem channel row that K position k (of 128) reads: 8 (k // 16 * 2 + i // 2) + 2 t + i % 2
    for k = 16 (k // 16) + 4 t + i. A warp's 32 loads of one register (fixed k // 16 and i, t = lane
    % 4, column j = 8 w + lane // 4) then land in 32 banks of the 128-byte-swizzled words."""
    k = np.asarray(k)
    t, i = (k % 16) // 4, k % 4
    return 8 * (2 * (k // 16) + i // 2) + 2 * t + i % 2


CHANNEL_ROWS = channel_row(np.arange(HEAD_DIM))  # B's column k holds channel CHANNEL_ROWS[k]


def supports(k, heads: int) -> str | None:
    """Why the int8 keys pass cannot read this key store for `heads` query heads a kv head, or None."""
    from jaxcompress.kv.store import CHANNEL_WORDS

    if k.layout != CHANNEL_WORDS or k.bits != 2:
        return f"keys are {k.bits}-bit {k.layout}; the int8 keys pass reads 2-bit channel_words stores"
    if k.head_dim != HEAD_DIM:
        return f"head_dim {k.head_dim}: the int8 keys pass takes {HEAD_DIM} (one 128-byte row of B)"
    if k.channel_group != 1 or k.token_group % SLOTS or STEP_TOKENS % k.token_group:
        return (f"keys quantized per channel in groups of {k.token_group} tokens; the int8 keys pass needs "
                f"per-channel keys in groups of a multiple of {SLOTS} tokens dividing {STEP_TOKENS}")
    if k.rows % (STEP_TOKENS // SLOTS):
        return f"the store's tiles of {k.rows} word columns are not whole steps of {STEP_TOKENS // SLOTS}"
    if k.scale.dtype != jnp.float16 or (k.zero is not None and k.zero.dtype != jnp.float16):
        return "the key scales and zero points are not fp16"
    if b_rows(heads, k.token_group) > 256:
        return f"{heads} query heads x {STEP_TOKENS // k.token_group} key groups a step exceed wgmma's N of 256"
    return None


def b_rows(heads: int, token_group: int) -> int:
    """N: B's rows (the step's key groups x query heads), zero-filled to a multiple of 8."""
    return -(-(STEP_TOKENS // token_group) * heads // 8) * 8


def prepare(q, k, *, scale: float):
    """The prepass: (B int8 [B, K, steps, N, 128], alpha f32 [B, K, steps, N], offset f32 [B, K, steps, N]).

    Row n = group * heads + query of a step's B is its key group `group` (of STEP_TOKENS / token_group)
    and query head `query`; rows past groups x heads are zero (alpha 1, offset 0)."""
    problem = supports(k, q.shape[2])
    if problem:
        raise ConfigError(f"the int8 keys pass cannot read this key store: {problem}")
    b, kv_heads, heads, d = q.shape
    qs = q.astype(jnp.float32) * (scale * LOG2E)
    groups = k.capacity // k.token_group
    meta = lambda x: jnp.broadcast_to(k.meta_rows(x).astype(jnp.float32), (b, kv_heads, groups, d))  # noqa: E731
    v = meta(k.scale)[:, :, :, None, :] * qs[:, :, None, :, :]  # [B, K, T, heads, D]
    amax = jnp.max(jnp.abs(v), axis=-1)
    alpha = jnp.where(amax > 0, amax / B_MAX, 1.0)
    inverse = jnp.where(amax > 0, B_MAX / jnp.where(amax > 0, amax, 1.0), 0.0)  # the kernel's ops, bit for bit
    b8 = jnp.round(v * inverse[..., None])  # |v| * 127 / max|v| <= 127 (+ rounding of the product)
    offset = CODE_MEAN * (v.sum(-1) - alpha * b8.sum(-1))
    if k.zero is not None:  # k = code * scale + zero
        offset = offset + jnp.einsum("bkgd,bktd->bktg", qs, meta(k.zero))
    else:  # a symmetric grid: k = (code - mid) * scale
        offset = offset - float(1 << (k.bits - 1)) * v.sum(-1)
    per_step = STEP_TOKENS // k.token_group
    steps = k.capacity // STEP_TOKENS
    n, n_pad = per_step * heads, b_rows(heads, k.token_group)

    def rows(x, fill):  # [B, K, T, heads, ...] -> [B, K, steps, N, ...]
        x = x.reshape(b, kv_heads, steps, n, *x.shape[4:])
        pad = [(0, 0)] * 3 + [(0, n_pad - n)] + [(0, 0)] * (x.ndim - 4)
        return jnp.pad(x, pad, constant_values=fill)

    return rows(b8, 0).astype(jnp.int8), rows(alpha, 1.0), rows(offset, 0.0)


def gather_registers(words: np.ndarray) -> np.ndarray:
    """The kernel's conversion, in numpy: words uint32 [4, ...] (channels c..c+3, word j: tokens 16j ..
    16j + 15, 2 bits each) -> s8 registers uint32 [16, ...]; register 4b + s holds, in byte i, the code
    of token 4b + s of channel c + i. Eight prmt (PRMT_PAIRS, PRMT_QUADS), then a shift and an and a
    register."""
    w = np.asarray(words, np.uint32)

    def prmt(a, b_, sel):  # PTX prmt.b32 without sign replication: byte k of the result is byte sel_k of {b, a}
        both = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b_ >> (8 * i)) & 0xFF for i in range(4)]
        return sum((both[(sel >> (4 * kk)) & 7] << (8 * kk)) for kk in range(4)).astype(np.uint32)

    x01, y01 = (prmt(w[0], w[1], sel) for sel in PRMT_PAIRS)
    x23, y23 = (prmt(w[2], w[3], sel) for sel in PRMT_PAIRS)
    quads = [prmt(lo, hi, sel) for lo, hi in ((x01, x23), (y01, y23)) for sel in PRMT_QUADS]  # R_0 .. R_3
    return np.stack([(quads[r // 4] >> (2 * (r % 4))) & CRUMBS for r in range(SLOTS)]).astype(np.uint32)


def emulate_scores(q, k, bias, length, *, scale: float, block: int, blocks_per_split: int, n_splits: int):
    """The int8 keys pass's arithmetic in plain JAX: exact integer sums of codes x B, alpha and the offset
    in fp32, the mask's bias (code order [B, S], as `decode_attention._cw_inputs` gives it). Returns what
    cw2's keys pass gives its values pass: scores [B, K, heads, S] in log2 units and code order, and
    each split's maximum [B, K, splits, heads] over the blocks it reads."""
    from jaxcompress.kv.store import to_code_order

    b8, alpha, offset = prepare(q, k, scale=scale)
    b, kv_heads, heads, _ = q.shape
    s = k.capacity
    steps = s // STEP_TOKENS
    codes = k.token_codes().astype(jnp.float32).reshape(b, kv_heads, steps, STEP_TOKENS, -1)
    sums = jnp.einsum("bkstd,bksnd->bkstn", codes, b8.astype(jnp.float32), precision="highest")  # exact
    token = np.arange(STEP_TOKENS)
    row = (token // k.token_group)[:, None] * heads + np.arange(heads)[None, :]  # [512, heads]: B's row
    pick = lambda x: jnp.take_along_axis(x, jnp.broadcast_to(row, x.shape[:3] + row.shape), axis=-1)  # noqa: E731
    own = lambda x: jnp.take(x, row, axis=-1)  # [B, K, steps, N] -> [B, K, steps, 512, heads]  # noqa: E731
    score = own(alpha) * pick(sums) + own(offset)  # [B, K, steps, 512, heads]
    score = jnp.moveaxis(score.reshape(b, kv_heads, s, heads), -1, -2)  # token order [B, K, heads, S]
    score = to_code_order(score, k.bits, k.rows) + bias[:, None, None, :]
    token = to_code_order(jnp.arange(s, dtype=jnp.int32), k.bits, k.rows)  # the token at each position
    used = -(-jnp.asarray(length, jnp.int32) // block)
    blk = token // block
    read = (blk < used)[None, :] & (blk[None, :] // blocks_per_split == jnp.arange(n_splits)[:, None])  # [splits, S]
    top = jnp.max(jnp.where(read[None, None, :, None, :], score[:, :, None], NEG_INF), axis=-1)
    return score, top


# ---------------------------------------------------------------------------------------- the kernel
MAX_KERNEL_COLUMNS = 32  # B's columns the kernel's epilogue selects from (a select chain of N / 4 a row;
                         # Llama-2's one query a kv head: 16)


def kernel_problem(k, heads: int, block: int | None = None) -> str | None:
    """Why `keys_pass` cannot run for this key store, `heads` query heads a kv head and keys-pass blocks
    of `block` tokens, or None."""
    problem = supports(k, heads)
    if problem:
        return problem
    if b_rows(heads, k.token_group) > MAX_KERNEL_COLUMNS:
        return (f"{heads} query heads x {STEP_TOKENS // k.token_group} key groups a step exceed the kernel's "
                f"{MAX_KERNEL_COLUMNS} columns")
    if block is not None and block % STEP_TOKENS:
        return f"the keys pass's blocks of {block} tokens are not whole steps of {STEP_TOKENS}"
    return None


def fragment_rows(w: int, lane: int) -> tuple[int, list[int]]:
    """(word column j of the step, [K position -> channel row]) of thread 32 w + lane: the map the kernel's
    `_gather_a` computes from the thread index, for the numpy model (`emulate_fragment`)."""
    j = 8 * w + lane // 4
    t = lane % 4
    return j, [int(channel_row(16 * ct + 4 * t + i)) for ct in range(HEAD_DIM // 16) for i in range(4)]


def emulate_fragment(words: np.ndarray) -> np.ndarray:
    """A step's A [512, 128] (codes, uint8) as the kernel's threads build it, in numpy: words uint32
    [128 channel rows, 32 word columns]; thread (w, lane) reads its column's words at its K positions'
    channel rows and places `gather_registers`' bytes at its fragment rows (row 64 tau + 16 w + 8 e +
    lane // 4 is slot 2 tau + e) and K positions (16 ct + 4 (lane % 4) + i)."""
    a = np.zeros((STEP_TOKENS, HEAD_DIM), np.uint8)
    for w in range(4):
        for lane in range(32):
            j, rows = fragment_rows(w, lane)
            t = lane % 4
            for ct in range(HEAD_DIM // 16):
                regs = gather_registers(np.array([words[rows[4 * ct + i], j] for i in range(4)]))
                for slot in range(SLOTS):
                    tau, e = divmod(slot, 2)
                    for i in range(4):
                        a[64 * tau + 16 * w + 8 * e + lane // 4, 16 * ct + 4 * t + i] = (regs[slot] >> (8 * i)) & 0xFF
    return a


def _prmt(a, b, selector: int):
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm

    return llvm.inline_asm(ir.IntegerType.get_signless(32), [a, b], f"prmt.b32 $0, $1, $2, {selector:#x};",
                           "=r,r,r")


def _thread():
    """(w, lane, t = lane % 4, j = 8 w + lane // 4) of this thread, i32 values."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    i32 = ir.IntegerType.get_signless(32)
    ci = lambda v: arith.constant(i32, v)  # noqa: E731
    tid = arith.remui(mgpu_utils.thread_idx(), ci(128))
    w, lane = arith.shrui(tid, ci(5)), arith.andi(tid, ci(31))
    return w, lane, arith.andi(lane, ci(3)), arith.ori(arith.shli(w, ci(3)), arith.shrui(lane, ci(2)))


def _gather_a(ctx, words_ref, *, half: int):
    """Tiles 4 half .. 4 half + 3 of the step's A, s8 [256, 128] in WGMMA_LAYOUT_8BIT, from the step's
    words (smem [128, 32] i32, tiled (8, 32), 128-byte swizzle: 16-byte chunk ^ row % 8). Slots
    8 half .. 8 half + 7 are bytes 2 half and 2 half + 1 of the words: two prmt of each word pair
    (PRMT_PAIRS[half]), one of each pair of those a byte (PRMT_QUADS), then a shift and an and a slot."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    del ctx
    i32, i8 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(8)
    index = ir.IndexType.get()
    ci = lambda v: arith.constant(i32, v)  # noqa: E731
    _, _, t, j = _thread()
    chunk, in_chunk = arith.shrui(j, ci(2)), arith.andi(j, ci(3))
    reg_ty = ir.VectorType.get((4,), i8)
    shape = fa.WGMMA_LAYOUT_8BIT.registers_shape((HALF_ROWS, HEAD_DIM))
    regs = np.empty(shape, dtype=object)
    for ct in range(HEAD_DIM // 16):
        words = []
        for i in range(4):  # channel row 8 (2 ct + i // 2) + 2 t + i % 2 (`channel_row`)
            r8 = arith.ori(arith.shli(t, ci(1)), ci(i % 2))
            col = arith.ori(arith.shli(arith.xori(chunk, r8), ci(2)), in_chunk)
            idx = [arith.constant(index, 2 * ct + i // 2), arith.constant(index, 0),
                   arith.index_cast(index, r8), arith.index_cast(index, col)]
            words.append(memref.load(words_ref, idx))
        x01, x23 = _prmt(words[0], words[1], PRMT_PAIRS[half]), _prmt(words[2], words[3], PRMT_PAIRS[half])
        for bb in range(2):
            r = _prmt(x01, x23, PRMT_QUADS[bb])
            for s in range(4):
                slot = 4 * (2 * half + bb) + s
                tau, e = divmod(slot - 8 * half, 2)
                crumbs = arith.andi(arith.shrui(r, ci(2 * s)) if s else r, ci(CRUMBS))
                regs[(tau, ct) + (0,) * 2 + (e,) + (0,) * (len(shape) - 5)] = mgpu_utils.bitcast(crumbs, reg_ty)
    return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT_8BIT, _is_signed=True)


def _acc_value(acc, tile: int, col8: int, e: int, b: int):
    """Element (row half e of 64-row tile `tile`, column 8 col8 + 2 (lane % 4) + b) of this thread's
    share of a WGMMA_LAYOUT (vectors of 2) or 32-bit accumulator layout (vectors of 1) array."""
    from jax._src.lib.mlir.dialects import vector

    regs = acc.registers
    if regs.ndim == 9:  # WGMMA_LAYOUT: (tile, col8, 1, 1, e, 1, 1, 1, 1) of vector<2>
        return vector.extract(regs[tile, col8, 0, 0, e, 0, 0, 0, 0], [], [b])
    return vector.extract(regs[tile, col8, 0, 0, e, 0, 0, 0, b, 0], [], [0])


def _score_rows(ctx, acc_lo, acc_hi, ao_ref, bias_ref, out_ref, valid, top, *, heads: int, n_pad: int,
                columns_per_group: int):
    """The step's scores from the s32 sums: row (slot, column j) of query q takes column n = (j //
    columns_per_group) heads + q, held by the thread with lane % 4 = (n % 8) // 2 (its element
    (n // 8, n % 2): a select chain); that thread writes alpha_n sum + offset_n + bias to out_ref
    [heads, 16 slots, 32 columns] and keeps its running maximum (top: WG_STRIDED, `heads` a thread)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, scf, vector
    from jax.experimental.mosaic import gpu as mgpu

    del ctx
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    index = ir.IndexType.get()
    ci = lambda v: arith.constant(i32, v)  # noqa: E731
    ix = lambda v: arith.index_cast(index, v)  # noqa: E731
    _, _, t, j = _thread()
    group = arith.divui(j, ci(columns_per_group))
    ok = valid.registers.item()
    (top_regs,) = top.registers.flat
    tops = [vector.extract(top_regs, [], [q]) for q in range(heads)]
    for q in range(heads):
        n = arith.addi(arith.muli(group, ci(heads)), ci(q))
        owner = arith.andi(ok, arith.cmpi(arith.CmpIPredicate.eq, t, arith.shrui(arith.andi(n, ci(7)), ci(1))))
        pick = arith.ori(arith.shli(arith.shrui(n, ci(3)), ci(1)), arith.andi(n, ci(1)))  # 2 (n // 8) + n % 2
        choices = [(c8, b) for c8 in range(n_pad // 8) for b in range(2)]
        alpha = memref.load(ao_ref, [arith.constant(index, 0), ix(n)])
        offset = memref.load(ao_ref, [arith.constant(index, 1), ix(n)])
        scores = []
        for half, acc in enumerate((acc_lo, acc_hi)):
            for tile in range(4):
                for e in range(2):
                    value = _acc_value(acc, tile, choices[0][0], e, choices[0][1])
                    for c, (c8, b) in enumerate(choices[1:], 1):
                        value = arith.select(arith.cmpi(arith.CmpIPredicate.eq, pick, ci(c)),
                                             _acc_value(acc, tile, c8, e, b), value)
                    slot = 8 * half + 2 * tile + e
                    bias = memref.load(bias_ref, [arith.constant(index, slot), ix(j)])
                    score = arith.addf(arith.addf(arith.mulf(arith.sitofp(f32, value), alpha), offset), bias)
                    scores.append((slot, score))
        best = tops[q]
        for _, score in scores:
            best = arith.maximumf(best, score)
        tops[q] = arith.select(owner, best, tops[q])
        branch = scf.IfOp(owner)
        with ir.InsertionPoint(branch.then_block):
            for slot, score in scores:
                memref.store(score, out_ref, [arith.constant(index, q), arith.constant(index, slot), ix(j)])
            scf.yield_([])
    new = vector.from_elements(top_regs.type, tops)
    new_regs = np.empty_like(top.registers)
    new_regs.flat[0] = new
    return mgpu.FragmentedArray(_registers=new_regs, _layout=top.layout, _is_signed=None)


def _write_b(ctx, qs_ref, scale_ref, *rest, heads: int, groups: int, with_zero: bool, mid: float):
    """The step's B (int8, [N, 128] tiled (8, 128), 128-byte swizzle, column k holding channel
    CHANNEL_ROWS[k]) and its alpha and offset (ao_ref [2, N] f32) from q in log2 units (qs_ref [heads,
    128] f32) and the key scales (and zero points) of the step's `groups` key groups (smem [128, groups]
    fp16), what `prepare` computes, op for op. Thread t takes group t // per and the 128 / per K
    positions (t % per) .. of it (per = 128 / groups threads a group, adjacent lanes): the max over
    channels and the offset's sums are butterflies over those lanes."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, memref, scf
    from jax._src.lib.mlir.dialects import math as mlir_math
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    del ctx
    zero_ref = rest[0] if with_zero else None
    b_ref, ao_ref = rest[int(with_zero):]
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    index = ir.IndexType.get()
    ci = lambda v: arith.constant(i32, v)  # noqa: E731
    cf = lambda v: arith.constant(f32, float(v))  # noqa: E731
    cx = lambda v: arith.constant(index, v)  # noqa: E731
    ix = lambda v: arith.index_cast(index, v)  # noqa: E731
    per = HEAD_DIM // groups
    width = HEAD_DIM // per  # K positions a thread: whole 16-byte chunks of B's row (groups >= 16)
    mgpu_utils.warpgroup_barrier()  # every thread is done with the previous step's B, alpha and offset
    tid = arith.remui(mgpu_utils.thread_idx(), ci(128))
    group, part = arith.divui(tid, ci(per)), arith.remui(tid, ci(per))
    k0 = arith.muli(part, ci(width))  # first K position; its channels: k0 + channel_row(m) - ... (below)
    rows = [int(channel_row(m)) for m in range(width)]  # channel of K position k0 + m: k0 + rows[m] (16 | k0)

    def butterfly(x, combine):
        for dist in (d for d in (1, 2, 4, 8, 16) if d < per):
            x = combine(x, mgpu_utils.shfl_bfly(x, dist))
        return x

    def cvt_rni(x):
        return llvm.inline_asm(i32, [x], "cvt.rni.s32.f32 $0, $1;", "=r,f")

    scales, zeros = [], []
    for m in range(width):
        d = ix(arith.addi(k0, ci(rows[m])))
        scales.append(arith.extf(f32, memref.load(scale_ref, [d, ix(group)])))
        if with_zero:
            zeros.append(arith.extf(f32, memref.load(zero_ref, [d, ix(group)])))
    lead = arith.cmpi(arith.CmpIPredicate.eq, part, ci(0))
    for q in range(heads):
        qs = [memref.load(qs_ref, [cx(q), ix(arith.addi(k0, ci(rows[m])))]) for m in range(width)]
        v = [arith.mulf(s_, q_) for s_, q_ in zip(scales, qs)]
        amax = cf(0.0)
        for x in v:
            amax = arith.maximumf(amax, mlir_math.absf(x))
        amax = butterfly(amax, arith.maximumf)
        positive = arith.cmpf(arith.CmpFPredicate.OGT, amax, cf(0.0))
        alpha = arith.select(positive, arith.divf(amax, cf(B_MAX)), cf(1.0))
        inverse = arith.select(positive, arith.divf(cf(B_MAX), arith.select(positive, amax, cf(1.0))), cf(0.0))
        codes = [cvt_rni(arith.mulf(x, inverse)) for x in v]
        n = arith.addi(arith.muli(group, ci(heads)), ci(q))
        for w4 in range(width // 4):  # 4 K positions a 32-bit store, 16-byte chunk ^ (n % 8)
            lo = _prmt(codes[4 * w4], codes[4 * w4 + 1], 0x0040)
            hi = _prmt(codes[4 * w4 + 2], codes[4 * w4 + 3], 0x0040)
            word = _prmt(lo, hi, 0x5410)
            kpos = arith.addi(k0, ci(4 * w4))
            chunk = arith.xori(arith.shrui(kpos, ci(4)), arith.andi(n, ci(7)))
            col = arith.ori(arith.shli(chunk, ci(4)), arith.andi(kpos, ci(15)))
            _store_word(word, b_ref, [ix(arith.shrui(n, ci(3))), cx(0), ix(arith.andi(n, ci(7))), ix(col)])
        vsum = v[0]
        for x in v[1:]:
            vsum = arith.addf(vsum, x)
        bsum = codes[0]
        for x in codes[1:]:
            bsum = arith.addi(bsum, x)
        vsum = butterfly(vsum, arith.addf)
        bsum = arith.sitofp(f32, butterfly(bsum, arith.addi))
        offset = arith.mulf(cf(CODE_MEAN), arith.subf(vsum, arith.mulf(alpha, bsum)))
        if with_zero:  # + q . zero
            qz = arith.mulf(qs[0], zeros[0])
            for q_, z_ in zip(qs[1:], zeros[1:]):
                qz = arith.addf(qz, arith.mulf(q_, z_))
            offset = arith.addf(offset, butterfly(qz, arith.addf))
        else:  # a symmetric grid: k = (code - mid) * scale
            offset = arith.subf(offset, arith.mulf(cf(mid), vsum))
        branch = scf.IfOp(lead)
        with ir.InsertionPoint(branch.then_block):
            memref.store(alpha, ao_ref, [cx(0), ix(n)])
            memref.store(offset, ao_ref, [cx(1), ix(n)])
            scf.yield_([])
    mgpu_utils.commit_shared()  # fence for wgmma's (async proxy) reads of B, then the warpgroup barrier


def _store_word(word, ref, idx):
    """A 32-bit word of four int8 into an i8 smem ref at idx (a multiple of 4 in the last dimension)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import vector
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    vec = mgpu_utils.bitcast(word, ir.VectorType.get((4,), ir.IntegerType.get_signless(8)))
    vector.store(vec, ref, idx)


def _kernel(len_g, words_g, qs_g, scale_g, *rest, heads: int, n_pad: int, rows: int, block: int,
            blocks_per_split: int, stages: int, token_group: int, with_zero: bool, mid: float):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    zero_g = rest[0] if with_zero else None
    bias_g, scores_g, top_g, b_smem, ao_smem, top_smem = rest[int(with_zero):]
    bi, hh, si = (jax.lax.axis_index(a) for a in ("b", "h", "s"))
    per_block = block // STEP_TOKENS
    groups = STEP_TOKENS // token_group
    used = jax.lax.div(len_g[0] + (block - 1), jnp.int32(block))
    lo = si * blocks_per_split
    valid_steps = jnp.maximum(jnp.minimum(lo + blocks_per_split, used) - lo, 0) * per_block
    first = lo * per_block
    per_tile = rows // STEP_COLUMNS  # steps a code-order tile
    tile_index = lambda g: ((first + g) // per_tile, 0, (first + g) % per_tile)  # noqa: E731
    words_transforms = (plgpu.TilingTransform((8, STEP_COLUMNS)), plgpu.SwizzleTransform(128))
    b_transforms = (plgpu.TilingTransform((8, HEAD_DIM)), plgpu.SwizzleTransform(128))
    a_type = plgpu.ShapeDtypeStruct((HALF_ROWS, HEAD_DIM), jnp.int8, layout=plgpu.Layout.WGMMA_8BIT)
    gathers = [plgpu.inline_mgpu(arg_types=(plgpu.RefType(words_transforms),), return_type=a_type)(
        functools.partial(_gather_a, half=h)) for h in (0, 1)]
    write_b = plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(), plgpu.RefType(), *([plgpu.RefType()] if with_zero else []),
                   plgpu.RefType(b_transforms), plgpu.RefType()),
    )(functools.partial(_write_b, heads=heads, groups=groups, with_zero=with_zero, mid=mid))
    top_layout = plgpu.Layout.WG_STRIDED((128 * heads,), vec_size=heads)
    finish = plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA, plgpu.RefType(), plgpu.RefType(), plgpu.RefType(),
                   plgpu.Layout.WG_SPLAT(()), top_layout),
        return_type=plgpu.ShapeDtypeStruct((128 * heads,), jnp.float32, layout=top_layout),
    )(functools.partial(_score_rows, heads=heads, n_pad=n_pad, columns_per_group=token_group // SLOTS))

    def body(idx, words_smem, qs_smem, scale_smem, *refs):
        zero_smem = refs[0] if with_zero else None
        bias_smem, out_smem, top = refs[int(with_zero):]
        write_b(qs_smem, scale_smem, *([zero_smem] if with_zero else []), b_smem, ao_smem)
        accs = []
        for gather in gathers:
            a = gather(words_smem)

            def mma(acc_ref, a=a):
                plgpu.wgmma(acc_ref, a, b_smem.T)
            zeros = plgpu.layout_cast(jnp.zeros((HALF_ROWS, n_pad), jnp.int32), plgpu.Layout.WGMMA)
            accs.append(pl.run_state(mma)(plgpu.ACC.init(zeros)))
        return finish(*accs, ao_smem, bias_smem, out_smem, idx[0] < valid_steps, top)

    meta_spec = plgpu.BlockSpec((HEAD_DIM, groups), lambda g: (0, first + g))
    in_specs = [plgpu.BlockSpec((HEAD_DIM, STEP_COLUMNS), lambda g: (0, first + g), transforms=words_transforms),
                plgpu.BlockSpec((heads, HEAD_DIM), lambda g: (0, 0)), meta_spec,
                *([meta_spec] if with_zero else []),
                plgpu.BlockSpec((None, SLOTS, STEP_COLUMNS), tile_index)]
    out_specs = [plgpu.BlockSpec((heads, None, SLOTS, STEP_COLUMNS), lambda g: (0, *tile_index(g)))]
    meta_of = lambda x: x.at[bi if x.shape[0] > 1 else 0, hh if x.shape[1] > 1 else 0]  # noqa: E731
    operands = [words_g.at[bi, hh], qs_g.at[bi, hh], meta_of(scale_g), *([meta_of(zero_g)] if with_zero else []),
                bias_g.at[bi], scores_g.at[bi, hh]]
    top0 = plgpu.layout_cast(jnp.full((128 * heads,), NEG_INF, jnp.float32), top_layout)
    top = plgpu.emit_pipeline(body, grid=(jnp.maximum(valid_steps, 1),), in_specs=in_specs, out_specs=out_specs,
                              max_concurrent_steps=stages, init_carry=top0)(*operands)
    top_smem[...] = top
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(top_smem, top_g.at[bi, hh, si])
    plgpu.wait_smem_to_gmem(0)


def keys_pass(q, k, bias, length, *, scale: float, block: int, blocks_per_split: int, n_splits: int,
              stages: int = 2):
    """cw2's keys pass on the int8 tensor cores (a Hopper GPU), one program a kv head and split for all its
    `heads` query heads; the arguments and outputs are `emulate_scores`'s: scores [B, K, heads, S] (log2
    units, code order, the mask's bias added) and each split's maximum [B, K, splits, heads]. Each step
    computes its B, alpha and offset from q and the key scales (`_write_b`: `prepare`'s arithmetic) before
    its wgmma. stages: steps of TMA loads in flight."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b, kv_heads, heads, _ = q.shape
    problem = kernel_problem(k, heads, block)
    if problem:
        raise ConfigError(f"the int8 keys pass cannot read this key store: {problem}")
    s = k.capacity
    n_pad = b_rows(heads, k.token_group)
    with_zero = k.zero is not None
    qs = q.astype(jnp.float32) * (scale * LOG2E)
    words = jax.lax.bitcast_convert_type(k.codes, jnp.int32)  # [B, K, D, S / 16]
    view = lambda x: x.reshape(*x.shape[:-1], s // (SLOTS * k.rows), SLOTS, k.rows)  # noqa: E731  code-order tiles
    body = functools.partial(_kernel, heads=heads, n_pad=n_pad, rows=k.rows, block=block,
                             blocks_per_split=blocks_per_split, stages=stages, token_group=k.token_group,
                             with_zero=with_zero, mid=float(1 << (k.bits - 1)))
    operands = [jnp.reshape(jnp.asarray(length, jnp.int32), (1,)), words, qs, k.scale,
                *([k.zero] if with_zero else []), view(bias)]
    scores, top = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((b, kv_heads, heads, s // (SLOTS * k.rows), SLOTS, k.rows), jnp.float32),
                  jax.ShapeDtypeStruct((b, kv_heads, n_splits, 128 * heads), jnp.float32)),
        grid=(b, kv_heads, n_splits), grid_names=("b", "h", "s"),
        scratch_types=[plgpu.SMEM((n_pad, HEAD_DIM), jnp.int8, transforms=(plgpu.TilingTransform((8, HEAD_DIM)),
                                                                            plgpu.SwizzleTransform(128))),
                       plgpu.SMEM((2, n_pad), jnp.float32), plgpu.SMEM((128 * heads,), jnp.float32)],
    )(*operands)
    top = top.reshape(b, kv_heads, n_splits, 128, heads).max(axis=-2)
    return scores.reshape(b, kv_heads, heads, s), top
