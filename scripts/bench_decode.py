"""Prefill and decode throughput of a model on the current device, with a bandwidth roofline.

    PYTHONPATH=. python scripts/bench_decode.py --model random:llama2-7b --out docs/results/decode_h100.json
    PYTHONPATH=. python scripts/bench_decode.py --model random:llama2-7b --recipe rtn_w4_g128 ...
    ... --fuse-projections   (q|k|v and gate|up as one matmul each, as served)
    ... --wgmma              (2-, 3-, 4- and 8-bit weights repacked for the Hopper wgmma kernel)

Decode runs inside one jitted `lax.while_loop` (the same loop `generate` uses) over a cache
already holding `--context` tokens; the median of three loops of `--steps` tokens, each continuing
the (donated) cache the last one left. Batch-1 decode is memory-bound, so its floor is
(weight bytes + cache bytes read per step) / copy bandwidth, measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress.bench.timing import copy_bandwidth, median_carried_seconds, median_seconds
from jaxcompress.io.atomic import write_json
from jaxcompress.io.load import load_model
from jaxcompress.models.build import param_summary
from jaxcompress.models.cache import KVCache
from jaxcompress.models.generate import SamplingConfig, decode_loop, prefill
from jaxcompress.provenance import provenance


def filled_cache(key, cfg, batch, context, max_len, dtype, codec):
    """A cache whose first `context` slots hold random keys/values (as after a prefill)."""
    cache = KVCache.create(cfg, batch, max_len, dtype, codec)
    shape = (batch, context, cfg.num_kv_heads, cfg.head_dim)
    layers = []
    for state in cache.layers:
        key, kk, kv = jax.random.split(key, 3)
        k = jax.random.normal(kk, shape, dtype)
        v = jax.random.normal(kv, shape, dtype)
        layers.append(cache.codec.write(state, k, v, jnp.int32(0)))
    positions = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (batch, context))
    cache = KVCache(tuple(layers), cache.positions, cache.index, cache.codec)
    return cache.advance(positions)


def bench_decode(loaded, batch, context, steps):
    model = loaded.model
    cfg = model.config
    graphdef, state = nnx.split(model)
    sampling = SamplingConfig(max_new_tokens=steps)

    # The cache is donated and each loop continues where the last stopped, as in `generate`
    # (which builds its cache inside the jitted function): no copy of the whole cache per loop.
    @functools.partial(jax.jit, donate_argnums=0)
    def run(cache, state, logits):
        m = nnx.merge(graphdef, state)
        next_pos = jnp.broadcast_to(cache.index, (batch,)).astype(jnp.int32)
        out, _, cache = decode_loop(m, logits, cache, next_pos, jax.random.key(0), (), sampling, return_cache=True)
        return out, cache

    runs = 4  # a warm-up and three timed loops
    # The key is an argument so that XLA cannot constant-fold the random fill at compile time.
    cache = jax.jit(lambda key: filled_cache(key, cfg, batch, context, context + steps * runs, model.dtype,
                                             loaded.kv_codec))(jax.random.key(0))
    logits = jax.random.normal(jax.random.key(1), (batch, cfg.vocab_size), jnp.float32)
    seconds, _ = median_carried_seconds(run, cache, state, logits, runs=runs)
    cache_bytes_per_step = batch * context * cfg.num_layers * (loaded.kv_codec.bytes_per_token(
        cfg.num_kv_heads, cfg.head_dim, model.dtype) if loaded.kv_codec else
        2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(model.dtype).itemsize)
    return seconds / steps, cache_bytes_per_step


def bench_prefill(loaded, context):
    model = loaded.model
    cfg = model.config
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        m = nnx.merge(graphdef, state)
        cache = KVCache.create(cfg, tokens.shape[0], tokens.shape[1], m.dtype, loaded.kv_codec)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return prefill(m, tokens, positions, cache)[0]

    tokens = jax.random.randint(jax.random.key(2), (1, context), 0, cfg.vocab_size)
    return median_seconds(run, state, tokens, warmup=1, repeats=3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama2-7b")
    p.add_argument("--recipe", help="compress first (e.g. rtn_w4_g128)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set weights.symmetric=true (repeatable)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--fuse-projections", action="store_true",
                   help="serve q|k|v and gate|up as one matmul each (jaxcompress.models.fuse)")
    p.add_argument("--wgmma", action="store_true",
                   help="repack 2-, 3-, 4- and 8-bit weights for the Hopper wgmma kernel (jaxcompress.models.repack), after fusing")
    p.add_argument("--wgmma-pad-k", action=argparse.BooleanOptionalAction, default=True,
                   help="with --wgmma: store a K that 256-column steps split badly (11008) padded with zeros "
                        "(repack_for_wgmma's default; --no-wgmma-pad-k keeps it unpadded)")
    p.add_argument("--skip-prefill", action="store_true", help="decode only (saves a compile)")
    p.add_argument("--copy-mib", type=int, default=2048, help="array size of the copy-bandwidth measurement")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.set and not args.recipe:
        p.error("--set overrides a recipe's fields: give --recipe too")
    start = time.perf_counter()
    elapsed = lambda: f"[{time.perf_counter() - start:.0f} s]"  # noqa: E731  (where a slow compile goes)

    dtype = jnp.dtype(args.dtype)
    loaded = load_model(args.model, dtype=dtype, param_dtype=dtype)
    if args.recipe:
        from jaxcompress.experiments.recipes import apply_recipe, load_recipe

        loaded = apply_recipe(loaded, load_recipe(args.recipe, args.set))
    if args.fuse_projections:
        from jaxcompress.models.fuse import fuse_projections

        fused, report = fuse_projections(loaded.model)
        loaded = dataclasses.replace(loaded, model=fused)
        print(report.summary(), elapsed(), flush=True)
    if args.wgmma:
        from jaxcompress.models.repack import repack_for_wgmma

        repacked, report = repack_for_wgmma(loaded.model, pad_k=args.wgmma_pad_k)
        loaded = dataclasses.replace(loaded, model=repacked)
        print(report.summary(), elapsed(), flush=True)
    weight_bytes = param_summary(loaded.model)["bytes"]
    bandwidth = copy_bandwidth(args.copy_mib << 20)
    record = {"model": args.model, "recipe": args.recipe, "overrides": args.set,
              "fused_projections": args.fuse_projections,
              "wgmma": args.wgmma, "wgmma_pad_k": args.wgmma and args.wgmma_pad_k,
              "dtype": dtype.name, "context": args.context,
              "weight_bytes": weight_bytes, "copy_bandwidth_GBps": bandwidth / 1e9, "decode": [], **provenance()}
    if not args.skip_prefill:
        prefill_s = bench_prefill(loaded, args.context)
        record["prefill"] = {"tokens": args.context, "seconds": prefill_s, "tokens_per_s": args.context / prefill_s}
        print(f"prefill {args.context} tokens: {prefill_s * 1e3:.1f} ms, {args.context / prefill_s:,.0f} tok/s",
              flush=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        step_s, cache_bytes = bench_decode(loaded, batch, args.context, args.steps)
        floor = (weight_bytes + cache_bytes) / bandwidth
        row = {"batch": batch, "ms_per_step": step_s * 1e3, "tokens_per_s": batch / step_s,
               "bytes_per_step": weight_bytes + cache_bytes, "roofline_ms": floor * 1e3,
               "roofline_fraction": floor / step_s}
        record["decode"].append(row)
        if args.out:  # after every batch, so a timeout keeps what was measured
            write_json(args.out, record)
        print(f"{elapsed()} decode batch {batch}: {row['ms_per_step']:.2f} ms/step, {row['tokens_per_s']:,.1f} tok/s, "
              f"roofline {row['roofline_ms']:.2f} ms -> {row['roofline_fraction']:.1%}", flush=True)
    if args.out:
        write_json(args.out, record)
    print(f"\n| batch | ms/step | tok/s | roofline fraction |   ({record['device']}, bw {bandwidth / 1e9:.0f} GB/s)")
    for row in record["decode"]:
        print(f"| {row['batch']} | {row['ms_per_step']:.2f} | {row['tokens_per_s']:.1f} | {row['roofline_fraction']:.1%} |")


if __name__ == "__main__":
    sys.exit(main())
