"""KV-cache benchmarks: decode attention over a long compressed cache, memory, end-to-end decode.

    PYTHONPATH=. python scripts/bench_kv.py --out docs/results               # attention + memory
    PYTHONPATH=. python scripts/bench_kv.py --e2e --no-attention --out docs/results

Attention: one decode query over a `--contexts` cache at `--model` head shapes (default
Llama-2-7B: 32 heads of 128), `--batches` rows: XLA's bf16 attention, the bf16 Pallas kernel and
each `--codecs` recipe's codec (kernel + exact tokens), checked against an fp32 reference, then
timed in the same run; roofline = the copy bandwidth measured in the same run.
Memory: the largest batch that fits each context with and without each codec on this device.
End-to-end (--e2e): decode tokens/s of `--model` at `--e2e-contexts` for a bf16 cache and each
`--e2e-recipes` recipe (e.g. KV2, W4 + KV2). Writes kv_bench_<card>.json and .md into --out.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import jax.numpy as jnp

from jaxcompress.bench.timing import copy_bandwidth
from jaxcompress.experiments.recipes import load_recipe
from jaxcompress.io.atomic import write_json, write_text
from jaxcompress.kv import memory
from jaxcompress.kv.bench import attention_benchmark, e2e_decode, synthetic_kvquant_calibration
from jaxcompress.kv.recipe import build_codec
from jaxcompress.models.build import abstract_model, param_summary
from jaxcompress.models.presets import preset
from jaxcompress.provenance import provenance


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def codec_for(recipe: str, cfg):
    section = load_recipe(recipe)["kv_cache"]
    calibration = None
    if section["method"] == "kvquant":  # random weights: a synthetic calibration (speed only)
        calibration = synthetic_kvquant_calibration(cfg, section["key_bits"], section["value_bits"])
    return build_codec(section, calibration)


def markdown(record) -> str:
    out = [f"# KV-cache benchmark on {record['device']} (jax {record['versions'].get('jax')}, "
           f"commit {record['git_commit']})", ""]
    if record.get("attention"):
        out += [f"Decode attention, {record['model']} head shapes, bf16; copy bandwidth "
                f"{record['copy_bandwidth_GBps']:.0f} GB/s (read + write, same run).", "",
                "| variant | batch | context | us / call | cache MB read | GB/s | roofline | vs XLA bf16 | rel err |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in record["attention"]:
            out.append(f"| {r['variant']} | {r['batch']} | {r['context']} | {r['us']:.1f} | {r['bytes'] / 1e6:.1f} | "
                       f"{r['GBps']:.0f} | {r['roofline_fraction']:.0%} | {r['speedup_vs_xla_bf16']:.2f}x | "
                       f"{r['rel_err']:.1e} |")
        out.append("")
    if record.get("memory"):
        m = record["memory"]
        out += [f"Largest batch in {m['device_bytes'] / 2**30:.1f} GiB ({record['model']}, 10% kept free):", "",
                "| weights | kv cache | " + " | ".join(f"{c} tokens" for c in m["contexts"]) + " |",
                "|---|---|" + "---|" * len(m["contexts"])]
        for row in m["rows"]:
            out.append(f"| {row['weights']} | {row['cache']} | " + " | ".join(str(b) for b in row["max_batch"]) + " |")
        out.append("")
    if record.get("e2e"):
        out += ["End-to-end decode (random weights, jitted decode loop):", "",
                "| recipe | batch | context | ms / token | tokens/s |", "|---|---|---|---|---|"]
        for r in record["e2e"]:
            out.append(f"| {r['recipe']} | {r['batch']} | {r['context']} | {r['ms_per_token']:.2f} | "
                       f"{r['tokens_per_s']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b", help="a preset (head shapes, weights size)")
    p.add_argument("--contexts", default="32768")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--codecs", default="kivi_k2v2,kivi_k4v4", help="kv_cache recipes to time")
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernel-variants", default="",
                   help="time each codec with these kernel settings, warps:stages:splits,... "
                        "(splits 0: automatic), e.g. 4:2:0,2:2:0,4:3:64; default: the kernel's defaults")
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--e2e", action="store_true", help="also time end-to-end decode (slow: one compile per cell)")
    p.add_argument("--e2e-contexts", default="8192,16384,32768")
    p.add_argument("--e2e-recipes", default=",kivi_k2v2,kivi_k2v2_w4", help="'' = bf16 cache")
    p.add_argument("--e2e-batch", type=int, default=1)
    p.add_argument("--out", help="folder for kv_bench_<card>.json and .md")
    args = p.parse_args(argv)

    cfg = preset(args.model)
    record = {"model": args.model, **provenance()}
    card = re.sub(r"[^a-z0-9]+", "_", record["device"].split(":")[-1].lower()).strip("_")
    if not args.no_attention:
        bandwidth = copy_bandwidth()
        record["copy_bandwidth_GBps"] = bandwidth / 1e9
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s on {record['device']}", flush=True)
        codecs = {name: codec_for(name, cfg) for name in args.codecs.split(",") if name}
        variants = {}
        for text in (v for v in args.kernel_variants.split(",") if v):
            warps, stages, splits = (int(x) for x in text.split(":"))
            variants[f"w{warps}-s{stages}-x{splits or 'auto'}"] = {
                "num_warps": warps, "num_stages": stages, "num_splits": splits or None}
        rows = []
        for context in _ints(args.contexts):
            for batch in _ints(args.batches):
                rows += attention_benchmark(cfg, codecs, batch, context, args.calls, args.repeats, bandwidth,
                                            kernel_variants=variants or None)
        record["attention"] = rows
    device_bytes = memory.device_memory_bytes() or 80 * 2 ** 30
    weights_bf16 = param_summary(abstract_model(cfg, jnp.bfloat16))["bytes"]
    contexts = _ints(args.e2e_contexts)
    mem_rows = []
    for wname, wbytes in (("bf16", weights_bf16), ("W4 g128 (4.25 bits)", int(weights_bf16 / 16 * 4.25))):
        for cname in ["bf16"] + [c for c in args.codecs.split(",") if c]:
            codec = None if cname == "bf16" else codec_for(cname, cfg)
            mem_rows.append({"weights": wname, "cache": cname, "max_batch": [
                memory.max_batch(cfg, codec, n, device_bytes, wbytes) for n in contexts]})
    record["memory"] = {"device_bytes": device_bytes, "contexts": contexts, "rows": mem_rows}
    if args.e2e:
        rows = []
        for recipe in args.e2e_recipes.split(","):
            rows += e2e_decode(f"random:{args.model}", recipe or None, contexts, args.e2e_batch)
        record["e2e"] = rows
    table = markdown(record)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, f"kv_bench_{card}.json"), record)
        write_text(os.path.join(args.out, f"kv_bench_{card}.md"), table)


if __name__ == "__main__":
    sys.exit(main())
