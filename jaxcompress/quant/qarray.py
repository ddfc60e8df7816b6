"""`QArray`: a quantized `[K, N]` weight (K = input features, N = output features).

Invariant (what `dequantize()` computes, the reference every kernel must equal):

* `codes` is uint32 `[ceil(K * bits / 32), N]`: for each output column n, the K codes form a
  little-endian bit stream; code i occupies bits [i * bits, (i + 1) * bits) of that stream, so
  3-, 5- and 6-bit codes straddle words (dense packing, no padding to a byte). For 2, 4 and 8
  bits this is the usual "32 / bits codes per word, lowest bits first".
* Storage row i holds input feature `perm[i]` when `perm` (act-order) is set, else feature i.
* Row i belongs to group `i // group_size` (`group_size == K` means per output channel); when
  the group size does not divide K, the last group is narrower. `scale` and `zero` are
  `[num_groups, N]`; per-tensor quantization stores them as `[1, 1]`.
* Uniform grid: w = (code - zero) * scale, with `zero` (integer-valued, in scale's dtype) only
  for asymmetric grids; symmetric grids have zero = 2**(bits-1) folded into the same formula
  (the code is offset-binary), so `zero` is None and the offset is implied.
* Non-uniform grid (SqueezeLLM, NF4): w = codebook[n, code] (times `scale` if present).
* Dense-and-sparse outliers: `outlier_index` (flat indices into the [K, N] storage-order
  matrix) get exactly `outlier_value`, overriding the grid.

`dequantize()` returns the dense `[K, N]` weight in the original feature order.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


def num_words(k: int, bits: int) -> int:
    return -(-k * bits // 32)


@functools.partial(jax.jit, static_argnames=("bits",))  # one compiled program per shape, not one per op
def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """[K, N] integer codes in [0, 2**bits) -> uint32 [ceil(K * bits / 32), N] bit streams."""
    k, n = codes.shape
    codes = codes.astype(jnp.uint32)
    words = num_words(k, bits)
    bit = np.arange(k, dtype=np.int64) * bits
    word_lo, off = bit // 32, (bit % 32).astype(np.uint32)
    lo = codes << jnp.asarray(off)[:, None]
    out = jnp.zeros((words + 1, n), jnp.uint32).at[word_lo].add(lo)  # disjoint bits: add == or
    spill = off + bits > 32
    if spill.any():
        rows = np.nonzero(spill)[0]
        hi = codes[rows] >> jnp.asarray(32 - off[rows])[:, None]
        out = out.at[word_lo[rows] + 1].add(hi)
    return out[:words]


@functools.partial(jax.jit, static_argnames=("bits", "k"))
def unpack_codes(packed: jax.Array, bits: int, k: int) -> jax.Array:
    """Inverse of `pack_codes`: uint32 bit streams -> int32 codes [K, N]."""
    bit = np.arange(k, dtype=np.int64) * bits
    word_lo, off = bit // 32, (bit % 32).astype(np.uint32)
    padded = jnp.concatenate([packed, jnp.zeros((1, packed.shape[1]), jnp.uint32)], axis=0)
    lo = padded[word_lo] >> jnp.asarray(off)[:, None]
    # For a code that straddles, the high bits come from the next word (shift < 32 guaranteed).
    shift_hi = np.where(off > 0, 32 - off, 0).astype(np.uint32)
    hi = jnp.where(jnp.asarray(off > 0)[:, None], padded[word_lo + 1] << jnp.asarray(shift_hi)[:, None], 0)
    return ((lo | hi) & jnp.uint32((1 << bits) - 1)).astype(jnp.int32)


def group_index(k: int, group_size: int) -> np.ndarray:
    """[K] group of each storage row."""
    return np.arange(k) // group_size


def check_quant_args(bits: int, group_size: int, k: int, where: str = "") -> None:
    """Validates bits and group size for a [K, N] weight; `where` names the layer."""
    prefix = f"{where}: " if where else ""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"{prefix}bits={bits} is not supported; choose one of {SUPPORTED_BITS}")
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or group_size <= 0:
        raise ConfigError(f"{prefix}group_size={group_size!r} must be a positive integer "
                          f"(or -1 for per-channel)")
    if group_size > k:
        raise ConfigError(f"{prefix}group_size={group_size} is larger than the input dimension {k}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
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

    @classmethod
    def from_codes(cls, codes: jax.Array, scale: jax.Array | None, zero: jax.Array | None = None, *,
                   bits: int, group_size: int, dtype, perm: jax.Array | None = None,
                   codebook: jax.Array | None = None, outlier_index: jax.Array | None = None,
                   outlier_value: jax.Array | None = None) -> "QArray":
        """Packs integer codes [K, N] (storage order) with their grid into a QArray.

        `scale`/`zero` are [num_groups, N], [1, N] (per channel) or [1, 1] (per tensor);
        `zero` None means symmetric (implied 2**(bits-1)). Checks the shapes against the
        invariant so that a malformed QArray never leaves the quantizer.
        """
        k, n = codes.shape
        check_quant_args(bits, group_size, k)
        groups = math.ceil(k / group_size)
        for name, x in (("scale", scale), ("zero", zero)):
            if x is not None and tuple(x.shape) not in ((groups, n), (1, n), (1, 1)):
                raise ValueError(f"QArray {name} has shape {tuple(x.shape)}; expected ({groups}, {n}), "
                                 f"(1, {n}) or (1, 1) for K={k}, group_size={group_size}")
        if codebook is not None and tuple(codebook.shape) != (n, 2 ** bits):
            raise ValueError(f"QArray codebook has shape {tuple(codebook.shape)}, expected ({n}, {2 ** bits})")
        if perm is not None and tuple(perm.shape) != (k,):
            raise ValueError(f"QArray perm has shape {tuple(perm.shape)}, expected ({k},)")
        return cls(codes=pack_codes(codes, bits), scale=scale, zero=zero,
                   perm=None if perm is None else perm.astype(jnp.int32), codebook=codebook,
                   outlier_index=outlier_index, outlier_value=outlier_value, bits=bits,
                   group_size=int(group_size), shape=(int(k), int(n)), dtype=jnp.dtype(dtype).name)

    @property
    def num_groups(self) -> int:
        return math.ceil(self.shape[0] / self.group_size)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def ndim(self) -> int:
        return 2

    def unpacked_codes(self) -> jax.Array:
        """int32 codes [K, N] in storage order."""
        return unpack_codes(self.codes, self.bits, self.shape[0])

    def dequantize_storage_order(self) -> jax.Array:
        """fp32 [K, N] weight with rows in storage order (act-order permuted if `perm`)."""
        k, n = self.shape
        q = self.unpacked_codes()
        if self.codebook is not None:
            w = jnp.take_along_axis(self.codebook.astype(jnp.float32).T, q, axis=0)
        else:
            zero = (self.zero.astype(jnp.float32) if self.zero is not None
                    else jnp.float32(2 ** (self.bits - 1)))
            w = q.astype(jnp.float32) - self._per_row(zero)
        if self.scale is not None:
            w = w * self._per_row(self.scale.astype(jnp.float32))
        if self.outlier_index is not None:
            w = w.reshape(-1).at[self.outlier_index].set(self.outlier_value.astype(jnp.float32)).reshape(k, n)
        return w

    def _per_row(self, x):
        """Broadcasts a [G, N] (or [1, 1]) group tensor to [K, N] rows."""
        if not hasattr(x, "ndim") or x.ndim == 0 or x.shape[0] == 1:
            return x
        return x[jnp.asarray(group_index(self.shape[0], self.group_size))]

    def dequantize(self) -> jax.Array:
        """The dense [K, N] weight in original feature order, in `dtype`."""
        return _dequantize(self)

    def _dequantize(self) -> jax.Array:
        w = self.dequantize_storage_order()
        if self.perm is not None:
            w = jnp.zeros_like(w).at[self.perm].set(w)
        return w.astype(self.dtype)

    def nbytes(self) -> int:
        """Exact storage bytes of every array the weight keeps."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / (self.shape[0] * self.shape[1])


