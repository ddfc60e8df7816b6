"""Held-out layer errors: how well each compressed projection reproduces its float outputs.

    hessians = heldout_hessians(float_model, tokens)          # {path: X^T X / n}, float inputs
    errors = layer_errors(float_model, compressed_model, hessians)

For a projection with float weight W [K, N], compressed weight Q and the Hessian H of its
float-model inputs on held-out text, the relative output error is

    ||X (Q - W)||^2 / ||X W||^2 = tr(D^T H D) / tr(W^T H W),   D = Q - W,

the quantity GPTQ minimizes on its calibration inputs. On held-out inputs it tells a method
that fits its calibration text from one that generalizes, layer by layer, before any
perplexity is computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.calibrate import LINEARS, Block, Hessian, _batch_size, calibration_inputs
from jaxcompress.models.build import flat_params, path_str
from jaxcompress.ops.linear import dense_weight

HIGHEST = jax.lax.Precision.HIGHEST


def heldout_hessians(model, tokens, batch_size: int = 8) -> dict[str, jax.Array]:
    """{kernel path: H [K, K]} of every decoder projection's inputs in the float model on
    tokens [n, T] (projections reading the same input share one array)."""
    x = calibration_inputs(model, tokens)
    out = {}
    bs = _batch_size(int(np.shape(tokens)[0]), batch_size)
    for i, layer in enumerate(model.layers):
        block = Block(i, layer, bs)
        stats, _ = block.accumulate(x, {name: Hessian() for name in LINEARS})
        out.update({block.path(name): h for name, h in stats.items()})
        x = block.run(x)
    return out


@jax.jit
def _relative_error(w, q, h):
    d = q.astype(jnp.float32) - w.astype(jnp.float32)
    w = w.astype(jnp.float32)
    num = jnp.sum(d * jnp.dot(h, d, precision=HIGHEST))
    den = jnp.sum(w * jnp.dot(h, w, precision=HIGHEST))
    return num / den


def layer_errors(reference, compressed, hessians: dict[str, jax.Array]) -> dict[str, float]:
    """{path: relative output error} for the paths of `hessians` (see the module doc)."""
    ref = {path_str(p): v for p, v in flat_params(reference).items()}
    new = {path_str(p): v for p, v in flat_params(compressed).items()}
    return {path: float(_relative_error(dense_weight(ref[path]), dense_weight(new[path]), h))
            for path, h in hessians.items()}


def summarize(errors: dict[str, float]) -> dict[str, float]:
    """Mean relative error per projection kind (`self_attn.q_proj`, ...) and over all."""
    kinds: dict[str, list[float]] = {}
    for path, e in errors.items():
        kind = ".".join(path.split(".")[2:4])
        kinds.setdefault(kind, []).append(e)
    out = {k: float(np.mean(v)) for k, v in sorted(kinds.items())}
    out["all"] = float(np.mean(list(errors.values())))
    return out
