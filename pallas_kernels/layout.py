"""Where each code of a packed `[K, N]` weight lives, as the fused kernels read it.

A kernel program walks K in *tiles* of `period * rows` input rows. A tile's codes sit in
`words * rows` uint32 rows of the packed array (coalesced along N), and its `period` code
positions form *slabs*: code position j of the `rows` word-rows of a tile is one slab, a
`[rows, N]` block of codes extracted with one shift and one mask per word. Two layouts:

* interleaved (`QArray` as stored, no copy): period p of a column is words
  `[p * words, (p + 1) * words)`, so slab j holds input rows `t * tile + j + period * r`
  (strided by the period). A tile must lie inside one quantization group.
* tiled (`TiledQArray`, one-time `repack_for_gpu`): the words of slab-row r of tile t are
  stored `rows` apart, so slab j holds the contiguous input rows `t * tile + j * rows + r`.
  A slab must lie inside one group, which lets small groups (32, 64) and 2/3-bit codes use
  slabs of 32 rows, as tensor-core dots need.

`period` is the number of codes after which the bit stream realigns to a word
(32 / gcd(bits, 32)): 8 codes in 1 word for 4 bits, 32 codes in 3 words for 3 bits.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.quant.qarray import QArray, num_words, pack_codes, unpack_codes


def period_of(bits: int) -> int:
    """Codes per bit-stream period (after which codes realign to a 32-bit word)."""
    return 32 // math.gcd(bits, 32)


@dataclasses.dataclass(frozen=True)
class CodeLayout:
    """Static description of a packed weight for the kernels (see the module docstring)."""

    bits: int
    rows: int
    interleaved: bool
    k: int
    n: int
    k_padded: int
    group_size: int
    num_groups: int
    codebook: bool = False  # codes index a lookup table (SqueezeLLM, NF4) instead of a uniform grid

    @property
    def period(self) -> int:
        return period_of(self.bits)

    @property
    def words(self) -> int:
        return self.bits * self.period // 32

    @property
    def tile(self) -> int:
        return self.period * self.rows

    @property
    def num_tiles(self) -> int:
        return self.k_padded // self.tile

    @property
    def in_place(self) -> bool:
        """Whether the in-place conversions (`dequant="inplace"` / `"fma"`) apply: every code lies
        inside one word (2, 4 or 8 bits) and stands for a uniform-grid value (no codebook)."""
        return self.words == 1 and self.bits <= 8 and not self.codebook

    @property
    def slabs_per_group(self) -> int:
        """Slabs of a tile that share one group (all of them unless groups are smaller than a tile)."""
        if self.num_groups == 1 or self.group_size % self.tile == 0:
            return self.period
        return self.group_size // self.rows

    def word_rows(self, tile, w: int) -> tuple:
        """(first packed row, stride) of word w of every slab-row of `tile`."""
        if self.interleaved:
            return tile * (self.words * self.rows) + w, self.words
        return (tile * self.words + w) * self.rows, 1

    def x_cols(self, tile, j: int) -> tuple:
        """(first input row, stride) of slab j of `tile`."""
        if self.interleaved:
            return tile * self.tile + j, self.period
        return tile * self.tile + j * self.rows, 1

    def problem(self) -> str | None:
        """Why the kernels cannot read this layout, or None when they can."""
        if self.rows < 1 or self.rows & (self.rows - 1):
            return f"rows={self.rows} must be a power of two"
        if self.k_padded % self.tile:
            return f"K={self.k_padded} must be a multiple of the tile of {self.tile} rows"
        if self.n % 16:
            return f"N={self.n} must be a multiple of 16 (the smallest block_n)"
        if self.num_groups == 1:
            return None
        if self.interleaved and self.group_size % self.tile:
            return (f"group_size={self.group_size} must be a multiple of the tile of {self.tile} "
                    f"rows ({self.period} codes per period x {self.rows} rows); repack_for_gpu "
                    f"lifts this")
        if not self.interleaved and (self.group_size % self.rows
                                     or (self.group_size < self.tile and self.tile % self.group_size)):
            return (f"group_size={self.group_size} must be a multiple of the slab of "
                    f"{self.rows} rows and divide or be a multiple of the tile of {self.tile} rows")
        return None


def native_layout(q: QArray, max_rows: int = 16) -> CodeLayout:
    """The interleaved layout of `q` as stored, with the largest valid slab (<= max_rows)."""
    k, n = q.shape
    groups = 1 if q.scale is None or q.scale.shape[0] == 1 else q.num_groups
    p = period_of(q.bits)
    rows = max_rows
    while rows > 1 and (k % (p * rows) or (groups > 1 and q.group_size % (p * rows))):
        rows //= 2
    return CodeLayout(q.bits, rows, True, k, n, k, q.group_size, groups, q.codebook is not None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TiledQArray:
    """A QArray repacked so each slab of `rows` codes covers contiguous input rows.

    Invariant: same fields and meaning as `QArray` (scale/zero/perm/codebook/outliers in storage
    order, `shape` the logical [K, N]) except `codes`: uint32 `[K_padded * bits / 32, N]` where
    K_padded rounds K up to the tile (`period * rows`); packed row `(t * words + w) * rows + r`
    holds word w of the bit stream of the `period` codes of input rows `t * tile + j * rows + r`
    (j = 0 .. period - 1, lowest bits first). Padded rows hold code 0 and are never read as
    weights (the kernel zeroes their activations). `dequantize()` equals the QArray's.
    """

    codes: jax.Array
    scale: jax.Array | None
    zero: jax.Array | None = None
    perm: jax.Array | None = None
    codebook: jax.Array | None = None
    outlier_index: jax.Array | None = None
    outlier_value: jax.Array | None = None
    bits: int = dataclasses.field(default=4, metadata=dict(static=True))
    group_size: int = dataclasses.field(default=128, metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(default=(0, 0), metadata=dict(static=True))
    dtype: str = dataclasses.field(default="bfloat16", metadata=dict(static=True))
    rows: int = dataclasses.field(default=32, metadata=dict(static=True))

    @property
    def num_groups(self) -> int:
        return math.ceil(self.shape[0] / self.group_size)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def layout(self) -> CodeLayout:
        k, n = self.shape
        groups = 1 if self.scale is None or self.scale.shape[0] == 1 else self.num_groups
        tile = period_of(self.bits) * self.rows
        return CodeLayout(self.bits, self.rows, False, k, n, -(-k // tile) * tile,
                          self.group_size, groups, self.codebook is not None)

    def to_qarray(self) -> QArray:
        """The equivalent QArray (inverse of `repack_for_gpu`)."""
        lay = self.layout
        p, w, r, t = lay.period, lay.words, lay.rows, lay.num_tiles
        n = self.shape[1]
        packed = self.codes.reshape(t, w, r, n).transpose(1, 0, 2, 3).reshape(w, t * r * n)
        codes = unpack_codes(packed, self.bits, p).reshape(p, t, r, n).transpose(1, 0, 2, 3)
        codes = codes.reshape(t * p * r, n)[: self.shape[0]]
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(QArray)}
        fields["codes"] = pack_codes(codes, self.bits)
        return QArray(**fields)

    def dequantize(self) -> jax.Array:
        return self.to_qarray().dequantize()

    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))


def repack_for_gpu(q: QArray, rows: int = 32) -> TiledQArray:
    """One-time repack of `q` into the tiled layout (slabs of `rows` contiguous input rows)."""
    if rows < 1 or rows & (rows - 1):
        raise ConfigError(f"repack_for_gpu: rows={rows} must be a power of two")
    return _repack(q, rows)


@functools.partial(jax.jit, static_argnums=1)
def _repack(q: QArray, rows: int) -> TiledQArray:
    k, n = q.shape
    p = period_of(q.bits)
    tile = p * rows
    kp = -(-k // tile) * tile
    t = kp // tile
    codes = q.unpacked_codes()
    codes = jnp.concatenate([codes, jnp.zeros((kp - k, n), codes.dtype)]) if kp > k else codes
    by_slab = codes.reshape(t, p, rows, n).transpose(1, 0, 2, 3).reshape(p, t * rows * n)
    w = num_words(p, q.bits)
    packed = pack_codes(by_slab, q.bits).reshape(w, t, rows, n).transpose(1, 0, 2, 3)
    fields = {f.name: getattr(q, f.name) for f in dataclasses.fields(QArray)}
    fields["codes"] = packed.reshape(t * w * rows, n)
    out = TiledQArray(**fields, rows=rows)
    problem = out.layout.problem()
    if problem:
        raise ConfigError(f"repack_for_gpu: {problem}")
    return out


def kernel_layout(w) -> CodeLayout:
    """The layout the kernels read for a QArray or TiledQArray leaf."""
    if isinstance(w, TiledQArray):
        return w.layout
    if isinstance(w, QArray):
        return native_layout(w)
    raise TypeError(f"no packed-code layout for {type(w).__name__}")


def grid_values_at(q: QArray | TiledQArray, flat_index: jax.Array) -> jax.Array:
    """fp32 grid (non-outlier) weights at flat storage-order indices of the [K, N] matrix."""
    qa = q.to_qarray() if isinstance(q, TiledQArray) else q
    k, n = qa.shape
    rows, cols = flat_index // n, flat_index % n
    bit = rows * qa.bits
    word, off = bit // 32, (bit % 32).astype(jnp.uint32)
    padded = jnp.concatenate([qa.codes, jnp.zeros((1, n), jnp.uint32)])
    lo = padded[word, cols] >> off
    hi = jnp.where(off > 0, padded[word + 1, cols] << ((32 - off) % 32), 0)
    code = ((lo | hi) & jnp.uint32((1 << qa.bits) - 1)).astype(jnp.int32)
    group = jnp.minimum(rows // qa.group_size, qa.num_groups - 1)

    def per_group(a):
        if a.shape[0] == 1 and a.shape[1] == 1:
            return a[0, 0].astype(jnp.float32)
        if a.shape[0] == 1:
            return a[0, cols].astype(jnp.float32)
        return a[group, cols].astype(jnp.float32)

    if qa.codebook is not None:
        cb = qa.codebook.astype(jnp.float32)
        w = cb[jnp.where(cb.shape[0] == 1, 0, cols), code]
    else:
        zero = per_group(qa.zero) if qa.zero is not None else np.float32(2 ** (qa.bits - 1))
        w = code.astype(jnp.float32) - zero
    if qa.scale is not None:
        w = w * per_group(qa.scale)
    return w


def _register():
    from jaxcompress.io.checkpoint import register_leaf_type
    from jaxcompress.ops.linear import register_linear
    from jaxcompress.quant.kernels_dispatch import quantized_linear

    register_leaf_type(TiledQArray)  # checkpoints restore it
    register_linear(TiledQArray)(quantized_linear)  # linear() takes the same path as for QArray


_register()
