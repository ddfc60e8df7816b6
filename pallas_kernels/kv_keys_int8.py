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

This module holds what the kernel will be checked against, not the kernel:
- `prepare`: the XLA prepass (B in int8, alpha, offset a step and key group), B in the [N, 128]
  tile a 512-token step feeds wgmma (N = the step's key groups x query heads, zero-filled to 8);
- `gather_registers`: the register map, in numpy: eight prmt byte gathers (PRMT_PAIRS, PRMT_QUADS)
  turn four channel_words words (channels c..c+3, 16 tokens each) into R_b, and
  (R_b >> 2s) & 0x03030303 is the s8 register of token 4b + s, channels c..c+3 (the four K
  positions a thread holds in `WGMMA_LAYOUT_8BIT`);
- `emulate_scores`: the kernel's arithmetic in plain JAX (exact s32 sums, fp32 epilogue), with cw2's
  keys-pass outputs (scores in log2 units and code order, each split's maximum).
Only 2-bit channel_words keys with fp16 meta, head_dim 128 and key groups that divide a step.
"""

from __future__ import annotations

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
    b8 = jnp.clip(jnp.round(v / alpha[..., None]), -B_MAX, B_MAX)
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
