"""Where does batch-1 decode time go? Times, on the current device, the pieces of one decode
step of a Llama-2-7B-shaped model against the bandwidth floor (notes in docs/results/decode_notes.md).

    PYTHONPATH=. python scripts/decode_probe.py [--out probe.json]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress.bench.timing import copy_bandwidth, median_seconds
from jaxcompress.models.build import param_summary, random_model
from jaxcompress.models.presets import preset
from jaxcompress.ops.linear import dense_linear

SHAPES = [(4096, 4096)] * 4 + [(4096, 11008), (4096, 11008), (11008, 4096)]


def gemv_stack(layers: int, fused_f32: bool):
    """x -> every projection of `layers` layers in turn, each on its own weight buffer."""
    keys = jax.random.split(jax.random.key(0), layers * len(SHAPES))
    ws = [jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, SHAPES * layers)]

    @jax.jit
    def run(ws, x):
        acc = jnp.zeros((1, 4096), jnp.float32)
        for i, w in enumerate(ws):
            inp = x if w.shape[0] == 4096 else jnp.zeros((1, w.shape[0]), jnp.bfloat16) + x[:, :1]
            y = dense_linear(inp, w) if fused_f32 else jnp.dot(inp, w)
            acc = acc + y[:, :4096].astype(jnp.float32)
        return acc

    x = jax.random.normal(jax.random.key(1), (1, 4096), jnp.bfloat16)
    nbytes = sum(w.size * 2 for w in ws)
    return median_seconds(run, ws, x, repeats=10), nbytes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    args = p.parse_args()
    bw = copy_bandwidth()
    rows = {"copy_bandwidth_GBps": bw / 1e9}
    for fused in (False, True):
        t, nbytes = gemv_stack(32, fused)
        rows[f"gemv_stack_{'f32acc' if fused else 'plain'}"] = {"ms": t * 1e3, "GBps": nbytes / t / 1e9,
                                                               "fraction": nbytes / t / bw}
    cfg = preset("llama2-7b")
    model = random_model(cfg, jnp.bfloat16)
    graphdef, state = nnx.split(model)
    weight_bytes = param_summary(model)["bytes"]

    @jax.jit
    def step_nocache(state, tok):
        return nnx.merge(graphdef, state)(tok)[0]

    tok = jnp.ones((1, 1), jnp.int32)
    t = median_seconds(step_nocache, state, tok, repeats=10)
    rows["model_step_no_cache"] = {"ms": t * 1e3, "fraction": weight_bytes / t / bw}
    print(json.dumps(rows, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
