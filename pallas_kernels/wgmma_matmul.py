"""W4 (and W8, W3, W2) weights x bf16/fp16 activations on Hopper tensor cores, loads decoupled from arithmetic (Mosaic GPU).

The Triton kernels of `quant_matmul` load each step's code words into registers and convert them
there, so a warp's loads and its arithmetic take turns, and at batch 8-32 their tensor-core path
converts every tile in registers for `tl.dot` (kernel_notes.md runs 10-12). This kernel streams
the codes with TMA into a ring of shared-memory stages (`plgpu.emit_pipeline`), so several steps
of loads are in flight while the warpgroup converts and multiplies the current one, and it hands
the multiply to `wgmma` at every batch:

    y^T [N, M] = W^T [N, K] @ x^T [K, M]      (weights are the left operand, "swap AB")

so the weight tile is the A operand, fed from registers (wgmma's M = 64 output features a
warpgroup), and the activations, zero-filled to 8 rows by TMA or padded to a multiple of 8, are
the B operand in shared memory (wgmma's N = 8 .. 256).

**Layout** (`repack_w4`, once per weight). The A fragment of a bf16 wgmma holds, per thread and
row, the columns {8c + 2q, 8c + 2q + 1 : c = 0..3} of each 32-column chunk (q = lane % 4). The
cheapest shared-memory load of 4-bit codes (`WGMMA_LAYOUT_UPCAST_4X`) gives the same thread the
*contiguous* columns 8q .. 8q + 7 of that row as one 32-bit word. The repack stores each logical
column where the converted word, cut into four bf16 pairs, *is* the A fragment (no shuffle, no
permute); `chunk_permutation` gives the map of each conversion order. With `block_k` every
64 x block_k tile a step reads is one contiguous run of memory.

**Grid** (`W4Config`): the weight's N in tiles of `tile_n` rows (a multiple of 64), K in `splits`
slices, and the batch in tiles of `tile_m` rows where it has more. Each program runs a pipeline
over its K slice in steps of `tile_k` columns (a multiple of 128 and of the group size below it),
`stages` steps in flight. The split-K partial sums meet
inside the kernel (`split_sum="cluster"`): a tile's splits form a thread-block cluster, the others
send their fp32 sums into the first program's shared memory (st.async), and it stores y [M, N] in
x's dtype itself, so nothing runs beside the kernel. Or XLA adds fp32 partial sums after it ("xla").
Large batches (`gemm_config`, past DECODE_MAX_M rows) are compute-bound: a memory warpgroup feeds
two compute warpgroups of 64 weight rows (`warp_specialized`), each step is 128 columns of the
stored 256-column blocks, and the batch tile and split count come from a cost model fitted to run 17.

**Arithmetic**: w = s * (code - zero). The conversion gives c' = code - 8 in bf16; an asymmetric
grid's integer zero point is subtracted from it, c' - (zero - 8) = code - zero, still exact in
bf16 (one sub a pair, as Marlin does). Each group's (code - zero) x products are summed by wgmma
in an fp32 accumulator of their own, which is multiplied by the group's scale in fp32
(`scale_on_acc`; the alternative multiplies every bf16 pair by a bf16 scale). fp16 activations
multiply in fp16 with the "lop3" order (`compute_dtype`), everything else in bf16.

Measured on an H100 (kernel_notes.md runs 13-15): 1.3-2.9x XLA's bf16 matmul at batch 8-32 on
the Llama shapes, 1.15-1.6x at 64; at batch 1 1.94-2.73x (symmetric g128), level with or ahead of
the Triton GEMV on 4096 x 14336 and 4096 x 22016 and behind it on the other shapes. On an H200
(run 16; XLA's bf16 is about 1.35x faster there, this kernel barely): 1.3-2.3x XLA's bf16 at
batch 1 and 8 on the Llama shapes (3.8x on 4096 x 1024 at batch 1, where XLA's own GEMV is slow),
0.85-1.16x the Triton GEMV at batch 1 and 1.3-2.6x the Triton kernels at batch 8. At batches
64-512 on the H200 (runs 17-18): 1.03-1.77x XLA's bf16 at 64-128 rows, 0.76-1.25x at 256-512 (the
asymmetric grids and the shapes whose tiles make uneven waves lowest), and 3.8-17x faster than the
dequantize-then-dot that ran there before. 8- and 2-bit codes (`W4Weight.bits`) take the same
pipeline: 8-bit ones as int8 in a byte order whose converted words are the fragment (`byte_permutation`),
2-bit ones as int4 pairs with eight lop3 pairs a word (`crumb_permutation`); on an H200 (run 21) W8 per
channel ran 1.30-1.43x XLA's bf16 at batch 8 and W2 g128 1.88-2.32x, 4-6x faster than the QArrays'
Triton path there, and 3-17% slower than their tuned GEMV at batch 1. 3-bit codes travel in two int4
planes, the low two bits and the third bits (`split_planes`), joined into each 4-bit word by one lop3;
on an H200 (run 22) W3 g128 ran 1.66-2.15x XLA's bf16 at batch 1 (3.87x on 4096 x 1024), 1.29-2.00x at
2-32 rows, and 1.26-1.31x faster than its tuned Triton GEMV at batch 1 (the three shapes its table
holds). CPU tests check
the repack and the kernel's arithmetic in plain JAX (`emulate_w4`) and lower the kernel for CUDA;
the kernel itself runs in `tests/gpu/test_wgmma_matmul_gpu.py` on an H100/H200.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.quant.qarray import QArray, unpack_codes

CHUNK = 32  # columns of one UPCAST_4X word row: the unit of the repack's permutation


ORDERS = ("lop3", "prmt")  # 4-bit column orders
ORDERS_8 = ("paired", "natural")  # 8-bit column orders (`byte_permutation`)
ORDERS_2 = ("lop3",)  # 2-bit column order (`crumb_permutation`)
ORDERS_3 = ("lop3",)  # 3-bit: the 4-bit lop3 column order, the codes split in two planes (`split_planes`)
BITS = (2, 3, 4, 8)
SEGMENT = 16  # columns of one UPCAST_2X row segment: the unit of the 8-bit permutation
CHUNK2 = 64  # 2-bit columns of one UPCAST_4X word row (16 codes a thread): the 2-bit permutation's unit


def orders_of(bits: int) -> tuple[str, ...]:
    """The column orders a `bits`-wide code can be stored in; the first is the default."""
    return {2: ORDERS_2, 3: ORDERS_3, 4: ORDERS, 8: ORDERS_8}[bits]


def plane_divisors(bits: int) -> tuple[int, ...]:
    """Codes an element of each stored plane: `codes`, then (3-bit) `high`. 2-bit codes travel in pairs
    as int4 (TMA and the UPCAST_4X load know int4), as do the low two bits of 3-bit codes, whose third
    bits go four an int4; 4- and 8-bit codes one an element."""
    return {2: (2,), 3: (2, 4)}.get(bits, (1,))


def split_planes(phys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """3-bit codes [N, K] (0..7) in the 4-bit lop3 column order -> (low [N, K / 2], high [N, K / 4]),
    int4 element values 0..15 (K a multiple of 128).

    The kernel builds each 32-column chunk's 4-bit word (its nibbles the codes, `chunk_permutation`)
    from one low and one high register with one lop3, (low' & 0x33333333) | (high' & 0xCCCCCCCC),
    and converts it as 4-bit codes whose mask drops the nibbles' top bit:
    * low element e of 32-element chunk l: the low two bits of 4-bit chunks 2l (bits 0-1) and 2l + 1
      (bits 2-3) at column e (low' = the register, or it shifted right by 2);
    * high element e of 32-element chunk h: bit j = the third bit of chunk 4h + j at column e
      (high' = the register shifted so that bit j of each nibble lands on bit 2)."""
    n, k = phys.shape
    pairs = phys.reshape(n, k // 64, 2, 32)
    low = (pairs[:, :, 0] & 3) | ((pairs[:, :, 1] & 3) << 2)
    third = (phys >> 2).reshape(n, k // 128, 4, 32)
    high = sum(third[:, :, j] << j for j in range(4))
    return low.reshape(n, k // 2), high.reshape(n, k // 4)


def join_planes(low: jax.Array, high: jax.Array) -> jax.Array:
    """Inverse of `split_planes`: the element values (any int dtype; only their low 4 bits count)."""
    n = low.shape[0]
    lo = low.astype(jnp.int32).reshape(n, -1, 1, 32)
    lo = jnp.concatenate([lo & 3, (lo >> 2) & 3], axis=2).reshape(n, -1)
    hi = high.astype(jnp.int32).reshape(n, -1, 1, 32)
    hi = jnp.concatenate([(hi >> j) & 1 for j in range(4)], axis=2).reshape(n, -1)
    return lo | (hi << 2)


def crumb_permutation() -> np.ndarray:
    """perm[p] = the logical column stored at physical column p of a 64-column chunk (2-bit codes).

    UPCAST_4X hands thread q its 32-bit word: 2-bit slots i = 0..15 at bits 2i, physical columns
    16q + i. Register c (c = 0..7) of the wgmma fragment is slots (c, c + 8): ((w >> 2c) & 0x00030003)
    | magic, one shift and one lop3 a pair; it must hold logical (8c + 2q, 8c + 2q + 1)."""
    p = np.arange(CHUNK2)
    q, i = p // 16, p % 16
    return 8 * (i % 8) + 2 * q + i // 8


def chunk_permutation(order: str = "lop3") -> np.ndarray:
    """perm[p] = the logical column stored at physical column p of a 32-column chunk.

    A thread's word holds physical columns 8q + i (i = 0..7); the wgmma fragment wants, for
    c = 0..3, the pair of logical columns (8c + 2q, 8c + 2q + 1) in its c-th register.
    * "lop3" (`_convert_lop3`): register c = nibbles (c, c + 4) of the word, one shift and one
      lop3 a pair; so physical 8q + i holds logical 8 (i % 4) + 2q + i // 4.
    * "prmt" (Mosaic GPU's int4 -> bf16 `astype`): register c = nibbles (2c, 2c + 1); so
      physical 8q + 2c + j holds logical 8c + 2q + j.
    """
    p = np.arange(CHUNK)
    q, i = p // 8, p % 8
    if order == "lop3":
        return 8 * (i % 4) + 2 * q + i // 4
    if order == "prmt":
        return 8 * (i // 2) + 2 * q + i % 2
    raise ConfigError(f"chunk_permutation: order={order!r}; choose one of {ORDERS}")


def column_permutation(bits: int, order: str) -> np.ndarray:
    """The stored column order of `bits`-wide codes within their unit (its length): 32-column chunks
    (4-bit), 16-column segments (8-bit) or 64-column chunks (2-bit)."""
    if bits == 8:
        return byte_permutation(order)
    return crumb_permutation() if bits == 2 else chunk_permutation(order)  # 3-bit: the 4-bit lop3 order


def byte_permutation(order: str = "paired") -> np.ndarray:
    """perm[p] = the logical column stored at physical column p of a 16-column segment (8-bit codes).

    WGMMA_LAYOUT_UPCAST_2X gives thread q (= lane % 4) of a row the 4 contiguous bytes at physical
    columns 4b .. 4b + 3 with b = (0, 2, 1, 3)[q]; the bf16 wgmma fragment wants the pairs (2q, 2q + 1)
    and (8 + 2q, 9 + 2q).
    * "paired": those bytes hold exactly that, so the converted register is the fragment itself;
    * "natural": the identity, which Mosaic GPU's relayout puts in place with a shuffle and a prmt
      a word."""
    p = np.arange(SEGMENT)
    if order == "natural":
        return p
    if order != "paired":
        raise ConfigError(f"byte_permutation: order={order!r}; choose one of {ORDERS_8}")
    q, i = np.array([0, 2, 1, 3])[p // 4], p % 4
    return np.where(i < 2, 2 * q + i, 8 + 2 * q + i - 2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class W4Weight:
    """A 4-bit (or 2- or 8-bit: `bits`) `[K, N]` weight laid out for `w4_matmul` (see the module docstring).

    codes: int4 `[N, K]`, columns permuted within each 32-column chunk (`chunk_permutation`);
    "prmt" order stores code - 8, "lop3" order the code's own bits (0..15 read as int4).
    8-bit: int8 `[N, K]` holding code - 128, columns permuted within 16-column segments
    (`byte_permutation`: "paired" or "natural"). 2-bit: int4 `[N, K / 2]`, each element two codes
    (the lower column in its low bits), columns permuted within 64-column chunks (`crumb_permutation`).
    3-bit: in the 4-bit lop3 order, split in two planes (`split_planes`): `codes` int4 `[N, K / 2]`
    holds the low two bits, `high` int4 `[N, K / 4]` the third bits.
    With `block_k`, stored blocked `[N / 64, K / block_k, 64, block_k / codes an element]`, so that each
    64 x block_k tile a pipeline step reads is one contiguous run of memory.
    scale: `[G, N]` in the QArray's scale dtype (G = K / group_size). zero: the QArray's
    integer-valued `[G, N]` zero points (asymmetric grids), or None (symmetric: 2**(bits-1) implied).
    stored_k: 0, or a K past the logical one up to which codes, scales and zero points are stored
    as zeros (`padded_k`), so that the kernel's steps split K evenly; the kernel reads x's
    columns past K as zeros (TMA fills out-of-bounds reads with zeros).
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    group_size: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    order: str = dataclasses.field(default="lop3", metadata=dict(static=True))
    block_k: int = dataclasses.field(default=0, metadata=dict(static=True))
    dtype: str = dataclasses.field(default="bfloat16", metadata=dict(static=True))
    stored_k: int = dataclasses.field(default=0, metadata=dict(static=True))
    bits: int = dataclasses.field(default=4, metadata=dict(static=True))
    high: jax.Array | None = None  # 3-bit codes' third bits (`split_planes`); None otherwise

    @property
    def mid(self) -> int:
        """The symmetric grid's implied zero point, 2**(bits-1): what the stored codes are offset by."""
        return 1 << (self.bits - 1)

    @property
    def k_stored(self) -> int:
        """The K the kernel steps over: the logical K, or `stored_k` where zeros pad it."""
        return self.stored_k or self.shape[0]

    def nbytes(self) -> int:
        """Exact storage bytes: bits / 8 a code (int4 packs two a byte on the GPU), the rest."""
        parts = [self.scale] + ([self.zero] if self.zero is not None else [])
        return self.k_stored * self.shape[1] * self.bits // 8 + sum(int(x.size) * x.dtype.itemsize for x in parts)

    def group_scales(self) -> jax.Array:
        """fp32 `[G, N]` scales of the logical K's groups (the padding's zeros dropped)."""
        return self.scale.astype(jnp.float32)[:max(self.shape[0] // self.group_size, 1)]

    def dequantize(self) -> jax.Array:
        """The dense `[K, N]` weight: (code - zero) * s in fp32 (as `QArray.dequantize`), cast to `dtype`."""
        w = self.centered_codes().astype(jnp.float32)
        return (w * jnp.repeat(self.group_scales(), self.group_size, axis=0)).astype(self.dtype)

    def centered_codes(self) -> jax.Array:
        """int32 `[K, N]` code - zero (code - mid if symmetric): what the kernel multiplies."""
        c = self.logical_codes()
        if self.zero is None:
            return c
        return c - jnp.repeat(self.zero.astype(jnp.int32) - self.mid, self.group_size, axis=0)[:self.shape[0]]

    def logical_codes(self) -> jax.Array:
        """int32 `[K, N]` codes - mid in the original column order (tests, `emulate_w4`)."""
        (k, n), ks = self.shape, self.k_stored
        unblock = lambda a: a.transpose(0, 2, 1, 3).reshape(n, -1) if self.block_k else a  # noqa: E731
        c = unblock(self.codes.astype(jnp.int32))
        if self.bits == 2:  # two codes an int4 element, the lower column in the low bits
            c = jnp.stack([c & 3, (c >> 2) & 3], axis=-1).reshape(n, ks)
        elif self.bits == 3:
            c = join_planes(c, unblock(self.high.astype(jnp.int32)))
        perm = column_permutation(self.bits, self.order)
        c = c.T.reshape(-1, len(perm), n)[:, np.argsort(perm)].reshape(ks, n)[:k]
        if self.bits == 8 or self.order == "prmt":  # stored as code - mid
            return c
        return (c & ((1 << self.bits) - 1)) - self.mid  # stored as the code's own bits


def repack_problem(w: QArray) -> str | None:
    """Why `w` cannot be repacked for `w4_matmul`, or None if it can."""
    k, n = w.shape
    if w.bits not in BITS:
        return f"bits={w.bits} (the wgmma kernel reads 2-, 3-, 4- and 8-bit codes)"
    if w.codebook is not None or w.perm is not None or w.outlier_index is not None:
        return "a codebook, act-order permutation or outliers (uniform grids in storage order only)"
    if w.scale.shape == (1, 1):
        return "per-tensor scale"
    if (w.zero is not None and not isinstance(w.zero, jax.core.Tracer)
            and not bool(jnp.all(w.zero == jnp.round(w.zero)))):
        return "zero points that are not integers (the kernel subtracts them from the codes in bf16)"
    grouped = w.scale.shape[0] > 1
    if grouped and w.scale.shape[0] * w.group_size != k:
        return f"group_size={w.group_size} does not divide K={k}"
    if grouped and (w.group_size < 32 or (w.group_size % 128 and 128 % w.group_size)):
        return f"group_size={w.group_size} (groups of 32, 64, 128, 256, ... or per channel)"
    if k % 128:
        return f"K={k} is not a multiple of 128 (the kernel's 128-column steps)"
    if w.bits in (2, 3) and grouped and w.group_size < 128:
        return f"group_size={w.group_size} with {w.bits}-bit codes (groups of 128 or more, or per channel)"
    if n % 64:
        return f"N={n} is not a multiple of 64 (wgmma's 64 rows a warpgroup)"
    return None


def repack_w4(w: QArray, *, order: str | None = None, block_k: int = 0, stored_k: int = 0) -> W4Weight:
    """One-time repack of a 2-, 4- or 8-bit `QArray` into the layout `w4_matmul` reads; `stored_k` pads
    K with zero codes, scales and zero points (`padded_k`). `order`: one of `orders_of(w.bits)`; None
    takes the first."""
    if (problem := repack_problem(w)) is not None:
        raise ConfigError(f"repack_w4: cannot lay out this weight for the wgmma kernel: {problem}")
    orders = orders_of(w.bits)
    order = order or orders[0]
    if order not in orders:
        raise ConfigError(f"repack_w4: order={order!r} for {w.bits}-bit codes; choose one of {orders}")
    k, n = w.shape
    ks = stored_k or k
    if block_k and (block_k % 128 or ks % block_k):
        raise ConfigError(f"repack_w4: block_k={block_k} must be a multiple of 128 dividing K={ks}")
    groups = w.scale.shape[0]
    group_size = k // groups
    if ks != k and (ks < k or ks % max(group_size, 128) or groups == 1):
        raise ConfigError(f"repack_w4: stored_k={ks} must exceed K={k} by whole groups of {group_size} "
                          "(multiples of 128), and the scales must be grouped (not per channel)")
    pad = ((0, ks // group_size - groups), (0, 0))
    # fp32 / fp16 / bf16 scales: the kernel scales the group sums in fp32; the padding's are zero
    scale = jnp.pad(w.scale, pad) if ks != k else w.scale
    zero = jnp.pad(w.zero, pad) if ks != k and w.zero is not None else w.zero
    codes, *high = _layout_codes(w.codes, k, order, block_k, ks, w.bits)
    return W4Weight(codes=codes, scale=scale, zero=zero, group_size=group_size, shape=(k, n), order=order,
                    block_k=block_k, dtype=w.dtype, stored_k=stored_k if ks != k else 0, bits=w.bits,
                    high=high[0] if high else None)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))  # one program per shape: a 7B model repacks in seconds
def _layout_codes(words: jax.Array, k: int, order: str, block_k: int, stored_k: int, bits: int = 4) -> tuple[jax.Array, ...]:
    """The stored planes of the codes: (codes,), or (low, high) for 3-bit ones."""
    n = words.shape[1]
    codes = jnp.pad(unpack_codes(words, bits, k), ((0, stored_k - k), (0, 0)))  # [K stored, N] in 0 .. 2**bits - 1
    k = stored_k
    perm = column_permutation(bits, order)
    codes = codes[np.arange(k).reshape(-1, len(perm))[:, perm].reshape(-1)].T  # [N, K], physical column order
    if bits == 8:  # code - 128 as int8
        planes = [codes - 128]
    elif bits == 2:  # two codes an int4 element, the lower column in the low bits
        planes = [codes[:, 0::2] | (codes[:, 1::2] << 2)]
    elif bits == 3:
        planes = list(split_planes(codes))
    else:  # int4 holds the bits: code - 8 for "prmt" (signed, Mosaic's conversion); the raw code for "lop3"
        planes = [codes - 8 if order == "prmt" else codes]
    if bits != 8 and order != "prmt":  # raw bits 0..15 read as int4
        planes = [jnp.where(p >= 8, p - 16, p) for p in planes]
    out = []
    for plane, per in zip(planes, plane_divisors(bits)):
        signed = plane.astype(jnp.int8)  # [N, K / codes an element]
        if block_k:
            signed = signed.reshape(n // 64, 64, k // block_k, block_k // per).transpose(0, 2, 1, 3)
        out.append(signed if bits == 8 else signed.astype(jnp.int4))
    return tuple(out)


def emulate_w4(x: jax.Array, w: W4Weight, offset_on_acc: bool = False) -> jax.Array:
    """The kernel's arithmetic in plain JAX: x in the compute dtype (`compute_dtype`), exact
    (code - zero) x products summed per group in fp32, each group sum times its fp32 scale.
    offset_on_acc: as `W4Config.offset_on_acc`, the sums of (base + code) x less (base + zero)
    times the group's sum of x, in fp32."""
    m, (k, n) = x.shape[0], w.shape
    dtype = compute_dtype(x.dtype, w)
    xb = x.astype(dtype).astype(jnp.float32).reshape(m, k // w.group_size, w.group_size)
    codes = w.centered_codes().astype(jnp.float32).reshape(k // w.group_size, w.group_size, n)
    if offset_on_acc:
        zero = w.zero.astype(jnp.float32)[:k // w.group_size] if w.zero is not None else float(w.mid)
        offset = LOP3_MAGIC[dtype][1] + jnp.broadcast_to(zero, (k // w.group_size, n))  # base + zero
        raw = jnp.einsum("mgk,gkn->mgn", xb, codes + offset[:, None], precision="highest")  # base + code
        sums = raw - xb.sum(-1)[..., None] * offset
    else:
        sums = jnp.einsum("mgk,gkn->mgn", xb, codes, precision="highest")
    y = jnp.einsum("mgn,gn->mn", sums, w.group_scales(), precision="highest")
    return y.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class W4Config:
    """Tiles and pipeline of one `w4_matmul` call (see the module docstring's Grid)."""

    tile_n: int = 64
    tile_k: int = 128
    splits: int = 1
    stages: int = 4
    scale_on_acc: bool = True  # each group into its own accumulator, scaled in fp32 (no bf16 mul a pair)
    # A memory warpgroup issues the TMA copies while tile_n / rows_per_wg compute warpgroups multiply,
    # so no warpgroup waits for its own loads (emit_pipeline_warp_specialized). Slower at batch 1
    # (kernel_notes run 14: 22.9 against 16.5 us on 4096 x 14336), so off in the decode configs; on
    # in `gemm_config`, where two compute warpgroups share each x tile (run 17).
    warp_specialized: bool = False
    loads_only: bool = False  # probe: the pipeline's loads without the arithmetic (output is zero)
    # Where the split-K partial sums meet (`split_sum_of`): "cluster" makes the splits of a tile one
    # thread-block cluster; each sends its fp32 sum into the first one's shared memory, which adds
    # them and stores y [M, N] in x's dtype itself. "xla" writes fp32 partial sums [splits, N, M] for
    # XLA to sum and transpose beside the kernel: one more kernel a call, 1.2-1.8 us on an H100
    # (kernel_notes runs 13, 14). None: the measured rule of `split_sum_of`.
    split_sum: str | None = None
    # One accumulator carried through the whole pipeline, the codes scaled in bf16 (no scale_on_acc):
    # each step issues its wgmmas and waits only for the previous step's, so the tensor cores work on
    # while the warpgroup loads and converts the next step (x's slot is released a step late, since
    # wgmma reads it from shared memory). Without it every step reads its group sums back and waits.
    # Correct on an H200 but 2-13% slower than the default on all 28 points timed (kernel_notes run 16),
    # so off: the wait on each step's wgmma is not what holds batch 1 back.
    overlap_mma: bool = False
    # The codes enter the tensor cores as base + code (the lop3 conversion without its sub, and no
    # zero-point sub), and each group's fp32 sum is corrected by (base + zero) times the group's sum
    # of x, which a wgmma of a ones tile gives: w x = s (sum (base + c) x - (base + z) sum x).
    # Two fewer instructions a weight pair (one for symmetric grids); lop3 order, scale_on_acc.
    # Correct on an H200 but slower on all 24 points timed (kernel_notes run 16): 4-13% asymmetric,
    # 10-44% symmetric. The second wgmma a group costs more than the instructions it saves.
    offset_on_acc: bool = False
    # Batch rows a program multiplies (wgmma's N, a multiple of 8 up to 256): 0 takes the whole padded
    # batch in one program; otherwise the grid tiles the batch, so prefill-sized batches run too.
    tile_m: int = 0
    # Warp-specialized only: weight rows each compute warpgroup multiplies, in 64-row wgmma blocks
    # (tile_n / rows_per_wg compute warpgroups, at most 2). 128 halves how often x's tile is read
    # from shared memory a weight row, which large batches need (`gemm_config`).
    rows_per_wg: int = 64
    # The conversion's and-or (`(word & mask) | magic`, and the 3-bit planes' join) written as one PTX
    # lop3 each: from arith's and + or ptxas emits two LOP3, as mask and magic are two 32-bit
    # immediates (kv_notes run 21's SASS of the same conversion). H200, kernel_notes run 23, batch 1:
    # W4 12.45 against 14.32 us on 4096 x 14336, W3 12.72 against 15.49, W2 11.11 against 12.73.
    # None: wherever the weight has that conversion (2-, 3- and 4-bit codes in the lop3 order, `lop3_of`);
    # False: arith's and + or.
    lop3: bool | None = None


SPLIT_SUMS = ("cluster", "xla")
MAX_CLUSTER = 8  # the portable thread-block cluster size
# Measured on an H100 (kernel_notes run 15, batch 1 and 8): the cluster's sum wins at 1 split (no
# kernel beside it: -1.1 us on 4096 x 14336) and at 2 (-0.5 to -1.2 us a call), and loses at 4
# (+0.1 to +1.1 us a call on 7 of 8 points) and 8, where each tile waits for the slowest program
# of its cluster.
CLUSTER_SUM_MAX_SPLITS = 2


def has_lop3_conversion(w) -> bool:
    """Whether the weight's codes are converted by masks and a magic exponent (`_word_pairs`): 2-, 3- and
    4-bit codes in the lop3 order; 8-bit codes and the prmt order take Mosaic GPU's own conversion."""
    return w.bits != 8 and w.order == "lop3"


def lop3_of(cfg: W4Config, w) -> bool:
    """The config's `lop3`, or by default: wherever the weight has the lop3 conversion."""
    return has_lop3_conversion(w) if cfg.lop3 is None else cfg.lop3


def split_sum_of(cfg: W4Config) -> str:
    """The config's `split_sum`, or by default "cluster" up to CLUSTER_SUM_MAX_SPLITS splits
    without warp specialization, else "xla". With one split nothing is summed: "cluster" then means
    that the kernel stores y [M, N] itself (warp-specialized too: each compute warpgroup its rows)."""
    if cfg.split_sum is not None:
        return cfg.split_sum
    if cfg.splits == 1:
        return "cluster"
    return "cluster" if not cfg.warp_specialized and cfg.splits <= CLUSTER_SUM_MAX_SPLITS else "xla"


MIN_PROGRAMS = 200  # programs that fill an H100's 132 SMs (kernel_notes run 13: fewer left bandwidth unused)
MAX_SPLITS = 16


def splits_keep_groups(k: int, tile_k: int, splits: int, group_size: int = 0) -> bool:
    """Whether each of `splits` K slices starts on a group boundary where a group spans several
    steps: a slice's steps index its scale rows from the slice's first group (a slice starting
    mid-group read the next group's scale a step early: relative error 0.42 on an H200, 2-bit g256
    in 128-column steps, K = 11008 in 2 splits). group_size 0 or >= K (per channel): one group."""
    return group_size <= tile_k or group_size >= k or (k // splits) % group_size == 0


def split_counts(k: int, tile_k: int, group_size: int = 0) -> list[int]:
    """Split counts dividing K's steps of tile_k (whole groups a slice, `splits_keep_groups`), at most
    MAX_SPLITS, fewest first."""
    return [s for s in range(1, MAX_SPLITS + 1)
            if (k // tile_k) % s == 0 and splits_keep_groups(k, tile_k, s, group_size)]


def split_choices(k: int, n: int, tile_k: int, group_size: int = 0) -> list[int]:
    """The split counts that give 64-row tiles at least MIN_PROGRAMS programs, fewest first;
    empty if none does."""
    return [s for s in split_counts(k, tile_k, group_size) if n // 64 * s >= MIN_PROGRAMS]


def padded_k(k: int, n: int, block: int = 256) -> int:
    """The K to store a weight at (`repack_w4(stored_k=...)`): K itself where its 256-column steps
    split into enough programs (`split_choices`), else the next multiple of 256 within K / 16 that
    does, else K. Llama-2's 11008 = 43 x 256 has no small divisor; 11264 = 44 x 256 splits in 4."""
    steps = -(-k // block)
    for s in range(steps, steps + max(steps // 16, 1) + 1):
        if split_choices(s * block, n, block):
            return s * block
    return k


def choose_block_k(k: int, n: int) -> int:
    """The code tile a blocked weight stores: 256 columns where K splits into enough programs,
    else 128 (K = 11008: 43 steps of 256 have no small divisor)."""
    return 256 if k % 256 == 0 and split_choices(k, n, 256) else 128


def stored_layout(k: int, n: int, grouped: bool = True, pad_k: bool = True) -> tuple[int, int]:
    """(block_k, stored_k) of a [K, N] weight as `repack_for_wgmma` stores it: K padded where
    `padded_k` says (grouped scales only: the padding is whole groups of zeros), then blocked by
    256; else K as it is, blocked by `choose_block_k`."""
    stored_k = padded_k(k, n) if pad_k and grouped else k
    return (256 if stored_k != k else choose_block_k(k, n)), stored_k


SMEM_BYTES = 227 * 1024  # an H100/H200 block's shared memory


def smem_bytes(cfg: W4Config, w: W4Weight, m_padded: int) -> int:
    """Shared memory of one program: a slot of (x tile, code tile, per-row tables) for each of
    `stages` steps in flight (at most the slice's steps), and the fp32 output tiles: one to copy
    out ("xla"), or the other splits' sums that a cluster's first program receives ("cluster").
    Mosaic GPU adds a few barriers. Tables are counted at 4 bytes an entry, an upper bound."""
    m_tile = batch_tile(cfg, m_padded)
    tables = 1 + (w.zero is not None)  # scales, zero points
    rows = max(cfg.tile_k // w.group_size, 1)
    slot = m_tile * cfg.tile_k * 2 + cfg.tile_n * cfg.tile_k * w.bits // 8 + tables * rows * cfg.tile_n * 4
    slots = min(cfg.stages, max(w.k_stored // (cfg.tile_k * cfg.splits), 1))
    if split_sum_of(cfg) == "cluster":
        return slots * slot + (cfg.splits - 1) * cfg.tile_n * m_tile * 4
    return slots * slot + cfg.tile_n * store_columns(m_tile) * 4


def store_columns(m_tile: int) -> int:
    """Batch columns of the fp32 staging tile through which a program stores its split's sum: a batch
    tile past 128 rows goes in two halves (where they stay multiples of 8), so that a 256-row tile's
    128 KB do not crowd out the pipeline's stages."""
    return m_tile // 2 if m_tile > 128 and m_tile % 16 == 0 else m_tile


def padded_batch(m: int, tile_m: int = 0) -> int:
    """The rows of x the kernel multiplies: TMA tiles of 8 rows, or whole batch tiles of `tile_m`
    where the batch needs more than one."""
    rows = max(8, -(-m // 8) * 8)
    return -(-rows // tile_m) * tile_m if tile_m and rows > tile_m else rows


def batch_tile(cfg: W4Config, m_padded: int) -> int:
    """The batch rows one program multiplies (wgmma's N)."""
    return cfg.tile_m if cfg.tile_m and m_padded > cfg.tile_m else m_padded


def compute_warpgroups(cfg: W4Config) -> int:
    """Warpgroups that convert and multiply: one, or tile_n / rows_per_wg under a memory warpgroup."""
    return cfg.tile_n // cfg.rows_per_wg if cfg.warp_specialized else 1


# Run 17 (H200): one program of `gemm_config`'s tiles (128 weight rows, two compute warpgroups) takes
# about STEP_US[0] + STEP_US[1] x batch rows a 128-column step (0.86 us at 128 rows, 1.38 at 256),
# plus PROGRAM_US to fill and drain its pipeline; XLA writes and reads split-K partial sums at
# about SUM_BYTES_PER_US. The cost of a grid is then its waves of programs plus those sums.
STEP_US = (0.34, 0.00406)
PROGRAM_US = 1.5
SUM_BYTES_PER_US = 3.0e6


def gemm_cost_us(k: int, n: int, m: int, tile_m: int, splits: int, sms: int = 132, tile_n: int = 128) -> float:
    """Run 17's model of a `gemm_config` grid's time (us): batch tiles of tile_m rows, K in splits."""
    m_padded = padded_batch(m, tile_m)
    tile = min(tile_m, m_padded)
    programs = n // tile_n * (m_padded // tile) * splits
    step = STEP_US[0] + STEP_US[1] * tile
    sums = 0.0 if splits == 1 else splits * n * m_padded * 8 / SUM_BYTES_PER_US  # fp32, out and back
    return -(-programs // sms) * (k // 128 // splits * step + PROGRAM_US) + sums


BALANCED_TILE_ROWS = 16  # balanced batch tiles are multiples of this many rows


def balanced_tiles(rows: int) -> list[int]:
    """Batch tiles that cover `rows` (past 256) in 2 or more nearly equal tiles, other than 128 and
    256 rows: for each tile count, the fewest multiples of BALANCED_TILE_ROWS that cover rows in that
    many (512 rows: 80, 96, 112 and 176)."""
    if rows <= 256:
        return []
    counts = range(-(-rows // 256), rows // 64 + 1)
    tiles = {-(-rows // count // BALANCED_TILE_ROWS) * BALANCED_TILE_ROWS for count in counts}
    return sorted(t for t in tiles if 64 < t < 256 and t != 128)


def gemm_step(w: W4Weight) -> int:
    """The columns of a `gemm_config` step: 128 (from 256-column blocks too), but 3-bit codes step whole
    blocks of 256 (`three_bit_step_problem`)."""
    return 256 if w.bits == 3 and w.block_k != 128 else 128


def three_bit_step_problem(tile_k: int, block_k: int) -> str | None:
    """Why 3-bit codes cannot step `tile_k` columns of a weight blocked by `block_k` (0: not blocked), or None.

    A 128-column step's high plane is 16-byte rows, which Pallas' TMA tiles cannot swizzle; read
    untiled, they came out wrong on an H200 as 128-column steps of 256-column blocks (relative error
    0.59), and right where the step is the whole stored row (blocks of 128). An unblocked weight's
    rows are longer still: refused too, untried."""
    if tile_k < 256 and block_k != tile_k:
        return (f"tile_k={tile_k} with 3-bit codes stored {'in blocks of ' + str(block_k) if block_k else 'unblocked'}: "
                "3-bit steps are 256 columns or more, or 128 on a weight blocked by 128")
    return None


def gemm_config(w: W4Weight, m: int, sms: int = 132, balanced: bool = True) -> W4Config:
    """Past DECODE_MAX_M rows (prefill), where the tensor cores, not the weight's bytes, set the time:
    a memory warpgroup streams 128-column steps (`gemm_step`) into two compute warpgroups of 64 weight rows each,
    which scale the bf16 codes (one accumulator) and multiply a tile of the batch. The batch tile
    (the whole batch, 128 or 256 rows, or a balanced tile) and the split count are those
    `gemm_cost_us` ranks fastest:
    more rows a tile convert each weight fewer times, while too few programs leave SMs idle and
    every split adds XLA's sum of fp32 partials. balanced: also rank `balanced_tiles` (at one split).
    (Tiles of 256 weight rows, `rows_per_wg=128`, ran no faster a row than 128 in run 17.)"""
    k, n = w.k_stored, w.shape[1]
    rows8 = padded_batch(m)
    tiles = sorted({min(rows8, 256)} | {t for t in (128, 256) if t < rows8})
    tile_n = 128 if n % 128 == 0 else 64
    step = gemm_step(w)
    shapes = [(t, s) for t in tiles for s in split_counts(k, w.block_k or step)
              if splits_keep_groups(k, step, s, w.group_size)]
    # Balanced tiles (one split only: the only kind measured) even out the waves where 128 and 256
    # rows do not: faster on all 10 points measured at 300-2048 rows (kernel_notes run 20, e.g.
    # 4096 x 4096 at 640 rows 33.9 against 47.7 us).
    shapes += [(t, 1) for t in (balanced_tiles(rows8) if balanced else [])]
    configs = [fit_stages(W4Config(tile_n=tile_n, tile_k=step, splits=s, stages=4, scale_on_acc=False,
                                   warp_specialized=True, tile_m=t), w, m) for t, s in shapes]
    # at least 2 stages, so that loads overlap the arithmetic (a 256-row batch tile with split sums
    # has room for 2 beside its staging tile of 128 batch columns, `store_columns`)
    ranked = [(gemm_cost_us(k, n, m, c.tile_m, c.splits, sms, tile_n), c.splits, c.tile_m, c)
              for c in configs if c.stages >= 2]
    return min(ranked)[-1]


def default_config(w: W4Weight, m: int = 1) -> W4Config:
    """Past DECODE_MAX_M rows `gemm_config`; else 64-row tiles, the weight's block as a step, the
    fewest splits that fill the GPU, 4 stages (fewer where a batch's x tiles do not fit the shared
    memory), the default `split_sum`
    (at 1-2 splits the cluster's: at most one received sum, the size of XLA's output tile). Within
    4% of the best candidate on every Llama shape at batch 8-32 (kernel_notes run 13, groups of
    128; groups of 32 and 64 are correct on an H100 but untimed)."""
    if m > DECODE_MAX_M:
        return gemm_config(w, m)
    k, n = w.k_stored, w.shape[1]
    tile_k = w.block_k or (256 if k % 256 == 0 else 128)
    splits = (split_choices(k, n, tile_k, w.group_size) or split_counts(k, tile_k, w.group_size)[-1:])[0]
    # Groups below 128 scale the bf16 codes (one accumulator) rather than keep one a group.
    scale_on_acc = w.group_size >= 128
    return fit_stages(W4Config(tile_n=64, tile_k=tile_k, splits=splits, stages=4, scale_on_acc=scale_on_acc), w, m)


def fit_stages(cfg: W4Config, w: W4Weight, m: int) -> W4Config:
    """`cfg` with as many of its stages as fit the shared memory at batch m (at least one)."""
    while cfg.stages > 1 and smem_bytes(cfg, w, padded_batch(m, cfg.tile_m)) > SMEM_BYTES:
        cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
    return cfg


def check_config(cfg: W4Config, w: W4Weight, m_padded: int) -> None:
    k, n = w.k_stored, w.shape[1]
    if cfg.tile_n % 64 or n % cfg.tile_n:
        raise ConfigError(f"W4Config.tile_n={cfg.tile_n} must be a multiple of 64 dividing N={n}")
    if cfg.tile_k % 128 or (w.group_size < cfg.tile_k and cfg.tile_k % w.group_size):
        raise ConfigError(f"W4Config.tile_k={cfg.tile_k} must be a multiple of 128 and of the "
                          f"group size {w.group_size}")
    if w.group_size > cfg.tile_k and w.group_size % cfg.tile_k:
        raise ConfigError(f"W4Config.tile_k={cfg.tile_k} must divide the group size {w.group_size}")
    if k % (cfg.tile_k * cfg.splits):
        raise ConfigError(f"W4Config: K={k} is not a multiple of tile_k x splits = "
                          f"{cfg.tile_k} x {cfg.splits}")
    if w.bits == 3 and (problem := three_bit_step_problem(cfg.tile_k, w.block_k)) is not None:
        raise ConfigError(f"W4Config: {problem}")
    if not splits_keep_groups(k, cfg.tile_k, cfg.splits, w.group_size):
        raise ConfigError(f"W4Config.splits={cfg.splits}: K={k} in slices of {k // cfg.splits} columns starts a "
                          f"slice inside a group of {w.group_size} (spanning steps of tile_k={cfg.tile_k}); "
                          "choose splits that keep whole groups, or a tile_k of the group size")
    if cfg.tile_m % 8 or cfg.tile_m > 256:
        raise ConfigError(f"W4Config.tile_m={cfg.tile_m} must be 0 (the whole batch) or a multiple of 8 "
                          "up to 256 (wgmma's N)")
    if batch_tile(cfg, m_padded) > 256:
        raise ConfigError(f"w4_matmul: batch {m_padded} > 256 rows (wgmma's N) in one program; "
                          "tile the batch with W4Config.tile_m")
    if w.block_k and (w.block_k % cfg.tile_k or k % (cfg.splits * w.block_k)):
        raise ConfigError(f"W4Config: a weight blocked by 64 x {w.block_k} needs tile_k dividing {w.block_k} "
                          f"and splits of whole blocks (tile_k={cfg.tile_k}, splits={cfg.splits}, K={k})")
    if cfg.warp_specialized and (cfg.rows_per_wg % 64 or cfg.tile_n % cfg.rows_per_wg
                                 or compute_warpgroups(cfg) > 2):
        raise ConfigError(f"W4Config.rows_per_wg={cfg.rows_per_wg} must be a multiple of 64 giving tile_n="
                          f"{cfg.tile_n} to one or two compute warpgroups (4 did not finish in 60 s on an "
                          "H100, kernel_notes run 14)")
    if not cfg.warp_specialized and w.block_k and cfg.tile_n != 64:
        raise ConfigError(f"W4Config.tile_n={cfg.tile_n} on a weight blocked by 64 rows needs "
                          "warp_specialized=True (each compute warpgroup takes whole 64-row blocks)")
    if split_sum_of(cfg) not in SPLIT_SUMS:
        raise ConfigError(f"W4Config.split_sum={cfg.split_sum!r}; choose one of {SPLIT_SUMS} or None")
    if split_sum_of(cfg) == "cluster" and cfg.splits > 1 and (
            cfg.splits > MAX_CLUSTER or (cfg.warp_specialized and cfg.rows_per_wg != 64)):
        # a warpgroup waits once on the barrier of received sums: a second wait would be for its next phase
        raise ConfigError(f"W4Config.split_sum='cluster' takes at most {MAX_CLUSTER} splits, and one 64-row "
                          f"block a compute warpgroup (splits={cfg.splits}, rows_per_wg={cfg.rows_per_wg}); "
                          "use split_sum='xla'")
    if cfg.overlap_mma and (cfg.scale_on_acc or cfg.warp_specialized or cfg.loads_only):
        # warp-specialized, it gave NaN on an H200 (kernel_notes run 18)
        raise ConfigError("W4Config.overlap_mma scales the codes in bf16 into one accumulator: it needs "
                          "scale_on_acc=False, warp_specialized=False and loads_only=False")
    if cfg.offset_on_acc and not (cfg.scale_on_acc and w.order == "lop3" and not cfg.loads_only):
        raise ConfigError("W4Config.offset_on_acc corrects each group's sum in fp32: it needs scale_on_acc=True, "
                          f"the lop3 order (this weight: {w.order!r}) and loads_only=False")
    if cfg.lop3 and not has_lop3_conversion(w):
        raise ConfigError(f"W4Config.lop3 writes the lop3 order's conversion as PTX: it needs 2-, 3- or 4-bit codes "
                          f"in the lop3 order (this weight: {w.bits}-bit, order {w.order!r})")
    if cfg.overlap_mma and min(cfg.stages, k // (cfg.tile_k * cfg.splits)) < 2:
        raise ConfigError(f"W4Config.overlap_mma releases x's slot a step late: it needs at least 2 stages "
                          f"and 2 steps a split (stages={cfg.stages}, K={k} in {cfg.splits} splits of "
                          f"tile_k={cfg.tile_k})")
    if smem_bytes(cfg, w, m_padded) > SMEM_BYTES:
        raise ConfigError(f"W4Config: {cfg.stages} stages of tile_k={cfg.tile_k} at batch {m_padded} need "
                          f"{smem_bytes(cfg, w, m_padded)} bytes of shared memory (> {SMEM_BYTES}); "
                          "use fewer stages or a smaller tile_k")


@functools.cache
def _load_takes_index() -> bool:
    import inspect

    from jax.experimental.pallas import mosaic_gpu as plgpu

    return inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def _load(ref, layout):
    """`plgpu.load` of a whole (already indexed) ref: jax 0.10 needs the index `()`, which 0.11
    deprecates (it reads a missing index as `()`)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.load(ref, (), layout=layout) if _load_takes_index() else plgpu.load(ref, layout=layout)


def _relabel(regs_of_chunk, shape, per_chunk: int = 4):
    """A WGMMA_LAYOUT 16-bit array of `shape` from, per UPCAST_4X register, its `per_chunk` pairs
    (four for 4-bit codes, eight for 2-bit ones)."""
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa

    dst_shape = fa.WGMMA_LAYOUT.registers_shape(shape)
    dst = np.empty(dst_shape, dtype=object)
    # Register index (row tile, column block of 8, ..., row block, ...): the UPCAST_4X register of
    # column chunk c holds the pairs of column blocks per_chunk c .. per_chunk (c + 1) - 1.
    for idx in np.ndindex(*dst_shape):
        col8 = idx[1]
        dst[idx] = regs_of_chunk((idx[0], col8 // per_chunk) + idx[2:])[col8 % per_chunk]
    return mgpu.FragmentedArray(_registers=dst, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


# The lop3 conversion's exponent: a code in the low mantissa bits of this pattern reads as
# base + code exactly; subtracting base + 8 leaves code - 8.
LOP3_MAGIC = {"bfloat16": (0x43004300, 128.0), "float16": (0x64006400, 1024.0)}
# PTX lop3's truth tables (a function of a = 0xF0, b = 0xCC, c = 0xAA): (a & b) | c, and (a & c) | (b & ~c).
LOP3_AND_OR, LOP3_SELECT = 0xEA, 0xE4


def _lop3(a, b, c, table: int):
    """PTX lop3.b32 of three i32 values: ptxas emits one LOP3 whatever the operands (an and-or of two
    immediates written in arith becomes two)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm

    return llvm.inline_asm(ir.IntegerType.get_signless(32), [a, b, c], f"lop3.b32 $0, $1, $2, $3, {table:#x};",
                           "=r,r,r,r")


def _word_pairs(word, *, field: int, value_bits: int, dtype: str, offset: bool, in_place: bool = False,
                lop3: bool = False, balanced: bool = False) -> list:
    """The 16 / field bf16 (fp16) pairs of a 32-bit word of codes in `field`-bit fields, the codes'
    `value_bits` low bits of each: pair c is fields (c, c + 16 / field), ((word >> field c) & mask) |
    magic = (base + code, base + code') exactly (one shift, one lop3), less base + mid (one
    sub.bf16x2 or sub.f16x2). offset=False leaves base + code (`W4Config.offset_on_acc`).

    in_place (fp16, field == value_bits): each pair is masked where it lies, at offset o, and OR-ed
    into the fp16 whose unit is its lowest bit, 2**(10 - o) (`f16x2.h2_positions`; the top pairs come
    from word >> 8), less 2**(10 - o) + mid: one shift a word instead of one a pair.
    balanced (in place only): less `f16x2.balanced_mids` instead of mid (codes centred on their
    middle, exactly).
    lop3: the and-or written as PTX `lop3`. From arith's and + or ptxas emits two LOP3, as the mask
    and the magic word are two 32-bit immediates and one LOP3 takes one (kv_notes run 21's SASS)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    from pallas_kernels.f16x2 import H2_SHIFT, h2_pair_constants, h2_positions

    i32 = ir.IntegerType.get_signless(32)
    elt = ir.BF16Type.get() if dtype == "bfloat16" else ir.F16Type.get()
    pair = ir.VectorType.get((2,), elt)
    magic, base = LOP3_MAGIC[dtype]
    c = lambda v: arith.constant(i32, _i32(int(v) & 0xFFFFFFFF))  # noqa: E731

    def masked(w, mask, magic):  # (w & mask) | magic
        if lop3:
            return _lop3(w, mask, magic, LOP3_AND_OR)
        return arith.ori(arith.andi(w, mask), magic)

    if balanced and not in_place:
        raise ValueError("balanced mids are the in-place fp16 pairs' (f16x2.balanced_mids)")
    if in_place:
        if dtype != "float16" or field != value_bits or not offset:
            raise ValueError(f"in-place pairs are fp16 codes filling their fields, centred: got {dtype}, "
                             f"field {field}, value_bits {value_bits}, offset {offset}")
        shifted = arith.shrui(word, c(H2_SHIFT))
        return [arith.subf(mgpu_utils.bitcast(masked(shifted if sh else word, c(m), c(g)), pair),
                           mgpu_utils.bitcast(c(centre), pair))
                for sh, (m, g, centre) in ((sh, h2_pair_constants(field, o, balanced)) for sh, o in h2_positions(field))]
    mask = ((1 << value_bits) - 1) * 0x00010001
    offset_pair = arith.constant(pair, ir.DenseElementsAttr.get_splat(
        pair, ir.FloatAttr.get(elt, base + (1 << (value_bits - 1)))))
    out = []
    for part in range(16 // field):
        shifted = arith.shrui(word, c(field * part)) if part else word
        value = mgpu_utils.bitcast(masked(shifted, c(mask), c(magic)), pair)
        out.append(arith.subf(value, offset_pair) if offset else value)
    return out


def _convert_lop3(ctx, a4, dtype: str = "bfloat16", offset: bool = True, bits: int = 4, in_place: bool = False,
                  lop3: bool = False, balanced: bool = False):
    """int4 bits of codes 0..15 in WGMMA_LAYOUT_UPCAST_4X -> code - 8 in WGMMA_LAYOUT, in bf16 or fp16.

    Pair c of a 32-bit word is nibbles (c, c + 4) (`_word_pairs`, which also says what `in_place` and
    `lop3` do). bits=2: the word holds 16 codes (two an int4 element), pair c (c = 0..7) is slots
    (c, c + 8), less base + 2 (`crumb_permutation`)."""
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    del ctx
    i32 = ir.IntegerType.get_signless(32)
    cache = {}

    def pairs(idx):
        if idx not in cache:
            word = mgpu_utils.bitcast(a4.registers[idx], i32)
            cache[idx] = _word_pairs(word, field=bits, value_bits=bits, dtype=dtype, offset=offset,
                                     in_place=in_place, lop3=lop3, balanced=balanced)
        return cache[idx]

    rows, cols = a4.shape
    return _relabel(pairs, (rows, cols * plane_divisors(bits)[0]), per_chunk=16 // bits)


def _i32(value: int) -> int:
    """A 32-bit pattern as the signed value an i32 constant takes."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _convert_planes(ctx, low, high, dtype: str = "bfloat16", offset: bool = True, lop3: bool = False):
    """3-bit codes in two planes (`split_planes`), both WGMMA_LAYOUT_UPCAST_4X -> code - 4 in WGMMA_LAYOUT.

    32-column chunk w's 4-bit word is (low' & 0x33333333) | (high' & 0xCCCCCCCC), one lop3: low' is
    register w // 2 of the low plane, shifted right by 2 for odd w; high' is register w // 4 of the high
    plane, shifted so that bit w % 4 of each nibble lands on bit 2. Its nibbles' top bits (high's
    other bits) fall to the conversion's 3-bit mask (`_word_pairs`). lop3: the join and the pairs'
    and-or as PTX lop3 (`W4Config.lop3`)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    del ctx
    i32 = ir.IntegerType.get_signless(32)
    c = lambda v: arith.constant(i32, _i32(v))  # noqa: E731
    cache = {}

    def pairs(idx):
        if idx not in cache:
            w = idx[1]
            lo = mgpu_utils.bitcast(low.registers[(idx[0], w // 2) + idx[2:]], i32)
            hi = mgpu_utils.bitcast(high.registers[(idx[0], w // 4) + idx[2:]], i32)
            lo = arith.shrui(lo, c(2)) if w % 2 else lo
            j = w % 4
            hi = arith.shli(hi, c(2 - j)) if j < 2 else (arith.shrui(hi, c(j - 2)) if j > 2 else hi)
            if lop3:  # (lo & m) | (hi & ~m)
                word = _lop3(lo, hi, c(0x33333333), LOP3_SELECT)
            else:
                word = arith.ori(arith.andi(lo, c(0x33333333)), arith.andi(hi, c(0xCCCCCCCC)))
            cache[idx] = _word_pairs(word, field=4, value_bits=3, dtype=dtype, offset=offset, lop3=lop3)
        return cache[idx]

    rows, cols = low.shape
    return _relabel(pairs, (rows, cols * 2), per_chunk=4)


def _convert_prmt(ctx, a4):
    """Signed int4 (code - 8) in WGMMA_LAYOUT_UPCAST_4X -> bf16 in WGMMA_LAYOUT, by Mosaic GPU's own
    conversion (pair c = nibbles 2c, 2c + 1: one prmt, one lop3 and one sub.bf16x2 a pair)."""
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    del ctx
    a16 = a4.astype(ir.BF16Type.get())
    return _relabel(lambda idx: [mgpu_utils.vector_slice(a16.registers[idx], slice(2 * p, 2 * p + 2))
                                 for p in range(4)], a4.shape)


def _convert_i8_paired(ctx, a8):
    """int8 (code - 128) in WGMMA_LAYOUT_UPCAST_2X, "paired" order -> bf16 in WGMMA_LAYOUT: Mosaic GPU's
    exact conversion of each 4-byte register, whose halves are the fragment's pairs (2q, 2q + 1) and
    (8 + 2q, 9 + 2q): the register map of Mosaic's own UPCAST_2X -> WGMMA relayout, without its shuffle."""
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    del ctx
    a16 = a8.astype(ir.BF16Type.get())
    dst = np.empty(fa.WGMMA_LAYOUT.registers_shape(a8.shape), dtype=object)
    for idx, reg in np.ndenumerate(a16.registers):
        for i in range(2):
            dst[(idx[0], idx[1] * 2 + i, *idx[2:-1])] = mgpu_utils.vector_slice(reg, slice(2 * i, 2 * i + 2))
    assert all(r is not None for r in dst.flat)
    return mgpu.FragmentedArray(_registers=dst, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


def _kernel_body(*refs, cfg: W4Config, k_slice: int, group_size: int, m_padded: int, order: str,
                 block_k: int, with_zero: bool, dtype: str, bits: int = 4):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    divisors = plane_divisors(bits)  # codes an element of each stored plane of the codes
    n_in = 2 + len(divisors) + with_zero
    inputs, (out_gmem, *scratch) = refs[:n_in], refs[n_in:]
    x_gmem, planes_gmem, (scale_gmem, *zero_gmem) = inputs[0], inputs[1:1 + len(divisors)], inputs[1 + len(divisors):]
    zero_gmem = zero_gmem[0] if zero_gmem else None
    tile_n, tile_k = cfg.tile_n, cfg.tile_k
    m_tile = batch_tile(cfg, m_padded)
    # Rows one wgmma block multiplies: the whole tile, or 64 when specialized (each compute
    # warpgroup takes rows_per_wg / 64 such blocks).
    rows = 64 if cfg.warp_specialized else tile_n
    n_idx = jax.lax.axis_index("n")
    s_idx = jax.lax.axis_index("s")
    m0 = jax.lax.axis_index("m") * m_tile if m_tile < m_padded else 0  # the grid tiles the batch only where it must
    n0 = n_idx * tile_n
    k0 = s_idx * k_slice
    groups_per_step = max(tile_k // group_size, 1)
    step_group = group_size if group_size < tile_k else tile_k
    # Codes are loaded and converted in pieces of at least 128 columns (a 64-byte swizzled row of
    # 4-bit codes; 8-bit pieces are 128 columns, one 128-byte row, and a larger group takes several);
    # groups of 32 or 64 are column slices of a converted piece.
    # 2- and 3-bit pieces are at least 256 columns where the step has them (64-byte rows of the
    # crumbs, as 4-bit's 128)
    piece = 128 if bits == 8 else max(step_group, min(tile_k, 256) if bits in (2, 3) else 128)
    groups_per_piece = max(piece // step_group, 1)
    pieces_per_group = max(step_group // piece, 1)
    mid = 1 << (bits - 1)

    if bits == 8 and order == "natural":
        def load_converted(refs):
            """int8 code - 128 -> bf16 in WGMMA_LAYOUT: 32-bit shared-memory loads, one shuffle and
            prmt a word into the fragment, Mosaic GPU's exact int8 -> bf16 (4 instructions a pair)."""
            a8 = plgpu.layout_cast(_load(refs[0], layout=plgpu.Layout.WGMMA_UPCAST_2X), plgpu.Layout.WGMMA)
            return a8.astype(jnp.dtype(dtype))
    elif bits == 8:  # "paired": each converted word is two registers of the fragment, no shuffle
        convert8 = plgpu.inline_mgpu(
            arg_types=(plgpu.Layout.WGMMA_UPCAST_2X,),
            return_type=plgpu.ShapeDtypeStruct((rows, piece), jnp.dtype(dtype), layout=plgpu.Layout.WGMMA),
        )(_convert_i8_paired)

        def load_converted(refs):
            return convert8(_load(refs[0], layout=plgpu.Layout.WGMMA_UPCAST_2X))
    elif bits == 3:  # the low and the high plane's registers make each 4-bit word
        convert3 = plgpu.inline_mgpu(
            arg_types=(plgpu.Layout.WGMMA_UPCAST_4X, plgpu.Layout.WGMMA_UPCAST_4X),
            return_type=plgpu.ShapeDtypeStruct((rows, piece), jnp.dtype(dtype), layout=plgpu.Layout.WGMMA),
        )(functools.partial(_convert_planes, dtype=dtype, offset=not cfg.offset_on_acc, lop3=cfg.lop3))

        def load_converted(refs):
            return convert3(*[_load(r, layout=plgpu.Layout.WGMMA_UPCAST_4X) for r in refs])
    else:
        convert = plgpu.inline_mgpu(
            arg_types=(plgpu.Layout.WGMMA_UPCAST_4X,),
            return_type=plgpu.ShapeDtypeStruct((rows, piece), jnp.dtype(dtype), layout=plgpu.Layout.WGMMA),
        )(functools.partial(_convert_lop3, dtype=dtype, offset=not cfg.offset_on_acc, bits=bits, lop3=cfg.lop3)
          if order == "lop3" else _convert_prmt)

        def load_converted(refs):
            return convert(_load(refs[0], layout=plgpu.Layout.WGMMA_UPCAST_4X))

    lop3_base = LOP3_MAGIC[dtype][1]

    def row_vector(ref, g, row_slice):
        """A [rows] fp32 vector of a per-row table (scales), broadcast over the batch columns."""
        v = _load(ref.at[g, row_slice], layout=plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
        return jax.lax.broadcast_in_dim(v, (rows, m_tile), [0])

    def multiply(row_slice, code_piece, x_smem, s_smem, z_smem, acc):
        """One pipeline step of one warpgroup: acc [rows, M] += its rows of W^T times x^T."""
        def group_weights():
            """weights(g) -> [(16-bit codes [rows, columns], their x^T)] of group g, one pair a piece
            (several where an 8-bit group spans pieces); each piece converted once."""
            converted = {}

            def piece_weights(g, p, j, col0, width):
                """Piece p of the step's codes (its j-th group slice where groups are narrower), for
                group g, against x's columns col0 .. col0 + width."""
                if p not in converted:
                    converted[p] = load_converted(code_piece(p))
                a = converted[p]
                if groups_per_piece > 1:
                    a = a[:, j * step_group:(j + 1) * step_group]
                # (code - mid) - (zero - mid): exact in bf16 / fp16 (|difference| < 256 for 8-bit)
                if z_smem is not None and not cfg.offset_on_acc:
                    z = _load(z_smem.at[g, row_slice], layout=plgpu.Layout.WGMMA.reduce(1))
                    z = (z.astype(jnp.float32) - float(mid)).astype(dtype)
                    a = a - jax.lax.broadcast_in_dim(z, a.shape, [0])
                return a, x_smem.at[:, pl.ds(col0, width)].transpose((1, 0))

            def weights(g):
                if pieces_per_group > 1:
                    return [piece_weights(g, g * pieces_per_group + i, 0, g * step_group + i * piece, piece)
                            for i in range(pieces_per_group)]
                p, j = divmod(g, groups_per_piece)
                return [piece_weights(g, p, j, g * step_group, step_group)]
            return weights

        def scaled_mma(acc_ref):
            weights = group_weights()
            for g in range(groups_per_step):
                s = _load(s_smem.at[g, row_slice], layout=plgpu.Layout.WGMMA.reduce(1))
                for a, x_t in weights(g):
                    plgpu.wgmma(acc_ref, a * jax.lax.broadcast_in_dim(s.astype(dtype), a.shape, [0]), x_t)

        if cfg.overlap_mma:  # acc is the carried accumulator ref: leave this step's wgmmas in flight
            scaled_mma(acc)
            plgpu.wgmma_wait(groups_per_step)
            return acc
        if not cfg.scale_on_acc:
            return pl.run_state(scaled_mma)(plgpu.ACC.init(acc))

        def group_sums(*acc_refs):
            weights = group_weights()
            if cfg.offset_on_acc:
                ones = plgpu.layout_cast(jnp.ones((rows, step_group), dtype), plgpu.Layout.WGMMA)
            for g in range(groups_per_step):
                for a, x_t in weights(g):
                    plgpu.wgmma(acc_refs[g], a, x_t)
                    if cfg.offset_on_acc:  # every row: the group's sum of x, exact products summed in fp32
                        plgpu.wgmma(acc_refs[groups_per_step + g], ones, x_t)
            return [acc_ref[...] for acc_ref in acc_refs]

        n_acc = groups_per_step * (1 + cfg.offset_on_acc)
        sums = pl.run_scoped(group_sums, *[plgpu.ACC((rows, m_tile), jnp.float32)] * n_acc)
        for g in range(groups_per_step):
            total = sums[g]
            if cfg.offset_on_acc:  # sum (base + c) x - (base + zero) sum x = sum (c - zero) x
                offset = (row_vector(z_smem, g, row_slice) + lop3_base if z_smem is not None
                          else lop3_base + float(mid))
                total = total - offset * sums[groups_per_step + g]
            acc = acc + row_vector(s_smem, g, row_slice) * total
        return acc

    def step(blocks):
        """The pipeline's step over `blocks`: (row slice of the tables, the block's code rows in
        the code tile) for each wgmma block this warpgroup multiplies; its carry is their sums."""
        def body(_, x_smem, *rest):
            c_smems, (s_smem, *z_smem), acc = rest[:len(code_operands)], rest[len(code_operands):-1], rest[-1]
            if cfg.loads_only:
                return acc
            z = z_smem[0] if z_smem else None
            return tuple(multiply(row_slice, functools.partial(code_rows, c_smems), x_smem, s_smem, z, a)
                         for (row_slice, code_rows), a in zip(blocks, acc))
        return body

    # Swizzled tiles as wide as a group slice, so that slicing a group out of a step stays on tiles.
    x_swizzle = plgpu.find_swizzle(step_group * 16)
    elem_bits = 8 if bits == 8 else 4  # the stored planes' element (2- and 3-bit codes travel as int4)

    def c_transforms(per):
        """A plane's tiles: swizzled rows as wide as a piece (`per` codes an element)."""
        swizzle = plgpu.find_swizzle(piece // per * elem_bits)
        if swizzle < 32:  # 16-byte rows (a 3-bit high plane in 128-column pieces): untiled, unswizzled
            return ()
        return plgpu.TilingTransform((8, 8 * swizzle // elem_bits)), plgpu.SwizzleTransform(swizzle)

    x_transforms = (plgpu.TilingTransform((8, x_swizzle // 2)), plgpu.SwizzleTransform(x_swizzle))
    scale_rows = groups_per_step if group_size < tile_k else 1
    steps = k_slice // tile_k
    if group_size >= tile_k:
        scale_index = lambda k: ((k * tile_k) // group_size, 0)  # noqa: E731
    else:
        scale_index = lambda k: (k, 0)  # noqa: E731
    n_blocks, k_parts = tile_n // 64, max(block_k // tile_k, 1)  # 64-row blocks; steps a stored block
    # One spec and operand a plane of the codes (3-bit: low and high); `block_rows(b)(c_smems, p)` gives
    # piece p of 64-row block b in each plane's step tile.
    pieces = lambda p: [pl.ds(p * piece // per, piece // per) for per in divisors]  # noqa: E731
    if block_k and not _stacks_blocks(cfg, block_k):  # codes [N / 64, K / tile_k, 64, tile_k]: one contiguous tile a step
        code_specs = [plgpu.BlockSpec((None, tile_n, tile_k // per), lambda k: (k, 0, 0), transforms=c_transforms(per))
                      for per in divisors]
        code_operands = [g.at[n_idx, pl.ds(k0 // tile_k, steps)] for g in planes_gmem]
        block_rows = lambda b: lambda c_smems, p: [c.at[:, cols] for c, cols in zip(c_smems, pieces(p))]  # noqa: E731
    elif block_k:  # codes viewed [N / 64, K / block_k x 64, block_k] (`_stacks_blocks`): the tile's blocks side by side
        code_specs = [plgpu.BlockSpec((n_blocks, 64, tile_k // per), lambda k: (0, k // k_parts, k % k_parts),
                                      transforms=c_transforms(per)) for per in divisors]
        code_operands = [g.at[pl.ds(n_idx * n_blocks, n_blocks), pl.ds(k0 // block_k * 64, k_slice // block_k * 64)]
                         for g in planes_gmem]
        block_rows = lambda b: lambda c_smems, p: [c.at[b, :, cols] for c, cols in zip(c_smems, pieces(p))]  # noqa: E731
    else:
        code_specs = [plgpu.BlockSpec((tile_n, tile_k // per), lambda k: (0, k), transforms=c_transforms(per))
                      for per in divisors]
        # the slice's first element as s x (K / splits / per), not k0 // per: Mosaic GPU's layout
        # inference (jax 0.11) could not prove a floor-divided index a multiple of the tile
        code_operands = [g.at[pl.ds(n0, tile_n), pl.ds(s_idx * (k_slice // per), k_slice // per)]
                         for g, per in zip(planes_gmem, divisors)]
        block_rows = lambda b: lambda c_smems, p: [c.at[pl.ds(b * rows, rows), cols]  # noqa: E731
                                                  for c, cols in zip(c_smems, pieces(p))]
    # overlap_mma: a step's x is still read by its wgmma when the next step starts, so its slot is
    # refilled a step later; codes and tables are in registers before the wgmma and go at once.
    in_specs = [plgpu.BlockSpec((m_tile, tile_k), lambda k: (0, k), transforms=x_transforms,
                                delay_release=int(cfg.overlap_mma)), *code_specs,
                plgpu.BlockSpec((scale_rows, tile_n), scale_index)]
    in_specs += [plgpu.BlockSpec((scale_rows, tile_n), scale_index)] if with_zero else []
    groups = (pl.ds(k0 // group_size, max(k_slice // group_size, 1)), pl.ds(n0, tile_n))
    # One batch tile: x's rows as they are (below 8, TMA reads the missing rows as zeros), y's all.
    batch = pl.ds(m0, m_tile) if m_tile < m_padded else slice(None)
    operands = (x_gmem.at[batch, pl.ds(k0, k_slice)], *code_operands, scale_gmem.at[groups],
                *([zero_gmem.at[groups]] if with_zero else []))
    zeros = lambda: plgpu.layout_cast(jnp.zeros((rows, m_tile), jnp.float32), plgpu.Layout.WGMMA)  # noqa: E731

    def store(acc, smem, first_row):
        """split_sum="xla": this split's fp32 sum [rows, M] (y transposed) for XLA to add, through
        `smem` in chunks of its columns (`store_columns`)."""
        width = smem.shape[-1]
        for c in range(0, m_tile, width):
            if c:  # the previous chunk has left the staging tile
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            smem[...] = acc if width == m_tile else acc[:, c:c + width]
            plgpu.commit_smem()
            cols = batch if width == m_tile else pl.ds(m0 + c, width)
            plgpu.copy_smem_to_gmem(smem, out_gmem.at[s_idx, pl.ds(first_row, rows), cols])
        plgpu.wait_smem_to_gmem(0)

    if not cfg.warp_specialized:
        def run_pipeline(init):
            blocks = ((slice(None), block_rows(0)),)
            return plgpu.emit_pipeline(step(blocks), grid=(steps,), in_specs=in_specs,
                                       max_concurrent_steps=cfg.stages, init_carry=init)(*operands)[0]

        if cfg.overlap_mma:
            acc = pl.run_scoped(lambda acc_ref: run_pipeline((acc_ref,))[...], plgpu.ACC((rows, m_tile), jnp.float32))
        else:
            acc = run_pipeline((zeros(),))
        if split_sum_of(cfg) == "xla":
            store(acc, scratch[0], n0)
        else:
            _cluster_sum_and_store(acc, out_gmem.at[batch, pl.ds(n0, tile_n)], scratch, cfg.splits, s_idx)
        return

    # A memory warpgroup issues the TMA copies; each compute warpgroup takes rows_per_wg rows, in
    # 64-row wgmma blocks, and stores them itself (one split) or hands XLA their fp32 sums.
    wg = jax.lax.axis_index("wg")
    per_wg = cfg.rows_per_wg // 64

    def compute_context(eval_pipeline):
        sums = eval_pipeline(tuple(zeros() for _ in range(per_wg)))
        for j, acc in enumerate(sums):
            b = wg * per_wg + j
            if split_sum_of(cfg) == "xla":
                store(acc, scratch[0].at[b], n0 + b * rows)
            else:  # each block's splits meet in the cluster's first program (or there is one split)
                _cluster_sum_and_store(acc, out_gmem.at[batch, pl.ds(n0 + b * rows, rows)], scratch, cfg.splits,
                                       s_idx, rows=pl.ds(b * rows, rows))

    blocks = tuple((pl.ds((wg * per_wg + j) * rows, rows), block_rows(wg * per_wg + j)) for j in range(per_wg))
    plgpu.emit_pipeline_warp_specialized(
        step(blocks), grid=(steps,), memory_registers=40, in_specs=in_specs,
        max_concurrent_steps=cfg.stages, wg_axis="wg", num_compute_wgs=compute_warpgroups(cfg),
        compute_context=compute_context)(*operands)


def _cluster_sum_and_store(acc, out_rows, scratch, splits: int, s_idx, rows=None) -> None:
    """split_sum="cluster": programs 1 .. splits-1 of the tile's cluster send their fp32 sums
    [rows, M] into program 0's shared memory (st.async, counted by its barrier's transaction
    bytes); program 0 adds them to its own in a fixed order and stores its tile of y itself.
    rows: the tile's rows this sum is (a warp-specialized warpgroup's 64-row block), else all."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if splits == 1:
        _store_transposed(acc, out_rows)
        return
    parts, arrived = scratch
    part = (lambda j: parts.at[j]) if rows is None else (lambda j: parts.at[j, rows])  # noqa: E731

    @pl.when(s_idx != 0)
    def _send():
        plgpu.async_store_smem(acc, part(s_idx - 1), arrived, cluster_idx=0, cluster_dim="s")

    @pl.when(s_idx == 0)
    def _sum():
        plgpu.barrier_wait(arrived)
        total = acc
        for j in range(splits - 1):
            total = total + _load(part(j), layout=plgpu.Layout.WGMMA)
        _store_transposed(total, out_rows)


def _store_transposed(acc, out_rows) -> None:
    """out_rows[b, r] = acc[r, b] for the batch rows b < M of `out_rows` [M, rows] (HBM), in its
    dtype: each thread stores its own elements, so y needs no transpose or slice after the kernel."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))(_store_transposed_mgpu)(acc, out_rows)


def _store_transposed_mgpu(ctx, acc, out):
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, scf

    del ctx
    elt = ir.MemRefType(out.type).element_type
    m = ir.MemRefType(out.type).shape[0]
    limit = arith.constant(ir.IndexType.get(), m)

    def put(value, idx):
        row, col = idx
        value = arith.truncf(elt, value)
        if m == acc.shape[1]:
            memref.store(value, out, [col, row])
            return
        inside = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ult, col, limit))  # not x's padding rows past M
        with ir.InsertionPoint(inside.then_block):
            memref.store(value, out, [col, row])
            scf.yield_([])

    acc.foreach(put)


def _stacks_blocks(cfg: W4Config, block_k: int) -> bool:
    """Whether a step reads several stored 64-row blocks, or part of one: the kernel then sees the
    codes [N / 64, K / block_k, 64, block_k] as [N / 64, K / block_k x 64, block_k], so that each
    step's TMA copy strides 5 dimensions (Mosaic GPU's limit), not 6."""
    return bool(block_k) and (cfg.tile_n > 64 or cfg.tile_k < block_k)


def compute_dtype(x_dtype, w: W4Weight) -> str:
    """The tensor cores' input type: fp16 activations stay fp16 with the lop3 order (its magic has
    an fp16 form); everything else multiplies in bf16."""
    return "float16" if jnp.dtype(x_dtype) == jnp.float16 and w.order == "lop3" else "bfloat16"


# jit: every call site of one shape and config lowers to the same function, hence one Mosaic GPU
# module. Unjitted, each call site's module differs in its debug locations, and a decode step of
# 32 layers carried 128 kernels to compile instead of 4.
@functools.partial(jax.jit, static_argnames=("config",))
def w4_matmul(x: jax.Array, w: W4Weight, config: W4Config | None = None) -> jax.Array:
    """x [..., K] (bf16/fp16) @ W [K, N] -> [..., N] in x's dtype, on Hopper tensor cores."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    k, n = w.shape
    if x.shape[-1] != k:
        raise ConfigError(f"w4_matmul: activations {x.shape} do not match the weight's K={k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    cfg = config or default_config(w, m)
    m_padded = padded_batch(m, cfg.tile_m)
    check_config(cfg, w, m_padded)
    m_tile = batch_tile(cfg, m_padded)
    dtype = compute_dtype(x.dtype, w)
    xb = x2.astype(dtype)
    if m > 8 and m != m_padded:  # TMA tiles x by 8 rows: below 8 it zero-fills the rows past m itself
        xb = jnp.pad(xb, ((0, m_padded - m), (0, 0)))
    k_slice = w.k_stored // cfg.splits  # past K (padding) the last slice's x tiles read as zeros
    with_zero = w.zero is not None
    body = functools.partial(_kernel_body, cfg=dataclasses.replace(cfg, lop3=lop3_of(cfg, w)), k_slice=k_slice,
                             group_size=w.group_size,
                             m_padded=m_padded, order=w.order, block_k=w.block_k, with_zero=with_zero,
                             dtype=dtype, bits=w.bits)
    planes = [w.codes] + ([w.high] if w.bits == 3 else [])
    if _stacks_blocks(cfg, w.block_k):
        planes = [p.reshape(n // 64, -1, w.block_k // per) for p, per in zip(planes, plane_divisors(w.bits))]
    operands = (xb, *planes, w.scale, *([w.zero] if with_zero else []))
    tiles = dict(grid=(n // cfg.tile_n,), grid_names=("n",))
    if m_tile < m_padded:
        tiles = dict(grid=(n // cfg.tile_n, m_padded // m_tile), grid_names=("n", "m"))
    if cfg.warp_specialized:
        tiles.update(num_threads=compute_warpgroups(cfg) + 1, thread_name="wg")
    if split_sum_of(cfg) == "cluster":
        scratch = []
        if cfg.splits > 1:  # the other splits' sums, tiled and swizzled as st.async stores them
            swizzle = plgpu.find_swizzle(m_tile * 32)
            scratch = [plgpu.SMEM((cfg.splits - 1, cfg.tile_n, m_tile), jnp.float32,
                                  transforms=(plgpu.TilingTransform((8, swizzle // 4)), plgpu.SwizzleTransform(swizzle))),
                       # an arrival a sending warpgroup (Pallas counts its 128 threads as one)
                       plgpu.Barrier(num_arrivals=(cfg.splits - 1) * compute_warpgroups(cfg))]
        # One batch tile stores y's M rows (past them nothing); several store whole tiles of rows.
        m_out = m if m_tile == m_padded else m_padded
        y = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((m_out, n), x.dtype), cluster=(cfg.splits,),
                         cluster_names=("s",), scratch_types=scratch, **tiles)(*operands)
        return y[:m].reshape(*lead, n)
    width = store_columns(m_tile)
    out_smem = (plgpu.SMEM((cfg.tile_n // 64, 64, width), jnp.float32) if cfg.warp_specialized
                else plgpu.SMEM((cfg.tile_n, width), jnp.float32))
    tiles.update(grid=tiles["grid"] + (cfg.splits,), grid_names=tiles["grid_names"] + ("s",))
    partial_sums = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((cfg.splits, n, m_padded), jnp.float32),
        scratch_types=[out_smem],
        **tiles,
    )(*operands)
    y = partial_sums.sum(0).T[:m]
    return y.astype(x.dtype).reshape(*lead, n)


# --------------------------------------------------------------------------------------------
# linear() for W4Weight
# --------------------------------------------------------------------------------------------

# Batches up to this take the decode configs (`default_config`), larger ones `gemm_config`: on an
# H200 the decode configs were 4-10% faster at 32 rows on 4 Llama shapes, `gemm_config` 3-28% faster
# at 48 on 3 of them and at 64 on 4 of 5 (40 lies between, unmeasured). The kernel runs at every
# batch: past 64 rows, dequantizing the weight for XLA's dot took 44-592 us a call on an H200,
# 3.8-17x the kernel's time (kernel_notes run 17).
DECODE_MAX_M = 40


def hopper_is_default_device() -> bool:
    """wgmma exists on compute capability 9.x (Hopper) only."""
    from jaxcompress.quant.kernels_dispatch import compute_capability

    cc = compute_capability()
    return cc is not None and 9.0 <= cc < 10.0


def kernel_problem(x: jax.Array, w: W4Weight) -> str | None:
    """Why `w4_matmul` cannot run this call here, or None."""
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        return f"activations are {x.dtype}; the kernel takes bfloat16 or float16"
    if not hopper_is_default_device():
        return "the default device is not a Hopper GPU (wgmma needs compute capability 9.x)"
    return None


def wgmma_linear(x: jax.Array, w: W4Weight) -> jax.Array:
    """linear() for W4Weight: the kernel where it runs, dequantize-then-dot elsewhere.

    `$JAXCOMPRESS_QUANT_KERNEL` applies as for QArray: `reference` forces the dot, `kernel`
    raises where the kernel cannot run; `interpret` takes the dot (Mosaic GPU kernels have no
    CPU interpreter here)."""
    from jaxcompress.ops.linear import dense_linear
    from jaxcompress.quant.kernels_dispatch import MODE_ENV, mode

    how = mode()
    problem = "forced by $JAXCOMPRESS_QUANT_KERNEL" if how in ("reference", "interpret") else kernel_problem(x, w)
    if problem is None:
        return w4_matmul(x, w)
    if how == "kernel":
        raise ConfigError(f"${MODE_ENV}=kernel but the wgmma kernel cannot run weight {w.shape}: {problem}")
    return dense_linear(x, w.dequantize())


def _register() -> None:
    from jaxcompress.io.checkpoint import register_leaf_type
    from jaxcompress.ops.linear import register_linear

    register_leaf_type(W4Weight)
    register_linear(W4Weight)(wgmma_linear)


_register()
