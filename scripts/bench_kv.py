"""KV-cache benchmarks: decode attention over a long compressed cache, memory, end-to-end decode.

    PYTHONPATH=. python scripts/bench_kv.py --out docs/results               # attention + memory
    PYTHONPATH=. python scripts/bench_kv.py --e2e --no-attention --out docs/results
    PYTHONPATH=. python scripts/bench_kv.py --records kv.tgz --out docs/results   # a kv.sh run -> records

Attention: one decode query over a `--contexts` cache at `--model` head shapes (default
Llama-2-7B: 32 heads of 128), `--batches` rows: XLA's bf16 attention, the bf16 Pallas kernel and
each `--codecs` recipe's codec (kernel + exact tokens), checked against an fp32 reference, then
timed in the same run; roofline = the copy bandwidth measured in the same run.
Memory: the largest batch that fits each context with and without each codec on this device.
End-to-end (--e2e --no-attention: a process of its own): decode tokens/s of `--model` at
`--e2e-contexts` for a bf16 cache and each `--e2e-recipes` recipe (e.g. KV2, W4 + KV2).
Writes kv_bench_<card>.json and .md into --out.
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
from jaxcompress.kv.bench import (add_speedups, attention_benchmark, e2e_decode, synthetic_kvquant_calibration,
                                  write_benchmark)
from jaxcompress.kv.recipe import build_codec
from jaxcompress.models.build import abstract_model, param_summary
from jaxcompress.models.presets import preset
from jaxcompress.provenance import provenance


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def codec_for(recipe: str, cfg):
    """The codec of a kv_cache recipe; `name:token_rows` / `name:channel_words[:columns]` sets
    KIVI's layout (and tile width)."""
    recipe, *opts = recipe.split(":")
    section = load_recipe(recipe)["kv_cache"]
    if opts:
        section = {**section, "layout": opts[0], **({"columns": int(opts[1])} if len(opts) > 1 else {})}
    calibration = None
    if section["method"] == "kvquant":  # random weights: a synthetic calibration (speed only)
        calibration = synthetic_kvquant_calibration(cfg, section["key_bits"], section["value_bits"])
    return build_codec(section, calibration)


def parse_cw2(text: str):
    """`vc16+kz` -> Cw2Config(value_channels=16, keys_zero=True): options joined by '+', vcN (value
    channel rows a program), kz / nokz (the keys pass sums q . zero, or XLA does; default: on small grids),
    colN (word columns of a tile), kwN / vwN (warps a keys / values program), kpN (steps of loads the
    keys pass keeps in flight), vwg / vcu (the values pass on Hopper's tensor cores, `kv_values_wgmma`, or the f16x2 one), vsN
    (its stages of loads), vpN (its 256-token pieces a step), vbal / vmid2 (its codes centred on their middle, the default, or less 2), vxN (its splits), vlop3 / varith (its conversion's and-or as one
    PTX lop3, the default, or as arith's and + or), ki8 / kcu (the keys pass on the int8 tensor cores,
    `kv_keys_int8`, or the f16x2 one), ksN (the int8 keys pass's stages of loads)."""
    from pallas_kernels.decode_attention import Cw2Config

    options = {}
    for item in text.split("+"):
        if item.startswith("vc") and item[2:].isdigit():
            options["value_channels"] = int(item[2:])
        elif item.startswith("col") and item[3:].isdigit():
            options["columns"] = int(item[3:])
        elif item[:2] in ("kw", "vw") and item[2:].isdigit():
            options["key_warps" if item[0] == "k" else "value_warps"] = int(item[2:])
        elif item in ("kz", "nokz"):
            options["keys_zero"] = item == "kz"
        elif item.startswith("kp") and item[2:].isdigit():
            options["key_prefetch"] = int(item[2:])
        elif item in ("vwg", "vcu"):
            options["values"] = "wgmma" if item == "vwg" else "cuda"
        elif item.startswith("vs") and item[2:].isdigit():
            options["values_stages"] = int(item[2:])
        elif item.startswith("vp") and item[2:].isdigit():
            options["values_pieces"] = int(item[2:])
        elif item in ("vlop3", "varith"):
            options["values_lop3"] = item == "vlop3"
        elif item in ("vbal", "vmid2"):
            options["values_balanced"] = item == "vbal"
        elif item.startswith("vx") and item[2:].isdigit():
            options["values_splits"] = int(item[2:])
        elif item in ("ki8", "kcu"):
            options["keys"] = "int8" if item == "ki8" else "cuda"
        elif item.startswith("ks") and item[2:].isdigit():
            options["keys_stages"] = int(item[2:])
        else:
            raise SystemExit(f"--kernel-variants cw2 option {item!r}: expected vcN (value channel rows a program), "
                             f"kz / nokz (zero-point term in the keys pass or not), colN (word columns of a tile) or kwN / vwN "
                             f"(warps a keys / values program), kpN (keys-pass prefetch steps), vwg / vcu (the values "
                             f"pass on the tensor cores or the f16x2 one), vsN / vpN (its stages / 256-token pieces a step), vbal / vmid2, vxN, vlop3 / varith, "
                             f"ki8 / kcu (the keys pass on the int8 tensor cores or the f16x2 one) or ksN (its stages), joined by '+'")
    return Cw2Config(**options)


