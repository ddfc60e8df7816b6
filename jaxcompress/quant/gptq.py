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

`sink_weight` (not in the paper; default 1) weights each calibration window's first token in
the Hessian: plain GPTQ can trade the attention-sink token's accuracy for the others'
(docs/results/quant_gptq_notes.md).

Each layer runs three jitted programs (preparation, inverse-Hessian factor, quantization loop)
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
from jaxcompress.quant.grid import GridSpec, group_params, weight_params
from jaxcompress.quant.rtn import uniform_qarray

HIGHEST = jax.lax.Precision.HIGHEST
INNER_UNROLL = 8  # rows of the inner loop per loop iteration (fewer device round trips)


@jax.jit
def _inverse_hessian_factor(h: jax.Array, damp: jax.Array) -> jax.Array:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1, i.e. H^-1 = U^T U (NaN where
    the Cholesky fails).

    With J the reversal permutation and J H J = L L^T, H = (J L J)(J L J)^T with J L J upper
    triangular, so H^-1 = U^T U for U = (J L J)^-1 = J L^-1 J: one Cholesky and one
    triangular inverse instead of the reference's Cholesky, inverse and second Cholesky.
    """
    k = h.shape[0]
    eye = jnp.eye(k, dtype=jnp.float32)
    h = h + damp * jnp.mean(jnp.diag(h)) * eye
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    return jax.scipy.linalg.solve_triangular(lower, eye, lower=True)[::-1, ::-1]


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


@dataclasses.dataclass(frozen=True)
class InverseHessian:
    """What GPTQ needs from a Hessian: U, the act-order permutation, the dead features."""

    u: jax.Array      # [K, K] upper Cholesky factor of the damped inverse (permuted)
    perm: jax.Array   # [K] storage order (identity without act-order)
    dead: jax.Array   # [K] bool, features calibration never activates
    damp: float       # the damping that succeeded


@functools.partial(jax.jit, static_argnames=("act_order",))
def _order(h, act_order: bool):
    """Dead features get H_ii = 1 (as the reference); the act-order permutation of H."""
    k = h.shape[0]
    diag = jnp.diag(h)
    dead = diag == 0
    h = h.at[jnp.arange(k), jnp.arange(k)].set(jnp.where(dead, 1.0, diag))
    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(k)
    return h[perm][:, perm], perm, dead


def inverse_hessian(h: jax.Array, opts, where: str = "") -> InverseHessian:
    """Prepares a Hessian [K, K] for `gptq_quantize` (shareable by layers with the same inputs)."""
    hs, perm, dead = _order(jnp.asarray(h, jnp.float32), act_order=opts.act_order)
    u, damp = inverse_hessian_factor(hs, opts.damp, opts.max_damp, where)
    return InverseHessian(u, perm, dead, damp)


@functools.partial(jax.jit, static_argnames=("static", "g", "per_tensor", "spec"))
def _prepare_weight(w, dead, perm, *, static: bool, g: int, per_tensor: bool, spec: GridSpec):
    """Dead features zeroed, rows in storage order, and the fixed grids of static mode (taken
    from the unpermuted weights)."""
    w = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))
    gscale = gzero = None
    if static:
        gscale, gzero = weight_params(w, g, per_tensor, spec)
    return w[perm], gscale, gzero


def _pad(x, rows, cols=None, diag=0.0):
    """Zero-pads x to `rows` rows (and `cols` columns with `diag` on the new diagonal)."""
    if cols is None:
        return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))
    out = jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))
    idx = jnp.arange(x.shape[0], rows)
    return out.at[idx, idx].set(diag)


@functools.partial(jax.jit, static_argnames=("spec", "g", "block", "dynamic", "unroll"))
def _gptq_loop(w, u, gscale, gzero, gidx, *, spec: GridSpec, g: int, block: int, dynamic: bool, unroll: int):
    """The GPTQ sweep over the rows of w [K, N] (storage order) with U [K, K].

    Rows are zero-padded (padding rows have U = I and never touch real rows). Static grids:
    gscale/gzero [G, N] (or [1, 1]) are given and row r uses group gidx[r]. Dynamic grids:
    at each block start, the grid of every group starting inside the block is computed from
    the weights as they are then (the reference's behaviour), and row r uses group r // g.
    Returns codes [K, N] int32, gscale, gzero and the reference's loss sum (w - q)^2 / U_ii^2 / 2.
    """
    k, n = w.shape
    maxq = spec.maxq
    blocks = -(-k // block)
    starts_per_block = -(-block // g)  # at most this many groups start inside one block
    # Room for the last group windows past the last block (zero rows: grids are unchanged).
    kp = blocks * block + (-(-(starts_per_block + 1) * g // block) * block if dynamic else 0)
    w = _pad(w, kp)
    u = _pad(u, kp, kp, diag=1.0)
    if dynamic:
        groups = -(-k // g)
        gscale = jnp.zeros((groups, n), jnp.float32)
        gzero = jnp.zeros((groups, n), jnp.float32)
    else:
        gidx = jnp.pad(gidx, (0, kp - k))

    def block_params(w, gscale, gzero, i1):
        """Per-row scale and zero [block, N] for the rows of the block starting at i1."""
        if not dynamic:
            rows = jax.lax.dynamic_slice_in_dim(gidx, i1, block)
            return gscale[rows], gzero[rows], gscale, gzero
        starts = (i1 + g - 1) // g * g + g * jnp.arange(starts_per_block)
        windows = jax.vmap(lambda r: jax.lax.dynamic_slice_in_dim(w, r, g))(starts)  # [J, g, N]
        s, z = group_params(windows, spec)
        slot = jnp.where((starts < i1 + block) & (starts < k), starts // g, gscale.shape[0])  # else dropped
        gscale = gscale.at[slot].set(s, mode="drop")
        gzero = gzero.at[slot].set(z, mode="drop")
        rows = jnp.minimum((i1 + jnp.arange(block)) // g, gscale.shape[0] - 1)
        return gscale[rows], gzero[rows], gscale, gzero

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
    _, codes, gscale, gzero, loss = jax.lax.fori_loop(0, blocks, block_step, init)
    return codes[:k], gscale, gzero, loss


def gptq_quantize(w: jax.Array, h: jax.Array | None, cfg: LayerConfig, where: str = "",
                  inverse: InverseHessian | None = None, unroll: int | None = None):
    """GPTQ-quantizes a dense kernel w [K, N] given the Hessian h [K, K] of its inputs (or its
    `inverse_hessian`, shared by projections that read the same inputs).

    Returns (QArray, info) where info has the damping used and the reference's loss."""
    opts = cfg.gptq
    k, n = w.shape
    g = cfg.group_for(k, where)
    if inverse is None:
        if tuple(h.shape) != (k, k):
            raise UserError(f"{where}: Hessian has shape {tuple(h.shape)}, expected ({k}, {k})")
        inverse = inverse_hessian(h, opts, where)
    spec = cfg.grid()
    # Per-channel / per-tensor grids, and static groups, are fixed before the sweep.
    static = g == k or cfg.per_tensor or opts.static_groups
    ws, gscale, gzero = _prepare_weight(w, inverse.dead, inverse.perm, static=static, g=g,
                                        per_tensor=cfg.per_tensor, spec=spec)
    gidx = None
    if static:  # group of each storage row
        gidx = np.zeros(k, np.int32) if gscale.shape[0] == 1 else np.arange(k, dtype=np.int32) // g
        gidx = jnp.asarray(gidx)[inverse.perm]
    if unroll is None:  # unrolling saves device round trips on GPUs and costs compile time on CPUs
        unroll = 1 if jax.default_backend() == "cpu" else INNER_UNROLL
    with jax.default_matmul_precision("highest"):
        codes, gscale, gzero, loss = _gptq_loop(ws, inverse.u, gscale, gzero, gidx, spec=spec, g=g,
                                                block=min(opts.block_size, k), dynamic=not static, unroll=unroll)
    store_perm = inverse.perm if opts.act_order else None
    if opts.act_order and static:
        codes = _unpermute(codes, inverse.perm)  # static grids follow feature order: no permutation to store
        store_perm = None
    q = uniform_qarray(codes, gscale, gzero, cfg, g, w.dtype, perm=store_perm)
    return q, {"damp": inverse.damp, "loss": float(loss)}


@jax.jit
def _unpermute(codes, perm):
    return jnp.zeros_like(codes).at[perm].set(codes)


@dataclasses.dataclass
class GPTQ(LayerMethod):
    """GPTQ on the calibration engine: statistic X^T X, per-layer `gptq_quantize`."""

    true_sequential: bool = True
    sequential: bool = True

    def statistic(self, path, cfg):
        return Hessian(first_token_weight=float(cfg.gptq.sink_weight))

    def stages(self, names):
        return [list(s) for s in TRUE_SEQUENTIAL] if self.true_sequential else [names]

    def compress_block(self, block, stats, targets):
        # q/k/v (and gate/up) share one Hessian object: factor it once for them all.
        inverses, info = {}, {}
        for name, cfg in targets.items():
            path = block.path(name)
            key = (id(stats[name]), cfg.gptq.act_order, cfg.gptq.damp, cfg.gptq.max_damp)
            if key not in inverses:
                inverses[key] = inverse_hessian(stats[name], cfg.gptq, path)
            q, info[path] = gptq_quantize(block.weight(name), None, cfg, path, inverse=inverses[key])
            block.set_weight(name, q)
        return info
