"""Sweeps: a grid of recipe variants evaluated one cell at a time, one result file per cell.

    name: e1_methods
    model: smollm2-135m
    dtype: auto
    eval: {tasks: [wikitext2, c4], seqlen: 2048, limit: null, batch_size: 4}
    baseline: true                     # also evaluate the uncompressed model
    overrides: []                      # --set values applied to every cell's recipe
    cells:
      - recipe: gptq_w4_g128           # a recipe name or path
        grid:                          # the cartesian product of these recipe overrides
          weights.bits: [3, 4, 5]
          weights.group_size: [32, 64, 128, channel]

Each cell writes `OUT/<cell id>.json` holding `recipe` (the recipe's name), `overrides`,
`results.<task>.ppl` and `.windows`, model bytes and compression ratio, the compression
record (calibration used, per-layer info, time, peak memory) and provenance. A rerun skips
every cell whose file exists with the same cell key (model, recipe file content, overrides,
evaluation options); a changed cell is recomputed. `OUT/summary.md` tabulates all cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import time
from typing import Callable

from jaxcompress.errors import ConfigError
from jaxcompress.eval.registry import TaskOptions, run_tasks
from jaxcompress.experiments.recipes import apply_recipe, as_overrides, load_recipe, recipe_path
from jaxcompress.io.atomic import write_json, write_text
from jaxcompress.overrides import apply_overrides, check_keys, load_yaml
from jaxcompress.provenance import provenance

SWEEP_KEYS = {"name", "description", "model", "dtype", "eval", "baseline", "overrides", "cells", "data_dir"}
CELL_KEYS = {"recipe", "grid", "overrides", "name"}
EVAL_KEYS = {"tasks", "seqlen", "limit", "batch_size"}
BASELINE = "baseline"


@dataclasses.dataclass(frozen=True)
class Cell:
    id: str
    recipe: str | None       # None: the uncompressed baseline
    overrides: tuple[str, ...] = ()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text)


def expand_cells(sweep: dict, where: str = "sweep") -> list[Cell]:
    """The sweep's cells in order (baseline first); every recipe is loaded and validated here,
    so a typo fails before any compute."""
    cells = [Cell(BASELINE, None)] if sweep.get("baseline", True) else []
    common = list(sweep.get("overrides") or [])
    for i, block in enumerate(sweep.get("cells") or []):
        check_keys(block, CELL_KEYS, f"{where}: cells[{i}]")
        if "recipe" not in block:
            raise ConfigError(f"{where}: cells[{i}] needs a recipe")
        grid = block.get("grid") or {}
        if not isinstance(grid, dict):
            raise ConfigError(f"{where}: cells[{i}].grid must map recipe keys to lists of values")
        keys = list(grid)
        values = [v if isinstance(v, list) else [v] for v in grid.values()]
        base = block.get("name") or os.path.splitext(os.path.basename(str(block["recipe"])))[0]
        for combo in itertools.product(*values):
            setting = dict(zip(keys, combo))
            overrides = tuple(common + list(block.get("overrides") or []) + as_overrides(setting))
            cell_id = _slug("-".join([base] + [f"{k.split('.')[-1]}={v}" for k, v in setting.items()]))
            load_recipe(block["recipe"], list(overrides))  # validates
            cells.append(Cell(cell_id, block["recipe"], overrides))
    seen = set()
    for cell in cells:
        if cell.id in seen:
            raise ConfigError(f"{where}: two cells are both named {cell.id}; give the cell blocks a `name`")
        seen.add(cell.id)
    return cells


def task_options(sweep: dict, where: str) -> tuple[list[str], TaskOptions]:
    ev = sweep.get("eval") or {}
    check_keys(ev, EVAL_KEYS, f"{where}: eval")
    tasks = ev.get("tasks", ["wikitext2"])
    tasks = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return tasks, TaskOptions(limit=ev.get("limit"), seqlen=ev.get("seqlen", 2048),
                              batch_size=ev.get("batch_size", 1), data_dir=sweep.get("data_dir"))


def cell_key(model: str, dtype: str, cell: Cell, tasks: list[str], opts: TaskOptions) -> str:
    """What a cell's numbers depend on (recipe files by content)."""
    recipe = None
    if cell.recipe is not None:
        with open(recipe_path(cell.recipe), "rb") as f:
            recipe = hashlib.sha256(f.read()).hexdigest()
    blob = json.dumps({"model": model, "dtype": dtype, "recipe": recipe, "overrides": list(cell.overrides),
                       "tasks": tasks, "seqlen": opts.seqlen, "limit": opts.limit}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_cell(loaded, cell: Cell, tasks: list[str], opts: TaskOptions, base_bytes: int,
             log: Callable[[str], None] | None = print) -> dict:
    """Compresses (unless baseline) and evaluates one cell; returns its record."""
    from jaxcompress.models.build import param_summary

    start = time.time()
    variant, recipe = loaded, None
    if cell.recipe is not None:
        recipe = load_recipe(cell.recipe, list(cell.overrides))
        variant = apply_recipe(loaded, recipe, data_dir=opts.data_dir, log=log)
    compress_seconds = time.time() - start
    results = run_tasks(variant, tasks, opts)
    nbytes = param_summary(variant.model)["bytes"]
    applied = (variant.recipe or {}).get("applied", {})
    return {
        "cell": cell.id,
        "recipe": recipe["name"] if recipe else BASELINE,
        "overrides": list(cell.overrides),
        "model": loaded.spec,
        "fingerprint": loaded.fingerprint,
        "results": results,
        "model_bytes": nbytes,
        "baseline_bytes": base_bytes,
        "compression_ratio": base_bytes / nbytes,
        "compress_seconds": round(compress_seconds, 2),
        "compress": applied.get("weights"),
        "kv_cache": applied.get("kv_cache"),
        "recipe_config": {k: v for k, v in (variant.recipe or {}).items() if k != "applied"} or None,
        "seconds": round(time.time() - start, 2),
        **provenance(),
    }


def summary_table(records: list[dict], tasks: list[str]) -> str:
    head = "| cell | " + " | ".join(f"{t} ppl" for t in tasks) + " | windows | bits/weight | ratio | compress s |"
    rows = [head, "|" + "---|" * (len(tasks) + 5)]
    for r in records:
        res = r["results"]
        ppl = " | ".join(f"{res[t]['ppl']:.3f}" if t in res and "ppl" in res[t] else "-" for t in tasks)
        windows = "/".join(str(res[t].get("windows", "-")) for t in tasks if t in res)
        bits = (r.get("compress") or {}).get("weight_bits", "-")
        rows.append(f"| {r['cell']} | {ppl} | {windows} | {bits} | {r['compression_ratio']:.2f}x | "
                    f"{r['compress_seconds']} |")
    return "\n".join(rows) + "\n"


def run_sweep(path: str, out_dir: str, overrides: list[str] | None = None, only: str | None = None,
              dry_run: bool = False, log: Callable[[str], None] | None = print) -> list[dict]:
    """Runs every cell of the sweep at `path` not already finished in `out_dir`."""
    from jaxcompress.cli import resolve_dtype
    from jaxcompress.io.load import load_model
    from jaxcompress.models.build import param_summary

    import jax.numpy as jnp

    sweep = apply_overrides(load_yaml(path), overrides or [], strict=True, name=path)
    check_keys(sweep, SWEEP_KEYS, path)
    cells = expand_cells(sweep, path)
    if only:
        cells = [c for c in cells if re.search(only, c.id)]
    tasks, opts = task_options(sweep, path)
    model_spec = sweep.get("model", "smollm2-135m")
    dtype = resolve_dtype(sweep.get("dtype", "auto"))
    dtype_name = jnp.dtype(dtype).name
    os.makedirs(out_dir, exist_ok=True)
    loaded, base_bytes, records = None, None, []
    for n, cell in enumerate(cells):
        file = os.path.join(out_dir, cell.id + ".json")
        key = cell_key(model_spec, dtype_name, cell, tasks, opts)
        if os.path.isfile(file):
            with open(file) as f:
                old = json.load(f)
            if old.get("cell_key") == key:
                log and log(f"[{n + 1}/{len(cells)}] {cell.id}: done, skipped")
                records.append(old)
                continue
            log and log(f"[{n + 1}/{len(cells)}] {cell.id}: settings changed, recomputing")
        if dry_run:
            log and log(f"[{n + 1}/{len(cells)}] {cell.id}: would run {cell.recipe} {' '.join(cell.overrides)}")
            continue
        if loaded is None:
            loaded = load_model(model_spec, dtype=dtype, param_dtype=dtype)
            base_bytes = param_summary(loaded.model)["bytes"]
        log and log(f"[{n + 1}/{len(cells)}] {cell.id}")
        record = run_cell(loaded, cell, tasks, opts, base_bytes, log=log)
        record.update(cell_key=key, dtype=dtype_name, sweep=sweep.get("name", os.path.basename(path)))
        write_json(file, record)
        records.append(record)
    if records:
        write_text(os.path.join(out_dir, "summary.md"), summary_table(records, tasks))
    return records
