"""In-process A/B of the `evict_first` hint on KIVI-2's decode kernel (cw2) code-word loads (issue 6).

Run 10b timed the hint across two processes, whose spread (up to ~20% at batch 1, kv_notes run 10)
is as large as the effect. Here both settings run in one process, alternating (A B A B ...), as
the kernel's static `eviction` option (each setting its own compilation). Llama-2-7B head
shapes, 32k tokens, the kernel alone (no exact tokens, no XLA glue). Prints the median over
rounds of each setting's time a call, and writes JSON. (Run 10d's version switched the hint by an
environment variable read at trace time, under a jit that cached the first trace: both of its
settings ran the same kernel, so its numbers say nothing about the hint.)

    PYTHONPATH=. JAX_PLATFORMS=cuda python scripts/gpu/kv_eviction_ab.py --out $OUT --batches 1,8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SETTINGS = {"none": None, "evict_first": "evict_first"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=8)
    args = ap.parse_args(argv)

    from jaxcompress.io.atomic import write_json
    from jaxcompress.kv.bench import attend_fn, filled_layer, time_attention
    from jaxcompress.models.presets import preset
    from scripts.bench_kv import codec_for

    cfg = preset("llama2-7b")
    results = []
    for batch in map(int, args.batches.split(",")):
        q = jax.random.normal(jax.random.key(1), (batch, 1, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
        inputs = filled_layer(cfg, codec_for("kivi_k2v2", cfg), batch, args.context)
        times = {s: [] for s in SETTINGS}
        outs = {}
        for _ in range(args.rounds):
            for setting, policy in SETTINGS.items():
                fn = attend_fn(inputs, cfg, "kernel-only", {"eviction": policy})
                outs[setting] = jax.jit(fn)(inputs.state, q)
                times[setting].append(time_attention(fn, inputs.state, q, args.calls, 5) * 1e6)
        same = bool(jnp.array_equal(outs["none"], outs["evict_first"]))
        row = {"name": "kivi_k2v2 kernel-only", "batch": batch, "context": args.context, "us": times,
               "bit_identical": same, "median_us": {s: statistics.median(v) for s, v in times.items()}}
        results.append(row)
        print(f"kivi_k2v2 kernel-only batch {batch}: " + ", ".join(f"{s} {statistics.median(v):7.1f} us"
                                                                 for s, v in times.items())
              + f"  (rounds {times}), outputs bit-identical: {same}", flush=True)
        write_json(f"{args.out}/kv_eviction_ab.json", {"device": jax.devices()[0].device_kind, "rows": results})
        del inputs
    print(f"{'kernel':>22} {'batch':>5} {'none us':>9} {'evict_first us':>15} {'change':>7}")
    for r in results:
        a, b = r["median_us"]["none"], r["median_us"]["evict_first"]
        print(f"{r['name']:>22} {r['batch']:>5} {a:9.1f} {b:15.1f} {b / a - 1:+7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
