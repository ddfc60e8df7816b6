"""W4 weights x bf16 activations on Hopper tensor cores, loads decoupled from arithmetic (Mosaic GPU).

The Triton kernels of `quant_matmul` load each step's code words into registers and convert them
there, so a warp's loads and its arithmetic take turns: run 12 measured the GEMVs at 1.4-2.0 TB/s
against 2.9 for XLA's bf16 GEMV. This kernel streams the codes with TMA into a ring of shared-memory
stages (`plgpu.emit_pipeline`), so several steps of loads are in flight while the warpgroup
converts and multiplies the current one, and it hands the multiply to `wgmma` at every batch:

    y^T [N, M] = W^T [N, K] @ x^T [K, M]      (weights are the left operand, "swap AB")

so the weight tile is the A operand, fed from registers (wgmma's M = 64 output features a
warpgroup), and the activations, padded to a multiple of 8 rows, are the B operand in shared
memory (wgmma's N = 8 .. 256). One kernel serves batch 1 to 256.

**Layout** (`repack_w4`, once per weight). The A fragment of a bf16 wgmma holds, per thread and
row, the columns {8c + 2q, 8c + 2q + 1 : c = 0..3} of each 32-column chunk (q = lane % 4). The
cheapest shared-memory load of 4-bit codes (`WGMMA_LAYOUT_UPCAST_4X`) gives the same thread the
*contiguous* columns 8q .. 8q + 7 of that row as one 32-bit word. The repack stores logical column
8c + 2q + j at physical column 8q + 2c + j, so the converted word, cut into four bf16 pairs, *is*
the A fragment: no shuffle, no permute. Codes are stored as signed int4 (code - 8), which the
Mosaic GPU conversion turns into bf16 pairs with one prmt, one lop3 and one sub.bf16x2.

**Grid** (`W4Config`): the weight's N in tiles of `tile_n` rows (a multiple of 64), K in `splits`
slices. Each program runs a pipeline over its K slice in steps of `tile_k` columns (a multiple of
the group size or of 128 when per channel), `stages` steps in flight. The split-K partial sums
are added by XLA.

**Arithmetic**: w = s * (code - zero) = s * c' + s * (8 - zero), with c' = code - 8. The kernel
multiplies the bf16 codes c' by their group's scale (one mul.bf16x2 a pair, exact up to bf16
rounding, as `dequantize()` rounds) and accumulates in fp32 on the tensor cores. The asymmetric
term sum_g s (8 - zero) * sum_{k in g} x_k is a [M, G] @ [G, N] product added outside.

CPU tests check the repack and the kernel's arithmetic in plain JAX (`emulate_w4`); the kernel
itself needs an H100/H200 (`tests/gpu/test_wgmma_matmul_gpu.py`).
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


def chunk_permutation() -> np.ndarray:
    """perm[p] = the logical column stored at physical column p of a 32-column chunk.

    Physical column 8q + 2c + j holds logical column 8c + 2q + j (q, c in 0..3, j in 0..1); the
    map swaps q and c, so it is its own inverse.
    """
    p = np.arange(CHUNK)
    q, c, j = p // 8, (p % 8) // 2, p % 2
    return 8 * c + 2 * q + j


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class W4Weight:
    """A 4-bit `[K, N]` weight laid out for `w4_matmul` (see the module docstring).

    codes: int4 `[N, K]`, code - 8, columns permuted within each 32-column chunk.
    scale: `[G, N]` bf16 (G = K / group_size). bias: `[G, N]` fp32 s * (8 - zero), or None
    for symmetric grids.
    """

    codes: jax.Array
    scale: jax.Array
    bias: jax.Array | None
    group_size: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))


def repack_problem(w: QArray) -> str | None:
    """Why `w` cannot be repacked for `w4_matmul`, or None if it can."""
    k, n = w.shape
    if w.bits != 4:
        return f"bits={w.bits} (the wgmma kernel reads 4-bit codes)"
    if w.codebook is not None or w.perm is not None or w.outlier_index is not None:
        return "a codebook, act-order permutation or outliers (uniform grids in storage order only)"
    if w.scale is None or w.scale.shape[0] * w.group_size != k and w.scale.shape[0] != 1:
        return f"group_size={w.group_size} does not divide K={k}"
    if k % 128:
        return f"K={k} is not a multiple of 128"
    if n % 64:
        return f"N={n} is not a multiple of 64"
    if w.scale.shape == (1, 1):
        return "per-tensor scale"
    return None


def repack_w4(w: QArray) -> W4Weight:
    """One-time repack of a 4-bit `QArray` into the layout `w4_matmul` reads."""
    if (problem := repack_problem(w)) is not None:
        raise ConfigError(f"repack_w4: cannot lay out this weight for the wgmma kernel: {problem}")
    k, n = w.shape
    codes = unpack_codes(w.codes, 4, k)  # [K, N] in 0..15
    perm = chunk_permutation()
    order = (np.arange(k).reshape(-1, CHUNK)[:, perm]).reshape(-1)
    signed = (codes[order] - 8).astype(jnp.int8).T  # [N, K], physical column order
    groups = w.scale.shape[0]
    group_size = k // groups
    scale = w.scale.astype(jnp.bfloat16)
    bias = None
    if w.zero is not None:
        bias = (w.scale.astype(jnp.float32) * (8.0 - w.zero.astype(jnp.float32)))
    return W4Weight(codes=signed.astype(jnp.int4), scale=scale, bias=bias,
                    group_size=group_size, shape=(k, n))


def emulate_w4(x: jax.Array, w: W4Weight) -> jax.Array:
    """The kernel's arithmetic in plain JAX: bf16 c' * s per group, fp32 sums, the bias term."""
    k, n = w.shape
    perm = chunk_permutation()
    inverse = np.argsort(perm)
    codes = w.codes.astype(jnp.float32).T  # [K physical, N]
    codes = codes.reshape(-1, CHUNK, n)[:, inverse].reshape(k, n)  # logical order
    scale = jnp.repeat(w.scale, w.group_size, axis=0)
    wt = (codes.astype(jnp.bfloat16) * scale).astype(jnp.float32)
    y = jnp.dot(x.astype(jnp.float32), wt, precision="highest")
    if w.bias is not None:
        y = y + bias_term(x, w)
    return y.astype(x.dtype)


def bias_term(x: jax.Array, w: W4Weight) -> jax.Array:
    """sum_g (s * (8 - zero))[g, n] * sum_{k in g} x[m, k]: the asymmetric grids' offset, fp32."""
    m = x.shape[0]
    xsum = x.astype(jnp.float32).reshape(m, -1, w.group_size).sum(-1)
    return jnp.dot(xsum, w.bias, precision="highest")


