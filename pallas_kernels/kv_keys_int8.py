"""cw2's keys pass on int8 tensor cores: a Triton prepass, a Mosaic GPU kernel and their plain-JAX model.

The keys pass of the two-pass body (`decode_attention`, path "cw2") is issue-bound at about three
instructions a 2-bit code (kv_notes runs 18-22): each pair is converted to fp16 and multiplied by
q * scale on the CUDA cores. Hopper's wgmma takes an s8 A operand from registers (s32 sums), and a
2-bit code becomes an s8 byte in about half an instruction, so the multiply-adds can move to the
tensor cores (design and cost: kv_notes run 22, "Next"):

    score[t, q] = alpha[g, q] * sum_d code[t, d] * B[(g, q), d] + offset[g, q]      (g: t's key group)
    B[(g, q), d] = round(v[g, q, d] * 127 / m[g, q]),  v = (q * scale * log2 e)[d] * key_scale[g, d]
    alpha[g, q] = m[g, q] / 127,  m[g, q] = max_d |v[g, q, d]|
    offset[g, q] = sum_d q[d] zero[g, d] + 1.5 * (sum_d v - alpha * sum_d B)

with the store's keys k = code * scale + zero (symmetric grids: (code - 2) * scale, offset less
2 sum_d v). `offset`'s last term takes B's rounding error about the
codes' mean (1.5) out exactly, so what is left is sum_d e_d (code_d - 1.5), |e_d| <= alpha / 2: an
rms logit error of about alpha sqrt(d * 1.25 / 12), a sixth or less of KIVI-2's own (kv_notes run 22).

This module holds the keys pass (`keys_pass`: `prepass`, a Pallas Triton kernel, then the Mosaic GPU
kernel; a Hopper GPU only) and what it is checked against on the CPU:
- `prepare`: the prepass's arithmetic in plain JAX (B in int8, alpha, offset a step and key group), B
  in the [N, 128] tile a 512-token step feeds wgmma (N = the step's key groups x query heads);
  `prepass` computes the same, op for op, reading the key scales in the store's [D, T] layout (its
  interpret mode runs on the CPU);
- `gather_registers`: the register map, in numpy: eight prmt byte gathers (PRMT_PAIRS, PRMT_QUADS)
  turn four channel_words words (channels c..c+3, 16 tokens each) into R_b, and
  (R_b >> 2s) & 0x03030303 is the s8 register of token 4b + s, channels c..c+3 (the four K
  positions a thread holds in `WGMMA_LAYOUT_8BIT`);
- `emulate_scores`: the kernel's arithmetic in plain JAX (exact s32 sums, fp32 epilogue), with cw2's
  keys-pass outputs (scores in log2 units and code order, each split's maximum).
Only 2-bit channel_words keys with fp16 meta, head_dim 128 and key groups that divide a step.

**The kernel** (`_kernel`), one program a kv head and split, a step of 512 tokens at a time (TMA
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

**Measured** (H200, KIVI-2 at 32k, Llama-2-7B heads, against XLA's bf16 attention; kv_notes run 23):
- The decode with `Cw2Config(keys="int8")`, in kernel time (run 25, the values pass in splits of its own):
  - batch 8: 328.0 us, 3.72x (the f16x2 keys pass: 344.0, 3.54x; run 23: 350.3 against 364.7);
  - batch 1: 68.7 us, 2.44x (66.3, 2.53x).
- The kernel alone: about 105 us at batch 8 against the f16x2 pass's 163, and 16 against 29 at batch
  1. The prepass: 59.6 / 12.2 us, against the default's 19.6 / 1 us q . zero einsum.
- Other homes for B, measured and taken out: an XLA prepass, 253 us at batch 8; B computed in the
  kernel (commit 7ec2e22), 204 us for the whole pass.
- Attention through int8 scores lies about 3x further from the float reference than through the f16x2
  pass, on random layers: 5.4e-3 against 1.7e-3. So it is an option, not the default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError
from pallas_kernels.decode_attention import LOG2E, NEG_INF, _compiler_params

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
    if k.rows % STEP_COLUMNS:
        return f"the store's tiles of {k.rows} word columns are not whole steps of {STEP_COLUMNS}"
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
    b8 = jnp.floor(v * inverse[..., None] + 0.5)  # to nearest (Triton has floor, not round); |B| <= 127
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


def emulate_scores(q, k, bias, length, *, scale: float, block: int, blocks_per_split: int, n_splits: int,
                   prepared=None):
    """The int8 keys pass's arithmetic in plain JAX: exact integer sums of codes x B, alpha and the offset
    in fp32, the mask's bias (code order [B, S], as `decode_attention._cw_inputs` gives it). Returns what
    cw2's keys pass gives its values pass: scores [B, K, heads, S] in log2 units and code order, and
    each split's maximum [B, K, splits, heads] over the blocks it reads. prepared: `prepare`'s outputs to
    use instead of computing them (`prepass`'s, through `from_prepass`)."""
    from jaxcompress.kv.store import to_code_order

    b8, alpha, offset = prepared if prepared is not None else prepare(q, k, scale=scale)
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


def from_prepass(b8, ao):
    """`prepass`'s outputs as `prepare` gives them: B's columns back in channel order, alpha and offset
    [B, K, steps, N]."""
    order = np.argsort(CHANNEL_ROWS)
    alpha, offset = (x.reshape(b8.shape[:-1]) for x in (ao[:, :, 0], ao[:, :, 1]))
    return b8[..., order], alpha, offset


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
    if heads & (heads - 1) or (STEP_TOKENS // k.token_group * heads) % 8:
        return (f"{heads} query heads x {STEP_TOKENS // k.token_group} key groups a step: the kernel takes a power "
                "of two query heads and a multiple of 8 columns")
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
    """(t = lane % 4, j = 8 w + lane // 4) of thread 32 w + lane, i32 values."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    i32 = ir.IntegerType.get_signless(32)
    ci = lambda v: arith.constant(i32, v)  # noqa: E731
    tid = arith.remui(mgpu_utils.thread_idx(), ci(128))
    w, lane = arith.shrui(tid, ci(5)), arith.andi(tid, ci(31))
    return arith.andi(lane, ci(3)), arith.ori(arith.shli(w, ci(3)), arith.shrui(lane, ci(2)))


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
    t, j = _thread()
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
    t, j = _thread()
    group = arith.divui(j, ci(columns_per_group))
    choices = [(c8, b) for c8 in range(n_pad // 8) for b in range(2)]  # this thread's columns of a row
    ok = valid.registers.item()
    (top_regs,) = top.registers.flat
    tops = [vector.extract(top_regs, [], [q]) for q in range(heads)]
    for q in range(heads):
        n = arith.addi(arith.muli(group, ci(heads)), ci(q))
        owner = arith.andi(ok, arith.cmpi(arith.CmpIPredicate.eq, t, arith.shrui(arith.andi(n, ci(7)), ci(1))))
        pick = arith.ori(arith.shli(arith.shrui(n, ci(3)), ci(1)), arith.andi(n, ci(1)))  # 2 (n // 8) + n % 2
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


# ------------------------------------------------------------------------------------------ the prepass
# The prepass's tuning (H200, KIVI-2 at 32k, Llama-2-7B heads, kv_notes run 23, us at batch 8 / 1):
# 4 steps a program and 4 warps, the tile transposed before the sums: 62.6 / 14.2; with 2 or 8 steps or 8
# warps 87-123 / 14-18. Sums down the columns (the tile transposed at the end) took 79.3-80.0 / 14.4;
# B times a 0/1 permutation matrix instead of the reshape, 106.9 / 17.2. XLA's `prepare` took 122.3 /
# 23.3, the default path's q . zero einsum alone 21.0 / 4.2 (it reads half the bytes).
PREPASS_STEPS = 4  # 512-token steps a prepass program takes (fewer where the capacity's steps do not divide)
PREPASS_WARPS = 4


def _prepass_kernel(qs_ref, scale_ref, *rest, heads: int, with_zero: bool, mid: float):
    """One program: `groups` key groups of one kv head (scale_ref [128, groups] fp16: the store's [D, T]
    layout). B [groups, heads, 128] int8 with its columns in `CHANNEL_ROWS` order, alpha and offset
    [2, groups, heads]: `prepare`'s arithmetic, op for op. The scales' rows take CHANNEL_ROWS order by a
    reshape and transpose, then the whole tile is transposed, so the sums run along its rows."""
    zero_ref = rest[0] if with_zero else None
    b_ref, ao_ref = rest[-2:]
    d = scale_ref.shape[0]

    def reorder(x):  # rows c = (ct, i1, t, i0) -> row k = (ct, t, i1, i0) holds channel CHANNEL_ROWS[k]
        return x.reshape(d // 16, 2, 4, 2, -1).transpose(0, 2, 1, 3, 4).reshape(d, -1)

    s = reorder(scale_ref[...].astype(jnp.float32)).T  # [groups, k]
    z = zero_ref[...].astype(jnp.float32) if with_zero else None
    for q in range(heads):
        v = s * reorder(qs_ref[q, :][:, None]).T  # [groups, k]
        amax = jnp.max(jnp.abs(v), axis=1)
        positive = amax > 0
        alpha = jnp.where(positive, amax / B_MAX, 1.0)
        inverse = jnp.where(positive, B_MAX / jnp.where(positive, amax, 1.0), 0.0)
        b8 = jnp.floor(v * inverse[:, None] + 0.5)
        offset = CODE_MEAN * (jnp.sum(v, axis=1) - alpha * jnp.sum(b8, axis=1))
        if with_zero:  # q . zero: the order of the channels does not matter to the sum
            offset = offset + jnp.sum(qs_ref[q, :][:, None] * z, axis=0)
        else:
            offset = offset - mid * jnp.sum(v, axis=1)
        b_ref[:, q, :] = b8.astype(jnp.int8)
        ao_ref[0, :, q] = alpha
        ao_ref[1, :, q] = offset


def prepass(q, k, *, scale: float, interpret: bool = False, steps_per_program: int = PREPASS_STEPS,
            warps: int = PREPASS_WARPS):
    """The keys pass's prepass as a Pallas (Triton) kernel, one program a kv head and `steps_per_program`
    steps of key groups (fewer where they do not divide the capacity's), reading the key scales (and zero points) where the store keeps them: (B int8 [B, K,
    steps, N, 128], columns in CHANNEL_ROWS order, and alpha, offset f32 [B, K, 2, steps x N]); `prepare`
    computes the same (B's columns in channel order, alpha and offset apart)."""
    from jax.experimental import pallas as pl

    b, kv_heads, heads, d = q.shape
    problem = kernel_problem(k, heads)
    if problem:
        raise ConfigError(f"the int8 keys pass cannot read this key store: {problem}")
    groups_total = k.capacity // k.token_group
    per_step = STEP_TOKENS // k.token_group
    steps = k.capacity // STEP_TOKENS
    per_program = next(p for p in (steps_per_program, 2, 1) if steps % p == 0)
    groups = per_step * per_program
    with_zero = k.zero is not None
    qs = q.astype(jnp.float32) * (scale * LOG2E)
    meta_spec = lambda x: pl.BlockSpec(  # noqa: E731  [Bs, Ks, D, T], shared over batch / heads where 1
        (None, None, d, groups), lambda i, h, t: (i if x.shape[0] > 1 else 0, h if x.shape[1] > 1 else 0, 0, t))
    inputs = [qs, k.scale] + ([k.zero] if with_zero else [])
    specs = [pl.BlockSpec((None, None, heads, d), lambda i, h, t: (i, h, 0, 0)), meta_spec(k.scale)]
    if with_zero:
        specs.append(meta_spec(k.zero))
    b8, ao = pl.pallas_call(
        functools.partial(_prepass_kernel, heads=heads, with_zero=with_zero, mid=float(1 << (k.bits - 1))),
        grid=(b, kv_heads, groups_total // groups),
        in_specs=specs,
        out_specs=[pl.BlockSpec((None, None, groups, heads, d), lambda i, h, t: (i, h, t, 0, 0)),
                   pl.BlockSpec((None, None, 2, groups, heads), lambda i, h, t: (i, h, 0, t, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, groups_total, heads, d), jnp.int8),
                   jax.ShapeDtypeStruct((b, kv_heads, 2, groups_total, heads), jnp.float32)],
        compiler_params=None if interpret else _compiler_params(warps, 1),  # Triton, not Mosaic GPU
        interpret=interpret,
        name="kv_keys_int8_prepass",
    )(*inputs)
    n = per_step * heads
    return b8.reshape(b, kv_heads, steps, n, d), ao.reshape(b, kv_heads, 2, steps * n)


def _kernel(len_g, words_g, b_g, ao_g, bias_g, scores_g, top_g, top_smem, *, heads: int, n_pad: int, rows: int,
            block: int, blocks_per_split: int, stages: int, token_group: int):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bi, hh, si = (jax.lax.axis_index(a) for a in ("b", "h", "s"))
    per_block = block // STEP_TOKENS
    used = jax.lax.div(len_g[0] + (block - 1), jnp.int32(block))
    lo = si * blocks_per_split
    valid_steps = jnp.maximum(jnp.minimum(lo + blocks_per_split, used) - lo, 0) * per_block
    first = lo * per_block
    per_tile = rows // STEP_COLUMNS  # steps a code-order tile
    tile_index = lambda g: ((first + g) // per_tile, 0, (first + g) % per_tile)  # noqa: E731
    words_transforms = (plgpu.TilingTransform((8, STEP_COLUMNS)), plgpu.SwizzleTransform(128))
    a_type = plgpu.ShapeDtypeStruct((HALF_ROWS, HEAD_DIM), jnp.int8, layout=plgpu.Layout.WGMMA_8BIT)
    gathers = [plgpu.inline_mgpu(arg_types=(plgpu.RefType(words_transforms),), return_type=a_type)(
        functools.partial(_gather_a, half=h)) for h in (0, 1)]
    top_layout = plgpu.Layout.WG_STRIDED((128 * heads,), vec_size=heads)
    finish = plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA, plgpu.RefType(), plgpu.RefType(), plgpu.RefType(),
                   plgpu.Layout.WG_SPLAT(()), top_layout),
        return_type=plgpu.ShapeDtypeStruct((128 * heads,), jnp.float32, layout=top_layout),
    )(functools.partial(_score_rows, heads=heads, n_pad=n_pad, columns_per_group=token_group // SLOTS))

    def body(idx, words_smem, b_smem, ao_smem, bias_smem, out_smem, top):
        accs = []
        for gather in gathers:
            a = gather(words_smem)

            def mma(acc_ref, a=a):
                plgpu.wgmma(acc_ref, a, b_smem.T)
            zeros = plgpu.layout_cast(jnp.zeros((HALF_ROWS, n_pad), jnp.int32), plgpu.Layout.WGMMA)
            accs.append(pl.run_state(mma)(plgpu.ACC.init(zeros)))
        return finish(*accs, ao_smem, bias_smem, out_smem, idx[0] < valid_steps, top)

    b_transforms = (plgpu.TilingTransform((8, HEAD_DIM)), plgpu.SwizzleTransform(128))
    in_specs = [plgpu.BlockSpec((HEAD_DIM, STEP_COLUMNS), lambda g: (0, first + g), transforms=words_transforms),
                plgpu.BlockSpec((None, n_pad, HEAD_DIM), lambda g: (first + g, 0, 0), transforms=b_transforms),
                plgpu.BlockSpec((2, n_pad), lambda g: (0, first + g)),
                plgpu.BlockSpec((None, SLOTS, STEP_COLUMNS), tile_index)]
    out_specs = [plgpu.BlockSpec((heads, None, SLOTS, STEP_COLUMNS), lambda g: (0, *tile_index(g)))]
    top0 = plgpu.layout_cast(jnp.full((128 * heads,), NEG_INF, jnp.float32), top_layout)
    top = plgpu.emit_pipeline(body, grid=(jnp.maximum(valid_steps, 1),), in_specs=in_specs, out_specs=out_specs,
                              max_concurrent_steps=stages, init_carry=top0)(
        words_g.at[bi, hh], b_g.at[bi, hh], ao_g.at[bi, hh], bias_g.at[bi], scores_g.at[bi, hh])
    top_smem[...] = top
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(top_smem, top_g.at[bi, hh, si])
    plgpu.wait_smem_to_gmem(0)


def keys_pass(q, k, bias, length, *, scale: float, block: int, blocks_per_split: int, n_splits: int,
              stages: int = 2):
    """cw2's keys pass on the int8 tensor cores (a Hopper GPU), one program a kv head and split for all its
    `heads` query heads; the arguments and outputs are `emulate_scores`'s: scores [B, K, heads, S] (log2
    units, code order, the mask's bias added) and each split's maximum [B, K, splits, heads]. B, alpha and
    the offset come from `prepass`. stages: steps of TMA loads in flight."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.kv_values_wgmma import _code_order_view

    b, kv_heads, heads, _ = q.shape
    problem = kernel_problem(k, heads, block)
    if problem:
        raise ConfigError(f"the int8 keys pass cannot read this key store: {problem}")
    s = k.capacity
    b8, ao = prepass(q, k, scale=scale)
    n_pad = b8.shape[-2]
    words = jax.lax.bitcast_convert_type(k.codes, jnp.int32)  # [B, K, D, S / 16]
    body = functools.partial(_kernel, heads=heads, n_pad=n_pad, rows=k.rows, block=block,
                             blocks_per_split=blocks_per_split, stages=stages, token_group=k.token_group)
    scores, top = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((b, kv_heads, heads, s // (SLOTS * k.rows), SLOTS, k.rows), jnp.float32),
                  jax.ShapeDtypeStruct((b, kv_heads, n_splits, 128 * heads), jnp.float32)),
        grid=(b, kv_heads, n_splits), grid_names=("b", "h", "s"),
        scratch_types=[plgpu.SMEM((128 * heads,), jnp.float32)],
    )(jnp.reshape(jnp.asarray(length, jnp.int32), (1,)), words, b8, ao, _code_order_view(bias, k.rows))
    top = top.reshape(b, kv_heads, n_splits, 128, heads).max(axis=-2)
    return scores.reshape(b, kv_heads, heads, s), top
