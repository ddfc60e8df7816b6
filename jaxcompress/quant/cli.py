"""Subcommands `compress` (write a compressed checkpoint) and `sweep` (run a grid of recipes).

    jaxcompress compress --model smollm2-135m --recipe gptq_w4_g128 --out ckpt/ [--set k=v]
    jaxcompress sweep configs/sweeps/e1_methods.yaml --out runs/e1 [--set eval.limit=2]
"""

from __future__ import annotations

import json
import sys
import time


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_compress(args) -> None:
    from jaxcompress.cli import resolve_dtype
    from jaxcompress.experiments.recipes import apply_recipe, describe, load_recipe
    from jaxcompress.io.checkpoint import save_checkpoint
    from jaxcompress.io.load import load_model
    from jaxcompress.models.build import param_summary

    recipe = load_recipe(args.recipe, args.overrides)  # bad recipe: fail before loading anything
    dtype = resolve_dtype(args.dtype)
    loaded = load_model(args.model, dtype=dtype, param_dtype=dtype)
    base = param_summary(loaded.model)["bytes"]
    start = time.time()
    compressed = apply_recipe(loaded, recipe, data_dir=args.data_dir, log=_log)
    seconds = time.time() - start
    size = param_summary(compressed.model)["bytes"]
    # The checkpoint is written to a temporary folder and renamed: complete or absent.
    save_checkpoint(compressed.model, args.out, tokenizer=compressed.tokenizer,
                    extra={"source": loaded.spec, "recipe": compressed.recipe,
                           "size": {"bytes": size, "baseline_bytes": base, "compression_ratio": base / size}})
    summary = {"out": args.out, "recipe": recipe["name"], "method": describe(recipe), "seconds": round(seconds, 1),
               "model_bytes": size, "baseline_bytes": base, "compression_ratio": round(base / size, 3),
               "weight_bits": compressed.recipe["applied"].get("weights", {}).get("weight_bits")}
    print(json.dumps(summary))


def cmd_sweep(args) -> None:
    from jaxcompress.experiments.sweep import run_sweep

    run_sweep(args.config, args.out, overrides=args.overrides, only=args.only, dry_run=args.dry_run, log=_log)


def add_commands(sub) -> None:
    from jaxcompress.cli import _add_model_args

    p = sub.add_parser("compress", help="compress a model with a recipe and write a loadable checkpoint")
    _add_model_args(p, recipe=False)
    p.add_argument("--recipe", required=True, help="a name in configs/recipes or a YAML path")
    p.add_argument("--out", required=True, help="checkpoint folder (written atomically)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("sweep", help="run a sweep config: one result file per cell, finished cells skipped")
    p.add_argument("config", help="YAML sweep, e.g. configs/sweeps/e1_methods.yaml")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep value, e.g. --set eval.limit=2 or "
                        "--set 'overrides=[calibration.num_samples=16]'")
    p.add_argument("--only", help="run only cells whose id matches this regex")
    p.add_argument("--dry-run", action="store_true", help="list the cells that would run")
    p.set_defaults(func=cmd_sweep)