@dataclasses.dataclass(frozen=True)
class W4Config:
    tile_n: int = 64
    tile_k: int = 128
    splits: int = 1
    stages: int = 4
    loads_only: bool = False  # probe: the pipeline's loads without the arithmetic (output is zero)


def check_config(cfg: W4Config, w: W4Weight, m_padded: int) -> None:
    k, n = w.shape
    if cfg.tile_n % 64 or n % cfg.tile_n:
        raise ConfigError(f"W4Config.tile_n={cfg.tile_n} must be a multiple of 64 dividing N={n}")
    step = max(w.group_size, 128) if w.group_size < k else 128
    if cfg.tile_k % 128 or cfg.tile_k % min(w.group_size, k) and w.group_size < cfg.tile_k:
        raise ConfigError(f"W4Config.tile_k={cfg.tile_k} must be a multiple of 128 and of the "
                          f"group size {w.group_size}")
    if w.group_size > cfg.tile_k and w.group_size % cfg.tile_k:
        raise ConfigError(f"W4Config.tile_k={cfg.tile_k} must divide the group size {w.group_size}")
    if k % (cfg.tile_k * cfg.splits):
        raise ConfigError(f"W4Config: K={k} is not a multiple of tile_k x splits = "
                          f"{cfg.tile_k} x {cfg.splits}")
    if m_padded > 256:
        raise ConfigError(f"w4_matmul: batch {m_padded} > 256 rows (wgmma's N); tile the batch")
    del step


