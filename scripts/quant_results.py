"""Full-protocol results of the weight-quantization recipes, and the GPTQ 7B timing (issue 4).

    PYTHONPATH=. python scripts/quant_results.py --out docs/results/quant \
        --recipes rtn_w4_g128,rtn_w3_g128,gptq_w4_g128,gptq_w3_g128,gptq_w4_g128_actorder,\
gptq_w3_g128_actorder,awq_w4_g128,awq_w3_g128,squeezellm_w4,squeezellm_w3,gptq_w3_g128@c4 --timing-7b

For the baseline and each recipe (`name@c4` calibrates on C4 instead of WikiText-2 train):
compress, then WikiText-2 (all 148 windows of 2048) and C4 (256 windows) perplexity. Each
finished cell is written at once as `OUT/<cell>.json` (recipe, `results.<task>.ppl` and
`windows`, bytes, ratio, calibration record, timings, provenance); a rerun skips finished cells.
`--timing-7b` first times GPTQ W4 g128 end to end on `random:llama2-7b` (bf16) with 128 x 2048
calibration tokens and records the peak device memory (`OUT/gptq_w4_g128_llama2-7b_timing.json`).

Smoke run on a CPU (tiny settings, same code path):
    PYTHONPATH=. python scripts/quant_results.py --out /tmp/q --recipes rtn_w4_g128,gptq_w4_g128@c4 \
        --limit 1 --set calibration.num_samples=2 --set calibration.seqlen=128 \
        --timing-7b --timing-model random:tiny --timing-set weights.group_size=32
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxcompress.eval.registry import TaskOptions  # noqa: E402
from jaxcompress.experiments.sweep import Cell, run_cell, summary_table  # noqa: E402
from jaxcompress.experiments.recipes import apply_recipe, load_recipe  # noqa: E402
from jaxcompress.io.atomic import write_json, write_text  # noqa: E402
from jaxcompress.io.load import load_model  # noqa: E402
from jaxcompress.provenance import provenance  # noqa: E402

TASKS = ["wikitext2", "c4"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timing_7b(args) -> dict:
    """GPTQ W4 g128 on a random 7B model: end-to-end seconds and peak device memory."""
    start = time.time()
    loaded = load_model(args.timing_model, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    jax.block_until_ready(jax.tree_util.tree_leaves(loaded.model))
    load_s = time.time() - start
    overrides = ["calibration.source=random", f"calibration.num_samples={args.timing_samples}",
                 f"calibration.seqlen={args.timing_seqlen}"] + args.timing_set
    recipe = load_recipe("gptq_w4_g128", overrides)
    t0 = time.time()
    out = apply_recipe(loaded, recipe, log=log)
    jax.block_until_ready(jax.tree_util.tree_leaves(out.model))
    seconds = time.time() - t0
    applied = out.recipe["applied"]["weights"]
    stats = jax.devices()[0].memory_stats() or {}
    record = {
        "what": "GPTQ W4 g128 end to end (calibration sampling, block-by-block Hessians, quantization)",
        "model": args.timing_model, "dtype": "bfloat16", "recipe": "gptq_w4_g128", "overrides": overrides,
        "calibration_tokens": args.timing_samples * args.timing_seqlen,
        "seconds": round(seconds, 2), "load_seconds": round(load_s, 2),
        "method_seconds": applied.get("method_seconds"),
        "peak_device_bytes": stats.get("peak_bytes_in_use"), "device_bytes_limit": stats.get("bytes_limit"),
        "target_seconds": 300, "meets_target": seconds <= 300,
        "layers": len(applied.get("layers", {})), **provenance(),
    }
    del out, loaded
    gc.collect()
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", help="the baseline is the dequantized GGUF in float32")
    p.add_argument("--recipes", default="", help="comma-separated recipe names; name@c4 calibrates on C4")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for every cell")
    p.add_argument("--limit", type=int, help="evaluate only the first N windows (smoke runs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--force", action="store_true", help="recompute cells whose file exists")
    p.add_argument("--timing-7b", action="store_true", help="also time GPTQ W4 g128 on a random 7B model")
    p.add_argument("--timing-model", default="random:llama2-7b")
    p.add_argument("--timing-samples", type=int, default=128)
    p.add_argument("--timing-seqlen", type=int, default=2048)
    p.add_argument("--timing-set", action="append", default=[], help="extra override for the timing recipe")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    if args.timing_7b:  # first, so the peak memory is this job's alone
        name = f"gptq_w4_g128_{args.timing_model.split(':')[-1]}_timing"
        record = timing_7b(args)
        write_json(os.path.join(args.out, name + ".json"), record)
        log(f"{name}: {record['seconds']} s, peak {record['peak_device_bytes']} bytes")

    cells = [] if args.no_baseline else [Cell("baseline", None)]
    for item in filter(None, args.recipes.split(",")):
        name, _, source = item.partition("@")
        overrides = list(args.overrides) + ([f"calibration.source={source}"] if source else [])
        cells.append(Cell(item.replace("@", "_calib_"), name, tuple(overrides)))
    for cell in cells:  # every recipe is validated before any compute
        if cell.recipe:
            load_recipe(cell.recipe, list(cell.overrides))
    if not cells:
        return
    dtype = jnp.dtype(args.dtype)
    loaded = load_model(args.model, dtype=dtype, param_dtype=dtype)
    from jaxcompress.models.build import param_summary

    base_bytes = param_summary(loaded.model)["bytes"]
    opts = TaskOptions(limit=args.limit, seqlen=2048, batch_size=args.batch_size)
    records = []
    for cell in cells:
        file = os.path.join(args.out, cell.id + ".json")
        if os.path.isfile(file) and args.limit is None and not args.force:
            log(f"{cell.id}: exists, skipped")
            continue
        record = run_cell(loaded, cell, TASKS, opts, base_bytes, log=log)
        record["protocol"] = ("WikiText-2 test all windows, C4 256 windows, seqlen 2048"
                              if args.limit is None else f"smoke run: first {args.limit} window(s)")
        write_json(file, record)
        records.append(record)
        res = record["results"]
        log(f"{cell.id:<32} wikitext2 {res['wikitext2']['ppl']:9.3f} ({res['wikitext2']['windows']} win)  "
            f"c4 {res['c4']['ppl']:9.3f}  ratio {record['compression_ratio']:.2f}x  "
            f"compress {record['compress_seconds']} s")
    if records:
        write_text(os.path.join(args.out, "summary.md"), summary_table(records, TASKS))


if __name__ == "__main__":
    main()
