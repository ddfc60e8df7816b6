"""Run the packed KV decode kernel once at Llama-2-7B head shapes, for a profiler to watch.

    ncu --clock-control none --kernel-name regex:kv_decode --launch-skip 1 --launch-count 1 \
        --section WarpStateStats --section Occupancy --section LaunchStats \
        python scripts/profile_kv_decode.py --batch 8 --context 32768 --path cw16

Builds a KIVI cache with random keys and values (jaxcompress.kv.bench.filled_layer), compiles
the kernel alone (no exact tokens, no XLA glue of the codec path) and calls it twice: the first
call compiles, the second is the one to profile (--launch-skip 1)."""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts.bench_kv


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--recipe", default="kivi_k2v2", help="a kv_cache recipe (name[:layout[:columns]])")
    p.add_argument("--path", default="auto", help="kernel body: auto, mma, cw, cw16, cw2")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--cw2", default="", help="cw2 options as bench_kv.py --kernel-variants reads them (e.g. vwg+vp2+vlop3)")
    args = p.parse_args(argv)

    from jaxcompress.kv.bench import filled_layer, kernel_only_fn
    from jaxcompress.models.presets import preset
    from scripts.bench_kv import codec_for, parse_cw2

    cfg = preset("llama2-7b")
    inputs = filled_layer(cfg, codec_for(args.recipe, cfg), args.batch, args.context, seed=0)
    q = jax.random.normal(jax.random.key(1), (args.batch, 1, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    fn = jax.jit(kernel_only_fn(inputs, cfg, {"path": args.path, "num_warps": args.warps,
                                                        **({"cw2": parse_cw2(args.cw2)} if args.cw2 else {})}))
    for _ in range(2):
        out = fn(inputs.state, q).block_until_ready()
    print(f"{args.recipe} path {args.path} batch {args.batch} context {args.context}: output {out.shape}, "
          f"finite {bool(jnp.isfinite(out).all())}")


if __name__ == "__main__":
    main()
