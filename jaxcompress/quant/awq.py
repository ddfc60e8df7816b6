"""AWQ (Lin et al., 2024): activation-aware per-channel scaling, then weight clipping, then RTN.

Per decoder block, following the reference implementation (llm-awq `auto_scale` / `auto_clip`):

1. Scale search, for each group of projections that share an input and the op producing it:
       input_layernorm          -> q, k, v      judged on the attention's output
       v_proj (if MHA)          -> o            judged on o_proj's output
       post_attention_layernorm -> gate, up     judged on the MLP's output
       up_proj                  -> down         judged on down_proj's output
   with s = mean|x| ** alpha (alpha = 0, 1/grid, ...), normalised by sqrt(max s * min s),
   pick the alpha minimising the mean squared error of the judged output when the group's
   weights are replaced by Q(W * s) / s. Then fold 1/s into the producing op (the RMSNorm's
   scale or the previous projection's output columns, bias included) and s into the rows of
   the group's weights: the float function is unchanged.
2. Clip search (all projections but q and k, whose errors the softmax amplifies): per group
   and output channel, the range max|w| * (1 - i / clip_grid) minimising the error of that
   group's partial outputs on a strided subsample of the (scaled) inputs.
3. RTN on the clipped, scaled weights.

Like the reference, the statistics are the float block's inputs and (by default) the next
block sees the float block's outputs (`awq.sequential: false`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.calibrate import Block, Method, Samples, submodule
from jaxcompress.models.rope import rope_cos_sin
from jaxcompress.quant.config import LayerConfig
from jaxcompress.quant.grid import GridSpec, fake_quantize, group_params, group_rows, per_row, weight_params
from jaxcompress.quant.rtn import rtn_quantize


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    prev: str              # the op producing the shared input: an RMSNorm or a projection
    linears: tuple         # projections reading that input
    inspect: str           # the module whose output judges a scale
    kind: str              # how to call it: "attention", "mlp" or "linear"


GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn",
               "attention"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", "linear"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "linear"),
)
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


def _apply(module, x, kind):
    if kind in ("linear", "mlp"):
        return module(x)
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out, _ = module(x, positions, rope_cos_sin(module.cfg, positions))
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "kind"))
def _outputs(graphdef, state, x, kind):
    return _apply(nnx.merge(graphdef, state), x, kind)


@functools.partial(jax.jit, static_argnames=("graphdef", "kind"))
def _squared_error(graphdef, state, x, ref, kind):
    out = _apply(nnx.merge(graphdef, state), x, kind)
    return jnp.sum(jnp.square(out.astype(jnp.float32) - ref.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnames=("g", "per_tensor", "spec"))
def _scaled_fake_quant(w, s, g, per_tensor, spec):
    """Q(W * s) / s for a kernel [K, N] and input-channel scales s [K], in w's dtype."""
    ws = w.astype(jnp.float32) * s[:, None]
    scale, zero = weight_params(ws, g, per_tensor, spec)
    k = w.shape[0]
    q = fake_quantize(ws, per_row(scale, k, g), per_row(zero, k, g), spec.bits)
    return (q / s[:, None]).astype(w.dtype)


@jax.jit
def _candidate_scales(x_mean, ratio):
    s = jnp.maximum(x_mean ** ratio, 1e-4)
    return s / jnp.sqrt(s.max() * s.min())


@jax.jit
def _abs_mean(x):
    """Mean |x| per channel [K] of x [n, T, K] (AWQ's activation statistic)."""
    return jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=(0, 1))


@functools.partial(jax.jit, static_argnames=("axis",))
def _scaled(x, s, axis: int):
    """x multiplied by s along `axis`, computed in fp32, returned in x's dtype."""
    shape = [1] * x.ndim
    shape[axis] = -1
    s = s.reshape(shape)
    return (x.astype(jnp.float32) * s).astype(x.dtype)


def _relative(inspect: str, name: str) -> str:
    return "" if name == inspect else name[len(inspect) + 1:]


def search_scale(block: Block, group: ScaleGroup, x, targets: dict[str, LayerConfig], grid: int):
    """(best scales s [K], best alpha, {alpha: error}) for a group, given its input samples x."""
    sub = submodule(block.module, group.inspect)
    graphdef, state = nnx.split(sub)
    refs = block.map_batches(lambda xb: _outputs(graphdef, state, xb, group.kind), x)
    x_mean = _abs_mean(x)
    count = sum(r.size for r in refs)
    errors, best = {}, None
    for i in range(grid):
        ratio = i / grid
        s = _candidate_scales(x_mean, jnp.float32(ratio))
        trial = nnx.clone(sub)
        for name, cfg in targets.items():
            lin = trial if name == group.inspect else submodule(trial, _relative(group.inspect, name))
            w = lin.kernel.get_value()
            lin.kernel.set_value(_scaled_fake_quant(w, s, cfg.group_for(w.shape[0], block.path(name)),
                                                    cfg.per_tensor, cfg.grid()))
        tg, ts = nnx.split(trial)
        err = sum(float(_squared_error(tg, ts, xb, rb, group.kind))
                  for xb, rb in zip(block.map_batches(lambda a: a, x), refs)) / count
        errors[round(ratio, 6)] = err
        if best is None or err < best[0]:
            best = (err, ratio, s)
    return best[2], best[1], errors


