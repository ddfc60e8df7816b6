"""Does the W4 GEMV's load path gain from another code layout or load hint? (issue 5, kernel_notes run 10)

For each shape (W4 g128 asymmetric at batch 1: the end-to-end model's projections, fused as
served), every candidate config is timed (CUPTI device time a call, split-K pass included) as

* `native`: the QArray as stored, codes [K / 8, N]: a program reads rows of block_n words at a
  stride of N words;
* `blocked`: the same words stored [N / block_n, K / 8, block_n] (`block_codes`), so each
  program's words are one contiguous run;
* `evict_first`: native, with the code loads hinted `evict_first` (read-once data);

plus the loads-only probe (`probe_matmul`) of the best native config in both layouts, and XLA's
bf16 GEMV on the same shape. Each blocked result is checked against the reference before it is
timed. Writes `$OUT/layout_experiment.json` after every shape and prints a table last.

    PYTHONPATH=. JAX_PLATFORMS=cuda python scripts/gpu/layout_experiment.py --out $OUT --deadline-s 240
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import time

import jax
import jax.numpy as jnp

from jaxcompress.io.atomic import write_json
from pallas_kernels import autotune
from pallas_kernels.benchmark import bf16_timing
from pallas_kernels.layout import kernel_layout
from pallas_kernels.quant_matmul import (TileConfig, _fused, block_codes, probe_matmul, quant_matmul,
                                         quant_matmul_reference)
from pallas_kernels.testing import Variant, random_weight, relative_error

log = logging.getLogger("layout_experiment")
SHAPES = ((4096, 12288), (4096, 22016), (11008, 4096), (4096, 4096))
VARIANT = Variant(4, 128, "asym")
LAYOUTS = ("native", "blocked", "evict_first")


def extra_configs(lay, sms: int) -> list[TileConfig]:
    """Beyond the autotuner's list: more bytes in flight a program (4 tiles a step, prefetched)."""
    base = TileConfig(block_n=64, block_m=1, dequant="h2", acc2d=True, prefetch=True, num_warps=4)
    out = []
    for bn, warps, step in ((64, 4, 4), (128, 8, 2), (32, 2, 4)):
        programs = lay.n // bn
        split = 1
        while programs * split < 2 * sms and lay.num_tiles % (2 * split * step) == 0 and split < 16:
            split *= 2
        out.append(dataclasses.replace(base, block_n=bn, num_warps=warps, tiles_per_step=step, split_k=split))
    return out


def call(layout: str, cfg: TileConfig, interpret: bool):
    if layout == "native":
        return lambda x, w: quant_matmul(x, w, config=cfg, interpret=interpret)
    kw = {"blocked": True} if layout == "blocked" else {"code_eviction": "evict_first"}
    return lambda x, w: _fused(x, w, jnp.float32(0.0), lay=kernel_layout(w), cfg=cfg, interpret=interpret,
                               poisoned=False, **kw)


def stored(layout: str, w, cfg: TileConfig):
    return block_codes(w, cfg.block_n) if layout == "blocked" else w


def run_shape(k: int, n: int, max_candidates: int, interpret: bool = False) -> dict:
    w = random_weight(k * 7 + n, k, n, VARIANT)
    lay = kernel_layout(w)
    sms = autotune.num_sms()
    cands = autotune.candidates(lay, 1, sms=sms)[:max_candidates]
    cands += [c for c in extra_configs(lay, sms)
              if c not in cands and autotune.config_problem(c, lay, 1) is None]
    x = jax.random.normal(jax.random.key(0), (1, k), jnp.float32).astype(jnp.bfloat16)
    ref = quant_matmul_reference(x, w)
    xs, ws = autotune.random_inputs(w, 1, jnp.bfloat16, seed=1)
    rows = []
    for layout in LAYOUTS:
        fns, wss, errs = [], [], []
        for cfg in cands:
            f = call(layout, cfg, interpret)
            try:
                errs.append(relative_error(jax.jit(f)(x, stored(layout, w, cfg)), ref))
            except Exception as e:  # reported, never hidden
                errs.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            fns.append(f)
            wss.append([stored(layout, ww, cfg) for ww in ws])
        for cfg, f, wl, err in zip(cands, fns, wss, errs):
            rec = {"layout": layout, "config": cfg.to_json(), "rel_err": err}
            if not isinstance(err, str):
                try:
                    t = autotune.time_per_call(f, xs, wl)
                    rec.update(device_us=t.device_us, wall_us=t.wall_us)
                except Exception as e:
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(rec)
            log.info("%dx%d %-11s %s -> %s", k, n, layout, cfg, rec.get("device_us", rec.get("error", err)))
    timed = [r for r in rows if r.get("device_us") is not None]
    best = {lo: min((r for r in timed if r["layout"] == lo), key=lambda r: r["device_us"], default=None)
            for lo in LAYOUTS}
    probes = {}
    if best["native"] is not None:
        cfg = TileConfig.from_json(best["native"]["config"])
        for layout, blocked in (("native", False), ("blocked", True)):
            wl = [block_codes(ww, cfg.block_n) if blocked else ww for ww in ws]
            t = autotune.time_per_call(functools.partial(
                lambda x, ww, b: probe_matmul(x, ww, cfg, blocked=b, interpret=interpret), b=blocked), xs, wl)
            probes[layout] = t.best_estimate_us
    base = bf16_timing(k, n, 1)
    return {"k": k, "n": n, "variant": VARIANT.name, "m": 1, "xla_bf16_us": base.best_estimate_us,
            "weight_bytes": sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(w)),
            "best": {lo: (b and {"device_us": b["device_us"], "config": b["config"]}) for lo, b in best.items()},
            "probe_us": probes, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline-s", type=float, default=240)
    ap.add_argument("--max-candidates", type=int, default=6)
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--interpret", action="store_true", help="a dry run on the CPU (use tiny --shapes)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.monotonic()
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    results = []
    for spec in args.shapes.split(","):
        if time.monotonic() - t0 > args.deadline_s:
            log.warning("deadline: %s not run", spec)
            continue
        k, n = map(int, spec.split("x"))
        results.append(run_shape(k, n, args.max_candidates, args.interpret))
        write_json(f"{args.out}/layout_experiment.json", {"meta": meta, "shapes": results})
    bw = 3.35e12 if "H100" in meta["device"] else None
    print(f"{'K x N':>12} {'xla bf16':>9} {'native':>8} {'blocked':>8} {'evict':>8} {'probe':>7} {'probe blk':>9}"
          + ("  native TB/s" if bw else ""))
    for r in results:
        b = {lo: (v["device_us"] if v else float("nan")) for lo, v in r["best"].items()}
        p = r["probe_us"]
        print(f"{r['k']:>5} x {r['n']:<5} {r['xla_bf16_us']:9.2f} {b['native']:8.2f} {b['blocked']:8.2f} "
              f"{b['evict_first']:8.2f} {p.get('native', float('nan')):7.2f} {p.get('blocked', float('nan')):9.2f}"
              + (f"  {r['weight_bytes'] / b['native'] / 1e6:.2f}" if bw else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
