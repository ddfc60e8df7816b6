"""GPTQ (Frantar et al., 2023): quantize input features one at a time, spreading each one's
rounding error over the features not yet quantized through the inverse Hessian.

For a dense kernel W [K, N] and the Hessian H = X^T X of its calibration inputs (K x K):

    dead features (H_ii = 0) are zeroed; act-order permutes features by decreasing H_ii
    U = upper Cholesky factor of (H + damp * mean(diag H) * I)^-1    (damp escalates x10
        while the Cholesky fails, up to `max_damp`; beyond it the layer is reported)
    for each block of B rows (lazy batch updates):
        for row i in the block:  q_i = grid(w_i);  e_i = (w_i - q_i) / U_ii
                                 w_j -= U_ij e_i  for the rows j > i of the block
        w_rest -= U[block, rest]^T E_block      (one matmul for the rows after the block)

Group parameters (scale, zero) follow the reference code: a group's grid is computed when the
loop reaches its first row, from the weights as updated by all *previous blocks* (the rows
of the current block carry their in-block updates separately, as in the reference). With
`static_groups` every group's grid is fixed up front from the original weights, so act-order
needs no stored permutation. Per-channel and per-tensor grids are fixed up front too.

Everything per layer runs in two jitted programs (inverse-Hessian factor, quantization loop)
in fp32 at HIGHEST matmul precision (no TF32), as the reference disables TF32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.calibrate import TRUE_SEQUENTIAL, Hessian, LayerMethod
from jaxcompress.errors import UserError
from jaxcompress.quant.config import LayerConfig
from jaxcompress.quant.grid import GridSpec, group_params, group_rows, weight_params
from jaxcompress.quant.rtn import uniform_qarray

HIGHEST = jax.lax.Precision.HIGHEST
INNER_UNROLL = 8  # rows of the inner loop per loop iteration (fewer device round trips)


@jax.jit
def _inverse_hessian_factor(h: jax.Array, damp: jax.Array) -> jax.Array:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1 (NaN where it fails)."""
    k = h.shape[0]
    eye = jnp.eye(k, dtype=jnp.float32)
    h = h + damp * jnp.mean(jnp.diag(h)) * eye
    lower = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), eye)
    return jnp.linalg.cholesky(h_inv).T


def inverse_hessian_factor(h: jax.Array, damp: float, max_damp: float, where: str) -> tuple[jax.Array, float]:
    """(U, damp actually used); escalates damp x10 until the Cholesky succeeds."""
    tried = []
    d = damp
    while True:
        with jax.default_matmul_precision("highest"):
            u = _inverse_hessian_factor(h, jnp.float32(d))
        if bool(jnp.isfinite(u).all()):
            return u, d
        tried.append(d)
        if d >= max_damp or d <= 0:
            break
        d = min(d * 10, max_damp)
    raise UserError(f"{where}: the Hessian of its calibration inputs is not positive definite even with "
                    f"damp={tried[-1]:g} (tried {', '.join(f'{t:g}' for t in tried)}; mean diagonal "
                    f"{float(jnp.mean(jnp.diag(h))):.4g}); raise weights.gptq.max_damp or use more or "
                    f"different calibration data")


