"""`QTokens`: one layer's quantized keys (or values), packed for the decode kernel.

Invariant (what `dequantize()` computes; the Pallas kernels must equal it). Shapes: B batch,
K kv heads, S slots (the capacity, a multiple of `block`), D head dim. Two layouts, one per
decode-kernel body (pallas_kernels/decode_attention.py):

* "token_rows": `codes` int32 [B, K, S // c, D], c = 32 // bits codes per word, packed along
  the *token* axis in blocks of `block = c * rows` tokens: token t = m * block + i * rows + w
  (block m, slot i < c, row w < rows) sits in word m * rows + w, bits [i * bits, (i + 1) *
  bits). So slot i of a block's `rows` words holds `rows` consecutive tokens: the tensor-core
  body unpacks a [rows, D] tile with one shift and one mask. (int32 words: bit 31 is just a bit.)
* "channel_words": `codes` int32 [B, K, D, S // c], channel-major, word-major: token t sits in
  word t // c of its channel, bits [(t % c) * bits, ...). The CUDA-core body reads [D, rows]
  word tiles (a block of `block = rows * c` tokens; rows = WORD_COLUMNS = 32 by default) and
  reduces over channels inside a thread. scale and zero are channel-major [Bs, Ks, Cs, Ts], and
  per-token ones (Ts = S) are kept in *code order*: token t = m * block + w * c + j at position
  m * block + j * rows + w, so the `rows` tokens of one slot j of a tile are contiguous (see
  `code_positions`).
* a(code) = code (asymmetric grid), code - 2**(bits - 1) (symmetric grid: `zero` is None),
  or codebook[code] (non-uniform grid; `codebook` [2**bits] sorted).
* x[t, d] = a(code[t, d]) * scale[t', d'] (+ zero[t', d']). scale and zero are (token_rows)
  [Bs, Ks, Ts, Cs] with Bs in {B, 1}, Ks in {K, 1} (shared across rows or heads), and
  t' = t // token_group (token_group 0: one static row, Ts = 1),
  d' = d // channel_group (Cs = D // channel_group; channel_group D: one per vector).
* Dense-and-sparse outliers (token_rows only): outlier_index [B, K, S, N] (uint8; NO_OUTLIER = empty) and
  outlier_value [B, K, S, N]: x[t, outlier_index[t, n]] = outlier_value[t, n] exactly.

Slots never written dequantize to garbage; the cache masks them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxcompress.errors import ConfigError

KV_BITS = (2, 3, 4, 8)
META_DTYPE = jnp.float16  # per-token / per-group scales and zeros (as KIVI and KVQuant keep them)
NO_OUTLIER = 255          # outlier_index of an empty outlier slot (head_dim must be < 255)
FP16_MAX = 65504.0
TOKEN_ROWS, CHANNEL_WORDS = "token_rows", "channel_words"
WORD_COLUMNS = 32         # channel_words: default word columns of one kernel tile (a block; `rows`)
PASS_COLUMNS = 128        # channel_words: word columns the cw2 decode passes read a step (one a thread, 4 warps)


def check_bits(bits: int, what: str) -> None:
    if bits not in KV_BITS:
        raise ConfigError(f"{what}={bits} is not supported for the KV cache; choose one of {KV_BITS}")


def codes_per_word(bits: int) -> int:
    return 32 // bits


def pack_block(bits: int, rows: int) -> int:
    """Tokens per packing block."""
    return codes_per_word(bits) * rows


def channel_words_supported(bits: int, token_group: int = 1) -> bool:
    """Whether a channel_words store can hold `bits`-bit codes whose key groups of
    `token_group` tokens cover whole words (the kernel folds one scale per word column)."""
    return bits in (2, 4, 8) and token_group % codes_per_word(bits) == 0


def code_positions(tokens: jax.Array, bits: int, columns: int = WORD_COLUMNS) -> jax.Array:
    """channel_words: positions of `tokens` in a per-token meta array (code order, tiles of
    `columns` word columns)."""
    c = codes_per_word(bits)
    block = c * columns
    r = tokens % block
    return tokens - r + (r % c) * columns + r // c


def to_code_order(x: jax.Array, bits: int, columns: int = WORD_COLUMNS) -> jax.Array:
    """channel_words: a per-token array [..., S] (token order) in code order."""
    c = codes_per_word(bits)
    block = c * columns
    p = jnp.arange(x.shape[-1], dtype=jnp.int32)
    r = p % block
    return x[..., p - r + (r % columns) * c + r // columns]  # the token at each position


# ------------------------------------------------------------------------------ channel words
def _pack_along_tokens(codes: jax.Array, bits: int) -> jax.Array:
    """Channel-major codes [..., D, S] -> words [..., D, S // c] (token t: word t // c)."""
    c = codes_per_word(bits)
    x = codes.astype(jnp.int32).reshape(*codes.shape[:-1], codes.shape[-1] // c, c)
    words = x[..., 0]
    for i in range(1, c):
        words = words | (x[..., i] << (bits * i))
    return words


def _unpack_along_tokens(words: jax.Array, bits: int) -> jax.Array:
    """Inverse of `_pack_along_tokens`: int32 codes [..., D, n * c]."""
    c = codes_per_word(bits)
    shifts = jnp.arange(c, dtype=jnp.int32) * bits
    codes = (words[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], words.shape[-1] * c)


def pack_channel_words(codes: jax.Array, bits: int) -> jax.Array:
    """Integer codes [..., S, D] in [0, 2**bits) -> int32 words [..., D, S // c] (word-major)."""
    return _pack_along_tokens(jnp.swapaxes(codes, -1, -2), bits)


def unpack_channel_words(words: jax.Array, bits: int) -> jax.Array:
    """Inverse of `pack_channel_words`: int32 codes [..., S, D]."""
    return jnp.swapaxes(_unpack_along_tokens(words, bits), -1, -2)


def write_channel_words(words: jax.Array, codes: jax.Array, start: jax.Array, bits: int) -> jax.Array:
    """Stores codes [B, K, T, D] at token slots [start, start + T) of words [B, K, D, S // c].

    Only the small `codes` is transposed: every operation on (a slice of) `words` keeps the
    token axis minor, so XLA keeps the store in the row-major layout the decode kernel reads
    (a transpose here made it carry the store word-major and transpose all of it every step)."""
    b, k, t, d = codes.shape
    c = codes_per_word(bits)
    codes = jnp.swapaxes(codes.astype(jnp.int32), 2, 3)  # [B, K, D, T]
    start = jnp.asarray(start, jnp.int32)
    if t == 1:  # decode: read-modify-write of one word column
        col, shift = start // c, bits * (start % c)
        old = jax.lax.dynamic_slice(words, (0, 0, 0, col), (b, k, d, 1))
        new = (old & ~(((1 << bits) - 1) << shift)) | (codes << shift)
        return jax.lax.dynamic_update_slice(words, new, (0, 0, 0, col))
    n_words = words.shape[3]
    span = min(t // c + 2, n_words)
    first = jnp.clip(start // c, 0, n_words - span)
    region = _unpack_along_tokens(jax.lax.dynamic_slice(words, (0, 0, 0, first), (b, k, d, span)), bits)
    region = jax.lax.dynamic_update_slice(region, codes, (0, 0, 0, start - first * c))
    return jax.lax.dynamic_update_slice(words, _pack_along_tokens(region, bits), (0, 0, 0, first))


# ------------------------------------------------------------------------------ packing
def pack_tokens(codes: jax.Array, bits: int, rows: int) -> jax.Array:
    """Integer codes [..., S, D] in [0, 2**bits) -> int32 words [..., S // c, D]."""
    c = codes_per_word(bits)
    *lead, s, d = codes.shape
    nb = s // (c * rows)
    x = codes.astype(jnp.int32).reshape(*lead, nb, c, rows, d)
    words = x[..., 0, :, :]
    for i in range(1, c):
        words = words | (x[..., i, :, :] << (bits * i))  # disjoint bit fields; wraps into bit 31
    return words.reshape(*lead, nb * rows, d)


def unpack_tokens(words: jax.Array, bits: int, rows: int) -> jax.Array:
    """Inverse of `pack_tokens`: int32 codes [..., S, D]."""
    c = codes_per_word(bits)
    *lead, n, d = words.shape
    nb = n // rows
    w = words.reshape(*lead, nb, 1, rows, d)
    shifts = (jnp.arange(c, dtype=jnp.int32) * bits).reshape(c, 1, 1)
    # Arithmetic shift is fine: the mask drops the sign bits it brings in.
    codes = (w >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*lead, nb * c * rows, d)


def write_codes(words: jax.Array, codes: jax.Array, start: jax.Array, bits: int, rows: int) -> jax.Array:
    """Stores codes [B, K, T, D] at token slots [start, start + T) of packed words
    [B, K, S // c, D]; the caller guarantees start + T <= S."""
    b, k, t, d = codes.shape
    c = codes_per_word(bits)
    block = c * rows
    codes = codes.astype(jnp.int32)
    start = jnp.asarray(start, jnp.int32)
    if t == 1:  # decode: read-modify-write of one word row
        row = (start // block) * rows + start % rows
        shift = bits * ((start % block) // rows)
        old = jax.lax.dynamic_slice(words, (0, 0, row, 0), (b, k, 1, d))
        new = (old & ~(((1 << bits) - 1) << shift)) | (codes << shift)
        return jax.lax.dynamic_update_slice(words, new, (0, 0, row, 0))
    # Several tokens: unpack the blocks they touch, overwrite, repack.
    n_blocks = words.shape[2] // rows
    span = min(t // block + 2, n_blocks)
    first = jnp.clip(start // block, 0, n_blocks - span)
    region = jax.lax.dynamic_slice(words, (0, 0, first * rows, 0), (b, k, span * rows, d))
    region_codes = unpack_tokens(region, bits, rows)
    region_codes = jax.lax.dynamic_update_slice(region_codes, codes, (0, 0, start - first * block, 0))
    return jax.lax.dynamic_update_slice(words, pack_tokens(region_codes, bits, rows), (0, 0, first * rows, 0))


# ------------------------------------------------------------------------------ grids
def _to_meta(x: jax.Array) -> jax.Array:
    return jnp.clip(x, -FP16_MAX, FP16_MAX).astype(META_DTYPE)


def minmax_scale_zero(x: jax.Array, axes, bits: int, symmetric: bool):
    """fp16 (scale, zero) reduced over `axes` (kept as size 1). Asymmetric: x ~ code * scale
    + zero with zero = min; symmetric: x ~ (code - 2**(bits-1)) * scale, zero None."""
    if symmetric:
        amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
        scale = _to_meta(amax / (2 ** (bits - 1) - 1))
        return jnp.where(scale > 0, scale, jnp.ones_like(scale)), None
    lo = jnp.min(x, axis=axes, keepdims=True)
    hi = jnp.max(x, axis=axes, keepdims=True)
    scale = _to_meta((hi - lo) / (2 ** bits - 1))
    return jnp.where(scale > 0, scale, jnp.ones_like(scale)), _to_meta(lo)


def uniform_codes(x: jax.Array, scale: jax.Array, zero: jax.Array | None, bits: int) -> jax.Array:
    """Nearest grid codes for x given (already rounded) scale and zero that broadcast to x."""
    s = scale.astype(jnp.float32)
    if zero is None:
        q = jnp.round(x / s) + 2 ** (bits - 1)
    else:
        q = jnp.round((x - zero.astype(jnp.float32)) / s)
    return jnp.clip(q, 0, 2 ** bits - 1).astype(jnp.int32)


def nearest_codes(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest entry of a sorted codebook [L] for every element of x."""
    bounds = (codebook[1:] + codebook[:-1]) / 2
    return jnp.sum(x[..., None] > bounds, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------ the leaf
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTokens:
    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None = None
    codebook: jax.Array | None = None
    outlier_index: jax.Array | None = None
    outlier_value: jax.Array | None = None
    bits: int = dataclasses.field(default=2, metadata=dict(static=True))
    rows: int = dataclasses.field(default=32, metadata=dict(static=True))
    token_group: int = dataclasses.field(default=1, metadata=dict(static=True))
    channel_group: int = dataclasses.field(default=1, metadata=dict(static=True))
    layout: str = dataclasses.field(default=TOKEN_ROWS, metadata=dict(static=True))

    @property
    def channel_words(self) -> bool:
        return self.layout == CHANNEL_WORDS

    @property
    def capacity(self) -> int:
        return self.codes.shape[3 if self.channel_words else 2] * codes_per_word(self.bits)

    @property
    def head_dim(self) -> int:
        return self.codes.shape[2 if self.channel_words else 3]

    @property
    def block(self) -> int:
        return codes_per_word(self.bits) * self.rows  # channel_words: rows = word columns of a tile

    # ---------------------------------------------------------------- layout-aware access
    def token_codes(self) -> jax.Array:
        """int32 codes [B, K, S, D] in token order."""
        if self.channel_words:
            return unpack_channel_words(self.codes, self.bits)
        return unpack_tokens(self.codes, self.bits, self.rows)

    def meta_rows(self, x: jax.Array) -> jax.Array:
        """A stored scale or zero as [Bs, Ks, Ts, Cs] in token order."""
        if not self.channel_words:
            return x
        if self.token_group == 1:  # undo the code order
            x = x[..., code_positions(jnp.arange(x.shape[-1], dtype=jnp.int32), self.bits, self.rows)]
        return jnp.swapaxes(x, -1, -2)

    def with_codes(self, codes: jax.Array, start) -> "QTokens":
        """Integer codes [B, K, T, D] written at token slots [start, start + T)."""
        if self.channel_words:
            words = write_channel_words(self.codes, codes, start, self.bits)
        else:
            words = write_codes(self.codes, codes, start, self.bits, self.rows)
        return dataclasses.replace(self, codes=words)

    def with_meta(self, start, **arrays) -> "QTokens":
        """scale= / zero= [B, K, T', Cs] (token order) written from meta row `start` (a token
        index for per-token meta, a group index for token groups)."""
        updates = {}
        for name, x in arrays.items():
            old = getattr(self, name)
            x = x.astype(old.dtype)
            if not self.channel_words:
                updates[name] = jax.lax.dynamic_update_slice(old, x, (0, 0, start, 0))
            elif self.token_group == 1:
                pos = code_positions(jnp.asarray(start, jnp.int32) + jnp.arange(x.shape[2], dtype=jnp.int32),
                                     self.bits, self.rows)
                updates[name] = old.at[..., pos].set(jnp.swapaxes(x, 2, 3))
            else:
                updates[name] = jax.lax.dynamic_update_slice(old, jnp.swapaxes(x, 2, 3), (0, 0, 0, start))
        return dataclasses.replace(self, **updates)

    @property
    def num_outliers(self) -> int:
        return 0 if self.outlier_index is None else self.outlier_index.shape[-1]

    def grid_values(self, codes: jax.Array) -> jax.Array:
        """a(code) in fp32."""
        if self.codebook is not None:
            return jnp.take(self.codebook.astype(jnp.float32), codes)
        if self.zero is None:
            return (codes - 2 ** (self.bits - 1)).astype(jnp.float32)
        return codes.astype(jnp.float32)

    def expand(self, x: jax.Array) -> jax.Array:
        """A [Bs, Ks, Ts, Cs] scale or zero broadcast to [.., S, D] token and channel resolution."""
        x = self.meta_rows(x).astype(jnp.float32)
        if self.token_group > 1:
            x = jnp.repeat(x, self.token_group, axis=2)
        if 1 < self.channel_group < self.head_dim:
            x = jnp.repeat(x, self.channel_group, axis=3)
        return x

    def dequantize(self) -> jax.Array:
        """fp32 [B, K, S, D]: the reference every kernel equals."""
        x = self.grid_values(self.token_codes()) * self.expand(self.scale)
        if self.zero is not None:
            x = x + self.expand(self.zero)
        if self.outlier_index is not None:
            channel = jnp.arange(self.head_dim, dtype=jnp.int32)
            for n in range(self.num_outliers):
                idx = self.outlier_index[..., n:n + 1].astype(jnp.int32)
                x = jnp.where(channel == idx, self.outlier_value[..., n:n + 1].astype(jnp.float32), x)
        return x

    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(self))


def capacity_for(max_len: int, bits: tuple[int, ...], rows: int, multiple_of: int = 1,
                 pass_tile: int | None = None) -> int:
    """Slots of a packed store holding max_len tokens: a multiple of every operand's block
    (and of `multiple_of`, e.g. a token group).

    pass_tile (slots a decode pass reads a step, a power of 2): round up to whole such tiles, or
    the largest power-of-2 fraction of one, that adds at most an eighth of max_len. The passes
    read the widest tile that divides the capacity; a capacity of odd blocks (32768 + 24 slots
    is 65 of 512) would cut them to one warp a program, at twice the time (kv_notes run 19)."""
    block = math.lcm(multiple_of, *(pack_block(b, rows) for b in bits))
    tile = math.lcm(block, pass_tile or block)
    while tile > block and -(-max_len // tile) * tile - max_len > max_len // 8:
        tile //= 2
    return -(-max_len // tile) * tile
