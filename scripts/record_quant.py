"""Full-protocol perplexity of weight-quantization recipes on one model, one file per cell.

    PYTHONPATH=. python scripts/record_quant.py --recipes rtn_w4_g128,gptq_w4_g128 --out $OUT/quant

For each recipe (optionally with `@c4` to calibrate on C4 instead of WikiText-2 train, and
`+key=value` overrides of that cell alone, e.g. `gptq_w4_g128+weights.gptq.damp=0.1`):
compress, then WikiText-2 (all windows) and C4 (256 windows) perplexity at seqlen 2048.
Each finished cell is written at once (`<recipe>.json`), so a cut-off run keeps what it did.
KV-cache recipes (`kivi_k2v2`, `kvquant_4bit`, ...) record their cache bytes too. A markdown
table of a folder of records (relative to its baseline cell):

    python scripts/record_quant.py --report $OUT/quant --to docs/results/table.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import jax.numpy as jnp

from jaxcompress.eval.perplexity import c4_tokens, perplexity, wikitext2_tokens, windows
from jaxcompress.experiments.recipes import apply_recipe, load_recipe
from jaxcompress.io.atomic import write_json, write_text
from jaxcompress.io.load import load_model
from jaxcompress.models.build import flat_params, param_summary, path_str
from jaxcompress.quant.diagnostics import heldout_hessians, layer_errors, summarize
from jaxcompress.provenance import provenance


def cell_file(cell: str) -> str:
    """`gptq_w4_g128@c4+weights.gptq.damp=0.1` -> `gptq_w4_g128_calib_c4_damp0.1.json`."""
    head, *overrides = cell.split("+")
    parts = [head.replace("@", "_calib_")]
    for o in overrides:
        key, _, value = o.partition("=")
        parts.append(key.rsplit(".", 1)[-1] + value)
    return "_".join(parts) + ".json"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--recipes", help="comma-separated; name@c4 calibrates on C4")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--wikitext-windows", type=int, help="default: all (148); 0 skips WikiText-2")
    p.add_argument("--c4-windows", type=int, default=256, help="0 skips C4")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layer-errors", type=int, default=0, metavar="N",
                   help="also record each projection's relative output error on the float model's inputs "
                        "over the first N WikiText-2 test windows (jaxcompress.quant.diagnostics)")
    p.add_argument("--out", help="folder for the records")
    p.add_argument("--report", metavar="DIR", help="only write a markdown table of the records in DIR")
    p.add_argument("--to", help="with --report: the markdown file (default: DIR/table.md)")
    args = p.parse_args()
    if args.report:
        path = args.to or os.path.join(args.report, "table.md")
        write_text(path, report_table(args.report))
        print(f"wrote {path}")
        return
    if not (args.recipes and args.out):
        p.error("--recipes and --out are required (or --report DIR)")

    dtype = jnp.dtype(args.dtype)
    base = load_model(args.model, dtype=dtype, param_dtype=dtype)
    wiki = wikitext2_tokens(base.tokenizer)
    c4 = c4_tokens(base.tokenizer)
    base_bytes = param_summary(base.model)["bytes"]
    os.makedirs(args.out, exist_ok=True)
    hessians = None
    if args.layer_errors:
        hessians = heldout_hessians(base.model, windows(wiki, 2048, args.layer_errors), args.batch_size)
    for cell in ["baseline"] + args.recipes.split(","):
        head, *cell_overrides = cell.split("+")
        name, _, calib = head.partition("@")
        start = time.time()
        loaded, recipe = base, None
        if name != "baseline":
            overrides = (list(args.overrides) + ([f"calibration.source={calib}"] if calib else [])
                         + cell_overrides)
            recipe = load_recipe(name, overrides)
            loaded = apply_recipe(base, recipe)
        compress_s = time.time() - start
        results = {task: perplexity(loaded, tokens, 2048, limit, args.batch_size, progress=False)
                   for task, tokens, limit in (("wikitext2", wiki, args.wikitext_windows), ("c4", c4, args.c4_windows))
                   if limit != 0}  # 0 windows: that set is skipped
        # AWQ rescales weights by design (scales folded into the layer before): their error against
        # the float weight at the same path means nothing, so AWQ cells get no layer errors.
        method = (recipe or {}).get("weights", {}).get("method")
        if hessians is not None and name != "baseline" and method != "awq":
            compressed = _compressed_paths(loaded.model)
            errors = layer_errors(base.model, loaded.model, {p: h for p, h in hessians.items() if p in compressed})
            results["heldout_layer_error"] = {"windows": args.layer_errors, "mean": summarize(errors),
                                              "layers": errors}
        nbytes = param_summary(loaded.model)["bytes"]
        record = {"recipe": cell, "model": args.model, "dtype": dtype.name, "recipe_config": loaded.recipe,
                  "results": results, "model_bytes": nbytes, "compression_ratio": base_bytes / nbytes,
                  "compress_seconds": round(compress_s, 1), "total_seconds": round(time.time() - start, 1),
                  **provenance()}
        write_json(os.path.join(args.out, cell_file(cell)), record)
        err = results.get("heldout_layer_error", {}).get("mean", {}).get("all")
        ppls = "  ".join(f"{task} {results[task]['ppl']:8.3f} ({results[task]['windows']} win)"
                         for task in ("wikitext2", "c4") if task in results)
        print(f"{cell:<28} {ppls}  {nbytes / 2**20:7.1f} MiB  compress {compress_s:6.1f}s"
              + (f"  layer err {err:.5f}" if err is not None else ""), flush=True)


def report_table(folder: str) -> str:
    """Markdown table of every record in `folder`, with each perplexity's change against the
    folder's `baseline.json` and, for KV-cache recipes, the cache's bytes and ratio to bf16."""
    records = []
    for f in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(f) as fh:
            records.append(json.load(fh))
    records = [r for r in records if "results" in r and "recipe" in r]
    if not records:
        raise SystemExit(f"--report {folder}: no record_quant.py records (*.json) there")
    base = next((r["results"] for r in records if r["recipe"] == "baseline"), {})
    first = records[0]
    commits = sorted({r.get("git_commit", "?") for r in records})
    commit = f"commit {commits[0]}" if len(commits) == 1 else "commits " + ", ".join(commits) + " (per record)"
    lines = [f"Model {first['model']} ({first['dtype']}), device {first.get('device', '?')}, "
             f"{commit}. Change = ppl / baseline ppl - 1.", "",
             "| recipe | WikiText-2 ppl | change | C4 ppl | change | model MiB | KV codec | KV bytes/token | KV vs bf16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["recipe"] != "baseline", r["recipe"])):
        cells = [r["recipe"]]
        for task in ("wikitext2", "c4"):
            res = r["results"].get(task)
            if res is None:
                cells += ["-", "-"]
                continue
            ref = base.get(task)
            same = ref is not None and ref["windows"] == res["windows"]
            cells += [f"{res['ppl']:.3f} ({res['windows']} win)",
                      f"{res['ppl'] / ref['ppl'] - 1:+.2%}" if same else "-"]
        kv = ((r.get("recipe_config") or {}).get("applied") or {}).get("kv_cache")
        cells.append(f"{r['model_bytes'] / 2**20:.1f}")
        cells += ([kv["codec"], f"{kv['bytes_per_token']:,.0f} (at {kv['context']})",
                   f"{kv['compression_ratio']:.2f}x"] if kv else ["-", "-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _compressed_paths(model) -> set[str]:
    return {path_str(p) for p, v in flat_params(model).items() if hasattr(v, "dequantize")}


if __name__ == "__main__":
    main()