def parse_variants(text: str) -> dict[str, dict]:
    """--kernel-variants -> {name: kernel options}: items warps:stages:splits[:path[:cw2]], cw2 as
    `parse_cw2` reads it."""
    from pallas_kernels.decode_attention import KERNEL_PATHS

    variants = {}
    for item in (v for v in text.split(",") if v):
        fields = item.split(":")
        if len(fields) not in (3, 4, 5) or (len(fields) >= 4 and fields[3] not in KERNEL_PATHS):
            raise SystemExit(f"--kernel-variants item {item!r}: expected warps:stages:splits[:path[:cw2]], "
                             f"path one of {KERNEL_PATHS}")
        warps, stages, splits = (int(x) for x in fields[:3])
        path = fields[3] if len(fields) >= 4 else "auto"
        name = f"w{warps}-s{stages}-x{splits or 'auto'}{'' if path == 'auto' else '-' + path}"
        options = {"num_warps": warps, "num_stages": stages, "num_splits": splits or None, "path": path}
        if len(fields) == 5 and fields[4]:
            options["cw2"] = parse_cw2(fields[4])
            name += "-" + fields[4]
        variants[name] = options
    return variants


def best_env(rows) -> str:
    """Shell exports naming the fastest correct kernel variant of the codec path at batch 1 (mean
    time over contexts), its time in a trailing comment; empty when none was measured."""
    times = {}
    for r in rows:
        opts = r.get("kernel_options") or {}
        codec = r["variant"].split("/")[0]
        if (r["batch"] == 1 and "num_warps" in opts and "kernel-only" not in r["variant"]
                and ":" not in codec and opts.get("path", "auto") == "auto"
                and r["rel_err"] < 1e-2):  # the recipes' own layout and body choice: what the model runs
            times.setdefault(opts["num_warps"], []).append(r["us"])
    if not times:
        return ""
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    warps = min(mean, key=mean.get)
    return f"export JAXCOMPRESS_KV_NUM_WARPS={warps}  # {mean[warps]:.1f} us\n"


