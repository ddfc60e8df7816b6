"""End-to-end time and peak device memory of a calibrated weight recipe on a large model.

    PYTHONPATH=. python scripts/bench_gptq.py --model random:llama2-7b --recipe gptq_w4_g128 --out $OUT

The issue's benchmark: GPTQ W4 g128 on `random:llama2-7b` with 128 x 2048 calibration tokens.
A random model has no tokenizer, so the calibration tokens are drawn uniformly from its
vocabulary with the recipe's seed (the work per token does not depend on the token ids).
Reports the compression wall clock (model already on the device; first-call compilation
included, as a user pays it), the engine's per-block seconds and the peak device memory.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from jaxcompress.experiments.recipes import load_recipe
from jaxcompress.io.atomic import write_json
from jaxcompress.io.load import load_model
from jaxcompress.models.build import param_summary
from jaxcompress.provenance import provenance
from jaxcompress.quant.config import from_dict, parse_weights
from jaxcompress.data.calibration import CalibrationConfig
from jaxcompress.quant.pipeline import quantize_weights


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama2-7b")
    p.add_argument("--recipe", default="gptq_w4_g128")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", required=True)
    args = p.parse_args()

    recipe = load_recipe(args.recipe, args.overrides)
    calib = from_dict(CalibrationConfig, recipe["calibration"], "calibration")
    t0 = time.time()
    loaded = load_model(args.model)
    jax.block_until_ready(jax.tree_util.tree_leaves(loaded.model))
    load_s = time.time() - t0
    vocab = loaded.model.config.vocab_size
    tokens = np.random.default_rng(calib.seed).integers(0, vocab, (calib.num_samples, calib.seqlen), dtype=np.int32)
    logs = []

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        logs.append(line)
        print(line, flush=True)

    start = time.time()
    model, record = quantize_weights(loaded.model, parse_weights(recipe["weights"]), calib, tokens=tokens, log=log)
    jax.block_until_ready(jax.tree_util.tree_leaves(model))
    seconds = time.time() - start
    stats = jax.devices()[0].memory_stats() or {}
    before, after = param_summary(loaded.model)["bytes"], param_summary(model)["bytes"]
    result = {
        "benchmark": "calibrated weight quantization, end to end",
        "model": args.model, "recipe": args.recipe, "overrides": args.overrides,
        "calibration": {"num_samples": calib.num_samples, "seqlen": calib.seqlen, "seed": calib.seed,
                        "tokens": "uniform random ids (random model: no tokenizer)", "batch_size": calib.batch_size},
        "load_seconds": round(load_s, 1), "compress_seconds": round(seconds, 1),
        "method_seconds": record.get("method_seconds"),
        "peak_device_bytes": stats.get("peak_bytes_in_use"),
        "device_bytes_limit": stats.get("bytes_limit"),
        "model_bytes_before": before, "model_bytes_after": after,
        "weight_bits": record.get("weight_bits"),
        "layers": len(record.get("layers", {})),
        "block_log": logs,
        **provenance(),
    }
    os.makedirs(args.out, exist_ok=True)
    name = f"gptq_timing_{args.model.replace(':', '_').replace('/', '_')}_{args.recipe}.json"
    write_json(os.path.join(args.out, name), result)
    peak = result["peak_device_bytes"]
    print(f"{args.recipe} on {args.model}: {seconds:.1f} s end to end (load {load_s:.1f} s), "
          f"peak device memory {peak / 2**30 if peak else float('nan'):.1f} GiB, "
          f"{before / 2**30:.2f} -> {after / 2**30:.2f} GiB of weights")


if __name__ == "__main__":
    main()
