"""The main job: `jaxcompress run CONFIG --out DIR`.

Loads the model, evaluates the baseline, and when the config names a recipe, compresses the
model, evaluates it again and reports model bytes and the compression ratio. Writes
`DIR/results.json` and a readable `DIR/results.md`.
"""

from __future__ import annotations

import os
import time

from jaxcompress.errors import ConfigError
from jaxcompress.eval.registry import TaskOptions, run_tasks
from jaxcompress.io.atomic import write_json, write_text
from jaxcompress.overrides import apply_overrides, check_keys, load_yaml
from jaxcompress.provenance import provenance

TOP_KEYS = {"model", "dtype", "recipe", "recipe_overrides", "eval", "out", "data_dir"}
EVAL_KEYS = {"tasks", "seqlen", "limit", "batch_size", "extra"}


def _task_options(cfg: dict) -> tuple[list[str], TaskOptions]:
    ev = cfg.get("eval") or {}
    check_keys(ev, EVAL_KEYS, "eval")
    tasks = ev.get("tasks", ["wikitext2"])
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    return tasks, TaskOptions(limit=ev.get("limit"), seqlen=ev.get("seqlen", 2048),
                              batch_size=ev.get("batch_size", 1), data_dir=cfg.get("data_dir"),
                              extra=ev.get("extra") or {})


def _markdown(record: dict) -> str:
    rows = ["| model | recipe | task | metric | value |", "|---|---|---|---|---|"]
    for variant in record["variants"]:
        for task, metrics in variant["results"].items():
            for key in ("ppl", "acc", "acc_norm", "exact_match", "pass@1"):
                if key in metrics:
                    rows.append(f"| {record['model']} | {variant['name']} | {task} | {key} | {metrics[key]:.4f} |")
    rows.append("")
    rows.append("| variant | model bytes | compression ratio |")
    rows.append("|---|---|---|")
    for variant in record["variants"]:
        rows.append(f"| {variant['name']} | {variant['model_bytes']:,} | {variant['compression_ratio']:.2f}x |")
    return "\n".join(rows) + "\n"


def run_config(path: str, overrides: list[str] | None = None, out_dir: str | None = None) -> dict:
    import jax.numpy as jnp

    from jaxcompress.cli import resolve_dtype
    from jaxcompress.io.load import load_model
    from jaxcompress.models.build import param_summary

    cfg = apply_overrides(load_yaml(path), overrides or [], name=path)
    check_keys(cfg, TOP_KEYS, path)
    out_dir = out_dir or cfg.get("out")
    if not out_dir:
        raise ConfigError(f"{path}: no output folder: pass --out DIR or set `out` in the config")
    tasks, opts = _task_options(cfg)
    dtype = resolve_dtype(cfg.get("dtype", "auto"))
    start = time.time()
    loaded = load_model(cfg.get("model", "smollm2-135m"), dtype=dtype, param_dtype=dtype)
    base_bytes = param_summary(loaded.model)["bytes"]
    variants = [("baseline", loaded)]
    if cfg.get("recipe"):
        from jaxcompress.experiments.recipes import apply_recipe, load_recipe

        recipe = load_recipe(cfg["recipe"], cfg.get("recipe_overrides") or [])
        variants.append((str(cfg["recipe"]), apply_recipe(loaded, recipe, data_dir=cfg.get("data_dir"))))
    record = {"config": cfg, "model": loaded.spec, "dtype": jnp.dtype(dtype).name, "variants": []}
    for name, variant in variants:
        print(f"== {name}")
        nbytes = param_summary(variant.model)["bytes"]
        record["variants"].append({"name": name, "recipe": variant.recipe,
                                   "results": run_tasks(variant, tasks, opts), "model_bytes": nbytes,
                                   "compression_ratio": base_bytes / nbytes})
    record.update(seconds=round(time.time() - start, 1), **provenance())
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "results.json"), record)
    table = _markdown(record)
    write_text(os.path.join(out_dir, "results.md"), table)
    print(table)
    return record