_dequantize = jax.jit(QArray._dequantize)  # eager callers get one program, traced callers inline it


def _register():
    from jaxcompress.io.checkpoint import register_leaf_type

    register_leaf_type(QArray)


_register()


def concat_columns(parts, where: str = ""):
    """One quantized weight whose output columns are those of `parts`, side by side.

    For fusing projections that read the same input (q | k | v, gate | up) into one matmul.
    Works for any leaf with QArray's fields and meaning (QArray, TiledQArray). The parts must
    agree on type, bits, group size, K, dtype, act-order `perm` and (tiled) rows; per-tensor or
    per-channel scales are broadcast to the widest grouping among them, and a symmetric part
    joining asymmetric ones gets its implied zero 2**(bits-1) written out.
    """
    prefix = f"{where}: " if where else ""
    first = parts[0]
    fields = ("bits", "group_size", "dtype", "rows")

    def signature(q):
        return (type(q).__name__, q.shape[0], q.codebook is None,
                None if q.scale is None else jnp.dtype(q.scale.dtype).name, *(getattr(q, f, None) for f in fields))

    for q in parts[1:]:
        if signature(q) != signature(first):
            raise ConfigError(
                f"{prefix}cannot fuse quantized weights that differ in layout: "
                f"(type, K, no codebook, scale dtype, bits, group size, dtype, rows) = "
                f"{signature(first)} vs {signature(q)}; quantize them alike or leave them unfused")
    perms = [None if q.perm is None else np.asarray(q.perm) for q in parts]
    if any(p is None for p in perms) != all(p is None for p in perms) or (
            perms[0] is not None and not all(np.array_equal(perms[0], p) for p in perms[1:])):
        raise ConfigError(f"{prefix}cannot fuse weights with different act-order permutations "
                          f"(their input rows are stored in different orders)")
    widths = [q.shape[1] for q in parts]
    n = sum(widths)
    any_zero = any(q.zero is not None for q in parts)
    group_rows = max(1 if q.scale is None else q.scale.shape[0] for q in parts)

    def grid(q, x, fill, dtype):
        """q's [G, n_q] group tensor x (or its implied value `fill`), broadcast to group_rows."""
        if x is None:
            x = jnp.full((1, 1), fill, dtype)
        return jnp.broadcast_to(x, (group_rows, q.shape[1]))

    scale = None
    if first.scale is not None:
        scale = jnp.concatenate([grid(q, q.scale, 1, None) for q in parts], axis=1)
    zero = None
    if any_zero:
        zero_dtype = next(q.zero.dtype for q in parts if q.zero is not None)
        zero = jnp.concatenate([grid(q, q.zero, 2 ** (q.bits - 1), zero_dtype) for q in parts], axis=1)
    codebook = None if first.codebook is None else jnp.concatenate([q.codebook for q in parts], axis=0)
    outlier_index = outlier_value = None
    if any(q.outlier_index is not None for q in parts):
        index, value, offset = [], [], 0
        for q, width in zip(parts, widths):
            if q.outlier_index is not None:
                row, col = jnp.divmod(q.outlier_index, width)  # flat [K, n_q] -> [K, n]
                index.append((row * n + col + offset).astype(q.outlier_index.dtype))
                value.append(q.outlier_value)
            offset += width
        outlier_index, outlier_value = jnp.concatenate(index), jnp.concatenate(value)
    return dataclasses.replace(
        first, codes=jnp.concatenate([q.codes for q in parts], axis=1), scale=scale, zero=zero,
        codebook=codebook, outlier_index=outlier_index, outlier_value=outlier_value,
        shape=(first.shape[0], n))