def _reinterpret_as_wgmma(ctx, a4):
    """Converts an int4 [T, K] array in WGMMA_LAYOUT_UPCAST_4X to bf16 and relabels its registers
    as WGMMA_LAYOUT without moving data (the repack put each column where this relabel expects)."""
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    del ctx
    a16 = a4.astype(ir.BF16Type.get())
    src = a16.registers
    shape = a16.shape
    dst_shape = fa.WGMMA_LAYOUT.registers_shape(shape)
    dst = np.empty(dst_shape, dtype=object)
    # Register index (row tile, column block of 8, ..., row block, ...): the UPCAST_4X register of
    # column chunk c holds the 4 pairs of column blocks 4c .. 4c + 3.
    for idx in np.ndindex(*dst_shape):
        col8 = idx[1]
        src_idx = (idx[0], col8 // 4) + idx[2:]
        part = col8 % 4
        dst[idx] = mgpu_utils.vector_slice(src[src_idx], slice(2 * part, 2 * part + 2))
    return mgpu.FragmentedArray(_registers=dst, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


def _kernel_body(x_gmem, codes_gmem, scale_gmem, out_gmem, out_smem, *, cfg: W4Config, k_slice: int,
                 group_size: int, m_padded: int):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tile_n, tile_k = cfg.tile_n, cfg.tile_k
    n_idx = jax.lax.axis_index("n")
    s_idx = jax.lax.axis_index("s")
    n0 = n_idx * tile_n
    k0 = s_idx * k_slice
    groups_per_step = max(tile_k // group_size, 1)
    step_group = group_size if group_size < tile_k else tile_k

    convert = plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA_UPCAST_4X,),
        return_type=plgpu.ShapeDtypeStruct((tile_n, step_group), jnp.bfloat16,
                                           layout=plgpu.Layout.WGMMA),
    )(_reinterpret_as_wgmma)

    def step(_, x_smem, c_smem, s_smem, acc):
        if cfg.loads_only:
            return acc

        def mma(acc_ref):
            for g in range(groups_per_step):
                cols = pl.ds(g * step_group, step_group)
                codes = plgpu.load(c_smem.at[:, cols], (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
                a = convert(codes)
                s = plgpu.load(s_smem.at[g], (), layout=plgpu.Layout.WGMMA.reduce(1))
                a = a * jax.lax.broadcast_in_dim(s, a.shape, [0])
                plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(x_smem.at[:, cols], (1, 0)))
        return pl.run_state(mma)(plgpu.ACC.init(acc))

    # Swizzled tiles as wide as a group slice, so that slicing a group out of a step stays on tiles.
    x_swizzle = plgpu.find_swizzle(step_group * 16)
    c_swizzle = plgpu.find_swizzle(step_group * 4)
    x_transforms = (plgpu.TilingTransform((8, x_swizzle // 2)), plgpu.SwizzleTransform(x_swizzle))
    c_transforms = (plgpu.TilingTransform((8, c_swizzle * 2)), plgpu.SwizzleTransform(c_swizzle))
    scale_rows = groups_per_step if group_size < tile_k else 1
    steps = k_slice // tile_k
    if group_size >= tile_k:
        scale_index = lambda k: ((k * tile_k) // group_size, 0)
    else:
        scale_index = lambda k: (k, 0)
    pipeline = plgpu.emit_pipeline(
        step,
        grid=(steps,),
        in_specs=[
            plgpu.BlockSpec((m_padded, tile_k), lambda k: (0, k), transforms=x_transforms),
            plgpu.BlockSpec((tile_n, tile_k), lambda k: (0, k), transforms=c_transforms),
            plgpu.BlockSpec((scale_rows, tile_n), scale_index),
        ],
        max_concurrent_steps=cfg.stages,
        init_carry=plgpu.layout_cast(jnp.zeros((tile_n, m_padded), jnp.float32), plgpu.Layout.WGMMA),
    )
    g0 = k0 // group_size
    g_slice = max(k_slice // group_size, 1)
    acc = pipeline(
        x_gmem.at[:, pl.ds(k0, k_slice)],
        codes_gmem.at[pl.ds(n0, tile_n), pl.ds(k0, k_slice)],
        scale_gmem.at[pl.ds(g0, g_slice), pl.ds(n0, tile_n)],
    )
    out_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[s_idx, pl.ds(n0, tile_n)])
    plgpu.wait_smem_to_gmem(0)


def w4_matmul(x: jax.Array, w: W4Weight, config: W4Config | None = None) -> jax.Array:
    """x [M, K] (bf16/fp16) @ W [K, N] -> [M, N] in x's dtype, on Hopper tensor cores."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cfg = config or W4Config()
    k, n = w.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ConfigError(f"w4_matmul: activations {x.shape} do not match the weight's K={k}")
    m = x.shape[0]
    m_padded = max(8, -(-m // 8) * 8)
    check_config(cfg, w, m_padded)
    xb = x.astype(jnp.bfloat16)  # rows m .. m_padded of each TMA box are zero-filled (out of bounds)
    k_slice = k // cfg.splits
    body = functools.partial(_kernel_body, cfg=cfg, k_slice=k_slice, group_size=w.group_size,
                             m_padded=m_padded)
    partial_sums = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((cfg.splits, n, m_padded), jnp.float32),
        grid=(n // cfg.tile_n, cfg.splits),
        grid_names=("n", "s"),
        scratch_types=[plgpu.SMEM((cfg.tile_n, m_padded), jnp.float32)],
    )(xb, w.codes, w.scale)
    y = partial_sums.sum(0).T[:m]
    if w.bias is not None:
        y = y + bias_term(x, w)
    return y.astype(x.dtype)