def markdown(record) -> str:
    out = [f"# KV-cache benchmark on {record['device']} (jax {record['versions'].get('jax')}, "
           f"commit {record['git_commit']})", ""]
    if record.get("attention"):
        out += [f"Decode attention, {record['model']} head shapes, bf16; copy bandwidth "
                f"{record['copy_bandwidth_GBps']:.0f} GB/s (read + write, same run).", "",
                "`us / call`: wall clock a call, calls unrolled in one program as a decode step's layers are; "
                "`kernels`: the kernels' own time a call (CUPTI); `loop`: the harness of records up to run 13 "
                "(the calls in a `lax.map` loop), where measured.", "",
                "| variant | batch | context | us / call | kernels us | loop us | cache MB read | GB/s | roofline | "
                "vs XLA bf16 | vs Pallas bf16 | kernels vs XLA bf16 | rel err |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        num = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        for r in record["attention"]:
            out.append(f"| {r['variant']}{' (' + r['run'] + ')' if r.get('run') else ''} | {r['batch']} | {r['context']} | "
                       f"{r['us']:.1f} | {num(r.get('device_us'), '.1f')} | {num(r.get('us_loop'), '.1f')} | "
                       f"{r['bytes'] / 1e6:.1f} | {r['GBps']:.0f} | {r['roofline_fraction']:.0%} | "
                       f"{num(r.get('speedup_vs_xla_bf16'), '.2f')}x | {num(r.get('speedup_vs_pallas_bf16'), '.2f')}x | "
                       f"{num(r.get('device_speedup_vs_xla_bf16'), '.2f')}x | {r['rel_err']:.1e} |")
        out.append("")
    if record.get("writes"):
        out += ["Cache write per decode step, one layer (one new token a row, flushes at their rate):", "",
                "| cache | batch | context | us / write |", "|---|---|---|---|"]
        out += [f"| {r['cache']} | {r['batch']} | {r['context']} | {r['us_per_write']:.1f} |" for r in record["writes"]]
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


# ------------------------------------------------------------------------- records from a GPU run
def _read_run(path: str) -> dict[str, bytes]:
    """{relative name: bytes} of a scripts/gpu/kv.sh result: its .tgz or the unpacked folder."""
    import tarfile

    files = {}
    if os.path.isdir(path):
        for root, _, names in os.walk(path):
            for n in names:
                full = os.path.join(root, n)
                with open(full, "rb") as f:
                    files[os.path.relpath(full, path)] = f.read()
    else:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    files[m.name] = tar.extractfile(m).read()
    # names relative to the kv/ folder
    return {n.split("kv/", 1)[1] if n.startswith("kv/") else n: b for n, b in files.items()}


def _bench_json(files: dict, folder: str):
    import json

    names = sorted(n for n in files if n.startswith(folder + "/") and n.endswith(".json"))
    full = [n for n in names if not n.endswith(".partial.json")]
    pick = (full or names or [None])[0]
    return (json.loads(files[pick]), pick.endswith(".partial.json")) if pick else (None, False)


def target_lines(rows) -> list[str]:
    """The issue's speed target per batch: the fastest correct KIVI-2 codec path vs both bf16
    baselines (>= 4x)."""
    out = []
    for b in sorted({r["batch"] for r in rows}):
        cands = [r for r in rows if r["batch"] == b and r["variant"].startswith("kivi")
                 and "kernel-only" not in r["variant"] and r["rel_err"] < 1e-2]
        best = min(cands, key=lambda r: r["us"]) if cands else None
        same = [r for r in rows if r["batch"] == b and r.get("run") == (best or {}).get("run")]
        xla = next((r["us"] for r in same if r["variant"] == "xla-bf16"), None)
        pal = next((r["us"] for r in same if r["variant"] == "pallas-bf16"), None)
        if not (xla and pal and best):
            out.append(f"- batch {b}: not measured completely")
            continue
        ratio_x, ratio_p = xla / best["us"], pal / best["us"]
        met = "met" if min(ratio_x, ratio_p) >= 4 else "NOT met"
        dev = ""
        if best.get("device_speedup_vs_xla_bf16"):
            dev = (f"; kernels' own time {best['device_us']:.1f} us = {best['device_speedup_vs_xla_bf16']:.2f}x XLA bf16, "
                   f"{best['device_speedup_vs_pallas_bf16']:.2f}x Pallas bf16")
        out.append(f"- batch {b}, {best['context']} tokens: fastest KIVI-2 ({best['variant']}) {best['us']:.1f} us = "
                   f"{ratio_x:.2f}x XLA bf16 ({xla:.1f} us), {ratio_p:.2f}x Pallas bf16 ({pal:.1f} us), "
                   f"baselines of the same run{dev}: wall-clock target (>= 4x both) **{met}**")
    return out


def records(path: str, out: str, tag: str) -> list[str]:
    """Turns a kv.sh result into docs/results records: kv_bench_<card>_<tag>.{json,md} (attention,
    memory, end-to-end) and kv_longctx_smollm2_<card>_<tag>.{json,md} (passkey, needle)."""
    import json

    files = _read_run(path)
    base, rows, partial = {}, [], {}
    for folder in sorted({n.split("/")[0] for n in files if n.startswith("attention")}):
        att, partial[folder] = _bench_json(files, folder)
        if not att:
            continue
        if not base:
            base = {k: v for k, v in att.items() if k != "attention"}
        run_rows = [{**r, "run": folder} for r in att.get("attention", [])]
        for b in {r["batch"] for r in run_rows}:  # ratios to this run's own baselines
            add_speedups([r for r in run_rows if r["batch"] == b])
        rows += run_rows
    if rows:
        base["attention"] = rows
    e2e, e2e_failed = [], []
    for folder in ("e2e_32k", "e2e_8k16k"):
        rec, part = _bench_json(files, folder)
        partial[folder] = part
        if rec:
            e2e += rec.get("e2e", [])
            e2e_failed += rec.get("e2e_failed", [])
            for k in ("device", "versions", "git_commit"):
                base.setdefault(k, rec.get(k))
    if not base:
        raise SystemExit(f"{path}: no benchmark record in it (steps.log: "
                         f"{files.get('steps.log', b'').decode()[-500:]})")
    device = base.get("device", "unknown")
    card = re.sub(r"[^a-z0-9]+", "_", device.split(":")[-1].lower()).strip("_")
    text = lambda n: files.get(n, b"").decode(errors="replace")  # noqa: E731
    tests = [line for line in text("gpu_tests.log").splitlines() if line.strip()]
    if tests and not re.search(r"=+ .*(passed|failed|error)", tests[-1]):  # no pytest summary: cut
        n_pass = sum(" PASSED" in line for line in tests)
        n_fail = sum(" FAILED" in line or " ERROR" in line for line in tests)
        tests.append(f"cut by the step's timeout after {n_pass} passed, {n_fail} failed "
                     f"(running: {tests[-1].split(' ')[0]})")
    record = {**base, "e2e": e2e, "e2e_failed": e2e_failed, "partial": partial,
              "kernel_for_model_runs": text("best_env.sh").strip(),
              "gpu_tests": tests[-1] if tests else "not run", "steps_log": text("steps.log"),
              "source": os.path.basename(path.rstrip("/"))}
    if e2e:  # ratio to the bf16 cache at the same context
        bf16 = {r["context"]: r["tokens_per_s"] for r in e2e if r["recipe"] == "bf16"}
        for r in e2e:
            r["vs_bf16"] = r["tokens_per_s"] / bf16[r["context"]] if r["context"] in bf16 else None
    written = []
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"kv_bench_{card}_{tag}")
    md = [f"Source: `{record['source']}` (scripts/gpu/kv.sh). GPU tests: {record['gpu_tests']}.",
          f"Kernel the model runs used: `{record['kernel_for_model_runs'] or 'default'}`.",
          "Partial records (a step hit its timeout): "
          + (", ".join(k for k, v in partial.items() if v) or "none") + ".", ""]
    if record.get("attention"):
        md += ["Speed target (decode attention, 2-bit cache vs bf16, >= 4x):", ""] + target_lines(record["attention"]) + [""]
    table = markdown(record)
    if e2e:
        table = table.rstrip("\n") + "\n\n" + "\n".join(
            f"- {r['recipe']} at {r['context']}: {r['vs_bf16']:.2f}x the bf16 cache's tokens/s"
            for r in e2e if r.get("vs_bf16") is not None) + "\n"
    for e in e2e_failed:
        table += f"\nEnd-to-end {e['recipe']} failed: {e['error']}\n"
    header, _, rest = table.partition("\n")
    write_json(stem + ".json", record)
    write_text(stem + ".md", header + "\n\n" + "\n".join(md) + rest)
    written += [stem + ".json", stem + ".md"]

    longctx = {}
    for name in sorted(n for n in files if n.startswith("longctx/") and n.endswith(".json")):
        longctx[name[len("longctx/"):-5]] = json.loads(files[name])
    if longctx:
        order = ["none", "kivi_k4v4", "kivi_k2v2", "kvquant_2bit"]
        names = sorted(longctx, key=lambda n: order.index(n) if n in order else len(order))
        ref = {t: v.get("acc") for t, v in longctx.get("none", {}).get("results", {}).items()}
        rows = ["| recipe | task | n | accuracy | vs none | grid (length: depth -> acc) |", "|---|---|---|---|---|---|"]
        for n in names:
            for task, res in longctx[n].get("results", {}).items():
                acc = res.get("acc")
                delta = f"{acc - ref[task]:+.2f}" if acc is not None and ref.get(task) is not None else ""
                rows.append(f"| {n} | {task} | {res.get('n')} | {acc:.2f} | {delta} | {json.dumps(res.get('grid'))} |")
        stem2 = os.path.join(out, f"kv_longctx_smollm2_{card}_{tag}")
        write_json(stem2 + ".json", {"device": device, "versions": base.get("versions"),
                                     "git_commit": base.get("git_commit"), "runs": longctx})
        grid = next(iter(longctx.values())).get("results", {})
        grid = next(iter(grid.values()), {}).get("grid") or {}
        lengths = sorted(int(k) for k in grid)
        depths = sorted({float(d) for cells in grid.values() for d in cells})
        write_text(stem2 + ".md", "\n".join([
            f"# Passkey and needle on SmolLM2-135M-Instruct, KV-cache recipes ({device})", "",
            "bf16 model on the GPU, every recipe's cache through the decode kernel it selects; lengths "
            f"{', '.join(map(str, lengths))}, depths {', '.join(f'{d:g}' for d in depths)}; n prompts per task "
            "(a few prompts a cell: a coarse accuracy check, one wrong answer moves a cell by 0.5). "
            "Source: scripts/gpu/kv.sh.", ""] + rows) + "\n")
        written += [stem2 + ".json", stem2 + ".md"]
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b", help="a preset (head shapes, weights size)")
    p.add_argument("--contexts", default="32768")
    p.add_argument("--extra-slots", type=int, default=0,
                   help="attention over caches of context + this many slots, as a decode loop's (its context plus the "
                        "tokens it writes; KIVI rounds up to whole 2048-slot tiles): --extra-slots 16 at 32768 gives "
                        "KIVI-2 34816 slots, 17 blocks. The Pallas bf16 baseline takes multiples of 64 slots (else it "
                        "is reported as failed)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--codecs", default="kivi_k2v2,kivi_k4v4", help="kv_cache recipes to time")
    p.add_argument("--calls", type=int, default=32,
                   help="attention calls a timed program (its fixed host cost, ~0.1-0.3 ms, is spread over them)")
    p.add_argument("--no-loop", action="store_true",
                   help="skip the earlier lax.map timing harness (us_loop), kept to compare with older records")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernel-variants", default="",
                   help="time each codec with these kernel settings, warps:stages:splits[:path[:cw2]],... (splits 0: "
                        "automatic; path: auto, mma, cw, cw16, cw2; cw2 options joined by '+': vcN, value channel rows "
                        "a program; kz / nokz, q . zero summed in the keys pass or by XLA; colN, word columns of a tile; kwN / vwN, warps a keys / "
                        "values program; kpN, steps of loads the keys pass keeps in flight; vwg / vcu, the values pass on the "
                        "tensor cores or the f16x2 one; vsN / vpN / vlop3 / varith, its stages, 256-token pieces a step and "
                        "the conversion's and-or as one lop3 or as and + or; vbal / vmid2, its codes centred on their middle or less 2; vxN, "
                        "its splits; ki8 / kcu, the keys pass on the int8 tensor "
                        "cores or the f16x2 one; ksN, its stages), "
                        "e.g. 4:2:0,4:2:0:cw16,4:2:0:auto:vc32; default: the kernel's defaults. The body follows the "
                        "codec's store layout (a recipe name + ':token_rows' forces KIVI's tensor-core body)")
    p.add_argument("--kernel-only", default="", metavar="BATCHES",
                   help="at these batches (e.g. 1 or 1,8), also time each variant's kernel alone "
                        "(no exact tokens, no XLA glue)")
    p.add_argument("--best-env", help="write `export JAXCOMPRESS_KV_NUM_WARPS=..` for the fastest correct "
                                      "kernel variant (batch 1) to this file")
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--write", action="store_true",
                   help="also time one decode step's cache write per layer (bf16 and each codec, at --contexts "
                        "and --batches): with the attention rows, what a codec adds to a decode step")
    p.add_argument("--e2e", action="store_true", help="time end-to-end decode (needs --no-attention: a process "
                                                      "of its own; slow: one compile per cell)")
    p.add_argument("--e2e-contexts", default="8192,16384,32768")
    p.add_argument("--e2e-recipes", default=",kivi_k2v2,kivi_k2v2_w4",
                   help="'' = bf16 cache; name@section.key=value adds overrides; a trailing +fused fuses "
                        "q|k|v and gate|up (e.g. kivi_k2v2_w4+fused, or +fused alone for bf16); a last +wgmma "
                        "repacks 4-bit weights for the Hopper wgmma kernel")
    p.add_argument("--e2e-batch", type=int, default=1)
    p.add_argument("--e2e-steps", type=int, default=32, help="decode steps per timed run")
    p.add_argument("--out", help="folder for kv_bench_<card>.json and .md")
    p.add_argument("--records", metavar="KV_TGZ",
                   help="turn a scripts/gpu/kv.sh result (kv.tgz or its folder) into records in --out "
                        "(default docs/results) and exit")
    p.add_argument("--records-tag", default="run3", help="suffix of the record file names")
    args = p.parse_args(argv)
    if args.e2e and not args.no_attention and not args.records:
        # H100, kv_notes run 15: after the attention benchmark in one process, every e2e row was 3-12%
        # slower than in a fresh process (bf16 11.64 against 11.28-11.35 ms/token, KIVI-2 10.90 against 9.71-9.91)
        p.error("--e2e times end-to-end decode in its own process: add --no-attention (and run the attention "
                "benchmark in another process); after the attention benchmark its rows measured 3-12% slow")

    if args.records:
        for path in records(args.records, args.out or "docs/results", args.records_tag):
            print(f"wrote {path}")
        return 0
    cfg = preset(args.model)
    record = {"model": args.model, **provenance()}
    card = re.sub(r"[^a-z0-9]+", "_", record["device"].split(":")[-1].lower()).strip("_")
    if not args.no_attention:
        bandwidth = copy_bandwidth()
        record["copy_bandwidth_GBps"] = bandwidth / 1e9
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s on {record['device']}", flush=True)
        codecs = {name: codec_for(name, cfg) for name in args.codecs.split(",") if name}
        variants = parse_variants(args.kernel_variants)
        rows = []
        record["attention"] = rows
        done = []

        def checkpoint(row):  # a partial record after every row: a timeout keeps what was measured
            done.append(row)
            if args.best_env:
                write_text(args.best_env, best_env(done))
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                write_json(os.path.join(args.out, f"kv_bench_{card}.partial.json"), {**record, "attention": done})

        for context in _ints(args.contexts):
            for batch in _ints(args.batches):
                rows += attention_benchmark(cfg, codecs, batch, context, args.calls, args.repeats, bandwidth,
                                            kernel_variants=variants or None,
                                            kernel_only=batch in _ints(args.kernel_only),
                                            on_row=checkpoint, loop=not args.no_loop, extra_slots=args.extra_slots)
        if args.best_env:
            write_text(args.best_env, best_env(rows))
    if args.write:
        record["writes"] = [row for context in _ints(args.contexts) for batch in _ints(args.batches)
                            for row in write_benchmark(cfg, {n: codec_for(n, cfg) for n in args.codecs.split(",") if n},
                                                       batch, context, repeats=args.repeats)]
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
        record["e2e"] = rows

        def e2e_checkpoint(row):
            rows.append(row)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                write_json(os.path.join(args.out, f"kv_bench_{card}.partial.json"), record)

        for recipe in args.e2e_recipes.split(","):
            try:
                e2e_decode(f"random:{args.model}", recipe or None, contexts, args.e2e_batch,
                           steps=args.e2e_steps, on_row=e2e_checkpoint)
            except Exception as e:  # noqa: BLE001 - one recipe failing (e.g. W4 path) must not lose the others
                print(f"e2e {recipe or 'bf16'} failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
                record.setdefault("e2e_failed", []).append({"recipe": recipe or "bf16",
                                                            "error": f"{type(e).__name__}: {str(e)[:500]}"})
    table = markdown(record)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, f"kv_bench_{card}.json"), record)
        write_text(os.path.join(args.out, f"kv_bench_{card}.md"), table)


if __name__ == "__main__":
    sys.exit(main())
