"""A few calls of one decode attention over a compressed cache, for a hardware-counter profiler.

    ncu --clock-control none --kernel-name regex:'kv_decode' --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \\
        --section MemoryWorkloadAnalysis \\
        python scripts/gpu/one_kv_decode.py --codec kivi_k2v2 --batch 8 --context 32768

The cache is `--model`'s layer (default Llama-2-7B heads) filled with random tokens through the
codec, as `scripts/bench_kv.py` fills it; the call is the codec's own decode path (what a model
runs: the Pallas kernel, exact tokens and glue). The first call compiles; the later ones run the
same program, so `--launch-skip` past the first call's kernels profiles warm calls. Prints the
output's relative error against the float reference.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxcompress.experiments.recipes import load_recipe  # noqa: E402
from jaxcompress.kv.bench import attend_fn, filled_layer, reference_output, relative_error  # noqa: E402
from jaxcompress.kv.recipe import build_codec  # noqa: E402
from jaxcompress.models.presets import preset  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codec", default="kivi_k2v2", help="a kv_cache recipe")
    p.add_argument("--model", default="llama2-7b", help="a preset (head shapes)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--calls", type=int, default=4)
    args = p.parse_args(argv)
    cfg = preset(args.model)
    codec = build_codec(load_recipe(args.codec)["kv_cache"])
    inputs = filled_layer(cfg, codec, args.batch, args.context)
    q = jax.random.normal(jax.random.key(1), (args.batch, 1, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    fn = jax.jit(attend_fn(inputs, cfg, "codec"))
    for _ in range(args.calls):
        out = jax.block_until_ready(fn(inputs.state, q))
    print(f"{args.codec} batch {args.batch} context {args.context}: relative error "
          f"{relative_error(out, reference_output(inputs, cfg, q)):.2e}")


if __name__ == "__main__":
    main()