def _block_size(block_size: int, g: int, dynamic: bool, k: int) -> int:
    """Rows per lazy block; with per-group grids a block holds whole groups (or a group whole
    blocks), so every group's grid can be computed at a block boundary."""
    if not dynamic:
        return min(block_size, k)
    if g <= block_size:
        return min((block_size // g) * g, -(-k // g) * g)
    divisors = [d for d in range(16, block_size + 1) if g % d == 0]
    return max(divisors) if divisors else g


@functools.partial(jax.jit, static_argnames=("spec", "g", "block", "dynamic", "unroll"))
def _gptq_loop(w, u, gscale, gzero, gidx, *, spec: GridSpec, g: int, block: int, dynamic: bool, unroll: int):
    """The GPTQ sweep over rows of w [Kp, N] (storage order, zero-padded), U [Kp, Kp].

    Static grids: gscale/gzero [G, N] (or [1, 1]) are given and row r uses group gidx[r].
    Dynamic grids: gscale/gzero [Kp / g, N] are filled as the sweep reaches each group.
    Returns codes [Kp, N] int32, gscale, gzero and the reference's loss sum (w - q)^2 / U_ii^2 / 2.
    """
    kp, n = w.shape
    maxq = spec.maxq

    def block_params(w, gscale, gzero, i1):
        if not dynamic:
            rows = jax.lax.dynamic_slice_in_dim(gidx, i1, block)
            return gscale[rows], gzero[rows], gscale, gzero
        if g <= block:  # the block holds block // g whole groups
            blk = jax.lax.dynamic_slice_in_dim(w, i1, block)
            s, z = group_params(blk.reshape(block // g, g, n), spec)
            gscale = jax.lax.dynamic_update_slice_in_dim(gscale, s, i1 // g, 0)
            gzero = jax.lax.dynamic_update_slice_in_dim(gzero, z, i1 // g, 0)
            return jnp.repeat(s, g, axis=0), jnp.repeat(z, g, axis=0), gscale, gzero

        def new_group(args):  # the block starts a group of g rows
            gscale, gzero = args
            s, z = group_params(jax.lax.dynamic_slice_in_dim(w, i1, g)[None], spec)
            return (jax.lax.dynamic_update_slice_in_dim(gscale, s, i1 // g, 0),
                    jax.lax.dynamic_update_slice_in_dim(gzero, z, i1 // g, 0))

        gscale, gzero = jax.lax.cond(i1 % g == 0, new_group, lambda a: a, (gscale, gzero))
        s = jnp.broadcast_to(gscale[i1 // g], (block, n))
        z = jnp.broadcast_to(gzero[i1 // g], (block, n))
        return s, z, gscale, gzero

    def block_step(b, carry):
        w, codes, gscale, gzero, loss = carry
        i1 = b * block
        rs, rz, gscale, gzero = block_params(w, gscale, gzero, i1)
        rs = jnp.broadcast_to(rs, (block, n))
        rz = jnp.broadcast_to(rz, (block, n))
        w1 = jax.lax.dynamic_slice_in_dim(w, i1, block)
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (block, block))

        def row_step(i, c):
            w1, q1, e1, loss = c
            x = w1[i]
            code = jnp.clip(jnp.round(x / rs[i]) + rz[i], 0, maxq)
            err = (x - (code - rz[i]) * rs[i]) / u1[i, i]
            w1 = w1 - u1[i][:, None] * err[None, :]  # U is upper triangular: rows >= i only
            return w1, q1.at[i].set(code.astype(jnp.int32)), e1.at[i].set(err), loss + 0.5 * jnp.sum(err * err)

        init = (w1, jnp.zeros((block, n), jnp.int32), jnp.zeros((block, n), jnp.float32), loss)
        _, q1, e1, loss = jax.lax.fori_loop(0, block, row_step, init, unroll=min(unroll, block))
        codes = jax.lax.dynamic_update_slice_in_dim(codes, q1, i1, 0)
        # Lazy update of every later row at once (earlier rows get 0: U is upper triangular;
        # the block's own rows are done and never read again).
        u_rows = jax.lax.dynamic_slice_in_dim(u, i1, block)  # [block, Kp]
        w = w - jnp.dot(u_rows.T, e1, precision=HIGHEST)
        return w, codes, gscale, gzero, loss

    init = (w, jnp.zeros((kp, n), jnp.int32), gscale, gzero, jnp.zeros((), jnp.float32))
    _, codes, gscale, gzero, loss = jax.lax.fori_loop(0, kp // block, block_step, init)
    return codes, gscale, gzero, loss


def _pad_to(x: jax.Array, rows: int, cols: int | None = None, diag: float = 0.0) -> jax.Array:
    """Zero-pads x to `rows` rows (and `cols` columns, with `diag` on the new diagonal)."""
    pr = rows - x.shape[0]
    if cols is None:
        return jnp.pad(x, ((0, pr), (0, 0)))
    out = jnp.pad(x, ((0, pr), (0, cols - x.shape[1])))
    if pr:
        idx = jnp.arange(x.shape[0], rows)
        out = out.at[idx, idx].set(diag)
    return out


def gptq_quantize(w: jax.Array, h: jax.Array, cfg: LayerConfig, where: str = "", unroll: int = INNER_UNROLL):
    """GPTQ-quantizes a dense kernel w [K, N] given the Hessian h [K, K] of its inputs.

    Returns (QArray, info) where info has the damping used and the reference's loss."""
    opts = cfg.gptq
    k, n = w.shape
    g = cfg.group_for(k, where)
    spec = cfg.grid()
    dtype = w.dtype
    w = w.astype(jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    if h.shape != (k, k):
        raise UserError(f"{where}: Hessian has shape {h.shape}, expected ({k}, {k})")
    dead = jnp.diag(h) == 0  # features never active in calibration: zeroed, as the reference does
    h = h.at[jnp.arange(k), jnp.arange(k)].set(jnp.where(dead, 1.0, jnp.diag(h)))
    w = jnp.where(dead[:, None], 0.0, w)

    grouped = g < k and not cfg.per_tensor
    static = not grouped or opts.static_groups
    if static:  # grids fixed up front from the original (dead-zeroed) weights
        gscale, gzero = weight_params(w, g, cfg.per_tensor, spec)
        gidx = np.zeros(k, np.int32) if gscale.shape[0] == 1 else np.arange(k, dtype=np.int32) // g
    perm = None
    if opts.act_order:
        perm = jnp.argsort(-jnp.diag(h), stable=True)
        w, h = w[perm], h[perm][:, perm]
        if static:
            gidx = np.asarray(gidx)[np.asarray(perm)]
    u, damp = inverse_hessian_factor(h, opts.damp, opts.max_damp, where)

    block = _block_size(opts.block_size, g, not static, k)
    step = block if static else max(block, g)  # a dynamic group of g > block rows is sliced whole
    kp = -(-k // step) * step
    w_p = _pad_to(w, kp)
    u_p = _pad_to(u, kp, kp, diag=1.0)
    if static:
        gidx_p = jnp.asarray(np.pad(gidx, (0, kp - k)))
    else:
        gscale = jnp.zeros((kp // g, n), jnp.float32)
        gzero = jnp.zeros((kp // g, n), jnp.float32)
        gidx_p = jnp.zeros((kp,), jnp.int32)  # unused
    with jax.default_matmul_precision("highest"):
        codes, gscale, gzero, loss = _gptq_loop(w_p, u_p, gscale, gzero, gidx_p, spec=spec, g=g, block=block,
                                                dynamic=not static, unroll=unroll)
    codes = codes[:k]
    if not static:
        groups = -(-k // g)
        gscale, gzero = gscale[:groups], gzero[:groups]
    store_perm = perm
    if perm is not None and static:
        codes = codes[jnp.argsort(perm)]  # back to feature order: static grids need no permutation
        store_perm = None
    q = uniform_qarray(codes, gscale, gzero, cfg, g, dtype, perm=store_perm)
    return q, {"damp": damp, "loss": float(loss)}


@dataclasses.dataclass
class GPTQ(LayerMethod):
    """GPTQ on the calibration engine: statistic X^T X, per-layer `gptq_quantize`."""

    true_sequential: bool = True
    sequential: bool = True

    def statistic(self, path, cfg):
        return Hessian()

    def stages(self, names):
        return [list(s) for s in TRUE_SEQUENTIAL] if self.true_sequential else [names]

    def compress_layer(self, path, w, stat, cfg: LayerConfig):
        return gptq_quantize(w, stat, cfg, path)
