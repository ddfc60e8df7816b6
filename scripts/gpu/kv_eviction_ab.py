"""In-process A/B of the `evict_first` hint on the decode-attention kernels' cache loads (issue 6).

Run 10b timed the hint across two processes, whose spread (up to ~20% at batch 1, kv_notes run 10)
is larger than the effect. Here both settings run in one process, alternating (A B A B ...): the
hint is read when a kernel is traced ($JAXCOMPRESS_KV_EVICTION), so each round traces fresh
functions. Llama-2-7B head shapes, 32k tokens; KIVI-2's kernel alone (default body) and the dense
bf16 kernel. Prints the median over rounds of each setting's time a call, and writes JSON.

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

SETTINGS = ("none", "evict_first")


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
        plans = {"kivi_k2v2 kernel-only": (filled_layer(cfg, codec_for("kivi_k2v2", cfg), batch, args.context),
                                           "kernel-only"),
                 "pallas-bf16": (filled_layer(cfg, None, batch, args.context), "pallas-bf16")}
        for name, (inputs, variant) in plans.items():
            times = {s: [] for s in SETTINGS}
            outs = {}
            for _ in range(args.rounds):
                for setting in SETTINGS:
                    os.environ["JAXCOMPRESS_KV_EVICTION"] = setting
                    fn = attend_fn(inputs, cfg, variant, {} if variant == "kernel-only" else None)
                    outs[setting] = jax.jit(fn)(inputs.state, q)
                    times[setting].append(time_attention(fn, inputs.state, q, args.calls, 5) * 1e6)
            same = bool(jnp.array_equal(outs["none"], outs["evict_first"]))
            row = {"name": name, "batch": batch, "context": args.context, "us": times, "bit_identical": same,
                   "median_us": {s: statistics.median(v) for s, v in times.items()}}
            results.append(row)
            print(f"{name:>22} batch {batch}: " + ", ".join(f"{s} {statistics.median(v):7.1f} us" for s, v in times.items())
                  + f"  (rounds {times}), outputs bit-identical: {same}", flush=True)
            write_json(f"{args.out}/kv_eviction_ab.json", {"device": jax.devices()[0].device_kind, "rows": results})
        del plans
    os.environ.pop("JAXCOMPRESS_KV_EVICTION", None)
    print(f"{'kernel':>22} {'batch':>5} {'none us':>9} {'evict_first us':>15} {'change':>7}")
    for r in results:
        a, b = r["median_us"]["none"], r["median_us"]["evict_first"]
        print(f"{r['name']:>22} {r['batch']:>5} {a:9.1f} {b:15.1f} {b / a - 1:+7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