def apply_scale(block: Block, group: ScaleGroup, s) -> None:
    """Folds 1/s into the op producing the group's input and s into the group's weight rows."""
    prev = submodule(block.module, group.prev)
    inv = 1.0 / s
    if hasattr(prev, "kernel"):  # a projection: divide its output columns (and bias)
        prev.kernel.set_value(_scaled(prev.kernel.get_value(), inv, axis=1))
        if prev.bias is not None:
            prev.bias.set_value(_scaled(prev.bias.get_value(), inv, axis=0))
    else:  # an RMSNorm
        prev.scale.set_value(_scaled(prev.scale.get_value(), inv, axis=0))
    for name in group.linears:
        lin = submodule(block.module, name)
        lin.kernel.set_value(_scaled(lin.kernel.get_value(), s, axis=0))


@functools.partial(jax.jit, static_argnames=("g", "spec", "steps", "clip_grid", "tokens"))
def _clip(w, x, *, g: int, spec: GridSpec, steps: int, clip_grid: int, tokens: int):
    """w [K, N] clipped per (group, output channel) to the range that minimises the error of
    the group's partial outputs on a strided subsample of the inputs x [..., K]; also returns
    the mean chosen fraction of the original range."""
    k, n = w.shape
    x = x.reshape(-1, x.shape[-1])
    x = x[::max(1, x.shape[0] // tokens)][:tokens].astype(jnp.float32)
    wg = group_rows(w.astype(jnp.float32), g)        # [G, g, N]
    xg = group_rows(x.T, g).transpose(2, 0, 1)        # [T, G, g]
    org_max = jnp.abs(wg).max(axis=1)                 # [G, N]
    # The shrink factors rounded once from float64 on the host, as the reference's Python floats are.
    factors = jnp.asarray(np.array([1.0 - i / clip_grid for i in range(steps)], np.float64).astype(np.float32))

    def per_channel(args):  # one output channel: wc [G, g], mc [G]
        wc, mc = args
        org = jnp.einsum("tgk,gk->tg", xg, wc)

        def step(i, best):
            best_err, best_max = best
            mx = mc * factors[i]
            cur = jnp.clip(wc, -mx[:, None], mx[:, None])
            scale, zero = group_params(cur[:, :, None], spec)  # [G, 1]
            q = fake_quantize(cur, scale, zero, spec.bits)
            err = jnp.mean(jnp.square(jnp.einsum("tgk,gk->tg", xg, q) - org), axis=0)
            better = err < best_err
            return jnp.where(better, err, best_err), jnp.where(better, mx, best_max)

        return jax.lax.fori_loop(0, steps, step, (jnp.full(mc.shape, jnp.inf, jnp.float32), mc))[1]

    best = jax.lax.map(per_channel, (wg.transpose(2, 0, 1), org_max.T), batch_size=min(n, 256)).T  # [G, N]
    mx = per_row(best, k, g)
    clipped = jnp.clip(w.astype(jnp.float32), -mx, mx).astype(w.dtype)
    return clipped, jnp.mean(best / jnp.maximum(org_max, 1e-30))


def clip_weight(w, x, cfg: LayerConfig, where: str, tokens: int):
    """(w [K, N] clipped to AWQ's searched ranges, mean shrink) given inputs x [..., K]."""
    opts = cfg.awq
    clipped, shrink = _clip(w, x, g=cfg.group_for(w.shape[0], where), spec=cfg.grid(), tokens=tokens,
                            steps=int(opts.clip_max_shrink * opts.clip_grid), clip_grid=opts.clip_grid)
    return clipped, float(shrink)


@dataclasses.dataclass
class AWQ(Method):
    """AWQ on the calibration engine: taps the block's four distinct projection inputs."""

    grid: int = 20
    search_samples: int = 128
    sequential: bool = False

    def taps(self, block, targets):
        needed = {}
        for group in GROUPS:
            if any(name in targets for name in group.linears):
                needed[group.linears[0]] = Samples(max_seqs=self.search_samples)
        return needed

    def compress_block(self, block, stats, targets):
        info = {}
        inputs = dict(stats)
        for group in GROUPS:
            chosen = {n: targets[n] for n in group.linears if n in targets}
            if not chosen:
                continue
            if group.prev == "self_attn.v_proj" and not _same_shape(block, "self_attn.v_proj", "self_attn.o_proj"):
                continue  # grouped-query attention: v's outputs do not map one-to-one onto o's inputs
            if not all(isinstance(block.weight(n), jax.Array) for n in group.linears + _prev_linear(group)):
                continue  # a weight in the group is already compressed (a rule quantized it first)
            x = inputs[group.linears[0]]
            s, ratio, errors = search_scale(block, group, x, chosen, self.grid)
            apply_scale(block, group, s)
            inputs[group.linears[0]] = _scaled(x, 1.0 / s, axis=2)
            for name in chosen:
                info[block.path(name)] = {"awq_alpha": ratio, "awq_error": errors[round(ratio, 6)],
                                          "awq_error_alpha0": errors[0.0]}
        for group in GROUPS:
            for name in group.linears:
                if name not in targets:
                    continue
                cfg = targets[name]
                w = block.weight(name)
                entry = info.setdefault(block.path(name), {})
                if cfg.awq.clip_search and name not in NO_CLIP and not cfg.per_tensor:
                    w, entry["awq_clip_shrink"] = clip_weight(w, inputs[group.linears[0]], cfg, block.path(name),
                                                              cfg.awq.clip_tokens)
                block.set_weight(name, rtn_quantize(w, cfg, block.path(name)))
        return info


def _same_shape(block, a, b) -> bool:
    return tuple(block.weight(a).shape) == tuple(block.weight(b).shape)


def _prev_linear(group: ScaleGroup) -> tuple:
    return (group.prev,) if group.prev.endswith("_proj") else ()
