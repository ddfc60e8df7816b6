"""The Mosaic GPU W2 / W4 / W8 kernel (`pallas_kernels/wgmma_matmul.py`) against the Triton kernel and XLA bf16.

For each (K, N, batch): checks `w4_matmul` against the float64 reference on a real random
QArray (symmetric or asymmetric, `--bits` 2, 4 or 8, `--group` 128 or 0 for per channel), then
times each candidate `W4Config` beside the shipped Triton config (`quant_matmul` with the tuning
table's entry), `linear()` on the QArray itself and XLA's bf16 dot, all in this
process and by CUPTI device time, with XLA's own read of the weight's bytes (`read_timing`; bf16 / that
is the speedup a kernel reading as fast as XLA's reduction would reach, the "ceiling"). Writes one
JSON record per point to --out and prints a table.

    python scripts/gpu/wgmma_w4_probe.py --out $OUT/wgmma.json --shapes 4096x4096 --batches 1,16
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxcompress.ops.linear import linear  # noqa: E402
from pallas_kernels import autotune, wgmma_matmul as wm  # noqa: E402
from pallas_kernels.benchmark import bf16_timing, read_timing  # noqa: E402
from pallas_kernels.layout import kernel_layout  # noqa: E402
from pallas_kernels.quant_matmul import quant_matmul  # noqa: E402
from pallas_kernels.testing import Variant, float64_reference, random_activations, random_weight, relative_error  # noqa: E402

log = logging.getLogger("wgmma_w4_probe")


def random_w4(key, k: int, n: int, group_size: int, asym: bool, order: str, block_k: int,
              stored_k: int = 0, bits: int = 4) -> wm.W4Weight:
    """Timing data in the kernel's layout (any int4 / int8 is a valid code), K stored as `stored_k`;
    group_size 0: per channel."""
    kc, ks, kz, kh = jax.random.split(key, 4)
    kk = stored_k or k
    group_size = group_size or k
    mid = 1 << (bits - 1)
    lo, hi = (-8, 8) if bits <= 4 else (-mid, mid)

    def plane(key, per):  # per codes an element: 2-bit pairs and 3-bit codes' planes are int4
        shape = (n // 64, kk // block_k, 64, block_k // per) if block_k else (n, kk // per)
        return jax.random.randint(key, shape, lo, hi, jnp.int8).astype(jnp.int8 if bits == 8 else jnp.int4)

    codes, *high = [plane(kp, per) for kp, per in zip((kc, kh), wm.plane_divisors(bits))]
    # fp16 scales, as the quantizers write them (run 13's calls a-e, before repack kept them, used bf16)
    scale = jax.random.uniform(ks, (max(kk // group_size, 1), n), jnp.float32, 0.001, 0.002).astype(jnp.float16)
    zero = jax.random.randint(kz, scale.shape, 0, 2 * mid).astype(jnp.float16) if asym else None
    return wm.W4Weight(codes=codes, scale=scale, zero=zero, group_size=group_size, shape=(k, n),
                       order=order, block_k=block_k, stored_k=stored_k, bits=bits, high=high[0] if high else None)


def candidate_configs(k: int, n: int, m: int, group_size: int, grid: str = "sym", bits: int = 4) -> list[tuple]:
    """Blocked lop3 layouts at the weight's block (`choose_block_k`): the two fewest split counts
    that fill the GPU (`split_choices`; else the most K allows, `split_counts`), 4 and 8 stages, or
    the most that fit the shared memory at this batch (with the zero points' table if asymmetric)."""
    tile_k = wm.choose_block_k(k, n)
    shell = wm.W4Weight(codes=None, scale=None, zero=None if grid == "sym" else 0, group_size=group_size or k,
                        shape=(k, n), block_k=tile_k, bits=bits)
    base = wm.default_config(shell, min(m, wm.DECODE_MAX_M))  # the decode configs (past it: `gemm_config`)
    out = []
    for s in wm.split_choices(k, n, tile_k)[:2] or wm.split_counts(k, tile_k)[-1:]:
        for stages in (4, 8):
            cfg = dataclasses.replace(base, splits=s, stages=min(stages, k // (tile_k * s)))  # slots used
            cfg = wm.fit_stages(cfg, shell, m)
            order = wm.orders_of(bits)[0]
            if (cfg, order, tile_k, False) not in out:
                out.append((cfg, order, tile_k, False))
    return out


def time_fn(fn, xs, ws):
    """CUPTI time a call (split-K sum included), wall clock, and each kernel's share."""
    t = autotune.time_per_call(fn, xs, ws, breakdown=True)
    kernels = {name: round(us, 2) for name, us in (t.kernels or {}).items()}
    return autotune.rank_us(t), t.wall_us, kernels


def lop3_flag(flags) -> bool | None:
    """W4Config.lop3 from the flags: True (lop3), False (arith) or None (the default)."""
    return True if "lop3" in flags else False if "arith" in flags else None


def parse_configs(text: str) -> list[tuple]:
    """'tile_n:tile_k:splits:stages[+flag...]' comma-separated -> [(W4Config, order, block_k, pad)].

    Flags: loads (the loads-only probe), mul (scale the bf16 weights instead of the group sums),
    prmt (Mosaic GPU's conversion and its column order), natural (8-bit: the unpermuted order and
    Mosaic GPU's relayout; else "paired"), blocked (codes stored 64 x tile_k tiles),
    ws (a memory warpgroup feeding tile_n / 64 compute warpgroups), xla / cluster (where the split
    sums meet, instead of `split_sum_of`'s default), pad (K stored padded with
    zeros to `padded_k`, blocked by tile_k). "default[+flags]" stands for `default_config` at each
    point (`resolve_default`). ovl (`overlap_mma`: one accumulator carried through
    the pipeline, the codes scaled in bf16), fold (`offset_on_acc`: base + code into the tensor cores,
    the offset taken off each group's sum in fp32). mN (`tile_m`: the grid tiles the batch by N rows),
    rN (`rows_per_wg`: N weight rows a compute warpgroup, with ws), bkN (blocked by N columns, read
    in steps of tile_k). lop3 / arith (`lop3`: the conversion's and-or as PTX lop3, or as arith's and + or;
    neither: the config's default; also after "default")."""
    out = []
    for item in filter(None, text.split(",")):
        head, *flags = item.split("+")
        if head == "default":  # resolved per point (`resolve_default`)
            out.append(("default", tuple(flags)))
            continue
        f = [int(v) for v in head.split(":")]
        sizes = {m.group(1): int(m.group(2)) for m in map(re.compile(r"(m|r|bk)(\d+)").fullmatch, flags) if m}
        overlap = "ovl" in flags
        cfg = wm.W4Config(f[0], f[1], f[2], f[3], scale_on_acc="mul" not in flags and not overlap,
                          loads_only="loads" in flags, warp_specialized="ws" in flags, overlap_mma=overlap,
                          offset_on_acc="fold" in flags, lop3=lop3_flag(flags),
                          split_sum="xla" if "xla" in flags else "cluster" if "cluster" in flags else None,
                          tile_m=sizes.get("m", 0), rows_per_wg=sizes.get("r", 64))
        blocked = "blocked" in flags or "pad" in flags or "bk" in sizes
        order = "natural" if "natural" in flags else "prmt" if "prmt" in flags else "lop3"
        out.append((cfg, order, sizes.get("bk", f[1]) if blocked else 0,
                    "pad" in flags))
    return out


def resolve_default(cand: tuple, k: int, n: int, m: int, grid: str, bits: int = 4, group: int = 128) -> tuple:
    """A parsed config, with "default[+ovl|fold|loads|lop3|arith|xla|cluster|gemm[+nobal]]" made concrete for this point: the
    weight as `repack_for_wgmma` lays it out (`stored_layout`), `default_config` at batch m, then
    the flags (ovl: `overlap_mma` with the codes scaled in bf16; fold: `offset_on_acc`; gemm:
    `gemm_config` at any batch; nobal: without its balanced batch tiles; loads: its loads only)."""
    if cand[0] != "default":
        return cand
    flags = cand[1]
    block_k, stored_k = wm.stored_layout(k, n, grouped=group > 0)
    shell = wm.W4Weight(codes=None, scale=None, zero=None if grid == "sym" else 0, group_size=group or k,
                        shape=(k, n), block_k=block_k, stored_k=stored_k if stored_k != k else 0, bits=bits)
    cfg = wm.gemm_config(shell, m, balanced="nobal" not in flags) if "gemm" in flags else wm.default_config(shell, m)
    if "ovl" in flags:
        cfg = dataclasses.replace(cfg, overlap_mma=True, scale_on_acc=False)
    if "fold" in flags:
        cfg = dataclasses.replace(cfg, offset_on_acc=True)
    if "loads" in flags:  # the default's pipeline with its arithmetic left out
        cfg = dataclasses.replace(cfg, loads_only=True)
    if lop3_flag(flags) is not None:
        cfg = dataclasses.replace(cfg, lop3=lop3_flag(flags))
    if "xla" in flags or "cluster" in flags:
        cfg = dataclasses.replace(cfg, split_sum="xla" if "xla" in flags else "cluster")
    # (fit_stages: a cluster's received sums take room)
    order = "natural" if bits == 8 and "natural" in flags else wm.orders_of(bits)[0]
    return wm.fit_stages(cfg, shell, m), order, block_k, stored_k != k


def probe_point(k: int, n: int, m: int, grid: str, max_cands: int, configs: list, bits: int = 4,
                group: int = 128, qarray: bool = True) -> dict:
    """One (K, N, batch) point; qarray=False skips timing `linear()` on the QArray itself (its default
    Triton config at an unmeasured batch, and dequantize-then-dot). In run 22 on an H200, W3 points past batch 1
    took 50-65 s each, against about 13 s at batch 1; this part is the likely difference (not timed apart)."""
    v = Variant(bits, group, grid)
    w = random_weight(3, k, n, v)
    rec: dict = {"k": k, "n": n, "m": m, "grid": grid, "group_size": group, "bits": bits}
    x = random_activations(4, (m, k))
    ref = float64_reference(x, w)
    # "default" may repeat another
    cands = list(dict.fromkeys(resolve_default(c, k, n, m, grid, bits, group) for c in configs))
    cands = cands or candidate_configs(k, n, m, group, grid, bits)[:max_cands]
    errors = {}
    if bits == 8:  # 8-bit orders: "natural" as asked, else the default ("paired")
        cands = [(c[0], c[1] if c[1] == "natural" else wm.ORDERS_8[0], *c[2:]) for c in cands]
    for cand in cands:
        cfg, order, block_k, pad = cand
        if not cfg.loads_only:
            try:
                ww = wm.repack_w4(w, order=order, block_k=block_k, stored_k=wm.padded_k(k, n) if pad else 0)
                errors[cand] = relative_error(wm.w4_matmul(x, ww, cfg), ref)
            except Exception as e:  # the timing below reports it
                log.warning("config %s failed the check: %s", cand, str(e)[:2000])
    rec["rel_err"] = max(errors.values(), default=None)
    n_buf = autotune.buffers_for(k * n * bits // 8)
    keys = jax.random.split(jax.random.key(5), n_buf)
    xs = [random_activations(100 + i, (m, k)) for i in range(autotune.MIN_CALLS)]
    results = []
    for cand in cands:
        cfg, order, block_k, pad = cand
        stored_k = wm.padded_k(k, n) if pad else 0
        desc = {**cfg.__dict__, "order": order, "block_k": block_k, "stored_k": stored_k}
        try:
            wss = [random_w4(kk, k, n, group, grid == "asym", order, block_k, stored_k, bits) for kk in keys]
            desc["lop3"] = wm.lop3_of(cfg, wss[0])  # None resolved
            us, wall, kernels = time_fn(lambda xx, www, c=cfg: wm.w4_matmul(xx, www, c), xs, wss)
            results.append({"config": desc, "us": us, "wall_us": wall, "rel_err": errors.get(cand),
                            "kernels": kernels})
            if m > wm.DECODE_MAX_M and "dequant_dot_us" not in rec:  # what linear() ran past 64 rows before run 17
                rec["dequant_dot_us"] = time_fn(lambda xx, www: xx @ www.dequantize().astype(xx.dtype), xs, wss)[0]
        except Exception as e:  # reported, not fatal: a config Mosaic GPU rejects
            results.append({"config": desc, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            log.warning("config %s failed: %s", desc, str(e)[:2000])
    rec["candidates"] = results
    ok = [r for r in results if "us" in r and not r["config"]["loads_only"] and r.get("rel_err") is not None]
    rec["wgmma_us"] = min((r["us"] for r in ok), default=None)
    rec["wgmma_config"] = min(ok, key=lambda r: r["us"])["config"] if ok else None
    # The shipped Triton kernel, as linear() dispatches it.
    lay = kernel_layout(w)
    entry = autotune.table().lookup(autotune.problem_of(w, m), lay, m)
    if entry is not None and entry.config is not None:
        txs, tws = autotune.random_inputs(w, m, jnp.bfloat16, seed=7)
        rec["triton_us"], _, rec["triton_kernels"] = time_fn(lambda xx, www, c=entry.config: quant_matmul(xx, www, config=c), txs, tws)
        rec["triton_config"] = entry.config.to_json()
    if qarray:  # what linear() runs for the QArray itself today (its tuning-table entry, the default
        # Triton config of an unmeasured batch, or dequantize-then-dot), on random QArrays of this structure
        qxs, qws = autotune.random_inputs(w, m, jnp.bfloat16, seed=9)
        rec["qarray_linear_us"], _, rec["qarray_linear_kernels"] = time_fn(linear, qxs, qws)
        os.environ["JAXCOMPRESS_QUANT_KERNEL"] = "reference"  # read when linear() is traced
        try:  # dequantize-then-dot: what linear() falls back to where no kernel is trusted
            rec["qarray_reference_us"] = time_fn(lambda xx, www: linear(xx, www), qxs, qws)[0]
        finally:
            del os.environ["JAXCOMPRESS_QUANT_KERNEL"]
    bt = bf16_timing(k, n, m)
    rec["xla_bf16_us"] = autotune.rank_us(bt)
    groups = k // group if group else 1
    nbytes = k * n * bits // 8 + groups * n * 2 + (groups * n * 2 if grid == "asym" else 0)  # fp16 tables
    rec["weight_bytes"] = nbytes
    # XLA's own read of as many bytes: a kernel that reads no faster stays above it
    rec["read_floor_us"] = autotune.rank_us(read_timing(nbytes))
    rec["ceiling_vs_bf16"] = rec["xla_bf16_us"] / rec["read_floor_us"]
    if rec["wgmma_us"]:
        rec["wgmma_tb_s"] = nbytes / rec["wgmma_us"] / 1e6
        rec["speedup_vs_bf16"] = rec["xla_bf16_us"] / rec["wgmma_us"]
        if rec.get("triton_us"):
            rec["speedup_vs_triton"] = rec["triton_us"] / rec["wgmma_us"]
    return rec


def best_of_order(rec: dict, order: str) -> tuple[float | None, dict | None]:
    """(us, config) of the fastest checked candidate of a probe point stored in `order`."""
    ok = [c for c in rec.get("candidates", []) if "us" in c and not c["config"]["loads_only"]
          and c.get("rel_err") is not None and c["config"]["order"] == order]
    best = min(ok, key=lambda c: c["us"], default=None)
    return (best["us"], best["config"]) if best else (None, None)


def issue_records(probe: dict, order: str | None = None) -> list[dict]:
    """The probe's points in the issue-5 record format (`quant_matmul_<card>.json`): one record for
    this kernel (its fastest candidate, or the fastest stored in `order`) and one for the QArray as
    linear() runs it (`qarray`: its tuning-table Triton config, else the default of an unmeasured
    batch) or, in probes before that was timed, the table's Triton config (`triton`). The roofline is
    the weight bytes over the card's specified bandwidth (the probe does not measure a copy)."""
    from pallas_kernels.benchmark import spec_bandwidth

    bandwidth = spec_bandwidth(probe["device"])
    out = []
    for r in probe["records"]:
        wgmma_us, wgmma_config = best_of_order(r, order) if order else (r.get("wgmma_us"), r.get("wgmma_config"))
        if wgmma_us is None:
            continue
        floor_us = r["weight_bytes"] / bandwidth * 1e6 if bandwidth else None
        other = (("qarray", r["qarray_linear_us"], "linear() on the QArray") if r.get("qarray_linear_us")
                 else ("triton", r.get("triton_us"), r.get("triton_config")))
        for kernel, us, config in (("wgmma", wgmma_us, wgmma_config), other):
            if us is None:
                continue
            bits, group = r.get("bits", 4), r["group_size"]
            out.append({"variant": f"w{bits}_{f'g{group}' if group else 'ch'}_{r['grid']} {kernel}", "kernel": kernel,
                        "bits": bits,
                        "group_size": r["group_size"], "m": r["m"], "k": r["k"], "n": r["n"],
                        "kernel_us": us, "xla_bf16_us": r["xla_bf16_us"], "speedup": r["xla_bf16_us"] / us,
                        "roofline_fraction": floor_us / us if floor_us else None,
                        "roofline_basis": f"spec {bandwidth / 1e12:.2f} TB/s" if bandwidth else None,
                        "config": config,
                        "rel_err": r["rel_err"] if kernel == "wgmma" else None,
                        "device": probe["device"], "jax": probe["jax"], "commit": probe["commit"]})
    return out


def write_issue_report(probe_paths: list[str], out: str, order: str | None = None) -> None:
    """--report: issue-format JSON, a markdown table and the speedup plot from probe JSONs."""
    from jaxcompress.io.atomic import write_json
    from pallas_kernels.benchmark import plot

    records = [rec for path in probe_paths for rec in issue_records(json.load(open(path)), order)]
    write_json(out, records)
    lines = ["| kernel | K x N | batch | kernel us | XLA bf16 us | speedup | roofline |", "|---|---|---|---|---|---|---|"]
    for r in records:
        roof = f"{r['roofline_fraction']:.0%}" if r["roofline_fraction"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['k']} x {r['n']} | {r['m']} | {r['kernel_us']:.1f} | "
                     f"{r['xla_bf16_us']:.1f} | {r['speedup']:.2f}x | {roof} |")
    base = out[:-len(".json")] if out.endswith(".json") else out
    with open(base + ".md", "w") as f:
        f.write(f"# {', '.join(sorted({r['variant'].split()[0] for r in records}))} on {records[0]['device']}: "
                f"the wgmma kernel and the QArray's own path\n\n"
                f"jax {records[0]['jax']}, commit {records[0]['commit']}; CUPTI time a call, split-K sum "
                f"included, XLA bf16 dot in the same process; roofline = weight bytes / "
                f"{records[0]['roofline_basis']}.\n\n" + "\n".join(lines) + "\n")
    plot(records, base + ".png", records[0]["device"], note="wgmma (Mosaic GPU) vs the QArray as linear() runs it")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="probe JSON (with --report: the issue-format JSON to write)")
    ap.add_argument("--report", nargs="+", help="probe JSONs to turn into --out, its .md table and .png plot")
    ap.add_argument("--report-order", help="with --report: each point's fastest candidate stored in this order "
                                           "(e.g. the default 'paired' of 8-bit codes), not the fastest of all")
    ap.add_argument("--shapes", default="4096x4096,4096x14336")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--grids", default="sym")
    ap.add_argument("--bits", type=int, default=4, choices=wm.BITS)
    ap.add_argument("--group", type=int, default=128, help="group size; 0: per channel")
    ap.add_argument("--max-candidates", type=int, default=8)
    ap.add_argument("--configs", default="", help="tile_n:tile_k:splits:stages[:loads],... (default: a sweep)")
    ap.add_argument("--deadline-s", type=float, default=400)
    ap.add_argument("--no-qarray", action="store_true",
                    help="skip timing linear() on the QArray itself (the slow part of a point at an unmeasured batch)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.report:
        return write_issue_report(args.report, args.out, args.report_order)
    t0 = time.time()
    records = []
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for grid, (k, n), m in itertools.product(args.grids.split(","), shapes,
                                             [int(b) for b in args.batches.split(",")]):
        if time.time() - t0 > args.deadline_s:
            log.warning("deadline: stopping before %s %dx%d m=%d", grid, k, n, m)
            break
        try:
            rec = probe_point(k, n, m, grid, args.max_candidates, parse_configs(args.configs), args.bits, args.group,
                              qarray=not args.no_qarray)
        except Exception as e:
            traceback.print_exc()
            rec = {"k": k, "n": n, "m": m, "grid": grid, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        records.append(rec)
        log.info("%s", json.dumps({key: v for key, v in rec.items() if key != "candidates"}))
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                       "commit": os.environ.get("JAXCOMPRESS_GIT_COMMIT"), "records": records}, f, indent=1)
    print(f"\n{'grid':5} {'K x N':13} {'m':>3} {'err':>8} {'wgmma':>7} {'triton':>7} {'linear':>7} {'bf16':>7} "
          f"{'vs bf16':>7} {'vs tri':>7} {'TB/s':>5} {'read':>6} {'ceiling':>7} {'deq+dot':>7} config")
    for r in records:
        if "error" in r:
            print(f"{r['grid']:5} {r['k']}x{r['n']:<8} {r['m']:>3} ERROR {r['error'][:200]}")
            continue
        f = lambda v, p=".1f": format(v, p) if v is not None else "-"  # noqa: E731
        print(f"{r['grid']:5} {r['k']}x{r['n']:<8} {r['m']:>3} {f(r['rel_err'], '8.1e'):>8} {f(r['wgmma_us']):>7} "
              f"{f(r.get('triton_us')):>7} {f(r.get('qarray_linear_us')):>7} {f(r['xla_bf16_us']):>7} {f(r.get('speedup_vs_bf16'), '.2f'):>7} "
              f"{f(r.get('speedup_vs_triton'), '.2f'):>7} {f(r.get('wgmma_tb_s'), '.2f'):>5} "
              f"{f(r.get('read_floor_us')):>6} {f(r.get('ceiling_vs_bf16'), '.2f'):>7} "
              f"{f(r.get('dequant_dot_us')):>7} {r['wgmma_config']}")


if __name__ == "__main__":
    main()
